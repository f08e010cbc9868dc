"""What every input form shares: load options, errors, 3D volumes to side samples, and assembling a `SliceSet`.

3D inputs (DICOM series + SEG, NIfTI image + label volume) take exactly the node's path, so training
and inference cannot drift apart: images come from `ian_node.segment.pipeline.prepare` (the side stacks of
`ian_node.segment.volume` with the default ROI halves, or with per-side crop boxes when
`LoadOptions.crop` is "boxes" (the paper's manual crop; see `read_crop_boxes`), the coronal reformat, the left side flipped to
right-side orientation, then `model.preprocess` per slice: min-max to uint8, physically square
zero-pad, LANCZOS into `size`, centre pad), and masks come from `ian_node.segment.pipeline.to_model_space`,
the node's own map of a label volume through the same stacks and slice transforms (nearest neighbour).
`slice` is the coronal index in the side's stack (anterior → posterior). A coronal slice is a sample
when its mask is non-empty *in model space* (what the network sees and is scored on); `empty_ratio`
adds nerve-free slices of the same side (`round(ratio × nerve samples)`, drawn with a seed per patient
and side) and `slice_step` keeps every k-th nerve slice (a speed knob for smoke runs: neighbouring
coronal slices are nearly identical).

Bad inputs raise a `DatasetError` naming the file; `LoadOptions.skip_bad` skips the offending source
instead and records why in `LoadReport.skipped`. The format readers (`training.data.dicom`, `.nifti`,
`.paper2d`) feed one `Collector`, which refuses duplicate samples and builds the ordered `SliceSet`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ian_node.segment.pipeline import PreparedSeries, PreparedSide, prepare, to_model_space
from ian_node.segment.reformat import PatientBox
from ian_node.segment.volume import SeriesError, SeriesVolume, Side
from training.data.samples import LoadReport, SampleMeta, SliceSet, SourceReport

logger = logging.getLogger(__name__)

#: Label value meaning "nerve, side decided by position" (an unsided segment split by the ROI halves).
EITHER_SIDE = 255
#: Where per-side crop boxes are read from for `crop="boxes"`: this file next to the SEG (the phantom layout).
CROP_SUMMARY = "summary.json"
#: How each side's region of interest is chosen: the node's default halves or per-study crop boxes.
CROPS: tuple[str, ...] = ("halves", "boxes")


class DatasetError(ValueError):
    """An input that cannot become training samples; the message names the file."""


class MissingSeriesError(DatasetError):
    """A SEG that references a series (or instances) not present in the input tree."""


class UnmatchedSegmentError(DatasetError):
    """A segment whose side (right/left IAN) cannot be told from its codes or label."""


class EmptyMaskError(DatasetError):
    """An annotation with no nerve voxels (or no nerve pixel left at the model size)."""


class DuplicateAnnotationError(DatasetError):
    """Two annotations of the same patient and side: samples would not be unique."""


@dataclass(frozen=True)
class LoadOptions:
    """How inputs become samples; the defaults are the paper's (nerve slices only, 256 px)."""

    size: int = 256
    empty_ratio: float = 0.0
    slice_step: int = 1
    skip_bad: bool = False
    unsided: Literal["error", "split"] = "error"  # DICOM segments without a side
    right_label: int = 1  # NIfTI label values; equal values mean "split by position"
    left_label: int = 2
    seed: int = 0  # for drawing empty slices
    crop: Literal["halves", "boxes"] = "halves"  # per-side ROI: the volume's halves, or CROP_SUMMARY's boxes

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"LoadOptions.size must be an integer >= 16, got {self.size!r}")
        if not (isinstance(self.empty_ratio, (int, float)) and 0 <= self.empty_ratio <= 100):
            raise ValueError(f"LoadOptions.empty_ratio must be within [0, 100], got {self.empty_ratio!r}")
        if not isinstance(self.slice_step, int) or self.slice_step < 1:
            raise ValueError(f"LoadOptions.slice_step must be a positive integer, got {self.slice_step!r}")
        if self.crop not in CROPS:
            raise ValueError(f"LoadOptions.crop must be one of {CROPS}, got {self.crop!r}")
        if self.unsided not in ("error", "split"):
            raise ValueError(f"LoadOptions.unsided must be 'error' or 'split', got {self.unsided!r}")
        for name in ("right_label", "left_label"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 254:
                raise ValueError(f"LoadOptions.{name} must be an integer label value in 1..254, got {value!r}")


# ---------------------------------------------------------------- crop boxes
def read_crop_boxes(summary: Path) -> dict[Side, PatientBox]:
    """Both sides' crop boxes from a study's summary JSON, so that training can crop as the paper did.

    The file holds `"crop_boxes": {"right": [[xmin, xmax], [ymin, ymax], [zmin, zmax]], "left": ...}`
    in patient LPS mm (as `ian_node.phantom` writes them). Anything else is a `DatasetError` naming the file.
    """
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{summary}: crop boxes were asked for (crop 'boxes') but this file does not exist; "
                           "crop by the volume's halves instead") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{summary}: cannot read the crop boxes: {exc}") from exc
    boxes = data.get("crop_boxes") if isinstance(data, dict) else None
    if not isinstance(boxes, Mapping) or not boxes:
        raise DatasetError(f"{summary}: no 'crop_boxes' (right and left boxes in patient mm) although crop "
                           "'boxes' was asked for")
    if sorted(boxes) != sorted(s.value for s in Side):
        raise DatasetError(f"{summary}: crop_boxes must name exactly 'right' and 'left', got {sorted(boxes)}")
    out = {}
    for side in Side:
        value = boxes[side.value]
        try:
            (x0, x1), (y0, y1), (z0, z1) = ((float(lo), float(hi)) for lo, hi in value)
            out[side] = PatientBox(x0, x1, y0, y1, z0, z1)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{summary}: crop_boxes[{side.value!r}] must be [[xmin, xmax], [ymin, ymax], "
                               f"[zmin, zmax]] in mm with min < max, got {value!r}: {exc}") from exc
    return out


# ---------------------------------------------------------------- 3D → 2D, the node's path
@dataclass(frozen=True)
class SideSamples:
    images: np.ndarray
    masks: np.ndarray
    slices: tuple[int, ...]
    nerve_slices: int
    lost_slices: int  # nerve in the source slice but none left at the model size


def side_samples(series: SeriesVolume, side: PreparedSide, nerve: np.ndarray, options: LoadOptions,
                 rng: np.random.Generator) -> SideSamples:
    """One side's samples: `nerve` is a label volume holding this side's label where its nerve is."""
    model_masks = to_model_space(PreparedSeries(series, (side,)), nerve).astype(bool)
    stack = side.stack
    in_source = ((nerve.reshape(-1)[stack.source_index] != 0) & stack.inside).reshape(len(stack.slices), -1).any(1)
    in_model = model_masks.reshape(len(model_masks), -1).any(axis=1)
    chosen = list(np.flatnonzero(in_model)[:: options.slice_step])
    if options.empty_ratio > 0:
        empty = np.flatnonzero(~in_source)
        n_empty = min(len(empty), int(round(options.empty_ratio * len(chosen))))
        chosen += list(rng.choice(empty, size=n_empty, replace=False)) if n_empty else []
    chosen = sorted(int(k) for k in chosen)
    return SideSamples(side.images[chosen], model_masks[chosen], tuple(chosen), int(in_model.sum()),
                       int((in_source & ~in_model).sum()))


def volume_samples(series: SeriesVolume, labels: np.ndarray, side_values: dict[Side, tuple[int, ...]],
                   patient: str, options: LoadOptions,
                   rois: Mapping[Side, PatientBox] | None = None) -> dict[Side, SideSamples]:
    """Samples of each side listed in `side_values` (the label values that count as that side's nerve).

    Images come from the node's own `prepare` (each side cropped to `rois`, default the volume's
    halves); masks from its `to_model_space`, given a label volume that holds the side's label
    wherever one of its values is (so an `EITHER_SIDE` voxel counts for the side whose region holds it).
    """
    if labels.shape != series.shape:
        raise ValueError(f"label volume {labels.shape} does not match image volume {series.shape}")
    out = {}
    for side in prepare(series, options.size, rois).sides:
        values = side_values.get(side.stack.side)
        if values is None:
            continue
        nerve = np.where(np.isin(labels, values), np.uint8(side.stack.side.label), np.uint8(0))
        name = side.stack.side.value
        rng = np.random.default_rng(np.random.SeedSequence(
            [options.seed, int(hashlib.sha256(f"{patient}/{name}".encode()).hexdigest()[:8], 16)]))
        out[side.stack.side] = side_samples(series, side, nerve, options, rng)
    return out


# ---------------------------------------------------------------- assembling sets
@dataclass
class Collector:
    """Accumulates samples per (patient, side), refusing duplicates, and the per-source report."""

    options: LoadOptions
    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    metas: list[SampleMeta] = field(default_factory=list)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)
    keys: set[tuple[str, str, int]] = field(default_factory=set)
    sources: list[SourceReport] = field(default_factory=list)

    def add_sample(self, source: str, meta: SampleMeta, image: np.ndarray, mask: np.ndarray) -> None:
        key = (meta.patient, meta.side, meta.slice)
        if key in self.keys:
            raise DuplicateAnnotationError(f"{source}: a second sample for the same patient, side and slice")
        self.keys.add(key)
        self.images.append(image[None])
        self.masks.append(mask[None])
        self.metas.append(meta)

    def add_sides(self, source: str, patient: str, sides: dict[Side, SideSamples], detail: str) -> None:
        total = sum(len(s.slices) for s in sides.values())
        if total == 0:
            raise EmptyMaskError(f"{source}: no coronal slice carries nerve at {self.options.size} px ({detail})")
        for side in sides:
            owner = self.owners.get((patient, side.value))
            if owner is not None:
                raise DuplicateAnnotationError(
                    f"{source}: the same patient's {side.value} IAN is already annotated in {owner}; "
                    "keep one annotation per patient and side")
        parts = []
        for side, s in sides.items():
            self.owners[(patient, side.value)] = source
            self.images.append(s.images)
            self.masks.append(s.masks)
            self.metas += [SampleMeta(patient, side.value, k) for k in s.slices]
            self.keys.update((patient, side.value, k) for k in s.slices)
            lost = f", {s.lost_slices} lost at {self.options.size} px" if s.lost_slices else ""
            parts.append(f"{side.value}: {len(s.slices)} samples of {s.nerve_slices} nerve slices{lost}")
        self.sources.append(SourceReport(source, "used", f"{detail}; " + "; ".join(parts), total))

    def run(self, source: str, work: Callable[[], None]) -> None:
        """Run one source's work; on a bad input, skip it (reported) if allowed, else raise."""
        try:
            work()
        except (DatasetError, SeriesError, OSError, ValueError) as exc:
            if not self.options.skip_bad:
                raise exc if isinstance(exc, DatasetError) else DatasetError(f"{source}: {exc}") from exc
            logger.warning("skipping %s: %s", source, exc)
            self.sources.append(SourceReport(source, "skipped", str(exc)))

    def build(self, fmt: str, root: Path) -> SliceSet:
        report = LoadReport(fmt, str(root), tuple(self.sources))
        if not self.metas:
            raise DatasetError(f"{root}: no usable samples ({len(report.skipped)} source(s) skipped)")
        images = np.concatenate(self.images)
        masks = np.concatenate(self.masks)
        order = sorted(range(len(self.metas)), key=lambda i: (self.metas[i].patient, self.metas[i].side,
                                                              self.metas[i].slice))
        logger.info("%s dataset: %d samples from %d source(s), %d skipped", fmt, len(order),
                    len(report.sources) - len(report.skipped), len(report.skipped))
        return SliceSet(images[order], masks[order], tuple(self.metas[i] for i in order), report)
