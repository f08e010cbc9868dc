"""3D clean-up of a predicted nerve mask: keep the main tract, drop islands far from it.

The network sees one coronal slice at a time, so bright look-alikes (vessels, fat, metal rims) can
light up on isolated slices. The IAN is one continuous tube per side, so components that lie far from
the largest one are dropped; small gaps along the tract are kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: Components whose nearest voxel is farther than this from the main tract are dropped.
DEFAULT_MAX_GAP_MM = 5.0


def keep_main_tract(
    mask: np.ndarray, spacing_mm: Sequence[float], max_gap_mm: float = DEFAULT_MAX_GAP_MM
) -> np.ndarray:
    """The largest 26-connected component plus every component within `max_gap_mm` of it.

    `spacing_mm` gives the voxel size along each array axis, so distances are physical.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {mask.shape}")
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise ValueError(f"spacing_mm must be three positive values, got {tuple(spacing_mm)}")
    if max_gap_mm < 0:
        raise ValueError(f"max_gap_mm must be >= 0, got {max_gap_mm}")
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    main = int(np.argmax(sizes))
    # Distances are needed only at mask voxels, and every main-tract voxel lies inside the mask's
    # bounding box, so the transform runs on that box alone: exact, and far smaller than the volume.
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
    sub = labels[box]
    distance = ndimage.distance_transform_edt(sub != main, sampling=tuple(float(s) for s in spacing_mm))
    inside = sub > 0
    nearest = np.full(count + 1, np.inf)
    np.minimum.at(nearest, sub[inside], distance[inside])
    keep = nearest <= max_gap_mm
    keep[0] = False
    keep[main] = True
    return keep[labels]
