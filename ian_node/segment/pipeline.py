"""One series from source images to a right/left IAN label volume in source voxels.

Pure: no I/O beyond reading its inputs. Split in two around the network so that the exact geometry
can be checked without one: `prepare` takes the series to model-space slices, `finish` takes
model-space probabilities back to source voxels, links each side's detections into one tract and
judges it (`ian_node.segment.tract`, `ian_node.segment.qa`). `segment_series` is
load → crop (`ian_node.segment.crop`: the localiser, halves or given boxes) → prepare → predictor →
finish, timed per stage. When the localiser finds no plausible mandible the network does not run:
`NoRegionError` says why and carries the crop, unless the options say to segment anyway.
A 2.5D model (context K) is fed each slice's window of K adjacent slices of its side's coronal stack
(`PreparedSeries.inputs`), the same windows its training samples were cut with.
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
from ian_node.segment.qa import SideQA, judge
from ian_node.segment.reformat import CoronalStack, PatientBox, RoiError, default_rois, side_stacks, stack_to_volume
from ian_node.segment.seg import NoSegmentsError
from ian_node.segment.tract import DEFAULT_MAX_GAP_MM, Tract, trace_tract
from ian_node.segment.volume import MalformedDatasetError, SeriesError, SeriesVolume, Side, load_series
from model.localiser import LoadedLocaliser
from model.preprocess import (
    SliceTransform,
    check_context,
    context_windows,
    image_to_model,
    mask_to_model,
    plan_slice_transform,
    probabilities_from_model,
)


class SlicePredictor(Protocol):
    """What the pipeline needs of a model: `PreparedSeries.inputs(context)` in, probabilities (N, size, size) out.

    `context` is the number of adjacent coronal slices per input (`model.checkpoint.InputContract.context`):
    1 feeds uint8 slices (N, size, size), K > 1 each slice's window (N, K, size, size).
    """

    size: int
    context: int

    def predict(self, images: np.ndarray) -> np.ndarray: ...


def predictor_context(predictor: SlicePredictor) -> int:
    """The predictor's context; 1 for a predictor that names none (one written before 2.5D inputs)."""
    return int(getattr(predictor, "context", 1))


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
    #: The tract step per side (`ian_node.segment.tract`): gaps up to this long (mm, along the tract)
    #: are filled and islands off the tract dropped. None turns the clean-up off: the labels are the
    #: network's thresholded masks, and QA still judges the tract traced at the default.
    max_gap_mm: float | None = DEFAULT_MAX_GAP_MM
    #: Keep each side's probabilities in source voxels on the result (`PipelineResult.probabilities`),
    #: for the probability SEG; off, no volume-sized copy is made.
    keep_probabilities: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.max_gap_mm is not None and self.max_gap_mm < 0:
            raise ValueError(f"max_gap_mm must be >= 0 or None, got {self.max_gap_mm}")


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

    def inputs(self, context: int = 1) -> np.ndarray:
        """What the network is fed, sides in order: the slices (N, size, size) for context 1; for context
        K each slice's window of K adjacent slices of its own side's stack (N, K, size, size), the edge
        slice repeated past the stack's ends (`model.preprocess.context_windows`, as training samples)."""
        if check_context(context) == 1:
            return self.images
        return np.concatenate([s.images[context_windows(len(s.images), context)] for s in self.sides], axis=0)


@dataclass(frozen=True)
class PipelineResult:
    series: SeriesVolume
    labels: np.ndarray  # uint8, source voxel geometry: 0 background, 1 right IAN, 2 left IAN
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    #: The crop used per side; `crop.problem` is set when the series was segmented without a found
    #: region (``segment_when_not_found``). None only for results built outside `segment_series`.
    crop: CropResult | None = None
    #: Per-side QA of the tract (`ian_node.segment.qa`), right then left; empty only for results
    #: built outside `segment_series`.
    qa: tuple[SideQA, ...] = ()
    #: Each side's network probability in source voxels (float32, the series' shape, 0 outside the
    #: side's crop), before thresholding and the tract step; None unless `options.keep_probabilities`.
    probabilities: dict[Side, np.ndarray] | None = None

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


@dataclass(frozen=True)
class SideMap:
    """One side's probabilities in source voxels, over the index box its region covers (0 elsewhere
    in the box): the crop's size, not the series'."""

    box: tuple[slice, slice, slice]
    values: np.ndarray  # float32, the box's shape


@dataclass(frozen=True)
class SideTract:
    """One side's tract (`trace_tract`), traced in `box` of the source voxels."""

    box: tuple[slice, slice, slice]
    tract: Tract


def side_probabilities(prepared: PreparedSeries, probabilities: np.ndarray) -> dict[Side, SideMap]:
    """Model-space probabilities (in `prepared.images` order) → each side's probabilities in source
    voxels: what the tract step follows between the detections."""
    expected = sum(len(s.images) for s in prepared.sides)
    if probabilities.shape[0] != expected:
        raise ValueError(f"expected probabilities for {expected} slices, got {probabilities.shape[0]}")
    out, start = {}, 0
    for side in prepared.sides:
        n, stack = len(side.images), side.stack
        back = np.stack([probabilities_from_model(p, side.transform) for p in probabilities[start : start + n]])
        index = np.stack(np.unravel_index(stack.source_index[stack.inside], prepared.series.shape), axis=1)
        lo, hi = index.min(axis=0), index.max(axis=0) + 1
        values = np.zeros(tuple(hi - lo), dtype=np.float32)
        values[tuple((index - lo).T)] = back[stack.inside]
        out[stack.side] = SideMap(tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)), values)
        start += n
    return out


def volume_probabilities(maps: Mapping[Side, SideMap], shape: tuple[int, ...]) -> dict[Side, np.ndarray]:
    """Each side's map spread over the whole series (float32, 0 outside its box): the probability SEG's input."""
    out = {}
    for side, side_map in maps.items():
        values = np.zeros(shape, dtype=np.float32)
        values[side_map.box] = side_map.values
        out[side] = values
    return out


def finish_series(prepared: PreparedSeries, probabilities: np.ndarray, options: PipelineOptions,
                  crop: CropResult | None = None) -> tuple[np.ndarray, tuple[SideQA, ...]]:
    """Model-space probabilities → uint8 labels in source voxels (thresholded, then the tract step
    unless `options.max_gap_mm` is None) and each side's QA (with `crop`'s localiser confidence)."""
    return _finish_maps(prepared, side_probabilities(prepared, probabilities), options, crop)


def _finish_maps(prepared: PreparedSeries, maps: Mapping[Side, SideMap], options: PipelineOptions,
                 crop: CropResult | None) -> tuple[np.ndarray, tuple[SideQA, ...]]:
    """`finish_series` from each side's probabilities in source voxels."""
    labels = raw_labels(prepared, maps, options.threshold)
    gap = DEFAULT_MAX_GAP_MM if options.max_gap_mm is None else options.max_gap_mm
    tracts = trace_sides(labels, prepared.series, gap, maps, options.threshold)
    if options.max_gap_mm is not None:
        apply_tracts(labels, tracts)
    confidence = {side: None if crop is None or side not in crop.sides else crop.sides[side].confidence
                  for side in Side}
    return labels, tuple(judge(side.value, tracts[side].tract, confidence[side], gap) for side in Side)


def raw_labels(prepared: PreparedSeries, maps: Mapping[Side, SideMap], threshold: float) -> np.ndarray:
    """The network's own answer in source voxels (uint8 `Side.label`s): each side's probabilities
    thresholded, before the tract step; what the benchmark scores per nerve."""
    masks = []
    for side in prepared.sides:  # each stack pixel's probability, read back from its side's map
        stack, box = side.stack, maps[side.stack.side].box
        index = np.stack(np.unravel_index(stack.source_index[stack.inside], prepared.series.shape), axis=1)
        mask = np.zeros(stack.source_index.shape, dtype=bool)
        mask[stack.inside] = maps[stack.side].values[tuple((index - [b.start for b in box]).T)] >= threshold
        masks.append(mask)
    return stack_to_volume([s.stack for s in prepared.sides], masks, prepared.series)  # refuses overlaps


def finish(prepared: PreparedSeries, probabilities: np.ndarray, options: PipelineOptions) -> np.ndarray:
    """The labels of `finish_series` alone (no QA): model-space probabilities → labels in source voxels."""
    return finish_series(prepared, probabilities, options)[0]


def trace_sides(labels: np.ndarray, series: SeriesVolume, max_gap_mm: float,
                maps: Mapping[Side, SideMap] | None = None, threshold: float = 0.5) -> dict[Side, SideTract]:
    """Each side's tract (`trace_tract`) through its probabilities, or through its labels as a 0/1
    map over the whole volume where none are given (a label volume read back from a SEG, say)."""
    affine = np.asarray(series.volume.affine, dtype=np.float64)
    out = {}
    for side in Side:
        if maps is None:
            box = tuple(slice(0, n) for n in labels.shape)
            values = (labels == side.label).astype(np.float32)
        else:
            box, values = maps[side].box, maps[side].values
        shift = np.eye(4)
        shift[:3, 3] = [b.start for b in box]
        out[side] = SideTract(box, trace_tract(values, affine @ shift, threshold, max_gap_mm))
    return out


def apply_tracts(labels: np.ndarray, tracts: Mapping[Side, SideTract]) -> np.ndarray:
    """Each side's labels replaced by its tract, in place: islands off it dropped, filled gaps added
    (never over the other side's voxels)."""
    for side, traced in tracts.items():
        outside = labels == side.label
        outside[traced.box] = False
        labels[outside] = 0  # a side's labels lie in its box; none outside it belong to the tract
        region, mask = labels[traced.box], traced.tract.mask
        region[(region == side.label) & ~mask] = 0
        region[mask & (region == 0)] = side.label
    return labels


def clean_up(labels: np.ndarray, series: SeriesVolume, max_gap_mm: float,
             maps: Mapping[Side, SideMap] | None = None) -> np.ndarray:
    """The tract step `finish` applies, on a label volume, in place (`trace_sides` then `apply_tracts`)."""
    return apply_tracts(labels, trace_sides(labels, series, max_gap_mm, maps))


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
    """The whole job: load → crop → prepare → predict → back to source voxels → tract and QA.

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
    probabilities = predictor.predict(prepared.inputs(predictor_context(predictor)))
    t4 = time.perf_counter()
    maps = side_probabilities(prepared, probabilities)
    labels, qa = _finish_maps(prepared, maps, options, crop)
    kept = volume_probabilities(maps, series.shape) if options.keep_probabilities else None
    t5 = time.perf_counter()
    timings.update(preprocess=t3 - t2, inference=t4 - t3, inverse_postprocess=t5 - t4)
    return PipelineResult(series, labels, timings, crop, qa, kept)


def failure_message(exc: BaseException) -> str:
    """The job error an operator reads: broken data named as such, never a bare exception name."""
    if isinstance(exc, MalformedDatasetError):
        return f"malformed dataset: {exc.problem} (series {exc.series_uid})"
    if isinstance(exc, SeriesError):
        return str(exc)
    if isinstance(exc, RoiError):  # a given crop box that misses the series
        return f"crop: {exc}"
    if isinstance(exc, NoSegmentsError):  # [output] empty_segments = "omit" and no nerve on either side
        return f"no SEG sent: {exc} (output.empty_segments = \"omit\")"
    text = str(exc) if raised_by_us(exc) else redact(str(exc))  # a library may quote header values
    return f"internal error: {text or 'unexpected failure'} (the node's log has the details)"
