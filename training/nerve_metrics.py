"""Per-nerve 3D metrics: DSC, clDice and the number of connected components.

Per-slice DSC (`training.metrics`) cannot tell a continuous nerve from the same voxels in pieces;
a surgeon needs the canal's course, so the tract step (`ian_node.segment.tract`) is scored per
nerve, in 3D:

- **DSC**: 2|P ∩ G| / (|P| + |G|) over the nerve's voxels (every voxel has the same volume, so this
  is the physical volume overlap). Empty rules as `training.metrics`: both empty 1, one empty 0.
- **clDice** (Shit et al., CVPR 2021): the harmonic mean of topology precision |S(P) ∩ G| / |S(P)|
  and topology sensitivity |S(G) ∩ P| / |S(G)|, S the skeleton (`skimage.morphology.skeletonize`,
  3D; see `_skeleton` for a scikit-image bug worked around). The masks are first resampled to isotropic voxels of the finest spacing (nearest neighbour),
  so that the skeleton is that of the physical shape, not of the anisotropic voxel grid. A tube in
  pieces loses topology sensitivity; an extra branch loses precision. Empty rules as DSC.
- **components**: 26-connected components of the prediction (1 for a continuous nerve).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

_FULL = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class NerveScores:
    """One nerve's 3D scores against its ground truth."""

    dsc: float
    cldice: float
    components: int  # of the prediction


def dsc(prediction: np.ndarray, truth: np.ndarray) -> float:
    """3D Dice of two masks: 1 when both are empty, 0 when only one is."""
    p, g = _masks(prediction, truth)
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int((p & g).sum()) / total


def components(mask: np.ndarray) -> int:
    """Number of 26-connected components of a 3D mask."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {mask.shape}")
    return int(ndimage.label(mask, structure=_FULL)[1])


def cldice(prediction: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Centreline Dice of two 3D masks with voxel size `spacing_mm` (skeletons on an isotropic grid)."""
    p, g = _masks(prediction, truth)
    if not p.any() and not g.any():
        return 1.0
    if not p.any() or not g.any():
        return 0.0
    spacing = np.asarray(spacing_mm, dtype=float)
    if spacing.shape != (3,) or spacing.min() <= 0:
        raise ValueError(f"spacing_mm must be three positive values, got {tuple(spacing_mm)}")
    both = p | g
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(both))
    zoom = spacing / spacing.min()
    p, g = (ndimage.zoom(m[box].astype(np.uint8), zoom, order=0, grid_mode=True, mode="grid-constant") > 0
            for m in (p, g))
    sp, sg = _skeleton(p), _skeleton(g)
    precision = (sp & g).sum() / max(int(sp.sum()), 1)
    sensitivity = (sg & p).sum() / max(int(sg.sum()), 1)
    if precision + sensitivity == 0:
        return 0.0
    return float(2 * precision * sensitivity / (precision + sensitivity))


def nerve_scores(prediction: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> NerveScores:
    """DSC, clDice and the prediction's component count of one nerve."""
    return NerveScores(dsc(prediction, truth), cldice(prediction, truth, spacing_mm), components(prediction))


def _skeleton(mask: np.ndarray) -> np.ndarray:
    """`skeletonize`, working around scikit-image issue #3757 (open): Lee's 3D thinning can delete a
    whole object of even, symmetric thickness. A component left without a skeleton is thickened by
    one voxel on one side of each axis (odd thickness) and thinned again, its skeleton kept inside it;
    failing that, its deepest voxel stands for it."""
    skeleton = skeletonize(mask)
    labels, count = ndimage.label(mask, structure=_FULL)
    lost = np.setdiff1d(np.arange(1, count + 1), labels[skeleton])
    for label in lost:
        component = np.pad(labels == label, 1)
        grown = component.copy()
        for axis in range(3):
            grown |= np.roll(grown, 1, axis=axis)
        again = (skeletonize(grown) & component)[1:-1, 1:-1, 1:-1]
        if not again.any():
            depth = ndimage.distance_transform_edt(component)[1:-1, 1:-1, 1:-1]
            again[np.unravel_index(int(np.argmax(depth)), depth.shape)] = True
        skeleton |= again
    return skeleton


def _masks(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"prediction {p.shape} and truth {g.shape} must be 3D masks of one shape")
    return p, g
