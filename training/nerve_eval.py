"""Per-nerve evaluation of the benchmark's runs: each test nerve's whole 3D prediction, in the source series.

The runs are trained and scored per coronal slice in model space (`training.runner`); a surgeon and a
reviewer judge a nerve in 3D, in millimetres. So, after the runs, each test patient's study is read
again through the reader its samples came from (`training.localiser_run.READERS`: DICOM series + SEG,
NIfTI pairs; the generated phantoms are DICOM), cropped exactly as its samples were
(`training.data.collect.Collector.crop` with the samples' load options and crop region), and run
through the node's own path with each run's best weights: `prepare` (side crops, coronal reformat,
slice transform), the node's `Predictor` over every coronal slice of the crop (nerve-free ones
included, whatever the samples kept), and the node's inverse (`side_probabilities`: the exact inverse
of the slice transform and the reformat), thresholded at the protocol's threshold.

**What is scored is the raw network output**: the labels `finish_series` gives with the tract clean-up
off (`PipelineOptions(max_gap_mm=None)`), because that is what the network does (the clean-up is
scored in `benchmarks/tract.py`).
Each side the samples hold for a test patient is scored against that side's whole ground truth in
source voxels (the nerve outside the crop, if any, counts as missed: the node would miss it too) by
`training.nerve_metrics.nerve_row`; the rows of every reported run go to
``reports/per_nerve_metrics.csv`` (columns `training.nerve_metrics.PER_NERVE_COLUMNS`).

Each run's rows are kept in its folder (``per_nerve.json``), keyed by its best checkpoint's SHA-256,
the samples' fingerprint and `EVAL_FORMAT`, so a resumed or re-reported benchmark predicts again only
the runs that changed. The paper's 2D folders hold no 3D geometry: per-nerve metrics are not
available for them, and the step is skipped with that reason (as when the data folder is gone).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ian_node.segment.pipeline import (
    PreparedSeries,
    SlicePredictor,
    predictor_context,
    prepare,
    raw_labels,
    side_probabilities,
)
from ian_node.segment.volume import SeriesError, Side
from model.checkpoint import InputContract
from model.predictor import Predictor, PredictorOptions
from training.data import SliceSet
from training.data.collect import Collector, DatasetError, LoadOptions, sided_labels
from training.localiser_run import READERS, StudyReader
from training.loop import load_weights
from training.nerve_metrics import NerveRow, nerve_row, write_per_nerve_csv
from training.outputs import complete_repeats
from training.presets import Protocol, Runtime
from training.runner import BenchmarkPaths, Ledger, RunRecord, build_model, run_key, write_json
from training.splits import Split

logger = logging.getLogger(__name__)

#: Changes whenever what a run's per-nerve rows mean changes, so that kept rows are recomputed.
EVAL_FORMAT = "ian-node-per-nerve/1"
PER_NERVE_CSV = "per_nerve_metrics.csv"
RUN_CACHE = "per_nerve.json"


@dataclass(frozen=True)
class NerveEvaluation:
    """The per-nerve step's outcome: its rows, the CSV (None when skipped) and a record for the summary."""

    rows: tuple[NerveRow, ...]
    csv: Path | None
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalStudy:
    """One test patient's study, ready for every run: its model-space slices and its sided truth."""

    patient: str
    prepared: PreparedSeries
    truth: np.ndarray  # uint8 `Side.label` per nerve voxel, source voxels
    affine: np.ndarray  # index → patient LPS mm
    sides: tuple[Side, ...]  # the sides the samples hold for this patient and this study annotates


def evaluate_nerves(records: list[RunRecord], ledger: Ledger, paths: BenchmarkPaths, slices: SliceSet,
                    source: dict[str, Any], runtime: Runtime) -> NerveEvaluation:
    """Per-nerve rows of the runs in `records` whose repeat every model finished (the runs every other
    report covers; kept rows reused), written to ``reports/per_nerve_metrics.csv``.

    `source` is the samples' origin as `training.runner.prepare_data` returns it (data folder, format,
    load options).
    """
    started = time.perf_counter()
    fmt = source.get("format", "")
    if fmt not in READERS:
        return _skipped(f"the {fmt!r} form holds no 3D geometry (its slices were cut and cropped when they were "
                        "made): per-nerve metrics are not available")
    reported = set(complete_repeats(records, ledger.protocol.models))
    records = [r for r in records if r.repeat in reported]
    root = paths.phantoms if source.get("data") == "generated phantoms" else Path(source.get("data", ""))
    fingerprint = ledger.fingerprint
    keys = {r.key: _run_identity(paths, r, fingerprint) for r in records}
    kept = {r.key: read_kept_rows(paths.run_dir(r.model, r.repeat), keys[r.key]) for r in records}
    todo = [r for r in records if kept[r.key] is None]
    if todo and not root.is_dir():
        return _skipped(f"the data folder {root} is not there any more")
    fresh = _predict_runs(todo, ledger, paths, slices, source, runtime, root) if todo else {}
    for r in todo:
        keep_rows(paths.run_dir(r.model, r.repeat), keys[r.key], fresh[r.key])
    rows = tuple(row for r in records for row in (kept[r.key] if kept[r.key] is not None else fresh[r.key]))
    csv_path = write_per_nerve_csv(rows, paths.reports / PER_NERVE_CSV)
    seconds = time.perf_counter() - started
    logger.info("per-nerve metrics: %d nerves of %d runs (%d predicted again, %d kept) in %.1f s -> %s", len(rows),
                len(records), len(todo), len(records) - len(todo), seconds, csv_path)
    return NerveEvaluation(rows, csv_path, {
        "status": "written", "path": str(csv_path), "nerves": len(rows), "runs": len(records),
        "runs_predicted": len(todo), "seconds": round(seconds, 2), "scored": "raw network output (no tract clean-up)",
        "geometry": "source series, mm"})


def _skipped(reason: str) -> NerveEvaluation:
    logger.info("per-nerve metrics: skipped (%s)", reason)
    return NerveEvaluation((), None, {"status": "skipped", "reason": reason})


def _predict_runs(todo: list[RunRecord], ledger: Ledger, paths: BenchmarkPaths, slices: SliceSet,
                  source: dict[str, Any], runtime: Runtime, root: Path) -> dict[str, list[NerveRow]]:
    """Rows of each run in `todo`, repeat by repeat: the repeat's test studies read once each, its networks
    built once each."""
    protocol = ledger.protocol
    fields_ = LoadOptions.__dataclass_fields__
    load = LoadOptions(**{k: v for k, v in source.get("load", {}).items() if k in fields_})
    region = slices.report.crop.get("region", "")
    collector = Collector(load)  # the crop rule of the samples (and crop auto's localiser, loaded once)
    sides = defaultdict(set)
    for m in slices.metas:
        sides[m.patient].add(m.side)
    out: dict[str, list[NerveRow]] = {r.key: [] for r in todo}
    by_repeat: dict[int, list[RunRecord]] = defaultdict(list)
    for r in todo:
        by_repeat[r.repeat].append(r)
    for split in ledger.splits:
        runs = by_repeat.get(split.repeat)
        if not runs:
            continue
        test = {p for p in split.test if p in sides}
        predictors: dict[str, Predictor] = {}
        readers = READERS[source["format"]](root, load, test.__contains__, region)
        for study in eval_studies(readers, collector, protocol.size, sides):
            for r in runs:
                if r.model not in predictors:
                    predictors[r.model] = _predictor(protocol, runtime, paths, r, split)
                labels = predict_labels(study, predictors[r.model], protocol.threshold)
                out[r.key] += score_labels(r.model, r.repeat, study, labels)
    return out


def eval_studies(readers: list[StudyReader], collector: Collector, size: int,
                 sides: dict[str, set[str]]) -> Iterator[EvalStudy]:
    """The studies `readers` return (one at a time), cropped by `collector`'s rule and prepared at `size`;
    `sides` names the sides to score per patient (those its samples hold)."""
    for where, read in readers:
        try:
            study = read()
            if study is None:
                continue
            crop = collector.crop(study.series, study.labels, study.landmarks, where)
            prepared = prepare(study.series, size, crop.rois)
        except (DatasetError, SeriesError, OSError, ValueError) as exc:
            # the samples were read from the same file, so this is a source `--skip-bad` left out
            logger.warning("per-nerve metrics: leaving out %s: %s", Path(where).name, exc)
            continue
        truth = sided_labels(study.series, study.labels)
        annotated = set(np.unique(truth).tolist())  # a patient's sides may come from two NIfTI pairs
        yield EvalStudy(study.patient, prepared, truth, np.asarray(study.series.volume.affine, dtype=np.float64),
                        tuple(s for s in Side if s.value in sides[study.patient] and s.label in annotated))


def _predictor(protocol: Protocol, runtime: Runtime, paths: BenchmarkPaths, record: RunRecord,
               split: Split) -> Predictor:
    """The node's predictor over a run's best weights, fed as the run's samples were."""
    net = build_model(protocol, record.model, split)
    load_weights(net, paths.run_dir(record.model, record.repeat) / "checkpoint_best.pt")
    return Predictor.from_model(net, InputContract(size=protocol.size, in_channels=protocol.in_channels,
                                                             context=protocol.context),
                                PredictorOptions(device=runtime.device, amp=protocol.amp,
                                                 batch_size=runtime.eval_batch_size or protocol.batch_size))


def predict_labels(study: EvalStudy, predictor: SlicePredictor, threshold: float) -> np.ndarray:
    """The raw network output in source voxels (uint8 `Side.label`s): every slice of the crop predicted
    (as the predictor's context asks) and mapped back by the node's inverse, before the tract step.

    These are the labels of `finish_series` with the clean-up off (``max_gap_mm=None``), without the
    tract it still traces for QA: on an untrained network's crop-filling output that trace took most
    of the smoke benchmark's per-nerve time.
    """
    probabilities = predictor.predict(study.prepared.inputs(predictor_context(predictor)))
    return raw_labels(study.prepared, side_probabilities(study.prepared, probabilities), threshold)


def score_labels(model: str, repeat: int, study: EvalStudy, labels: np.ndarray) -> list[NerveRow]:
    """The rows of one study's labels (source voxels, `Side.label` values) against its truth, side by side."""
    if labels.shape != study.truth.shape:
        raise ValueError(f"labels {labels.shape} do not match the study's volume {study.truth.shape}")
    return [nerve_row(model, repeat, study.patient, side.value, labels == side.label, study.truth == side.label,
                      study.affine) for side in study.sides]


def _run_identity(paths: BenchmarkPaths, record: RunRecord, fingerprint: str) -> dict[str, Any]:
    """What a run's kept rows must have been computed from."""
    h = hashlib.sha256()
    with (paths.run_dir(record.model, record.repeat) / "checkpoint_best.pt").open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"format": EVAL_FORMAT, "run": run_key(record.model, record.repeat), "checkpoint_sha256": h.hexdigest(),
            "data_fingerprint": fingerprint}


def read_kept_rows(run_dir: Path, identity: dict[str, Any]) -> list[NerveRow] | None:
    """A run's kept rows (its ``per_nerve.json``) when they were computed from `identity`, else None."""
    try:
        data = json.loads((run_dir / RUN_CACHE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if any(data.get(k) != v for k, v in identity.items()):
        return None
    return [NerveRow(**{k: math.nan if v is None else v for k, v in row.items()}) for row in data["rows"]]


def keep_rows(run_dir: Path, identity: dict[str, Any], rows: list[NerveRow]) -> None:
    """Keep a run's rows with what they were computed from (JSON has no NaN: an undefined value is null)."""
    write_json(run_dir / RUN_CACHE, {**identity, "rows": [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(row).items()} for row in rows]})


