"""From a checkpoint to a result SEG: the node's model loading, its crop, and the SEG of one series version.

Shared by the worker and ``ian-node predict``, so a file-in/SEG-out run builds exactly what the node
would send: the SEG, its TID 1500 SR and, when asked, the probability SEG. UIDs are derived from
(source series, series version, model hash), so a job re-run after a crash produces the same
instances and a PACS sees one result per version.

The crop is checked against the checkpoint when the model is loaded (`check_crop_compatible`), so a
node whose configured crop cannot reproduce the checkpoint's training crop refuses to start rather
than segmenting every series in the wrong region.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pydicom.dataset import Dataset

from ian_node import __version__
from ian_node.config import CropConfig, ModelConfig, check_box
from ian_node.segment.crop import CropMode, CropRequest, check_crop_compatible
from ian_node.segment.measure import measure_labels
from ian_node.segment.pipeline import PipelineOptions, PipelineResult
from ian_node.segment.qa import SideQA, Verdict
from ian_node.segment.reformat import PatientBox
from ian_node.segment.seg import (
    AlgorithmInfo,
    EmptySegments,
    build_probability_segmentation,
    build_segmentation,
)
from ian_node.segment.sr import build_measurement_report
from ian_node.segment.volume import Side
from ian_node.uids import derived_uid
from model.checkpoint import BUNDLED_CHECKPOINT, LoadedCheckpoint, load_checkpoint
from model.localiser import LoadedLocaliser, load_localiser
from model.predictor import Predictor, PredictorOptions

logger = logging.getLogger(__name__)

#: Result series numbers are this plus the source series version, so each version is told apart.
SEG_SERIES_NUMBER_BASE = 9000
#: The probability SEG's series number sits this far above its SEG's (the SR's: `sr.SR_SERIES_OFFSET`).
PROBABILITY_SERIES_OFFSET = 1000


def crop_request(mode: str, right: Any = None, left: Any = None) -> CropRequest:
    """A `CropRequest` from a mode and [[x_min, x_max], [y_min, y_max], [z_min, z_max]] boxes (LPS mm)."""
    boxes = None
    if right is not None and left is not None:
        boxes = {Side.RIGHT: _patient_box(check_box("right", right)),
                 Side.LEFT: _patient_box(check_box("left", left))}
    return CropRequest(CropMode(mode), boxes)


def _patient_box(box: tuple[tuple[float, float], ...]) -> PatientBox:
    return PatientBox(*(v for pair in box for v in pair))


def configured_crop(config: CropConfig) -> CropRequest:
    """The ``[crop]`` section's request."""
    return crop_request(config.mode, config.right, config.left)


def request_record(config: CropConfig) -> dict[str, Any]:
    """The configured crop as a job records it (``"source": "config"``; see `ian_node.storage.records.Job`)."""
    boxes = config.boxes or {}
    return {"mode": config.mode, "right": _lists(boxes.get("right")), "left": _lists(boxes.get("left")),
            "source": "config"}


def _lists(box: Any) -> list[list[float]] | None:
    return None if box is None else [list(pair) for pair in box]


def request_from_record(record: Mapping[str, Any]) -> CropRequest:
    """A job's recorded crop request back as a `CropRequest`."""
    return crop_request(record["mode"], record.get("right"), record.get("left"))


def pipeline_options(config: CropConfig, request: CropRequest | None = None) -> PipelineOptions:
    """The pipeline's options for the ``[crop]`` section; `request` replaces its mode and boxes (a job's own)."""
    return PipelineOptions(crop=request or configured_crop(config), min_confidence=config.min_confidence,
                           segment_when_not_found=config.segment_when_not_found)


def load_crop_localiser(config: CropConfig) -> LoadedLocaliser | None:
    """The configured (or bundled) localiser when the crop mode is ``auto``; None otherwise."""
    if config.mode != CropMode.AUTO:
        return None
    localiser = load_localiser(config.localiser)
    meta = localiser.meta
    logger.info("localiser %s (region %s, sha256 %s, min confidence %.2f%s)", localiser.path.name, meta.region,
                localiser.sha256[:12], meta.min_confidence if config.min_confidence is None else config.min_confidence,
                "" if config.min_confidence is None else " from the config")
    return localiser


def load_predictor(config: ModelConfig, crop: CropConfig | None = None,
                   localiser: LoadedLocaliser | None = None) -> Predictor:
    """The configured checkpoint (or the bundled phantom model) on the configured device.

    With `crop`, refuse (`ian_node.segment.crop.CropError`) a checkpoint whose training crop that
    crop mode cannot reproduce (`localiser`: the one `load_crop_localiser` loaded for ``auto``).
    """
    path = config.checkpoint or BUNDLED_CHECKPOINT
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    checkpoint = load_checkpoint(path)
    if crop is not None:
        check_crop_compatible(checkpoint.meta, crop.mode, localiser)
        paired = checkpoint.meta.crop.get("localiser_sha256")
        if localiser is not None and paired and paired != localiser.sha256:
            logger.warning("the checkpoint was exported with localiser sha256 %s but the node uses %s (%s): same "
                           "crop region, but not the pair train_benchmark made", paired[:12], localiser.sha256[:12],
                           localiser.path.name)
    predictor = Predictor(checkpoint, PredictorOptions(device=config.device, batch_size=config.batch_size))
    logger.info(
        "model %s (%s, sha256 %s) on %s%s",
        checkpoint.meta.architecture, checkpoint.meta.variant, checkpoint.sha256[:12], predictor.device,
        f" [{checkpoint.meta.label}]" if checkpoint.meta.label else "",
    )
    return predictor


def algorithm_info(checkpoint: LoadedCheckpoint) -> AlgorithmInfo:
    meta = checkpoint.meta
    params = {"architecture": meta.architecture, "variant": meta.variant, "input_size": str(meta.input.size)}
    if meta.label:
        params["label"] = meta.label
    return AlgorithmInfo(name=f"ian-node {meta.architecture}", version=__version__,
                         checkpoint_hash=checkpoint.sha256, parameters=params)


def result_segmentation(result: PipelineResult, version: int, checkpoint: LoadedCheckpoint, *,
                        empty_segments: EmptySegments | str = EmptySegments.EMPTY_FRAME,
                        omit_empty_frames: bool = True) -> Dataset:
    """The SEG of one series version, with UIDs that are the same every time it is rebuilt.

    `empty_segments` and `omit_empty_frames` as in `build_segmentation`: by default an empty side keeps
    its segment with one zero frame; with ``omit`` it is left out (`seg.omitted_sides`, `omitted_flag`)
    and both sides empty raise `NoSegmentsError`. `result_report` finds each side's segment by laterality.
    """
    entropy = [result.series.series_uid, str(version), checkpoint.sha256]
    return build_segmentation(
        result.series,
        result.labels,
        algorithm=algorithm_info(checkpoint),
        series_number=SEG_SERIES_NUMBER_BASE + version,
        series_description=f"IAN segmentation (AI) v{version}",
        series_instance_uid=derived_uid(None, "ian-node-result", *entropy, "series"),
        sop_instance_uid=derived_uid(None, "ian-node-result", *entropy, "instance"),
        empty_segments=empty_segments,
        omit_empty_frames=omit_empty_frames,
    )


def result_probability_segmentation(result: PipelineResult, version: int, checkpoint: LoadedCheckpoint, *,
                                    empty_segments: EmptySegments | str = EmptySegments.EMPTY_FRAME,
                                    omit_empty_frames: bool = True) -> Dataset:
    """The FRACTIONAL (PROBABILITY) SEG of a result's per-side probabilities, with rebuild-stable UIDs
    and a series number `PROBABILITY_SERIES_OFFSET` above the SEG's; needs ``keep_probabilities``."""
    if result.probabilities is None:
        raise ValueError("the result has no probabilities: segment with PipelineOptions(keep_probabilities=True)")
    entropy = [result.series.series_uid, str(version), checkpoint.sha256]
    return build_probability_segmentation(
        result.series,
        result.probabilities,
        algorithm=algorithm_info(checkpoint),
        series_number=SEG_SERIES_NUMBER_BASE + PROBABILITY_SERIES_OFFSET + version,
        series_description=f"IAN probability (AI) v{version}",
        series_instance_uid=derived_uid(None, "ian-node-probability", *entropy, "series"),
        sop_instance_uid=derived_uid(None, "ian-node-probability", *entropy, "instance"),
        empty_segments=empty_segments,
        omit_empty_frames=omit_empty_frames,
    )


def omitted_flag(seg: Dataset) -> str | None:
    """What an operator must read about sides a SEG left out (``empty_segments = "omit"``), or None."""
    omitted = getattr(seg, "omitted_sides", ())
    return " | ".join(f"{side.value} segment left out: empty" for side in omitted) or None


def result_report(result: PipelineResult, seg: Dataset) -> Dataset:
    """The TID 1500 SR of a result: each side's length, volume and diameters (`measure_labels`) and QA,
    referencing `seg`'s segments; its UIDs derive from the SEG's, so a rebuilt pair matches again."""
    measurements = measure_labels(result.labels, np.asarray(result.series.volume.affine))
    return build_measurement_report(seg, result.series, measurements, qa=result.qa)


def qa_flag(qa: Sequence[SideQA]) -> str | None:
    """What an operator must read about a result's QA: each failed side and why (None: no side failed)."""
    failed = [f"QA FAIL {q.side}: {'; '.join(q.reasons)}" for q in qa if q.verdict is Verdict.FAIL]
    return " | ".join(failed) or None


def qa_summary(qa: Sequence[SideQA]) -> str:
    """The verdicts in one phrase for a log line ("QA right PASS, left FAIL"); no patient data."""
    return "QA " + ", ".join(f"{q.side} {q.verdict.value}" for q in qa) if qa else "no QA"


def qa_failed(qa: Sequence[SideQA]) -> bool:
    return any(q.verdict is Verdict.FAIL for q in qa)
