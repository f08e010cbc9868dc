"""Two trivial segmenters that measure how hard a data set is: a phantom a blob finder solves is no benchmark.

Both work on model-space uint8 slices (n, size, size), the network's own input (`training.data.SliceSet`),
and return boolean masks of the same shape:

- `brightest_blob`: Gaussian smoothing, then the connected blob (`scipy.ndimage.label`) around the
  smoothed maximum above a threshold relative to that maximum, optionally cut to its brightest pixels
  when it is larger than a nerve could be. The nerve is bright on MR neurography; so are its look-alikes.
- `percentile_threshold`: everything above a global intensity percentile of the slice or of the whole
  crop (one side of one patient).

Each has a small parameter grid, given at the paper's 256 px and scaled to the slice size. `tune` picks
the grid point with the highest mean DSC on tuning slices; `evaluate` scores parameters on other slices
the way the benchmark scores a network: per-image DSC (`training.metrics.image_metrics`) over the slices
that carry nerve, averaged. `benchmarks/phantom_difficulty.py` puts a network next to them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from training.data import SliceSet
from training.metrics import failure_rates, image_metrics

#: The slice size the grids below are written for; other sizes scale lengths and areas.
REFERENCE_SIZE = 256


@dataclass(frozen=True)
class BlobParams:
    sigma: float  # Gaussian smoothing, pixels
    relative_threshold: float  # fraction of the smoothed slice's maximum that the blob keeps
    max_area: int | None = None  # pixels; a larger blob is cut to its brightest max_area pixels


@dataclass(frozen=True)
class PercentileParams:
    percentile: float  # 0-100
    scope: Literal["slice", "volume"] = "slice"  # "volume": one threshold over each side of each patient


Params = BlobParams | PercentileParams


@dataclass(frozen=True)
class Baseline:
    """A named segmenter of a whole SliceSet and the parameter grid it is tuned over."""

    name: str
    segment: Callable[[SliceSet, Any], np.ndarray]
    grid: tuple[Params, ...]


@dataclass(frozen=True)
class BaselineScore:
    """A baseline's score with given parameters on the slices of a set that carry nerve."""

    name: str
    params: Params
    mean_dsc: float
    n_slices: int
    tracking_failure: float  # fraction of those slices with DSC < 0.2 (the paper's Table 2)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "params": {"kind": type(self.params).__name__, **asdict(self.params)}}


def smooth(images: np.ndarray, sigma: float) -> np.ndarray:
    """Each slice Gaussian-smoothed in-plane (float32): the blob finder's first step."""
    return ndimage.gaussian_filter(_check_images(images).astype(np.float32), sigma=(0, sigma, sigma))


def brightest_blob(images: np.ndarray, params: BlobParams, smoothed: np.ndarray | None = None) -> np.ndarray:
    """Per slice: the connected blob containing the smoothed maximum, above `relative_threshold` of it.

    `smoothed`, if given, is `smooth(images, params.sigma)` computed once for many thresholds."""
    smoothed = smooth(images, params.sigma) if smoothed is None else smoothed
    out = np.zeros(smoothed.shape, dtype=bool)
    for i, s in enumerate(smoothed):
        peak = np.unravel_index(int(np.argmax(s)), s.shape)
        if s[peak] <= 0:
            continue
        labels, _ = ndimage.label(s >= params.relative_threshold * s[peak])
        blob = labels == labels[peak]
        if params.max_area is not None and np.count_nonzero(blob) > params.max_area:
            values = s[blob]
            blob &= s >= np.partition(values, values.size - params.max_area)[values.size - params.max_area]
        out[i] = blob
    return out


def percentile_threshold(images: np.ndarray, params: PercentileParams, volumes: Sequence[object] | None = None
                         ) -> np.ndarray:
    """Pixels above the `percentile` of their slice, or of their volume (`volumes`: one key per slice)."""
    images = _check_images(images)
    if params.scope == "slice":
        thresholds = np.percentile(images.reshape(len(images), -1), params.percentile, axis=1)
    elif params.scope == "volume":
        if volumes is None or len(volumes) != len(images):
            raise ValueError("percentile_threshold: scope 'volume' needs one volume key per slice")
        keys = np.asarray([str(v) for v in volumes])
        thresholds = np.empty(len(images))
        for key in np.unique(keys):
            chosen = keys == key
            thresholds[chosen] = np.percentile(images[chosen], params.percentile)
    else:
        raise ValueError(f"percentile_threshold: scope must be 'slice' or 'volume', got {params.scope!r}")
    return images > thresholds[:, None, None]


def blob_baseline(size: int = REFERENCE_SIZE) -> Baseline:
    """The brightest-blob baseline with its grid scaled to `size`."""
    scale = size / REFERENCE_SIZE
    grid = tuple(
        BlobParams(round(sigma * scale, 3), rel, None if area is None else max(1, round(area * scale**2)))
        for sigma, rel, area in itertools.product((1.0, 2.0, 4.0, 6.0), (0.6, 0.75, 0.85, 0.9, 0.95),
                                                   (None, 100, 300))
    )
    last: list[tuple[np.ndarray, float, np.ndarray]] = []  # tune walks the grid sigma by sigma: smooth once each

    def segment(slices: SliceSet, params: BlobParams) -> np.ndarray:
        if not (last and last[0][0] is slices.images and last[0][1] == params.sigma):
            last[:] = [(slices.images, params.sigma, smooth(slices.images, params.sigma))]
        return brightest_blob(slices.images, params, last[0][2])

    return Baseline("brightest_blob", segment, grid)


def percentile_baseline() -> Baseline:
    """The global-percentile baseline; its grid does not depend on the slice size."""
    grid = tuple(PercentileParams(q, scope) for scope, q in itertools.product(
        ("slice", "volume"), (95.0, 98.0, 99.0, 99.5, 99.7, 99.8, 99.85, 99.9, 99.95)))
    return Baseline("percentile", _percentile_of_set, grid)


def baselines(size: int = REFERENCE_SIZE) -> tuple[Baseline, ...]:
    return blob_baseline(size), percentile_baseline()


def evaluate(baseline: Baseline, params: Params, slices: SliceSet) -> BaselineScore:
    """Mean per-image DSC over the slices that carry nerve; every slice is segmented (a volume's
    percentile sees its empty slices too)."""
    return _score(baseline.name, params, baseline.segment(slices, params), slices.masks)


def tune(baseline: Baseline, slices: SliceSet) -> BaselineScore:
    """The grid point with the highest mean DSC on `slices` (the first on ties), with that score."""
    if not slices.masks.any():
        raise ValueError(f"tune {baseline.name}: the tuning slices carry no nerve")
    return max((evaluate(baseline, params, slices) for params in baseline.grid), key=lambda s: s.mean_dsc)


def _percentile_of_set(slices: SliceSet, params: PercentileParams) -> np.ndarray:
    return percentile_threshold(slices.images, params, [(m.patient, m.side) for m in slices.metas])


def _score(name: str, params: Params, predictions: np.ndarray, targets: np.ndarray) -> BaselineScore:
    nerve = np.flatnonzero(targets.reshape(len(targets), -1).any(axis=1))
    if nerve.size == 0:
        raise ValueError(f"evaluate {name}: no slice carries nerve")
    dsc = [image_metrics(predictions[i], targets[i]).dsc for i in nerve]
    return BaselineScore(name, params, float(np.mean(dsc)), int(nerve.size), failure_rates(dsc).tracking)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected slices of shape (n, size, size), got {images.shape}")
    return images
