"""Model-space training samples: the `SliceSet` every input form ends as, its torch view and its cache file.

A `SliceSet` holds uint8 model-space images (N, S, S), boolean masks (N, S, S) and one `SampleMeta`
(patient, side, slice) per sample, plus the `LoadReport` of how it was read (and, for 3D inputs, each
side's millimetres: `SideGeometry`). `SliceDataset` is the
training loop's view of some of its samples (`SliceSet.torch_dataset`): images scaled to [0, 1] by
`model.preprocess.model_input`, the same numbers the node's predictor feeds the network.

**2.5D samples** (context K > 1, `LoadOptions.context`): a sample's input is its window of K adjacent
coronal slices of its side's stack (`model.preprocess.context_windows`: the sample's slice in the middle,
the edge slice repeated past the stack's ends), the windows the node builds (`PreparedSeries.inputs`).
With `slice_step` or nerve-only sampling a window's neighbours are mostly not samples themselves, so
the set keeps them once, beside the samples: `neighbours` holds the window slices that are not
samples, and `windows` (N, K) indexes each sample's window into `images` followed by `neighbours`.
Masks are the centre slice's only. K = 1 stores nothing extra, and its fingerprint and cache file are
as before 2.5D.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from model.preprocess import model_input

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleMeta:
    """Which image a sample is: enough to pair it across models and write the per-image table."""

    patient: str
    side: str
    slice: int


@dataclass(frozen=True)
class SideGeometry:
    """Millimetres of one patient side's samples, so that `training.regions` can measure along them.

    The samples are model-space coronal slices: `slice_mm` is the series' spacing between neighbouring
    coronal slices of the side's stack (its A→P voxel spacing), `slice_step` the step in coronal indices
    between consecutive samples actually kept (`sampling_step`), and `row_mm` / `col_mm` the size of a
    model pixel (the slice transform's canvas over its resized size; square up to rounding).
    """

    patient: str
    side: str
    slice_mm: float
    slice_step: int
    row_mm: float
    col_mm: float

    @property
    def sample_mm(self) -> float:
        """Millimetres between consecutive samples of the side."""
        return self.slice_mm * self.slice_step


def sampling_step(slices: Sequence[int]) -> int:
    """The usual step between sampled coronal indices (median; `slice_step` when no slice is missing), >= 1."""
    steps = np.diff(np.sort(np.asarray(slices, dtype=np.int64)))
    return max(1, int(np.median(steps))) if steps.size else 1


@dataclass(frozen=True)
class SourceReport:
    """What one input unit (a SEG file, a NIfTI pair, a CSV row) gave, or why it was skipped."""

    source: str
    status: Literal["used", "skipped"]
    detail: str
    samples: int = 0


#: The keys of `model.checkpoint.CheckpointMeta.crop`.
CHECKPOINT_CROP_KEYS = ("region", "trained_with", "samples")


@dataclass(frozen=True)
class LoadReport:
    format: str
    root: str
    sources: tuple[SourceReport, ...] = ()
    #: The crop and sample policy of every sample, as `model.checkpoint.CheckpointMeta.crop` records them:
    #: {"region", "trained_with", "samples"} (plus "localiser_sha256" for crop "auto"); empty for
    #: sets built before crops were recorded.
    crop: dict[str, Any] = field(default_factory=dict)
    #: Per patient and side, the millimetres of its samples; empty where the input records none (the
    #: paper's 2D folders, sets cached before geometry was recorded).
    geometry: tuple[SideGeometry, ...] = ()

    @property
    def skipped(self) -> tuple[SourceReport, ...]:
        return tuple(s for s in self.sources if s.status == "skipped")

    def checkpoint_crop(self) -> dict[str, Any]:
        """The crop record a checkpoint trained on these samples stores (`CheckpointMeta.crop`)."""
        missing = [k for k in CHECKPOINT_CROP_KEYS if not self.crop.get(k)]
        if missing:
            raise ValueError(f"samples of {self.root or self.format!r} record no crop {missing}")
        return {k: self.crop[k] for k in CHECKPOINT_CROP_KEYS}

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "root": self.root, "crop": dict(self.crop), "n_sources": len(self.sources),
                "n_skipped": len(self.skipped), "sources": [asdict(s) for s in self.sources],
                "geometry": [asdict(g) for g in self.geometry]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadReport:
        return cls(data["format"], data["root"], tuple(SourceReport(**s) for s in data["sources"]),
                   dict(data.get("crop", {})), tuple(SideGeometry(**g) for g in data.get("geometry", ())))

    def geometry_of(self) -> dict[tuple[str, str], SideGeometry]:
        """(patient, side) → its recorded millimetres."""
        return {(g.patient, g.side): g for g in self.geometry}


@dataclass(frozen=True)
class SliceSet:
    """Model-space samples: images uint8 (N, S, S), masks bool (N, S, S), one meta per sample."""

    images: np.ndarray
    masks: np.ndarray
    metas: tuple[SampleMeta, ...]
    report: LoadReport = field(default_factory=lambda: LoadReport("", ""))
    #: int64 (N, K): each sample's window of K adjacent slices as rows of `images` then `neighbours`
    #: (row r < N is sample r's image, r >= N is neighbours[r - N]); default: each sample alone (K = 1).
    windows: np.ndarray | None = None
    #: uint8 (M, S, S): the slices of the windows that are not samples themselves; default none.
    neighbours: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.metas)
        if self.images.shape[0] != n or self.masks.shape != self.images.shape or self.images.ndim != 3:
            raise ValueError(f"SliceSet: images {self.images.shape}, masks {self.masks.shape} and {n} metas disagree")
        if self.images.dtype != np.uint8 or self.masks.dtype != np.bool_:
            raise ValueError("SliceSet: images must be uint8 and masks bool")
        if self.windows is None:
            object.__setattr__(self, "windows", np.arange(n, dtype=np.int64)[:, None])
        if self.neighbours is None:
            object.__setattr__(self, "neighbours", np.zeros((0, *self.images.shape[1:]), dtype=np.uint8))
        windows, neighbours = np.asarray(self.windows), np.asarray(self.neighbours)
        if windows.ndim != 2 or windows.shape[0] != n or windows.shape[1] % 2 == 0:
            raise ValueError(f"SliceSet: windows {windows.shape} must be ({n}, K) with K odd")
        if neighbours.dtype != np.uint8 or neighbours.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"SliceSet: neighbours {neighbours.dtype} {neighbours.shape} must be uint8 slices "
                             f"like the images {self.images.shape[1:]}")
        if windows.size and (windows.min() < 0 or windows.max() >= n + len(neighbours)):
            raise ValueError(f"SliceSet: windows index outside the {n} images and {len(neighbours)} neighbours")
        object.__setattr__(self, "windows", windows.astype(np.int64, copy=False))

    @property
    def context(self) -> int:
        """Adjacent coronal slices per sample input (1: 2D)."""
        return int(self.windows.shape[1])

    def window(self, k: int) -> np.ndarray:
        """Sample `k`'s input slices, uint8 (K, S, S), its own slice in the middle."""
        rows, n = self.windows[k], len(self.metas)
        return np.stack([self.images[r] if r < n else self.neighbours[r - n] for r in rows])

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
        if self.context > 1:  # 2D sets keep the fingerprint they had before 2.5D
            h.update(np.ascontiguousarray(self.windows).tobytes())
            h.update(np.ascontiguousarray(self.neighbours).tobytes())
        return h.hexdigest()


class SliceDataset(Dataset):
    """The training loop's dataset: (image float32 (C, S, S) in [0, 1], mask float32 (1, S, S), meta).

    The image is the sample's slice (grey replicated to C) or, for 2.5D sets, its window of C = K
    adjacent slices (`SliceSet.window`).
    """

    def __init__(self, slices: SliceSet, indices: Sequence[int], in_channels: int) -> None:
        self.slices = slices
        self.indices = np.asarray(indices, dtype=np.int64)
        self.in_channels = in_channels
        if slices.context > 1 and in_channels != slices.context:
            raise ValueError(f"samples with context {slices.context} feed {slices.context} input channels, "
                             f"not {in_channels}")

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, SampleMeta]:
        k = int(self.indices[i])
        context = self.slices.context
        image = self.slices.window(k) if context > 1 else self.slices.images[k]
        image = torch.from_numpy(model_input(image, self.in_channels, context))
        mask = torch.from_numpy(self.slices.masks[k][None].astype(np.float32))
        return image, mask, self.slices.metas[k]


# ---------------------------------------------------------------- cache (the benchmark's copy of its samples)
def save_slice_set(slices: SliceSet, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Store a SliceSet (masks bit-packed) with its report and `extra` metadata, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"metas": [asdict(m) for m in slices.metas], "report": slices.report.to_dict(), "extra": extra or {},
            "shape": list(slices.images.shape)}
    tmp = path.with_name(path.name + ".tmp.npz")
    context = {"windows": slices.windows, "neighbours": slices.neighbours} if slices.context > 1 else {}
    np.savez(tmp, images=slices.images, masks=np.packbits(slices.masks), meta=np.frombuffer(
        json.dumps(meta).encode(), dtype=np.uint8), **context)
    tmp.replace(path)
    logger.info("saved %d samples to %s", len(slices), path)
    return path


def load_slice_set(path: str | Path) -> tuple[SliceSet, dict[str, Any]]:
    with np.load(Path(path)) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        shape = tuple(meta["shape"])
        masks = np.unpackbits(data["masks"], count=int(np.prod(shape))).reshape(shape).astype(bool)
        context = {k: data[k] for k in ("windows", "neighbours") if k in data.files}
        slices = SliceSet(data["images"], masks, tuple(SampleMeta(**m) for m in meta["metas"]),
                          LoadReport.from_dict(meta["report"]), **context)
    return slices, meta["extra"]


def subset(slices: SliceSet, indices: Iterable[int]) -> SliceSet:
    """The samples at `indices`, in that order, with their windows (a window slice whose sample is left
    out becomes a neighbour)."""
    idx = np.asarray(list(indices), dtype=np.int64)
    n = len(slices)
    kept = replace(slices, images=slices.images[idx], masks=slices.masks[idx],
                   metas=tuple(slices.metas[i] for i in idx), windows=None, neighbours=None)
    if slices.context == 1:
        return kept
    rows = slices.windows[idx]
    extra = np.setdiff1d(np.unique(rows), idx)  # pool rows the windows need beyond the kept samples
    where = np.full(n + len(slices.neighbours), -1, dtype=np.int64)
    where[idx] = np.arange(len(idx))
    where[extra] = len(idx) + np.arange(len(extra))
    pool_extra = [slices.images[r] if r < n else slices.neighbours[r - n] for r in extra]
    neighbours = np.stack(pool_extra) if pool_extra else np.zeros((0, *slices.images.shape[1:]), np.uint8)
    return replace(kept, windows=where[rows], neighbours=neighbours)
