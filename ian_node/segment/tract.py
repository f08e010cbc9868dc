"""One side's nerve as one continuous tract: link the per-slice detections, fill short gaps, drop islands.

The network sees one coronal slice at a time, so its 3D mask is a stack of per-slice answers: the
nerve broken where a slice missed it, and bright look-alikes (vessels, fat, the lingual nerve) lit
on a few slices. The IAN is one tube per side from the mandibular foramen (posterior-superior, in
the ramus; the paper's annotations and the phantoms carry it on up towards the cranial base) to the
mental foramen (anterior). `trace_tract` rebuilds that tube:

1. **Chain.** The detections (probability >= threshold) are split into 26-connected components,
   and components closer than `max_gap_mm` to each other are chained (single linkage: a dilation by
   half the gap in mm, then labelling). The chain with the most probability mass is the nerve: the
   nerve is long and is detected on most slices, a look-alike is short or dim, so mass favours the
   nerve even when a single look-alike component is the largest (where the old "largest
   component" rule failed).
2. **Path.** A minimal path through the chain's probability map (`skimage.graph.MCP_Geometric`,
   cost per mm ``-log(p) + LENGTH_COST_PER_MM``, physical spacing; p smoothed by
   `PATH_SMOOTHING_MM` so that the path keeps to the middle of the tube) from the chain's
   posterior-superior end (largest y + z in LPS) to its anterior end (smallest y). A minimal path rather than a graph of
   slice components because it also says *where* a gap runs (so it can be filled as a tube) and
   how long it is along the nerve, it follows the probability through the weak slices where a gap
   is, and it needs no per-slice matching rules; the cost of -log(p) is the path's negative log
   likelihood, so it prefers the network's evidence and crosses background only where it must.
3. **Tract.** The components the path passes through, plus every gap of the path outside the
   detections up to `max_gap_mm` long (measured along the path), filled with a tube of the local
   radius (the detections' distance-to-surface at the path on either side of the gap). Everything
   else is an island and is dropped.

The tract's length (its centreline, `ian_node.segment.measure.centreline`, the one the report
measures; for a tract left in pieces, that of its longest piece) and the mean probability along the
path feed the per-side QA (`ian_node.segment.qa`). Chaining beyond `max_gap_mm`
(so that a nerve broken by a longer gap stays one broken tract) and keeping every chained component
were both tried on the held-out phantoms and scored worse (docs/tract.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.graph import MCP_Geometric

from ian_node.segment.measure import centreline

#: Gaps along the tract up to this long (mm, along the path) are filled; also the chaining distance.
DEFAULT_MAX_GAP_MM = 10.0
#: Probabilities are floored here before the log, so a path through background has a finite cost.
P_FLOOR = 1e-3
#: Cost per mm added everywhere, so that among paths of equal evidence the shorter one wins.
LENGTH_COST_PER_MM = 0.05
#: How far beyond the chain (mm) the path may detour.
PATH_MARGIN_MM = 5.0
#: Path voxels on each side of a gap whose distance-to-surface gives the gap's tube radius.
RADIUS_SAMPLES = 5
#: Smoothing (mm, Gaussian sigma) of the probabilities that the path follows, so that it runs mid-tube.
PATH_SMOOTHING_MM = 1.0
#: An end of the chain is chosen among the voxels this close (mm) to its extreme.
END_TOLERANCE_MM = 1.0

_FULL = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Tract:
    """One side's traced tract in the input grid, and the figures QA judges it by."""

    mask: np.ndarray  # bool: the tract (detections on the path plus the filled gaps)
    path: np.ndarray  # int (k, 3): voxel indices, posterior-superior end first; (0, 3) when empty
    gaps_mm: tuple[float, ...]  # every gap of the path outside the detections, before filling
    filled: int  # how many of those gaps were filled (the ones <= max_gap_mm)
    components_before: int  # 26-connected components of the detections
    components_after: int  # 26-connected components of `mask`
    length_mm: float  # of the mask's centreline (`ian_node.segment.measure.centreline`)
    mean_probability: float  # along the path, gaps included

    @property
    def empty(self) -> bool:
        return not self.mask.any()


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along each array axis of an index → LPS affine."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0))


def _box(mask: np.ndarray, margin: np.ndarray) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - m, 0), min(int(i.max()) + m + 1, n))
                 for i, m, n in zip(idx, margin, mask.shape, strict=True))


def _chains(components: np.ndarray, spacing: tuple[float, ...], link_mm: float) -> np.ndarray:
    """Each component's chain id (index = component label): components within `link_mm` chain."""
    grown = ndimage.distance_transform_edt(components == 0, sampling=spacing) <= link_mm / 2
    chained, _ = ndimage.label(grown, structure=_FULL)
    ids = np.zeros(int(components.max()) + 1, dtype=np.int64)
    ids[components[components > 0]] = chained[components > 0]
    return ids


def _endpoints(chain: np.ndarray, affine: np.ndarray, centred: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """The chain's posterior-superior end (largest LPS y + z) and its anterior end (smallest y): of the
    voxels within `END_TOLERANCE_MM` of each extreme, the one where `centred` is highest (mid-tube)."""
    idx = np.argwhere(chain)
    lps = idx @ np.asarray(affine, dtype=float)[:3, :3].T
    ends = []
    for key in (lps[:, 1] + lps[:, 2], -lps[:, 1]):
        near = idx[key >= key.max() - END_TOLERANCE_MM]
        ends.append(tuple(near[int(np.argmax(centred[tuple(near.T)]))]))
    return tuple(ends)


def _gap_runs(on: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of False in `on` (the path's steps outside the detections)."""
    edges = np.diff(np.concatenate([[1], on.astype(np.int8), [1]]))
    return list(zip(np.flatnonzero(edges == -1).tolist(), np.flatnonzero(edges == 1).tolist(), strict=True))


def _fill_tube(out: np.ndarray, points: np.ndarray, radius: float, spacing: tuple[float, ...]) -> None:
    """Set every voxel within `radius` mm of the path points, in place."""
    reach = np.ceil(radius / np.asarray(spacing)).astype(int) + 1
    lo = np.maximum(points.min(axis=0) - reach, 0)
    hi = np.minimum(points.max(axis=0) + reach + 1, out.shape)
    local = np.ones(tuple(hi - lo), dtype=bool)
    local[tuple((points - lo).T)] = False
    near = ndimage.distance_transform_edt(local, sampling=spacing) <= radius
    out[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] |= near


def empty_tract(shape: tuple[int, ...]) -> Tract:
    return Tract(np.zeros(shape, dtype=bool), np.zeros((0, 3), dtype=np.int64), (), 0, 0, 0, 0.0, 0.0)


def trace_tract(probability: np.ndarray, affine: np.ndarray, threshold: float = 0.5,
                max_gap_mm: float = DEFAULT_MAX_GAP_MM) -> Tract:
    """One side's tract from its probability map (any 3D grid; `affine` maps its indices to LPS mm).

    A binary mask works as a probability map (1 inside, 0 outside): the path then runs through the
    detections and straight across the gaps.
    """
    probability = np.asarray(probability, dtype=np.float32)
    if probability.ndim != 3:
        raise ValueError(f"probability must be 3D, got shape {probability.shape}")
    if max_gap_mm < 0:
        raise ValueError(f"max_gap_mm must be >= 0, got {max_gap_mm}")
    affine = np.asarray(affine, dtype=float)
    spacing = voxel_spacing(affine)
    if min(spacing) <= 0:
        raise ValueError(f"affine has a zero voxel size: {spacing}")
    detected = probability >= threshold
    if not detected.any():
        return empty_tract(probability.shape)

    # everything below happens in the detections' bounding box, grown by the chaining and detour reach
    margin = np.ceil((max_gap_mm + PATH_MARGIN_MM) / np.asarray(spacing)).astype(int)
    box = _box(detected, margin)
    origin = np.array([s.start for s in box])
    det, prob = detected[box], probability[box]
    components, count = ndimage.label(det, structure=_FULL)
    chain_of = _chains(components, spacing, max_gap_mm)
    mass = np.bincount(chain_of[components[det]], weights=prob[det])
    chain = det & (chain_of[components] == int(np.argmax(mass)))

    centred = ndimage.gaussian_filter(prob, PATH_SMOOTHING_MM / np.asarray(spacing))
    start, end = _endpoints(chain, affine, centred)
    cost = -np.log(np.clip(centred, P_FLOOR, 1.0)) + LENGTH_COST_PER_MM
    reach = _box(chain, np.ceil(PATH_MARGIN_MM / np.asarray(spacing)).astype(int))
    cost_outside = np.full(cost.shape, np.inf)
    cost_outside[reach] = cost[reach]
    mcp = MCP_Geometric(cost_outside, fully_connected=True, sampling=spacing)
    mcp.find_costs([start], [end])
    path = np.asarray(mcp.traceback(end), dtype=np.int64)

    on = det[tuple(path.T)]
    inside = ndimage.distance_transform_edt(det, sampling=spacing)
    steps = np.concatenate([[0.0], np.linalg.norm(np.diff(path, axis=0) * np.asarray(spacing), axis=1)])
    tract = np.isin(components, np.unique(components[tuple(path[on].T)]))
    gaps, filled = [], 0
    for a, b in _gap_runs(on):
        length = float(steps[a:b + 1].sum())  # from the last detected voxel before to the first after
        gaps.append(length)
        if length <= max_gap_mm:
            near = path[max(a - RADIUS_SAMPLES, 0):a].tolist() + path[b:b + RADIUS_SAMPLES].tolist()
            radius = float(np.median(inside[tuple(np.asarray(near).T)])) - 0.5 * min(spacing)
            _fill_tube(tract, path[a:b], max(radius, 0.5 * min(spacing)), spacing)
            filled += 1

    mask = np.zeros(probability.shape, dtype=bool)
    mask[box] = tract
    path = path + origin
    return Tract(mask=mask, path=path, gaps_mm=tuple(gaps), filled=filled, components_before=count,
                 components_after=int(ndimage.label(tract, structure=_FULL)[1]),
                 length_mm=centreline(mask, affine).length_mm,
                 mean_probability=float(probability[tuple(path.T)].mean()))
