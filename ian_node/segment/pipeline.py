"""One series from source images to a right/left IAN label volume in source voxels.

Pure: no I/O beyond reading its inputs. Split in two around the network so that the exact geometry
can be checked without one: `prepare` takes the series to model-space slices, `finish` takes
model-space probabilities back to source voxels and cleans them up in 3D. `segment_series` is
load → crop (`ian_node.segment.crop`: the localiser, halves or given boxes) → prepare → predictor →
finish, timed per stage. When the localiser finds no plausible mandible the network does not run:
`NoRegionError` says why and carries the crop, unless the options say to segment anyway.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
from pydicom.dataset import Dataset

from ian_node.logs import raised_by_us, redact
from ian_node.segment.crop import CropMode, CropRequest, CropResult, NoRegionError, SideCrop, resolve_crop
from ian_node.segment.metadata import check_source_metadata
from ian_node.segment.postprocess import DEFAULT_MAX_GAP_MM, keep_main_tract
from ian_node.segment.reformat import CoronalStack, PatientBox, RoiError, default_rois, side_stacks, stack_to_volume
from ian_node.segment.volume import MalformedDatasetError, SeriesError, SeriesVolume, Side, load_series
from model.localiser import LoadedLocaliser
from model.preprocess import (
    SliceTransform,
    image_to_model,
    mask_to_model,
    plan_slice_transform,
    probabilities_from_model,
)


class SlicePredictor(Protocol):
    """What the pipeline needs of a model: uint8 (N, size, size) slices in, probabilities out."""

    size: int

    def predict(self, images: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class PipelineOptions:
    #: How each side is cropped (`ian_node.segment.crop`): the localiser by default.
    crop: CropRequest = field(default_factory=CropRequest)
    #: Per-side localiser confidence below which no region is found; None: the localiser's own.
    min_confidence: float | None = None
    #: When no region is found: False, do not segment (`NoRegionError`); True, segment in the
    #: localiser's boxes (the halves where a side has none) and mark the result's crop with the problem.
    segment_when_not_found: bool = False
    threshold: float = 0.5
    #: 3D clean-up per side (ian_node.segment.postprocess); None turns it off.
    max_gap_mm: float | None = DEFAULT_MAX_GAP_MM

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


@dataclass(frozen=True)
class PreparedSide:
    stack: CoronalStack
    transform: SliceTransform
    images: np.ndarray  # uint8 (n, size, size): model input for this side


@dataclass(frozen=True)
class PreparedSeries:
    series: SeriesVolume
    sides: tuple[PreparedSide, ...]

    @property
    def images(self) -> np.ndarray:
        """Every side's model-space slices in one batch, sides in order."""
        return np.concatenate([s.images for s in self.sides], axis=0)


@dataclass(frozen=True)
class PipelineResult:
    series: SeriesVolume
    labels: np.ndarray  # uint8, source voxel geometry: 0 background, 1 right IAN, 2 left IAN
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    #: The crop used per side; `crop.problem` is set when the series was segmented without a found
    #: region (``segment_when_not_found``). None only for results built outside `segment_series`.
    crop: CropResult | None = None

    @property
    def voxels(self) -> dict[str, int]:
        return {side.value: int((self.labels == side.label).sum()) for side in Side}


def prepare(series: SeriesVolume, size: int, rois: Mapping[Side, PatientBox] | None = None) -> PreparedSeries:
    """Side crops (left flipped) → coronal slices → the paper's slice transform into size × size."""
    sides = []
    for stack in side_stacks(series, rois).values():
        n, h, w = stack.slices.shape
        transform = plan_slice_transform((h, w), stack.pixel_spacing, size)
        images = np.empty((n, size, size), dtype=np.uint8)
        for i in range(n):
            images[i] = image_to_model(stack.slices[i], transform)
        sides.append(PreparedSide(stack, transform, images))
    return PreparedSeries(series, tuple(sides))


def to_model_space(prepared: PreparedSeries, labels: np.ndarray) -> np.ndarray:
    """A source-geometry label volume mapped forward like the images (1.0 where that side's nerve is)."""
    out = []
    for side in prepared.sides:
        nerve = labels.reshape(-1)[side.stack.source_index] == side.stack.side.label
        nerve &= side.stack.inside
        out.append(np.stack([mask_to_model(m, side.transform) for m in nerve]).astype(np.float32))
    return np.concatenate(out, axis=0)


def finish(prepared: PreparedSeries, probabilities: np.ndarray, options: PipelineOptions) -> np.ndarray:
    """Model-space probabilities (in `prepared.images` order) → uint8 labels in source voxels."""
    expected = sum(len(s.images) for s in prepared.sides)
    if probabilities.shape[0] != expected:
        raise ValueError(f"expected probabilities for {expected} slices, got {probabilities.shape[0]}")
    masks, start = [], 0
    for side in prepared.sides:
        n = len(side.images)
        back = [probabilities_from_model(p, side.transform) for p in probabilities[start : start + n]]
        masks.append(np.stack(back) >= options.threshold)
        start += n
    labels = stack_to_volume([s.stack for s in prepared.sides], masks, prepared.series)
    return labels if options.max_gap_mm is None else clean_up(labels, prepared.series, options.max_gap_mm)


def clean_up(labels: np.ndarray, series: SeriesVolume, max_gap_mm: float) -> np.ndarray:
    """Each side's main tract only (`keep_main_tract`), in place; the 3D clean-up `finish` applies."""
    spacing = tuple(float(s) for s in series.volume.spacing)
    for side in Side:
        nerve = labels == side.label
        if nerve.any():
            kept = keep_main_tract(nerve, spacing, max_gap_mm)
            labels[nerve & ~kept] = 0
    return labels


def fallback_crop(series: SeriesVolume, crop: CropResult) -> CropResult:
    """A crop that was not found, made segmentable: the localiser's boxes, the half where a side has none.

    `problem` stays set, so the result is flagged wherever it is recorded.
    """
    halves = default_rois(series)
    sides = {side: c if c.box is not None else SideCrop(CropMode.HALF, halves[side], c.confidence)
             for side, c in crop.sides.items()}
    return replace(crop, sides=sides)


def segment_series(
    sources: Sequence[Dataset | Path | str] | SeriesVolume,
    predictor: SlicePredictor,
    options: PipelineOptions | None = None,
    localiser: LoadedLocaliser | None = None,
) -> PipelineResult:
    """The whole job: load → crop → prepare → predict → back to source voxels → 3D clean-up.

    `localiser` is needed for crop mode ``auto``. Raises `NoRegionError` when no region is
    found and `options.segment_when_not_found` is false.
    """
    options = options or PipelineOptions()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    series = sources if isinstance(sources, SeriesVolume) else load_series(sources)
    check_source_metadata(series)  # what the SEG cannot be built without fails before the network runs
    t1 = time.perf_counter()
    crop = resolve_crop(series, options.crop, localiser, options.min_confidence)
    t2 = time.perf_counter()
    timings.update(load=t1 - t0, localise=t2 - t1)
    if not crop.found:
        if not options.segment_when_not_found:
            raise NoRegionError(series.series_uid, crop, timings)
        crop = fallback_crop(series, crop)
    prepared = prepare(series, predictor.size, crop.rois)
    t3 = time.perf_counter()
    probabilities = predictor.predict(prepared.images)
    t4 = time.perf_counter()
    labels = finish(prepared, probabilities, options)
    t5 = time.perf_counter()
    timings.update(preprocess=t3 - t2, inference=t4 - t3, inverse_postprocess=t5 - t4)
    return PipelineResult(series, labels, timings, crop)


def failure_message(exc: BaseException) -> str:
    """The job error an operator reads: broken data named as such, never a bare exception name."""
    if isinstance(exc, MalformedDatasetError):
        return f"malformed dataset: {exc.problem} (series {exc.series_uid})"
    if isinstance(exc, SeriesError):
        return str(exc)
    if isinstance(exc, RoiError):  # a given crop box that misses the series
        return f"crop: {exc}"
    text = str(exc) if raised_by_us(exc) else redact(str(exc))  # a library may quote header values
    return f"internal error: {text or 'unexpected failure'} (the node's log has the details)"
