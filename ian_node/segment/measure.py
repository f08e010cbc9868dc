"""Nerve measurements from one side's mask: centreline, length, volume, diameters, per region.

The figures a surgeon asks of an inferior alveolar nerve (how long, how thick, where it narrows)
and that the TID 1500 report (:mod:`ian_node.segment.sr`), the tract QA and the benchmark's
region-wise scores share, so they are computed once, here, from a mask in source voxels and the
series affine (``SeriesVolume.volume.affine``: (slice, row, column) index → patient LPS mm).

- **Centreline.** The mask is resampled to an isotropic grid (the finest voxel spacing) by trilinear
  interpolation, so a nerve only one or two anisotropic voxels wide keeps its shape; the occupancy
  at or above 0.25 (which keeps 26-connected voxels joined) is skeletonised in 3D
  (`skimage.morphology.skeletonize`), and the longest geodesic path (mm) through the skeleton graph
  (two Dijkstra sweeps per component) is taken. A skeleton stops short of the ends and can miss a
  hook (the turn out through the mental foramen), so each end is carried on along the geodesic,
  inside the mask, to the voxel farthest from the other end. The path is smoothed (Gaussian, 1.5 mm),
  pulled back one radius from each tip (a tube's centreline ends at its cap's centre; not where the
  mask meets the volume's edge) and resampled every 0.5 mm. It runs from the posterior-superior
  end (the ramus: mandibular foramen) to the anterior end (the mental foramen): the end with the
  larger P + S coordinate comes first.
- **Length** is the smoothed centreline's arc length; **volume** is voxel count × voxel volume.
- **Diameter** is the equivalent diameter 2·√(A/π) of the local cross-sectional area A: each
  (resampled, fractional) mask voxel belongs to its nearest centreline point, which approximates
  planes orthogonal to the centreline, and A is the volume owned by a 5 mm window divided by 5 mm.
  Windows that reach the two end points are left out, since those points own the end caps.
  A distance-transform radius was not used: on 1.6 mm voxels it moves in whole-voxel steps.
- **Regions** (:func:`regions_along`): the ramus runs from the start until the smoothed path first
  turns flatter than 30° to the axial plane and stays so for 10 mm; the anterior loop / mental foramen region is the last
  15 mm of the path; the body lies between. Mask voxels take the region of their nearest
  centreline point (:func:`region_map`), so the benchmark scores any mask by the same split.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, dijkstra
from scipy.spatial import cKDTree
from skimage.morphology import skeletonize

#: Centreline sample spacing after smoothing (mm).
SAMPLE_STEP_MM = 0.5
#: Gaussian smoothing of the skeleton path (mm): removes the voxel staircase, keeps the bends.
SMOOTHING_MM = 1.5
#: Length of the window over which the cross-sectional area is averaged (mm).
DIAMETER_WINDOW_MM = 5.0
#: Interpolated occupancy at or above which a resampled voxel is skeletonised.
_SKELETON_LEVEL = 0.25


class Region(IntEnum):
    """Stretches of the nerve along its centreline; the values label :func:`region_map`'s volume."""

    RAMUS = 1
    BODY = 2
    MENTAL = 3  # the anterior loop and the mental foramen

    @property
    def title(self) -> str:
        return {Region.RAMUS: "ramus", Region.BODY: "body", Region.MENTAL: "anterior loop / mental foramen"}[self]


@dataclass(frozen=True)
class RegionSplit:
    """Where the regions meet along the centreline (see the module docstring)."""

    #: The ramus ends where the path first runs flatter than this to the axial plane (degrees)...
    body_inclination_deg: float = 30.0
    #: ... and stays so for this stretch (mm), or up to the mental region.
    body_min_mm: float = 10.0
    #: The anterior loop / mental foramen region: this last stretch of the path (mm).
    mental_mm: float = 15.0
    #: Smoothing of the tangents the inclination is read from (mm).
    smoothing_mm: float = 3.0

    def __post_init__(self) -> None:
        if not 0.0 < self.body_inclination_deg < 90.0:
            raise ValueError(f"RegionSplit.body_inclination_deg must be in (0, 90), got {self.body_inclination_deg!r}")
        if min(self.mental_mm, self.smoothing_mm, self.body_min_mm) < 0.0:
            raise ValueError(f"RegionSplit lengths must be >= 0, got mental_mm={self.mental_mm!r}, "
                             f"smoothing_mm={self.smoothing_mm!r}, body_min_mm={self.body_min_mm!r}")


@dataclass(frozen=True)
class Centreline:
    """Ordered points (n, 3) in patient LPS mm, every `step_mm`, ramus end first."""

    points: np.ndarray
    step_mm: float = SAMPLE_STEP_MM

    @property
    def arc_length(self) -> np.ndarray:
        """Cumulative arc length (mm) at each point."""
        steps = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        return np.concatenate([[0.0], np.cumsum(steps)])

    @property
    def length_mm(self) -> float:
        return float(self.arc_length[-1])


@dataclass(frozen=True)
class RegionMeasurements:
    """One region's share of the tract; diameters are None where no full window fits in it."""

    region: Region
    length_mm: float
    volume_mm3: float
    mean_diameter_mm: float | None
    min_diameter_mm: float | None


@dataclass(frozen=True)
class TractMeasurements:
    """One side's figures, its centreline, and the equivalent-diameter profile along it (NaN at the ends)."""

    length_mm: float
    volume_mm3: float
    mean_diameter_mm: float | None
    min_diameter_mm: float | None
    centreline: Centreline
    diameter_profile_mm: np.ndarray
    regions: tuple[RegionMeasurements, ...]

    def region(self, region: Region) -> RegionMeasurements:
        return next(r for r in self.regions if r.region is region)


# ---------------------------------------------------------------- geometry helpers
def _spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) along the three index axes of a 4×4 index → LPS affine."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    return np.linalg.norm(affine[:3, :3], axis=0)


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D (slices, rows, columns), got shape {mask.shape}")
    return mask.astype(bool, copy=False)


@dataclass(frozen=True)
class _Resampled:
    """The mask's bounding box on an isotropic grid: occupancy in [0, 1], and that grid's affine."""

    occupancy: np.ndarray
    affine: np.ndarray
    step: float
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray


def _resample(mask: np.ndarray, affine: np.ndarray, step: float) -> _Resampled:
    spacing = _spacing(affine)
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - 2, 0)
    hi = np.minimum(idx.max(axis=0) + 3, mask.shape)
    crop = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
    scale = step / spacing  # input index units per output voxel
    shape = tuple(int(np.floor((n - 1) / s)) + 1 for n, s in zip(crop.shape, scale, strict=True))
    occupancy = ndimage.affine_transform(crop, scale, output_shape=shape, order=1, mode="constant", cval=0.0)
    to_crop = np.diag([*scale, 1.0])
    to_crop[:3, 3] = lo
    affine = np.asarray(affine, dtype=np.float64)
    return _Resampled(occupancy, affine @ to_crop, step, mask.shape, affine)


def _to_lps(affine: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return indices @ affine[:3, :3].T + affine[:3, 3]


_OFFSETS = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)
                     if (a, b, c) > (0, 0, 0)])  # 13 of the 26 neighbours: each edge once


@dataclass(frozen=True)
class _Graph:
    """The 26-neighbour graph of a voxel set, edges weighted by their length in mm."""

    nodes: np.ndarray  # (n, 3) voxel indices
    ids: np.ndarray  # node id per voxel of the grid, -1 outside the set
    matrix: Any  # scipy CSR, symmetric use (directed=False)

    def path(self, predecessors: np.ndarray, start: int, end: int) -> list[int]:
        """Node ids from `start` to `end` along the predecessors of a search from `start`."""
        out = [end]
        while out[-1] != start:
            out.append(int(predecessors[out[-1]]))
        return out[::-1]


def _graph(voxels: np.ndarray, step: float) -> _Graph:
    nodes = np.argwhere(voxels)
    ids = np.full(voxels.shape, -1, dtype=np.int64)
    ids[tuple(nodes.T)] = np.arange(len(nodes))
    padded = np.pad(ids, 1, constant_values=-1)
    rows, cols, weights = [], [], []
    for off in _OFFSETS:
        nb = padded[tuple((nodes + 1 + off).T)]
        keep = nb >= 0
        rows.append(np.flatnonzero(keep))
        cols.append(nb[keep])
        weights.append(np.full(int(keep.sum()), step * float(np.linalg.norm(off))))
    r, c, w = (np.concatenate(x) for x in (rows, cols, weights))
    return _Graph(nodes, ids, coo_matrix((w, (r, c)), shape=(len(nodes), len(nodes))).tocsr())


def _longest_path(skeleton: np.ndarray, step: float) -> np.ndarray:
    """Voxel indices (k, 3) of the longest geodesic path through the skeleton's 26-neighbour graph."""
    graph = _graph(skeleton, step)
    if len(graph.nodes) == 1:
        return graph.nodes
    _, component = connected_components(graph.matrix, directed=False)
    best: tuple[float, list[int]] = (-1.0, [0])
    for comp in np.unique(component):
        members = np.flatnonzero(component == comp)
        dist = dijkstra(graph.matrix, directed=False, indices=int(members[0]))
        far = int(members[np.argmax(dist[members])])
        dist, pred = dijkstra(graph.matrix, directed=False, indices=far, return_predecessors=True)
        end = int(members[np.argmax(dist[members])])
        if dist[end] > best[0]:
            best = (float(dist[end]), graph.path(pred, far, end))
    return graph.nodes[best[1]]


def _resample_curve(points: np.ndarray, step: float) -> np.ndarray:
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    if arc[-1] <= 0.0:
        return points[:1]
    count = max(int(round(arc[-1] / step)), 1) + 1
    target = np.linspace(0.0, arc[-1], count)
    return np.stack([np.interp(target, arc, points[:, k]) for k in range(3)], axis=1)


def _smooth(points: np.ndarray, sigma_mm: float, step: float) -> np.ndarray:
    """Gaussian smoothing along a uniformly sampled path, its two end points held in place."""
    if len(points) < 3 or sigma_mm <= 0:
        return points
    # Point reflection about the ends (plain 'nearest' padding would pull them inwards) keeps the path's extent.
    ends = np.concatenate([2 * points[:1] - points[1:][::-1], points, 2 * points[-1:] - points[:-1][::-1]])
    smoothed = ndimage.gaussian_filter1d(ends, sigma_mm / step, axis=0, mode="nearest")
    return smoothed[len(points) - 1: 2 * len(points) - 1]


def _to_tips(path: np.ndarray, solid: np.ndarray, step: float) -> np.ndarray:
    """The skeleton path carried on, inside the tract, to its two far tips.

    A skeleton stops short of a tract's ends, and may miss a hook (the nerve's turn out through the
    mental foramen) altogether. The tip beyond each end is the tract voxel geodesically farthest from
    the other end; the geodesic from the end to it is appended.
    """
    graph = _graph(solid, step)
    start, end = int(graph.ids[tuple(path[0])]), int(graph.ids[tuple(path[-1])])
    from_start, pred_start = dijkstra(graph.matrix, directed=False, indices=start, return_predecessors=True)
    from_end, pred_end = dijkstra(graph.matrix, directed=False, indices=end, return_predecessors=True)
    reach = np.isfinite(from_start) & np.isfinite(from_end)
    # Beyond the start: nearer the start than the end, and farthest from the end.
    beyond_start = np.flatnonzero(reach & (from_start < from_end))
    beyond_end = np.flatnonzero(reach & (from_end < from_start))
    head: list[int] = []
    tail: list[int] = []
    if beyond_start.size:
        tip = int(beyond_start[np.argmax(from_end[beyond_start])])
        head = graph.path(pred_start, start, tip)[1:][::-1]
    if beyond_end.size:
        tip = int(beyond_end[np.argmax(from_start[beyond_end])])
        tail = graph.path(pred_end, end, tip)[1:]
    return np.concatenate([graph.nodes[head].reshape(-1, 3), path, graph.nodes[tail].reshape(-1, 3)])


def _at_edge(point: np.ndarray, grid: _Resampled) -> bool:
    """Whether an LPS point lies within one source voxel of the volume's edge (a tract cut by the field of view)."""
    index = _to_lps(np.linalg.inv(grid.source_affine), point[None])[0]
    return bool(np.any(index < 1.0) or np.any(index > np.asarray(grid.source_shape) - 2.0))


def _centreline_of(grid: _Resampled, smoothing_mm: float, step_mm: float) -> Centreline:
    solid = grid.occupancy >= _SKELETON_LEVEL
    skeleton = skeletonize(solid)
    if not skeleton.any():
        # Thinning can erase a straight tube of even width (a blocky prediction) whole: one more
        # layer on one face of each axis breaks the tie; the ends are carried on inside the mask anyway.
        grown = solid.copy()
        grown[1:] |= solid[:-1]
        grown[:, 1:] |= solid[:, :-1]
        grown[:, :, 1:] |= solid[:, :, :-1]
        skeleton = skeletonize(grown)
        solid |= skeleton
    if not skeleton.any():  # a blob too small to keep a skeleton voxel: its densest point
        skeleton = np.zeros_like(skeleton)
        skeleton[np.unravel_index(int(np.argmax(grid.occupancy)), grid.occupancy.shape)] = True
        solid |= skeleton
    voxels = _longest_path(skeleton, grid.step)
    fine = min(grid.step, step_mm) / 2
    length = float(np.sum(np.linalg.norm(np.diff(voxels, axis=0), axis=1))) * grid.step
    radius = float(np.sqrt(grid.occupancy.sum() * grid.step ** 3 / max(length, grid.step) / np.pi))
    # A skeleton's last radius may bend off towards a corner of the end cap: cut it before reaching the tips.
    trim = int(round(radius / grid.step))
    if len(voxels) > 4 * trim + 2 and trim:
        voxels = voxels[trim:-trim]
    voxels = _to_tips(voxels, solid, grid.step)
    dense = _smooth(_resample_curve(_to_lps(grid.affine, voxels.astype(np.float64)), fine), smoothing_mm, fine)
    # A tube's centreline ends at its end cap's centre, one radius inside the tip; at a cut end, at the edge.
    cut = int(round(radius / fine))
    lo = 0 if _at_edge(dense[0], grid) else cut
    hi = len(dense) - (0 if _at_edge(dense[-1], grid) else cut)
    if hi - lo >= 2:
        dense = dense[lo:hi]
    points = _resample_curve(dense, step_mm)
    # Ramus end first: the end further posterior + superior (LPS: +y, +z).
    if points[0, 1] + points[0, 2] < points[-1, 1] + points[-1, 2]:
        points = points[::-1].copy()
    return Centreline(points, step_mm)


# ---------------------------------------------------------------- public API
def centreline(mask: np.ndarray, affine: np.ndarray, *, smoothing_mm: float = SMOOTHING_MM,
               step_mm: float = SAMPLE_STEP_MM) -> Centreline | None:
    """The tract's centreline in patient LPS mm, ramus end first; None for an empty mask."""
    mask = _check_mask(mask)
    if not mask.any():
        return None
    return _centreline_of(_resample(mask, affine, float(_spacing(affine).min())), smoothing_mm, step_mm)


def regions_along(line: Centreline, split: RegionSplit | None = None) -> np.ndarray:
    """The `Region` value (int8) of each centreline point: ramus, then body, then the mental region.

    Contiguous by construction: the body starts at the first point where the smoothed path runs
    flatter than ``split.body_inclination_deg`` to the axial plane for ``split.body_min_mm`` (never inside the mental stretch),
    and the mental region is the last ``split.mental_mm`` of arc length.
    """
    split = split or RegionSplit()
    arc = line.arc_length
    out = np.full(len(arc), Region.BODY, dtype=np.int8)
    mental_start = int(np.searchsorted(arc, arc[-1] - split.mental_mm, side="left"))
    body_start = 0
    if len(arc) >= 2:
        smooth = ndimage.gaussian_filter1d(line.points, max(split.smoothing_mm / line.step_mm, 1e-3), axis=0,
                                           mode="nearest")
        tangent = np.gradient(smooth, axis=0)
        inclination = np.degrees(np.arctan2(np.abs(tangent[:, 2]), np.hypot(tangent[:, 0], tangent[:, 1])))
        steep = inclination[:mental_start] >= split.body_inclination_deg
        body_start = mental_start
        for i in range(mental_start):
            # flat from here on for body_min_mm (or up to the mental region): a kink is not the body
            stop = min(int(np.searchsorted(arc, arc[i] + split.body_min_mm, side="right")), mental_start)
            if not steep[i:stop].any():
                body_start = i
                break
    out[:body_start] = Region.RAMUS
    out[mental_start:] = Region.MENTAL
    return out


def nearest_points(line: Centreline, positions_lps: np.ndarray) -> np.ndarray:
    """Index of the nearest centreline point of each position (k, 3): its share of the tract."""
    return cKDTree(line.points).query(np.asarray(positions_lps, dtype=np.float64).reshape(-1, 3))[1]


def region_map(mask: np.ndarray, affine: np.ndarray, line: Centreline,
               split: RegionSplit | None = None) -> np.ndarray:
    """An int8 volume like `mask`: 0 outside it, else the `Region` of each voxel's nearest centreline point.

    `line` may come from another mask (the ground truth's), so a prediction and its reference are
    split at the same places.
    """
    mask = _check_mask(mask)
    out = np.zeros(mask.shape, dtype=np.int8)
    idx = np.argwhere(mask)
    if len(idx):
        regions = regions_along(line, split)
        out[tuple(idx.T)] = regions[nearest_points(line, _to_lps(np.asarray(affine, np.float64), idx.astype(float)))]
    return out


def _diameter_profile(grid: _Resampled, line: Centreline, window_mm: float) -> np.ndarray:
    """Equivalent diameter (mm) at each centreline point; NaN where the window meets an end point."""
    n = len(line.points)
    profile = np.full(n, np.nan)
    half = int(round(window_mm / line.step_mm / 2))
    if n < 2 * half + 3:
        return profile
    idx = np.argwhere(grid.occupancy > 0)
    owner = nearest_points(line, _to_lps(grid.affine, idx.astype(float)))
    volume = np.bincount(owner, weights=grid.occupancy[tuple(idx.T)] * grid.step ** 3, minlength=n)
    cumulative = np.concatenate([[0.0], np.cumsum(volume)])
    centre = np.arange(half + 1, n - half - 1)
    area = (cumulative[centre + half + 1] - cumulative[centre - half]) / ((2 * half + 1) * line.step_mm)
    profile[centre] = 2.0 * np.sqrt(area / np.pi)
    return profile


def _stats(values: np.ndarray) -> tuple[float | None, float | None]:
    values = values[np.isfinite(values)]
    return (float(values.mean()), float(values.min())) if values.size else (None, None)


def measure_tract(mask: np.ndarray, affine: np.ndarray, *, split: RegionSplit | None = None,
                  window_mm: float = DIAMETER_WINDOW_MM) -> TractMeasurements | None:
    """Length, volume and diameters of one side's tract, overall and per region; None for an empty mask."""
    mask = _check_mask(mask)
    if not mask.any():
        return None
    affine = np.asarray(affine, dtype=np.float64)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    grid = _resample(mask, affine, float(_spacing(affine).min()))
    line = _centreline_of(grid, SMOOTHING_MM, SAMPLE_STEP_MM)
    profile = _diameter_profile(grid, line, window_mm)
    along = regions_along(line, split)
    owner = nearest_points(line, _to_lps(affine, np.argwhere(mask).astype(float)))
    voxels = np.bincount(along[owner], minlength=len(Region) + 1)
    arc = line.arc_length
    regions = []
    for region in Region:
        where = np.flatnonzero(along == region)
        if where.size:
            stop = min(int(where[-1]) + 1, len(arc) - 1)  # the next region's first point closes this one
            length = float(arc[stop] - arc[where[0]])
        else:
            length = 0.0
        mean, low = _stats(profile[where])
        regions.append(RegionMeasurements(region, length, float(voxels[region]) * voxel_mm3, mean, low))
    mean, low = _stats(profile)
    return TractMeasurements(line.length_mm, float(mask.sum()) * voxel_mm3, mean, low, line, profile, tuple(regions))


def measure_labels(labels: np.ndarray, affine: np.ndarray, *,
                   split: RegionSplit | None = None) -> dict[str, TractMeasurements | None]:
    """Both sides of a label volume (1 right, 2 left, as every label volume of the project): {"right", "left"}."""
    labels = np.asarray(labels)
    return {side: measure_tract(labels == value, affine, split=split) for side, value in (("right", 1), ("left", 2))}
