"""Training samples: 2D coronal slices that carry nerve, from DICOM studies, NIfTI pairs or the paper's 2D form.

Every input form ends as a `SliceSet`: uint8 model-space images (N, S, S), boolean masks (N, S, S)
and one `SampleMeta` (patient, side, slice) per sample, ordered by (patient, side, slice).

3D inputs (DICOM series + SEG, NIfTI image + label volume) take exactly the node's path, so training
and inference cannot drift apart: images come from `ian_node.segment.pipeline.prepare` (the side stacks of
`ian_node.segment.volume` with the default ROI halves, the coronal reformat, the left side flipped to
right-side orientation, then `model.preprocess` per slice: min-max to uint8, physically square
zero-pad, LANCZOS into `size`, centre pad), and masks take the same stacks and slice transforms
through `model.preprocess.mask_to_model` (nearest neighbour). `slice` is the coronal index in the side's stack
(anterior → posterior). A coronal slice is a sample when its mask is non-empty *in model space*
(what the network sees and is scored on); `empty_ratio` adds nerve-free slices of the same side
(`round(ratio × nerve samples)`, drawn with a seed per patient and side) and `slice_step` keeps every
k-th nerve slice (a speed knob for smoke runs: neighbouring coronal slices are nearly identical).

The 2D form (paper's own): `samples.csv` at the root with columns image, mask, patient, side and
slice (image and mask are paths relative to the root, PNG or JPEG; side is right/left or R/L). An
image already `size`×`size` is used as stored (converted to 8-bit grey); any other size goes through
the same slice transform with square pixels. Masks are grey values ≥ 128 (JPEG-safe). `export_2d`
writes that form losslessly (PNG), so it reads back to identical arrays at the same size.

Bad inputs raise a `DatasetError` naming the file; `LoadOptions.skip_bad` skips the offending source
instead and records why in `LoadReport.skipped`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ian_node.segment.pipeline import PreparedSide, prepare
from ian_node.segment.volume import SeriesError, SeriesVolume, Side
from model.preprocess import image_to_model, mask_to_model, model_input, plan_slice_transform
from training.loop import SampleMeta

log = logging.getLogger(__name__)

Format = Literal["dicom", "nifti", "2d"]
FORMATS: tuple[str, ...] = ("dicom", "nifti", "2d")
#: Label value meaning "nerve, side decided by position" (an unsided segment split by the ROI halves).
EITHER_SIDE = 255
SAMPLES_CSV = "samples.csv"
SAMPLE_FIELDS = ("image", "mask", "patient", "side", "slice")
_SIDE_NAMES = {"right": "right", "r": "right", "rt": "right", "left": "left", "l": "left", "lt": "left"}


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

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"LoadOptions.size must be an integer >= 16, got {self.size!r}")
        if not (isinstance(self.empty_ratio, (int, float)) and 0 <= self.empty_ratio <= 100):
            raise ValueError(f"LoadOptions.empty_ratio must be within [0, 100], got {self.empty_ratio!r}")
        if not isinstance(self.slice_step, int) or self.slice_step < 1:
            raise ValueError(f"LoadOptions.slice_step must be a positive integer, got {self.slice_step!r}")
        if self.unsided not in ("error", "split"):
            raise ValueError(f"LoadOptions.unsided must be 'error' or 'split', got {self.unsided!r}")
        for name in ("right_label", "left_label"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 254:
                raise ValueError(f"LoadOptions.{name} must be an integer label value in 1..254, got {value!r}")


@dataclass(frozen=True)
class SourceReport:
    """What one input unit (a SEG file, a NIfTI pair, a CSV row) gave, or why it was skipped."""

    source: str
    status: Literal["used", "skipped"]
    detail: str
    samples: int = 0


@dataclass(frozen=True)
class LoadReport:
    format: str
    root: str
    sources: tuple[SourceReport, ...] = ()

    @property
    def skipped(self) -> tuple[SourceReport, ...]:
        return tuple(s for s in self.sources if s.status == "skipped")

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "root": self.root, "n_sources": len(self.sources),
                "n_skipped": len(self.skipped), "sources": [asdict(s) for s in self.sources]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadReport:
        return cls(data["format"], data["root"], tuple(SourceReport(**s) for s in data["sources"]))


@dataclass(frozen=True)
class SliceSet:
    """Model-space samples: images uint8 (N, S, S), masks bool (N, S, S), one meta per sample."""

    images: np.ndarray
    masks: np.ndarray
    metas: tuple[SampleMeta, ...]
    report: LoadReport = field(default_factory=lambda: LoadReport("", ""))

    def __post_init__(self) -> None:
        n = len(self.metas)
        if self.images.shape[0] != n or self.masks.shape != self.images.shape or self.images.ndim != 3:
            raise ValueError(f"SliceSet: images {self.images.shape}, masks {self.masks.shape} and {n} metas disagree")
        if self.images.dtype != np.uint8 or self.masks.dtype != np.bool_:
            raise ValueError("SliceSet: images must be uint8 and masks bool")

    def __len__(self) -> int:
        return len(self.metas)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def patients(self) -> list[str]:
        return [m.patient for m in self.metas]

    def index_of(self) -> dict[tuple[str, str, int], int]:
        """(patient, side, slice) → sample index."""
        return {(m.patient, m.side, m.slice): i for i, m in enumerate(self.metas)}

    def torch_dataset(self, indices: Sequence[int], in_channels: int) -> SliceDataset:
        return SliceDataset(self, indices, in_channels)

    def fingerprint(self) -> str:
        """SHA-256 over images, masks and metas: identifies the exact samples a run used."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(np.packbits(self.masks).tobytes())
        h.update(json.dumps([asdict(m) for m in self.metas]).encode())
        return h.hexdigest()


class SliceDataset(Dataset):
    """The training loop's dataset: (image float32 (C, S, S) in [0, 1], mask float32 (1, S, S), meta)."""

    def __init__(self, slices: SliceSet, indices: Sequence[int], in_channels: int) -> None:
        self.slices = slices
        self.indices = np.asarray(indices, dtype=np.int64)
        self.in_channels = in_channels

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, SampleMeta]:
        k = int(self.indices[i])
        image = torch.from_numpy(model_input(self.slices.images[k], self.in_channels))
        mask = torch.from_numpy(self.slices.masks[k][None].astype(np.float32))
        return image, mask, self.slices.metas[k]


# ---------------------------------------------------------------- 3D → 2D, the node's path
@dataclass(frozen=True)
class SideSamples:
    images: np.ndarray
    masks: np.ndarray
    slices: tuple[int, ...]
    nerve_slices: int
    lost_slices: int  # nerve in the source slice but none left at the model size


def side_samples(side: PreparedSide, side_labels: np.ndarray, options: LoadOptions,
                 rng: np.random.Generator) -> SideSamples:
    """One side's samples: `side_labels` (n, h, w) bool says which stack pixels are this side's nerve."""
    size = options.size
    model_masks = (np.stack([mask_to_model(m, side.transform) for m in side_labels]) if len(side_labels)
                   else np.zeros((0, size, size), bool))
    in_source = side_labels.reshape(len(side_labels), -1).any(axis=1)
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
                   patient: str, options: LoadOptions) -> dict[Side, SideSamples]:
    """Samples of each side listed in `side_values` (the label values that count as that side's nerve).

    Images come from the node's own `ian_node.segment.pipeline.prepare`; masks take the same side stacks and
    slice transforms through `mask_to_model`.
    """
    if labels.shape != series.shape:
        raise ValueError(f"label volume {labels.shape} does not match image volume {series.shape}")
    flat = labels.reshape(-1)
    out = {}
    for side in prepare(series, options.size).sides:
        values = side_values.get(side.stack.side)
        if values is None:
            continue
        side_labels = np.isin(flat[side.stack.source_index], values) & side.stack.inside
        name = side.stack.side.value
        rng = np.random.default_rng(np.random.SeedSequence(
            [options.seed, int(hashlib.sha256(f"{patient}/{name}".encode()).hexdigest()[:8], 16)]))
        out[side.stack.side] = side_samples(side, side_labels, options, rng)
    return out


# ---------------------------------------------------------------- assembling sets
@dataclass
class _Collector:
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
            log.warning("skipping %s: %s", source, exc)
            self.sources.append(SourceReport(source, "skipped", str(exc)))

    def build(self, fmt: str, root: Path) -> SliceSet:
        report = LoadReport(fmt, str(root), tuple(self.sources))
        if not self.metas:
            raise DatasetError(f"{root}: no usable samples ({len(report.skipped)} source(s) skipped)")
        images = np.concatenate(self.images)
        masks = np.concatenate(self.masks)
        order = sorted(range(len(self.metas)), key=lambda i: (self.metas[i].patient, self.metas[i].side,
                                                              self.metas[i].slice))
        log.info("%s dataset: %d samples from %d source(s), %d skipped", fmt, len(order),
                 len(report.sources) - len(report.skipped), len(report.skipped))
        return SliceSet(images[order], masks[order], tuple(self.metas[i] for i in order), report)


def load_dataset(root: str | Path, fmt: str, options: LoadOptions = LoadOptions()) -> SliceSet:
    """Read a dataset of format dicom, nifti or 2d into model-space samples."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    if fmt == "dicom":
        from training.dataset_dicom import collect_dicom
        collect: Callable[[Path, _Collector], None] = collect_dicom
    elif fmt == "nifti":
        from training.dataset_nifti import collect_nifti
        collect = collect_nifti
    elif fmt == "2d":
        collect = _collect_2d
    else:
        raise ValueError(f"unknown dataset format {fmt!r}; valid: {', '.join(FORMATS)}")
    collector = _Collector(options)
    collect(root, collector)
    return collector.build(fmt, root)


# ---------------------------------------------------------------- the paper's 2D form
def _read_grey(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)


def _side_name(text: str, where: str) -> str:
    side = _SIDE_NAMES.get(text.strip().lower())
    if side is None:
        raise DatasetError(f"{where}: side must be right/left (or R/L), got {text!r}")
    return side


def _collect_2d(root: Path, collector: _Collector) -> None:
    table = root / SAMPLES_CSV
    if not table.is_file():
        raise DatasetError(f"{table}: missing; the 2d form needs {SAMPLES_CSV} with columns {', '.join(SAMPLE_FIELDS)}")
    with table.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in SAMPLE_FIELDS if c not in (reader.fieldnames or ())]
        if missing:
            raise DatasetError(f"{table}: missing column(s) {missing}; expected {', '.join(SAMPLE_FIELDS)}")
        rows = list(reader)
    size = collector.options.size
    for line, row in enumerate(rows, start=2):
        where = f"{table}:{line}"

        def work(row: dict[str, str] = row, where: str = where) -> None:
            patient = row["patient"].strip()
            if not patient:
                raise DatasetError(f"{where}: empty patient")
            side = _side_name(row["side"], where)
            try:
                slice_index = int(row["slice"])
            except ValueError:
                raise DatasetError(f"{where}: slice must be an integer, got {row['slice']!r}") from None
            image_path, mask_path = root / row["image"], root / row["mask"]
            for p in (image_path, mask_path):
                if not p.is_file():
                    raise DatasetError(f"{where}: file {p} does not exist")
            image, mask = _read_grey(image_path), _read_grey(mask_path) >= 128
            if image.shape != mask.shape:
                raise DatasetError(f"{mask_path}: mask {mask.shape} and image {image.shape} differ in size")
            if image.shape != (size, size):
                t = plan_slice_transform(image.shape, (1.0, 1.0), size)
                image, mask = image_to_model(image, t), mask_to_model(mask, t)
            if not mask.any() and collector.options.empty_ratio == 0:
                raise EmptyMaskError(f"{mask_path}: mask is empty (pass an empty-slice ratio > 0 to keep empty samples)")
            collector.add_sample(where, SampleMeta(patient, side, slice_index), image, mask)

        collector.run(where, work)
    used = len(collector.metas)
    sides = len({(m.patient, m.side) for m in collector.metas})
    collector.sources.append(SourceReport(str(table), "used", f"{used} of {len(rows)} rows: {sides} patient sides",
                                          used))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:64] or "_"


def export_2d(slices: SliceSet, out_dir: str | Path) -> Path:
    """Write `slices` in the paper's 2D form (PNG images and 0/255 masks + samples.csv); return the CSV."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: export folder exists and is not empty")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    rows = []
    for i, meta in enumerate(slices.metas):
        name = f"{_safe(meta.patient)}_{meta.side}_{meta.slice:04d}"
        if name in names:
            name = f"{name}_{i}"
        names.add(name)
        Image.fromarray(slices.images[i], mode="L").save(out / "images" / f"{name}.png")
        Image.fromarray(slices.masks[i].astype(np.uint8) * 255, mode="L").save(out / "masks" / f"{name}.png")
        rows.append([f"images/{name}.png", f"masks/{name}.png", meta.patient, meta.side, meta.slice])
    with (out / SAMPLES_CSV).open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(SAMPLE_FIELDS)
        writer.writerows(rows)
    log.info("exported %d samples in the 2d form to %s", len(rows), out)
    return out / SAMPLES_CSV


# ---------------------------------------------------------------- cache (the benchmark's copy of its samples)
def save_slice_set(slices: SliceSet, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Store a SliceSet (masks bit-packed) with its report and `extra` metadata, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"metas": [asdict(m) for m in slices.metas], "report": slices.report.to_dict(), "extra": extra or {},
            "shape": list(slices.images.shape)}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, images=slices.images, masks=np.packbits(slices.masks), meta=np.frombuffer(
        json.dumps(meta).encode(), dtype=np.uint8))
    tmp.replace(path)
    return path


def load_slice_set(path: str | Path) -> tuple[SliceSet, dict[str, Any]]:
    with np.load(Path(path)) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        shape = tuple(meta["shape"])
        masks = np.unpackbits(data["masks"], count=int(np.prod(shape))).reshape(shape).astype(bool)
        slices = SliceSet(data["images"], masks, tuple(SampleMeta(**m) for m in meta["metas"]),
                          LoadReport.from_dict(meta["report"]))
    return slices, meta["extra"]


def subset(slices: SliceSet, indices: Iterable[int]) -> SliceSet:
    idx = np.asarray(list(indices), dtype=np.int64)
    return replace(slices, images=slices.images[idx], masks=slices.masks[idx],
                   metas=tuple(slices.metas[i] for i in idx))
