"""What every input form shares: load options, the crop, errors, 3D volumes to side samples, and a `SliceSet`.

3D inputs (DICOM series + SEG, NIfTI image + label volume, generated phantoms) take exactly the node's
path, so training and inference cannot drift apart: images come from `ian_node.segment.pipeline.prepare`
(the side stacks of `ian_node.segment.volume`, each side cropped by the crop below, the coronal
reformat, the left side flipped to right-side orientation, then `model.preprocess` per slice: min-max
to uint8, physically square zero-pad, LANCZOS into `size`, centre pad), and masks come from
`ian_node.segment.pipeline.to_model_space`, the node's own map of a label volume through the same stacks
and slice transforms (nearest neighbour). `slice` is the coronal index in the side's stack (anterior →
posterior).

**The crop** (`LoadOptions.crop`, the node's `ian_node.segment.crop.CropMode` names):

- ``oracle`` (default): the paper's semi-automatic crop. A study's landmark crop when it has one (the
  ``crop_boxes`` of the `CROP_SUMMARY` next to its SEG, as the phantoms write it; region
  ``landmarks``), otherwise the nerve's bounding box grown by `NERVE_MARGINS_MM` (`nerve_margin_boxes`;
  region ``nerve-margins``). One dataset has one region: when some DICOM studies have landmarks and
  others do not, every study is cropped by its nerve margins (and a warning says so), because a
  checkpoint records one crop region and the node's localiser reproduces one.
- ``auto``: the node's localiser (`ian_node.segment.crop.resolve_crop`) finds each side's box, as the
  node will at inference; the region is the localiser's (`LocaliserMeta.region`). A study where it finds
  no mandible is a `DatasetError`.
- ``half``: the volume's left-right halves, whole y and z (the node's first crop), for comparison.

**The samples** (`LoadOptions.nerve_slices_only`): by default every coronal slice of each side's crop,
nerve-free ones included, because that is what the node predicts; with `nerve_slices_only` only the
slices whose mask is non-empty *in model space* (what the network sees and is scored on), the paper's
selection. `slice_step` keeps every k-th of those slices (a speed knob for smoke runs: neighbouring
coronal slices are nearly identical). What was used is recorded in `LoadReport.crop` as the checkpoint
stores it: ``{"region", "trained_with", "samples"}`` (`model.checkpoint.CheckpointMeta.crop`).
With `LoadOptions.context` K > 1 each sample also keeps its window of K adjacent coronal slices of the
side's whole stack (not of the samples: with `slice_step` the neighbours are the stack's adjacent
slices), by `model.preprocess.context_windows`, the rule the node's `PreparedSeries.inputs` uses; the
paper's 2D folders hold single slices and refuse K > 1.

**Millimetres.** Each 3D side's samples record their geometry in `LoadReport.geometry` (`SideGeometry`):
the series' coronal slice spacing, the sampling step used, and the size of a model pixel from the side's
slice transform (`model_pixel_mm`), so that region-wise scores (`training.regions`) measure in mm. The
paper's 2D folders hold no geometry and record none.

Bad inputs raise a `DatasetError` naming the file; `LoadOptions.skip_bad` skips the offending source
instead and records why in `LoadReport.skipped`. The format readers (`training.data.dicom`, `.nifti`,
`.paper2d`, `.phantoms`) feed one `Collector`, which refuses duplicate samples and builds the ordered
`SliceSet`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ian_node.segment.crop import CropMode, CropRequest, resolve_crop
from ian_node.segment.pipeline import PreparedSeries, PreparedSide, prepare, to_model_space
from ian_node.segment.reformat import CORONAL_ORIENTATION, PatientBox, default_rois, split_at_overlap
from ian_node.segment.volume import SeriesError, SeriesVolume, Side
from model.localiser import LoadedLocaliser, load_localiser
from model.preprocess import SliceTransform, SliceTransformError, check_context, context_windows
from training.data.samples import LoadReport, SampleMeta, SideGeometry, SliceSet, SourceReport, sampling_step

logger = logging.getLogger(__name__)

#: Label value meaning "nerve, side decided by position" (an unsided segment split by the ROI halves).
EITHER_SIDE = 255
#: Where a study's landmark crop boxes are read from: this file next to the SEG (the phantom layout).
CROP_SUMMARY = "summary.json"
#: The crop modes training can use (`ian_node.segment.crop.CropMode`; ``box`` needs boxes from a user).
CROPS: tuple[str, ...] = (CropMode.ORACLE.value, CropMode.AUTO.value, CropMode.HALF.value)
#: The sample policies as `CheckpointMeta.crop["samples"]` names them.
SAMPLES_ALL, SAMPLES_NERVE_ONLY = "all", "nerve-only"
#: How far each side's oracle box reaches beyond the bounding box of its nerve voxel centres, in mm.
#: Lateral/medial are away from/towards the midline in x, anterior is lower LPS y, inferior lower z.
#: The rounded medians of the distances from the nerve's bounding box to the paper's landmark crop
#: on 24 `paper`-preset phantoms (seed 101), so that data without landmarks is cropped about alike.
NERVE_MARGINS_MM: dict[str, float] = {"lateral": 20.0, "medial": 22.0, "anterior": 20.0, "posterior": 18.0,
                                      "inferior": 12.0, "superior": 5.0}


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
    """How inputs become samples: the crop, which slices, the model size, and how bad inputs are met."""

    size: int = 256
    crop: str = CropMode.ORACLE.value  # one of CROPS (stored as the plain name: options are written as JSON)
    nerve_slices_only: bool = False  # True: the paper's samples; False: every slice of the crop
    slice_step: int = 1
    localiser: str | None = None  # crop "auto": the localiser checkpoint; None: the bundled one
    skip_bad: bool = False
    unsided: Literal["error", "split"] = "error"  # DICOM segments without a side
    right_label: int = 1  # NIfTI label values; equal values mean "split by position"
    left_label: int = 2
    #: Adjacent coronal slices per sample input (odd; 1: 2D). See `training.data.samples` (2.5D samples).
    context: int = 1

    def __post_init__(self) -> None:
        try:
            check_context(self.context)
        except SliceTransformError as exc:
            raise ValueError(f"LoadOptions.{exc}") from None
        if not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"LoadOptions.size must be an integer >= 16, got {self.size!r}")
        if not isinstance(self.slice_step, int) or self.slice_step < 1:
            raise ValueError(f"LoadOptions.slice_step must be a positive integer, got {self.slice_step!r}")
        if self.crop not in CROPS:
            raise ValueError(f"LoadOptions.crop must be one of {CROPS}, got {self.crop!r}")
        object.__setattr__(self, "crop", CropMode(self.crop).value)
        if not isinstance(self.nerve_slices_only, bool):
            raise ValueError(f"LoadOptions.nerve_slices_only must be True or False, got {self.nerve_slices_only!r}")
        if self.unsided not in ("error", "split"):
            raise ValueError(f"LoadOptions.unsided must be 'error' or 'split', got {self.unsided!r}")
        for name in ("right_label", "left_label"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 254:
                raise ValueError(f"LoadOptions.{name} must be an integer label value in 1..254, got {value!r}")

    @property
    def mode(self) -> CropMode:
        """The crop as the node's `CropMode`."""
        return CropMode(self.crop)

    @property
    def samples(self) -> str:
        """The sample policy's name, as the checkpoint records it."""
        return SAMPLES_NERVE_ONLY if self.nerve_slices_only else SAMPLES_ALL


# ---------------------------------------------------------------- the crop
def find_crop_boxes(summary: Path) -> dict[Side, PatientBox] | None:
    """Both sides' landmark crop boxes from a study's summary JSON, or None when it gives none.

    The file holds `"crop_boxes": {"right": [[xmin, xmax], [ymin, ymax], [zmin, zmax]], "left": ...}`
    in patient LPS mm (as `ian_node.phantom` writes them). No file, or no ``crop_boxes`` key, means
    the study has no landmarks (the oracle crop falls back to nerve margins); a file that cannot be
    read or boxes that are malformed are a `DatasetError` naming the file, since what was meant is unknown.
    """
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{summary}: cannot read the crop boxes: {exc}") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{summary}: expected a JSON object, got {type(data).__name__}")
    if "crop_boxes" not in data:
        return None
    boxes = data["crop_boxes"]
    if not isinstance(boxes, Mapping) or sorted(boxes) != sorted(s.value for s in Side):
        raise DatasetError(f"{summary}: crop_boxes must name exactly 'right' and 'left', got "
                           f"{sorted(boxes) if isinstance(boxes, Mapping) else type(boxes).__name__}")
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


def nerve_margin_boxes(labels: np.ndarray, affine: np.ndarray) -> dict[Side, PatientBox]:
    """Each labelled side's oracle box when a study has no landmarks: its nerve grown by `NERVE_MARGINS_MM`.

    `labels` holds `Side.label` values (1 right, 2 left) in the index order of `affine` (index → LPS mm).
    A side's box is the bounding box of its nerve voxel centres in LPS mm, grown by the margins: for the
    right side (lower x) lateral is x_min and medial x_max, for the left side the other way round;
    anterior is y_min, posterior y_max, inferior z_min, superior z_max. When the two grown boxes overlap
    in x, both are cut at the midpoint of the overlap, so that no voxel belongs to both sides. Sides
    without a voxel are left out.
    """
    m = NERVE_MARGINS_MM
    out: dict[Side, PatientBox] = {}
    for side, points in nerve_points(labels, affine).items():
        if not len(points):
            continue
        (x0, y0, z0), (x1, y1, z1) = points.min(axis=0), points.max(axis=0)
        lower_x, upper_x = (m["lateral"], m["medial"]) if side is Side.RIGHT else (m["medial"], m["lateral"])
        out[side] = PatientBox(*(float(v) for v in (x0 - lower_x, x1 + upper_x, y0 - m["anterior"],
                                                    y1 + m["posterior"], z0 - m["inferior"], z1 + m["superior"])))
    if len(out) == 2:
        out[Side.RIGHT], out[Side.LEFT] = split_at_overlap(out[Side.RIGHT], out[Side.LEFT])
    return out


def nerve_points(labels: np.ndarray, affine: np.ndarray) -> dict[Side, np.ndarray]:
    """LPS mm (n, 3) of every labelled voxel centre per side (labels 1 right, 2 left; index order of `affine`)."""
    affine = np.asarray(affine, dtype=np.float64)
    out = {}
    for side in Side:
        index = np.argwhere(labels == side.label).astype(np.float64)
        out[side] = index @ affine[:3, :3].T + affine[:3, 3]
    return out


def sided_labels(series: SeriesVolume, labels: np.ndarray) -> np.ndarray:
    """`labels` with `EITHER_SIDE` voxels given the side of the half they lie in (as `unsided="split"` means)."""
    either = labels == EITHER_SIDE
    if not either.any():
        return labels
    out = labels.copy()
    index = np.argwhere(either).astype(np.float64)
    affine = np.asarray(series.volume.affine, dtype=np.float64)
    x = index @ affine[0, :3] + affine[0, 3]
    right = default_rois(series)[Side.RIGHT].contains_1d(x, 0)
    out[either] = np.where(right, Side.RIGHT.label, Side.LEFT.label).astype(labels.dtype)
    return out


@dataclass(frozen=True)
class StudyCrop:
    """One study's crop: the boxes to `prepare` (None: the halves), their region, and a line for the report."""

    rois: dict[Side, PatientBox] | None
    region: str
    detail: str


def _box_text(boxes: Mapping[Side, PatientBox]) -> str:
    return "; ".join(f"{s.value} " + " ".join(f"[{lo:.0f}, {hi:.0f}]" for lo, hi in b.bounds)
                     for s, b in boxes.items())


# ---------------------------------------------------------------- 3D → 2D, the node's path
@dataclass(frozen=True)
class SideSamples:
    images: np.ndarray
    masks: np.ndarray
    slices: tuple[int, ...]
    nerve_slices: int  # slices of the side's crop whose mask is non-empty at the model size
    lost_slices: int  # nerve in the source slice but none left at the model size
    slice_mm: float  # between neighbouring coronal slices of the side's stack
    pixel_mm: tuple[float, float]  # (row_mm, col_mm) of a model pixel
    windows: np.ndarray  # int64 (len(slices), K): each sample's window, as coronal indices of the stack
    neighbours: dict[int, np.ndarray]  # coronal index → image, for window slices that are not samples


def coronal_spacing(series: SeriesVolume) -> float:
    """Millimetres between neighbouring coronal slices (`ian_node.segment.reformat`'s stack axis 0, A→P)."""
    canon = series.volume.get_geometry().to_patient_orientation(CORONAL_ORIENTATION)
    return float(canon.spacing[0])


def model_pixel_mm(t: SliceTransform) -> tuple[float, float]:
    """(row_mm, col_mm) of one model pixel: the physically square canvas over the size it was resized to."""
    return (t.padded_shape[0] * t.spacing[0] / t.resized_shape[0],
            t.padded_shape[1] * t.spacing[1] / t.resized_shape[1])


def side_samples(series: SeriesVolume, side: PreparedSide, nerve: np.ndarray, options: LoadOptions) -> SideSamples:
    """One side's samples: `nerve` is a label volume holding this side's label where its nerve is."""
    model_masks = to_model_space(PreparedSeries(series, (side,)), nerve).astype(bool)
    stack = side.stack
    in_source = ((nerve.reshape(-1)[stack.source_index] != 0) & stack.inside).reshape(len(stack.slices), -1).any(1)
    in_model = model_masks.reshape(len(model_masks), -1).any(axis=1)
    candidates = np.flatnonzero(in_model) if options.nerve_slices_only else np.arange(len(in_model))
    chosen = [int(k) for k in candidates[:: options.slice_step]]
    windows = context_windows(len(side.images), options.context, np.asarray(chosen, dtype=np.int64))
    neighbours = {int(k): side.images[k].copy() for k in np.setdiff1d(windows, chosen)}  # not views of the stack
    return SideSamples(side.images[chosen], model_masks[chosen], tuple(chosen), int(in_model.sum()),
                       int((in_source & ~in_model).sum()), coronal_spacing(series), model_pixel_mm(side.transform),
                       windows, neighbours)


def volume_samples(series: SeriesVolume, labels: np.ndarray, side_values: dict[Side, tuple[int, ...]],
                   options: LoadOptions, rois: Mapping[Side, PatientBox] | None = None) -> dict[Side, SideSamples]:
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
        out[side.stack.side] = side_samples(series, side, nerve, options)
    return out


# ---------------------------------------------------------------- assembling sets
@dataclass
class Collector:
    """Accumulates samples per (patient, side), refusing duplicates, the per-source report and the crop used."""

    options: LoadOptions
    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    metas: list[SampleMeta] = field(default_factory=list)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)
    keys: set[tuple[str, str, int]] = field(default_factory=set)
    sources: list[SourceReport] = field(default_factory=list)
    regions: set[str] = field(default_factory=set)  # crop regions of the sources used
    geometry: list[SideGeometry] = field(default_factory=list)  # per 3D side added; none for 2D samples
    windows: list[tuple[int, ...]] = field(default_factory=list)  # per sample: its window's coronal indices
    neighbours: dict[tuple[str, str, int], np.ndarray] = field(default_factory=dict)  # window slices, not samples
    _localiser: LoadedLocaliser | None = field(default=None, repr=False)

    @property
    def localiser(self) -> LoadedLocaliser:
        """The localiser of crop ``auto``, loaded once per dataset."""
        if self._localiser is None:
            self._localiser = load_localiser(self.options.localiser)
            logger.info("crop auto: localiser %s (region %s, sha256 %s)", self._localiser.path.name,
                        self._localiser.meta.region, self._localiser.sha256[:12])
        return self._localiser

    def crop(self, series: SeriesVolume, labels: np.ndarray, landmarks: Mapping[Side, PatientBox] | None,
             where: str) -> StudyCrop:
        """One study's crop under `options.crop` (rules in the module docstring).

        `landmarks` are the study's landmark boxes (None: it has none, or the dataset does not use
        them); `labels` its label volume, for the nerve margins.
        """
        mode = self.options.mode
        if mode is CropMode.HALF:
            return StudyCrop(None, "half", "cropped by the volume's halves")
        if mode is CropMode.ORACLE:
            if landmarks is not None:
                boxes = {Side(k): v for k, v in landmarks.items()}
                return StudyCrop(boxes, "landmarks", f"oracle crop from the landmarks: {_box_text(boxes)}")
            boxes = nerve_margin_boxes(sided_labels(series, labels), np.asarray(series.volume.affine))
            return StudyCrop(boxes, "nerve-margins", f"oracle crop from the nerve margins: {_box_text(boxes)}")
        found = resolve_crop(series, CropRequest(CropMode.AUTO), self.localiser)
        if not found.found:
            raise DatasetError(f"{where}: crop 'auto': {found.problem}")
        confidences = ", ".join(f"{s.value} {c.confidence:.2f}" for s, c in found.sides.items())
        return StudyCrop(found.rois, self.localiser.meta.region,
                         f"auto crop (confidence {confidences}): {_box_text(found.rois)}")

    def add_sample(self, source: str, meta: SampleMeta, image: np.ndarray, mask: np.ndarray) -> None:
        """One single-slice sample (the paper's 2D folders): 2D only, as it comes without its neighbours."""
        if self.options.context > 1:
            raise DatasetError(f"{source}: a single 2D slice has no adjacent slices for context "
                               f"{self.options.context}; 2.5D samples need 3D inputs (DICOM or NIfTI)")
        key = (meta.patient, meta.side, meta.slice)
        if key in self.keys:
            raise DuplicateAnnotationError(f"{source}: a second sample for the same patient, side and slice")
        self.keys.add(key)
        self.windows.append((meta.slice,))
        self.images.append(image[None])
        self.masks.append(mask[None])
        self.metas.append(meta)

    def add_sides(self, source: str, patient: str, sides: dict[Side, SideSamples], detail: str,
                  region: str) -> None:
        """One study's sides (those with nerve at the model size), cropped by a `region` crop."""
        if not sum(s.nerve_slices for s in sides.values()):
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
            self.windows += [tuple(int(c) for c in w) for w in s.windows]
            self.neighbours.update({(patient, side.value, k): image for k, image in s.neighbours.items()})
            self.geometry.append(SideGeometry(patient, side.value, s.slice_mm, sampling_step(s.slices), *s.pixel_mm))
            lost = f", {s.lost_slices} lost at {self.options.size} px" if s.lost_slices else ""
            parts.append(f"{side.value}: {len(s.slices)} samples, {s.nerve_slices} nerve slices{lost}")
        self.regions.add(region)
        self.sources.append(SourceReport(source, "used", f"{detail}; " + "; ".join(parts),
                                         sum(len(s.slices) for s in sides.values())))

    def run(self, source: str, work: Callable[[], None]) -> None:
        """Run one source's work; on a bad input, skip it (reported) if allowed, else raise."""
        try:
            work()
        except (DatasetError, SeriesError, OSError, ValueError) as exc:
            if not self.options.skip_bad:
                raise exc if isinstance(exc, DatasetError) else DatasetError(f"{source}: {exc}") from exc
            logger.warning("skipping %s: %s", source, exc)
            self.sources.append(SourceReport(source, "skipped", str(exc)))

    def crop_record(self, root: Path | str) -> dict[str, Any]:
        """What the samples were cropped by, as `CheckpointMeta.crop` records it (plus the localiser's hash)."""
        if len(self.regions) > 1:  # the readers decide one region per dataset; this guards that rule
            raise DatasetError(f"{root}: the studies were cropped by different regions {sorted(self.regions)}; "
                               "a dataset must use one crop definition")
        record: dict[str, Any] = {"region": next(iter(self.regions), ""), "trained_with": self.options.crop,
                                  "samples": self.options.samples}
        if self.options.mode is CropMode.AUTO:
            record["localiser_sha256"] = self.localiser.sha256
        return record

    def build(self, fmt: str, root: Path | str) -> SliceSet:
        report = LoadReport(fmt, str(root), tuple(self.sources))
        if not self.metas:
            raise DatasetError(f"{root}: no usable samples ({len(report.skipped)} source(s) skipped)")
        report = LoadReport(fmt, str(root), tuple(self.sources), self.crop_record(root),
                            tuple(sorted(self.geometry, key=lambda g: (g.patient, g.side))))
        images = np.concatenate(self.images)
        masks = np.concatenate(self.masks)
        order = sorted(range(len(self.metas)), key=lambda i: (self.metas[i].patient, self.metas[i].side,
                                                              self.metas[i].slice))
        logger.info("%s dataset: %d samples from %d source(s), %d skipped; crop %s", fmt, len(order),
                    len(report.sources) - len(report.skipped), len(report.skipped), report.crop)
        metas = tuple(self.metas[i] for i in order)
        if self.options.context == 1:
            return SliceSet(images[order], masks[order], metas, report)
        extra = sorted(self.neighbours)  # window slices that are not samples, after the samples
        row = {(m.patient, m.side, m.slice): r for r, m in enumerate(metas)}
        row.update({key: len(metas) + j for j, key in enumerate(extra)})
        windows = np.array([[row[(self.metas[i].patient, self.metas[i].side, c)] for c in self.windows[i]]
                            for i in order], dtype=np.int64)
        neighbours = np.stack([self.neighbours[k] for k in extra]) if extra else None
        return SliceSet(images[order], masks[order], metas, report, windows, neighbours)
