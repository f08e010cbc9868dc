"""Model-space samples from generated phantoms, made by the node's own path.

One function, `phantom_slice_set`: generate_phantom → DICOM MR series (`build_mr_series`) →
`load_series` → `prepare` (side crops, coronal slices, the paper's slice transform) → ground truth by
`to_model_space`. The bundled model (`training.default_model`) and the difficulty checks
(`training.baselines`, `benchmarks/phantom_difficulty.py`) take their slices from here, so what they
train or score on is what the node would feed its network for that study.

Crops: "halves" is the node's default (each half of the volume, `rois=None`); "boxes" is each
phantom's per-side manual crop (`Phantom.crop_boxes`), as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import numpy as np

from ian_node.phantom.mr_series import build_mr_series
from ian_node.phantom.study import Phantom, PhantomConfig, generate_phantom
from ian_node.segment.pipeline import prepare, to_model_space
from ian_node.segment.reformat import PatientBox
from ian_node.segment.volume import Side, load_series
from model.preprocess import DEFAULT_SIZE
from training.data.collect import CROPS
from training.data.samples import LoadReport, SampleMeta, SliceSet, SourceReport

Crop = Literal["halves", "boxes"]  # as `training.data.LoadOptions.crop`


def phantom_slice_set(
    patients: Iterable[int],
    seed: int,
    config: PhantomConfig | None = None,
    size: int = DEFAULT_SIZE,
    crop: Crop = "halves",
    empty_fraction: float = 0.0,
    rng_seed: int = 0,
) -> SliceSet:
    """Nerve-carrying slices of each phantom plus a seeded share of empty ones, in phantom order.

    `empty_fraction` is the number of nerve-free slices kept relative to the nerve slices of each
    phantom (0: the paper's samples only; `math.inf`: every slice of both crops). One generator seeded
    by `rng_seed` draws the empty slices of all phantoms in turn, so a set is reproducible.
    """
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if not empty_fraction >= 0.0:
        raise ValueError(f"empty_fraction must be >= 0 (math.inf keeps every slice), got {empty_fraction!r}")
    rng = np.random.default_rng(rng_seed)
    images, masks, metas, sources = [], [], [], []
    for index in patients:
        phantom = generate_phantom(index, seed, config)
        series = load_series(build_mr_series(phantom.volume, phantom.study, phantom.series))
        prepared = prepare(series, size, _rois(phantom) if crop == "boxes" else None)
        gt = to_model_space(prepared, phantom.labels)
        sides = [s.stack.side.value for s in prepared.sides for _ in range(len(s.images))]
        slice_no = [i for s in prepared.sides for i in range(len(s.images))]
        nerve = gt.reshape(len(gt), -1).any(axis=1)
        empty = np.flatnonzero(~nerve)
        wanted = len(empty) if math.isinf(empty_fraction) else int(round(empty_fraction * nerve.sum()))
        keep = np.sort(np.concatenate([np.flatnonzero(nerve), rng.choice(empty, min(len(empty), wanted),
                                                                          replace=False)]))
        images.append(prepared.images[keep])
        masks.append(gt[keep].astype(bool))
        metas += [SampleMeta(phantom.study.patient_id, sides[k], slice_no[k]) for k in keep]
        sources.append(SourceReport(phantom.study.patient_id, "used",
                                    f"patient {index} of seed {seed}, crop {crop}: {int(nerve.sum())} nerve slices "
                                    f"of {len(nerve)}", len(keep)))
    report = LoadReport("phantom", f"seed={seed}", tuple(sources))
    if not images:
        return SliceSet(np.zeros((0, size, size), np.uint8), np.zeros((0, size, size), bool), (), report)
    return SliceSet(np.concatenate(images), np.concatenate(masks), tuple(metas), report)


def _rois(phantom: Phantom) -> dict[Side, PatientBox]:
    """The phantom's manual per-side crops keyed as `prepare` wants them."""
    if not phantom.crop_boxes:
        raise ValueError(f"phantom {phantom.study.patient_id} has no crop_boxes for crop 'boxes'")
    return {Side(side): box for side, box in phantom.crop_boxes.items()}
