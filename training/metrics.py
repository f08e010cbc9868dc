"""Per-image overlap metrics and the paper's DSC-threshold failure rates.

Definitions, from the pixel counts TP, FP and FN of one binary prediction against its ground truth:

- DSC = 2·TP / (2·TP + FP + FN). The paper prints 2·TP / (TP + FP + FN), which can exceed 1 and is a
  typo; we implement the standard Dice coefficient.
- IoU = TP / (TP + FP + FN)
- precision = TP / (TP + FP)
- recall = TP / (TP + FN)

Empty cases (a denominator of zero), chosen so that every image gets a score and none is dropped
silently from the means, the failure rates or the paired tests:

- ground truth empty and prediction empty (TP + FP + FN = 0): correct "nothing here", so all four
  metrics are 1;
- ground truth present, prediction empty (the paper's "absence of any predicted mask", complete
  failure): DSC = IoU = recall = 0, and precision, formally 0/0, is 0;
- ground truth empty, prediction present: DSC = IoU = precision = 0, and recall, formally 0/0, is 0.

In words: when exactly one side is empty every metric is 0, when both are empty every metric is 1.
The paper's samples are slices that carry nerve, so its ground truth is never empty; these rules
only matter for datasets that keep nerve-free slices. `ImageMetrics.gt_empty` lets a report exclude
such slices explicitly.

Failure rates are cumulative, as in the paper's Table 2: complete failure DSC = 0, tracking failure
DSC < 0.2 (which includes complete failures), boundary-delineation failure DSC < 0.3.

DSC = 0 lumps three different events together, which `complete_failures` separates from the pixel
counts (they partition DSC = 0 exactly):

- **no prediction**: nerve present, nothing predicted (the paper's "absence of any predicted mask");
- **misplaced**: nerve present, something predicted, no overlap (TP = 0, FP > 0);
- **false positive on a nerve-free slice**: no nerve, something predicted. Only datasets that keep
  nerve-free slices (the default `--all-slices`) have these; `false_positive_rate` measures them on
  their own (fraction of nerve-free slices with any predicted pixel, mean FP pixels).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: The four metrics in the order of the paper's Table 1, as field names of `ImageScore`.
METRICS: tuple[str, ...] = ("dsc", "iou", "precision", "recall")
METRIC_LABELS: dict[str, str] = {"dsc": "DSC", "iou": "IoU", "precision": "Precision", "recall": "Recall"}

#: Upper DSC bounds (exclusive) of tracking and boundary-delineation failure.
TRACKING_FAILURE_DSC = 0.2
BOUNDARY_FAILURE_DSC = 0.3


@dataclass(frozen=True)
class ImageMetrics:
    """The pixel counts of one image and the four metrics derived from them."""

    tp: int
    fp: int
    fn: int
    dsc: float
    iou: float
    precision: float
    recall: float

    @property
    def gt_empty(self) -> bool:
        return self.tp + self.fn == 0

    @property
    def prediction_empty(self) -> bool:
        return self.tp + self.fp == 0

    @classmethod
    def from_counts(cls, tp: int, fp: int, fn: int) -> ImageMetrics:
        """Metrics from pixel counts, applying the empty-case rules of the module docstring."""
        if min(tp, fp, fn) < 0:
            raise ValueError(f"pixel counts must be >= 0, got tp={tp}, fp={fp}, fn={fn}")
        if tp + fp + fn == 0:
            return cls(0, 0, 0, 1.0, 1.0, 1.0, 1.0)
        return cls(
            tp=tp,
            fp=fp,
            fn=fn,
            dsc=2 * tp / (2 * tp + fp + fn),
            iou=tp / (tp + fp + fn),
            precision=tp / (tp + fp) if tp + fp else 0.0,
            recall=tp / (tp + fn) if tp + fn else 0.0,
        )


@dataclass(frozen=True)
class ImageScore:
    """One row of the per-image metrics table: which image of which run, its four metrics and pixel counts.

    The counts are None only for scores built from metrics alone (an old per-image CSV); the complete
    failure split and the false-positive table need them.
    """

    model: str
    repeat: int
    patient: str
    side: str
    slice: int
    dsc: float
    iou: float
    precision: float
    recall: float
    tp: int | None = None
    fp: int | None = None
    fn: int | None = None

    @classmethod
    def of(cls, model: str, repeat: int, patient: str, side: str, slice: int, m: ImageMetrics) -> ImageScore:
        return cls(model, repeat, patient, side, slice, m.dsc, m.iou, m.precision, m.recall, m.tp, m.fp, m.fn)

    @property
    def has_counts(self) -> bool:
        return self.tp is not None and self.fp is not None and self.fn is not None

    @property
    def gt_empty(self) -> bool | None:
        """True on a nerve-free slice; None without pixel counts."""
        return None if self.tp is None or self.fn is None else self.tp + self.fn == 0

    @property
    def key(self) -> tuple[int, str, str, int]:
        """Identifies the image across models, for pairing in the statistical tests."""
        return (self.repeat, self.patient, self.side, self.slice)


@dataclass(frozen=True)
class FailureRates:
    """Fractions (0–1) of images in each cumulative failure class, over `n` images."""

    n: int
    complete: float
    tracking: float
    boundary: float


@dataclass(frozen=True)
class CompleteFailures:
    """The DSC = 0 images split by cause, as fractions (0–1) of all `n` images; the three sum to the
    complete-failure rate of `FailureRates`."""

    n: int
    no_prediction: float
    misplaced: float
    fp_nerve_free: float

    @property
    def total(self) -> float:
        return self.no_prediction + self.misplaced + self.fp_nerve_free


@dataclass(frozen=True)
class FalsePositiveRate:
    """False positives on the `n_nerve_free` nerve-free images: the fraction with any predicted pixel
    (NaN when there is no nerve-free image) and the mean number of predicted pixels."""

    n_nerve_free: int
    any_prediction: float
    mean_fp_pixels: float


def image_metrics(prediction: np.ndarray, target: np.ndarray) -> ImageMetrics:
    """DSC, IoU, precision and recall of one binary prediction (bool or 0/1 values) against its mask."""
    pred = _as_binary(prediction, "prediction")
    gt = _as_binary(target, "target")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {gt.shape}")
    tp = int(np.count_nonzero(pred & gt))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(gt)) - tp
    return ImageMetrics.from_counts(tp, fp, fn)


def binarize(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Boolean mask of probabilities at or above `threshold`."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return np.asarray(probabilities) >= threshold


def failure_rates(dsc_values: Iterable[float]) -> FailureRates:
    """The paper's Table 2 rates: DSC = 0, DSC < 0.2 and DSC < 0.3, as fractions of all images."""
    dsc = np.asarray(list(dsc_values), dtype=np.float64)
    if dsc.size == 0:
        raise ValueError("failure rates need at least one DSC value")
    if np.any(~np.isfinite(dsc)) or np.any((dsc < 0) | (dsc > 1)):
        raise ValueError("DSC values must be finite and within [0, 1]")
    return FailureRates(
        n=int(dsc.size),
        complete=float(np.mean(dsc == 0.0)),
        tracking=float(np.mean(dsc < TRACKING_FAILURE_DSC)),
        boundary=float(np.mean(dsc < BOUNDARY_FAILURE_DSC)),
    )


def complete_failures(scores: Iterable[ImageScore]) -> CompleteFailures:
    """DSC = 0 split into no prediction, misplaced prediction and a prediction on a nerve-free slice."""
    counts = _counts(scores)
    if counts.size == 0:
        raise ValueError("complete failures need at least one image")
    tp, fp, fn = counts.T
    nerve = tp + fn > 0
    return CompleteFailures(
        n=int(counts.shape[0]),
        no_prediction=float(np.mean(nerve & (tp + fp == 0))),
        misplaced=float(np.mean(nerve & (tp == 0) & (fp > 0))),
        fp_nerve_free=float(np.mean(~nerve & (fp > 0))),
    )


def false_positive_rate(scores: Iterable[ImageScore]) -> FalsePositiveRate:
    """How often and how much a model predicts on slices without nerve."""
    counts = _counts(scores)
    if counts.size == 0:
        raise ValueError("false-positive rates need at least one image")
    tp, fp, fn = counts.T
    fp_free = fp[tp + fn == 0]
    if fp_free.size == 0:
        return FalsePositiveRate(0, float("nan"), float("nan"))
    return FalsePositiveRate(int(fp_free.size), float(np.mean(fp_free > 0)), float(np.mean(fp_free)))


def _counts(scores: Iterable[ImageScore]) -> np.ndarray:
    """(n, 3) array of tp, fp, fn; an error when a score carries no counts."""
    rows = []
    for s in scores:
        if not s.has_counts:
            raise ValueError(f"model {s.model!r}, repeat {s.repeat}, side {s.side}, slice {s.slice}: no pixel counts")
        rows.append((s.tp, s.fp, s.fn))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def _as_binary(mask: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype == np.bool_:
        return arr
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must be binary (bool or 0/1 values); threshold probabilities first")
    return arr.astype(bool)
