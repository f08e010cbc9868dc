"""Side crops, the coronal reformat, and its exact inverse.

The volume is reoriented to patient orientation "PFL" (axis 0 → posterior, rows →
inferior/foot, columns → patient left) by highdicom's exact axis permutation + flips, nearest to the
acquisition axes (so oblique series work too, without interpolation). A side's region of interest
(an LPS box in mm) selects the voxels whose centres lie inside it; the stack is their index bounding
box; LEFT stacks are flipped horizontally so that on both sides column 0 is the lateral edge (the
paper's "left flipped to right-side orientation"). Each stack carries the flat source index of every
pixel, so putting masks back (`stack_to_volume`) is a scatter and exact by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np

from ian_node.segment.volume import SeriesVolume, Side

logger = logging.getLogger(__name__)

#: Patient orientation of the reformatted volume: slices A→P, rows S→I, columns R→L.
CORONAL_ORIENTATION = "PFL"
_FACE_SHIFT_MM = 1e-6  # see PatientBox.contains


class RoiError(ValueError):
    """A region of interest that selects no voxel of the series, or stacks that overlap."""


@dataclass(frozen=True)
class PatientBox:
    """An axis-aligned box in patient (LPS) mm; a voxel belongs to it when min <= centre < max."""

    x_min: float = -np.inf
    x_max: float = np.inf
    y_min: float = -np.inf
    y_max: float = np.inf
    z_min: float = -np.inf
    z_max: float = np.inf

    def __post_init__(self) -> None:
        for axis in "xyz":
            lo, hi = getattr(self, f"{axis}_min"), getattr(self, f"{axis}_max")
            if np.isnan(lo) or np.isnan(hi) or not lo < hi:
                raise ValueError(f"PatientBox: {axis}_min must be < {axis}_max, got {lo} and {hi}")

    @property
    def bounds(self) -> np.ndarray:
        """(3, 2) array of [min, max] for x, y, z."""
        return np.array([[self.x_min, self.x_max], [self.y_min, self.y_max], [self.z_min, self.z_max]])

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Which LPS points (..., 3) lie in [min, max) on every axis.

        Both faces are moved by 1 nm towards -inf, so that a voxel centre lying on a face (as with
        the default halves) is classified the same way whatever float rounding produced it.
        """
        b = self.bounds - _FACE_SHIFT_MM
        points = np.asarray(points, dtype=np.float64)
        return np.all((points >= b[:, 0]) & (points < b[:, 1]), axis=-1)

    def contains_1d(self, values: np.ndarray, axis: int) -> np.ndarray:
        """Which coordinates along one axis (0 x, 1 y, 2 z) lie in the box's range, by `contains`' rule."""
        lo, hi = self.bounds[axis] - _FACE_SHIFT_MM
        values = np.asarray(values, dtype=np.float64)
        return (values >= lo) & (values < hi)


@dataclass(frozen=True)
class CoronalStack:
    """One side's coronal slices and, for every pixel, its flat index into the SeriesVolume array."""

    series_uid: str
    side: Side
    slices: np.ndarray  # float32 (n, h, w): axis 0 A→P, rows S→I, column 0 lateral
    pixel_spacing: tuple[float, float]  # (row_mm, col_mm)
    source_index: np.ndarray  # int64 (n, h, w)
    inside: np.ndarray  # bool (n, h, w): voxel centre inside the side's region of interest


def extent_corners(geometry: hd.VolumeGeometry | hd.Volume) -> np.ndarray:
    """LPS positions (8, 3) of the outer voxel corners (centres ± half a voxel)."""
    shape = geometry.spatial_shape
    grid = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in shape], indexing="ij")).reshape(3, -1).T
    return geometry.map_indices_to_reference(grid)


def default_rois(series: SeriesVolume) -> dict[Side, PatientBox]:
    """The patient-right (lower x) and patient-left halves of the volume's extent; whole y and z."""
    corners = extent_corners(series.volume)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    mid = float((lo[0] + hi[0]) / 2)
    yz = dict(y_min=float(lo[1]), y_max=float(hi[1]), z_min=float(lo[2]), z_max=float(hi[2]))
    return {Side.RIGHT: PatientBox(x_min=float(lo[0]), x_max=mid, **yz),
            Side.LEFT: PatientBox(x_min=mid, x_max=float(hi[0]), **yz)}


def split_at_overlap(right: PatientBox, left: PatientBox) -> tuple[PatientBox, PatientBox]:
    """The two sides' boxes cut at the middle of their x overlap (unchanged if they do not overlap), so
    that no voxel belongs to both stacks (`stack_to_volume` refuses an overlap)."""
    if right.x_max <= left.x_min:
        return right, left
    cut = (right.x_max + left.x_min) / 2
    r, lf = right.bounds, left.bounds
    r[0, 1], lf[0, 0] = cut, cut
    return PatientBox(*r.reshape(-1)), PatientBox(*lf.reshape(-1))


def _inside_roi(affine: np.ndarray, axes: Sequence[np.ndarray], roi: PatientBox) -> np.ndarray:
    """Which voxels of the index box `axes` have their centre in `roi` (PatientBox.contains rules).

    The affine is linear, so each patient coordinate is a sum of three broadcast 1-D terms; one
    coordinate at a time keeps the peak at one float array of the box's size.
    """
    inside = np.ones(tuple(len(a) for a in axes), dtype=bool)
    for c, (lo, hi) in enumerate(roi.bounds - _FACE_SHIFT_MM):
        coord = (affine[c, 3] + (affine[c, 0] * axes[0])[:, None, None]
                 + (affine[c, 1] * axes[1])[None, :, None] + (affine[c, 2] * axes[2])[None, None, :])
        inside &= (coord >= lo) & (coord < hi)
    return inside


def coronal_stack(series: SeriesVolume, side: Side | str, roi: PatientBox | None = None) -> CoronalStack:
    """One side's region of interest as coronal slices, LEFT flipped so column 0 is lateral."""
    side = Side(side)
    roi = roi if roi is not None else default_rois(series)[side]
    source = series.volume.get_geometry()
    canon = source.to_patient_orientation(CORONAL_ORIENTATION)
    mapping = np.linalg.inv(source.affine) @ canon.affine  # canonical index → source index
    exact = np.rint(mapping)
    if not np.allclose(mapping, exact, atol=1e-6):
        raise RuntimeError(f"series {series.series_uid}: reorientation is not an axis permutation")

    # candidate index box: the ROI (clipped to the volume extent) mapped into canonical indices
    corners = extent_corners(canon)
    bounds = np.clip(roi.bounds, corners.min(axis=0)[:, None], corners.max(axis=0)[:, None])
    box = np.array(np.meshgrid(*bounds, indexing="ij")).reshape(3, -1).T
    idx = canon.map_reference_to_indices(box, round_output=False, check_bounds=False)
    shape = np.array(canon.spatial_shape)
    lo = np.clip(np.floor(idx.min(axis=0)).astype(int) - 1, 0, shape)
    hi = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 2, 0, shape)
    axes = [np.arange(a, b) for a, b in zip(lo, hi, strict=True)]
    inside = _inside_roi(canon.affine, axes, roi)
    if not inside.any():
        raise RoiError(f"series {series.series_uid}: the {side.value} region of interest {roi} contains no voxel")
    tight = [np.flatnonzero(inside.any(axis=tuple(j for j in range(3) if j != k))) for k in range(3)]
    cut = tuple(slice(t[0], t[-1] + 1) for t in tight)
    inside = inside[cut]
    axes = [a[c] for a, c in zip(axes, cut, strict=True)]

    # canonical index → source index is an exact signed permutation plus offset, so the flat source
    # index is linear in the canonical indices: a sum of three broadcast 1-D terms, no index grids.
    strides = np.array([int(np.prod(source.spatial_shape[k + 1:])) for k in range(3)], dtype=np.int64)
    perm, offset = exact[:3, :3].astype(np.int64), exact[:3, 3].astype(np.int64)
    weights = strides @ perm  # flat-index step per canonical axis
    flat = (int(strides @ offset) + (weights[0] * axes[0])[:, None, None]
            + (weights[1] * axes[1])[None, :, None] + (weights[2] * axes[2])[None, None, :])
    if side is Side.LEFT:
        flat, inside = flat[:, :, ::-1], inside[:, :, ::-1]
    flat, inside = np.ascontiguousarray(flat), np.ascontiguousarray(inside)
    slices = np.asarray(series.volume.array, dtype=np.float32).reshape(-1)[flat]
    _, row_mm, col_mm = canon.spacing
    return CoronalStack(series_uid=series.series_uid, side=side, slices=slices,
                        pixel_spacing=(float(row_mm), float(col_mm)), source_index=flat, inside=inside)


def side_stacks(series: SeriesVolume, rois: Mapping[Side, PatientBox] | None = None) -> dict[Side, CoronalStack]:
    """Both sides' stacks; `rois` overrides the default halves per side."""
    chosen = {**default_rois(series), **{Side(k): v for k, v in (rois or {}).items()}}
    return {side: coronal_stack(series, side, chosen[side]) for side in Side}


def stack_to_volume(stacks: Sequence[CoronalStack], masks: Sequence[np.ndarray], series: SeriesVolume) -> np.ndarray:
    """Per-side masks (n, h, w) back in source voxels: uint8 labels, 1 right, 2 left, 0 elsewhere."""
    if len(stacks) != len(masks):
        raise ValueError(f"got {len(stacks)} stacks but {len(masks)} masks")
    labels = np.zeros(series.shape, dtype=np.uint8)
    flat_labels = labels.reshape(-1)
    claimed = np.zeros(flat_labels.size, dtype=bool)
    for stack, mask in zip(stacks, masks, strict=True):
        if stack.series_uid != series.series_uid:
            raise ValueError(f"stack of series {stack.series_uid} cannot go back into series {series.series_uid}")
        mask = np.asarray(mask)
        if mask.shape != stack.source_index.shape:
            raise ValueError(f"{stack.side.value} mask must have shape {stack.source_index.shape}, got {mask.shape}")
        owned = stack.source_index[stack.inside]
        if claimed[owned].any():
            raise RoiError(f"series {series.series_uid}: the {stack.side.value} region overlaps another stack's")
        claimed[owned] = True
        flat_labels[owned] = np.where(mask[stack.inside].astype(bool), np.uint8(stack.side.label), np.uint8(0))
    return labels
