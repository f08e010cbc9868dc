"""Stage one: each side's crop box found from the whole series by the localiser network.

The series is resampled onto an axis-aligned LPS grid of `LocaliserMeta.spacing_mm` covering its
whole extent (so an oblique or anisotropic acquisition and an off-centre head look the same to the
network), after a block mean that stands in for the low-pass filter. The network's per-voxel "inside
this side's crop" probability is turned into a box by its marginal profiles: along each axis the box
is as long as the profile's area and centred on its mean, which is sub-voxel and ignores stray
voxels. Confidence is the Dice overlap of the probability map with the fitted box: near 1 for a
box-shaped answer, near 0 when the network sees no mandible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import torch
from scipy import ndimage

from ian_node.segment.reformat import PatientBox, extent_corners, split_at_overlap
from ian_node.segment.volume import SeriesVolume, Side
from model.localiser import GRID_MULTIPLE, LoadedLocaliser

#: Intensities are divided by this percentile of the in-field voxels (robust to a few bright vessels).
NORMALISE_PERCENTILE = 99.0
#: Smallest box edge a plausible crop has, in mm (a mandible side is several centimetres everywhere).
MIN_EDGE_MM = 15.0


@dataclass(frozen=True)
class LocaliserGrid:
    """The network's input: channels (2, X, Y, Z) on an LPS-aligned grid; index (i, j, k) is at
    `origin + spacing * (i, j, k)` in LPS mm (x patient left, y posterior, z head)."""

    image: np.ndarray  # float32 (2, X, Y, Z): normalised intensity, inside-the-field-of-view mask
    origin: np.ndarray  # (3,) LPS mm of voxel (0, 0, 0)
    spacing: float

    def centres(self, axis: int) -> np.ndarray:
        """LPS coordinate of every voxel centre along `axis`."""
        return self.origin[axis] + self.spacing * np.arange(self.image.shape[1 + axis])

    def occupancy(self, box: PatientBox) -> np.ndarray:
        """bool (X, Y, Z): voxels whose centre lies in `box` (the training target)."""
        inside = [box.contains_1d(self.centres(a), a) for a in range(3)]
        return inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]


@dataclass(frozen=True)
class SideLocation:
    """One side's answer: the fitted box (with the safety margin) or None, and its confidence."""

    box: PatientBox | None
    confidence: float


@dataclass(frozen=True)
class Localisation:
    sides: dict[Side, SideLocation]
    seconds: float


def localiser_grid(volume: hd.Volume, spacing: float) -> LocaliserGrid:
    """A whole series volume on an LPS-aligned grid of `spacing` mm, normalised for the localiser."""
    data = np.asarray(volume.array, dtype=np.float32)
    affine = np.asarray(volume.affine, dtype=np.float64)
    steps = np.linalg.norm(affine[:3, :3], axis=0)  # mm per index step along each array axis
    factors = np.maximum(1, np.floor(spacing / steps + 1e-6).astype(int))
    data, affine = _block_mean(data, affine, factors)
    corners = extent_corners(volume)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    shape = np.maximum(1, np.ceil((hi - lo) / spacing).astype(int))
    shape = np.maximum(-(-shape // GRID_MULTIPLE) * GRID_MULTIPLE, 2 * GRID_MULTIPLE)  # >= 2 voxels at the bottleneck
    origin = (lo + hi) / 2 - spacing * (shape - 1) / 2  # the grid centred on the field of view
    axes = [origin[a] + spacing * np.arange(shape[a]) for a in range(3)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=0).reshape(3, -1)
    inverse = np.linalg.inv(affine)
    index = inverse[:3, :3] @ points + inverse[:3, 3:4]
    values = ndimage.map_coordinates(data, index, order=1, mode="constant", cval=0.0, prefilter=False)
    limit = np.array(data.shape)[:, None] - 0.5
    inside = np.all((index >= -0.5) & (index <= limit), axis=0)
    image = np.zeros((2, *shape), dtype=np.float32)
    scale = float(np.percentile(values[inside], NORMALISE_PERCENTILE)) if inside.any() else 0.0
    image[0] = (np.clip(values / scale, 0.0, 2.0) if scale > 0 else 0.0).reshape(shape)
    image[1] = inside.reshape(shape)
    return LocaliserGrid(image=image, origin=origin, spacing=float(spacing))


def _block_mean(data: np.ndarray, affine: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average non-overlapping blocks of `factors` voxels; the affine follows the block centres."""
    if np.all(factors == 1):
        return data, affine
    trimmed = [n - n % f if n >= f else n for n, f in zip(data.shape, factors, strict=True)]
    factors = np.array([f if n >= f else 1 for n, f in zip(data.shape, factors, strict=True)])
    data = data[: trimmed[0], : trimmed[1], : trimmed[2]]
    shape = [trimmed[a] // factors[a] for a in range(3)]
    data = data.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2]).mean(axis=(1, 3, 5))
    scale = np.eye(4)
    scale[:3, :3] = np.diag(factors)
    scale[:3, 3] = (factors - 1) / 2
    return np.ascontiguousarray(data, dtype=np.float32), affine @ scale


def predict_occupancy(localiser: LoadedLocaliser, grid: LocaliserGrid) -> np.ndarray:
    """float32 (2, X, Y, Z) probabilities that each voxel lies in the right / left crop box."""
    with torch.inference_mode():
        logits = localiser.model(torch.from_numpy(grid.image)[None])
    return torch.sigmoid(logits[0]).numpy()


def fit_box(probability: np.ndarray, grid: LocaliserGrid) -> tuple[PatientBox | None, float]:
    """The box a probability map describes, from its marginal profiles, and its Dice confidence."""
    mask = probability >= 0.5
    labels, count = ndimage.label(mask)
    if count == 0:
        return None, 0.0
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    main = labels == 1 + int(np.argmax(sizes))
    region = tuple(slice(max(0, s.start - 2), s.stop + 2) for s in ndimage.find_objects(main.astype(np.int8))[0])
    p = probability[region]
    bounds = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        profile = _profile(p, main[region], axis, others)
        centres = grid.centres(axis)[region[axis]]
        length = float(profile.sum()) * grid.spacing
        if length < MIN_EDGE_MM:
            return None, 0.0
        middle = float((profile * centres).sum() / profile.sum())
        bounds.append((middle - length / 2, middle + length / 2))
    box = PatientBox(*[v for b in bounds for v in b])
    target = grid.occupancy(box)
    dice = 2.0 * float((probability * target).sum()) / (float(probability.sum()) + float(target.sum()) + 1e-6)
    return box, dice


def _profile(p: np.ndarray, main: np.ndarray, axis: int, others: tuple[int, int]) -> np.ndarray:
    """Mean probability along `axis`, over the cross-section the main component occupies at its widest."""
    footprint = main.any(axis=axis)  # the component's shadow on the other two axes
    weights = np.expand_dims(footprint, axis).astype(np.float32)
    return (p * weights).sum(axis=others) / max(float(footprint.sum()), 1.0)


def grow(boxes: dict[Side, PatientBox | None], margin_mm: float) -> dict[Side, PatientBox | None]:
    """Every face moved out by `margin_mm`, except that the two sides never cross each other medially."""
    grown = {side: None if b is None else PatientBox(*(b.bounds + np.array([-margin_mm, margin_mm])).reshape(-1))
             for side, b in boxes.items()}
    right, left = grown.get(Side.RIGHT), grown.get(Side.LEFT)
    if right is not None and left is not None:
        grown[Side.RIGHT], grown[Side.LEFT] = split_at_overlap(right, left)
    return grown


def locate(series: SeriesVolume, localiser: LoadedLocaliser) -> Localisation:
    """Both sides' crop boxes (safety margin included) and confidences for one series."""
    start = time.perf_counter()
    grid = localiser_grid(series.volume, localiser.meta.spacing_mm)
    occupancy = predict_occupancy(localiser, grid)
    fitted = {side: fit_box(occupancy[k], grid) for k, side in enumerate((Side.RIGHT, Side.LEFT))}
    boxes = grow({side: box for side, (box, _) in fitted.items()}, localiser.meta.safety_margin_mm)
    sides = {side: SideLocation(boxes[side], conf) for side, (_, conf) in fitted.items()}
    return Localisation(sides, time.perf_counter() - start)
