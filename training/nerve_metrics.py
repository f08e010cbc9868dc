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

The benchmark's per-nerve table (`nerve_row`, one `NerveRow` per model × repeat × patient × side,
`write_per_nerve_csv` → ``reports/per_nerve_metrics.csv``) adds, in mm of the source series
(voxel sizes from its index → LPS affine):

- **HD95** and **ASSD** (MONAI's `compute_hausdorff_distance(percentile=95)` and
  `compute_average_surface_distance(symmetric=True)`, the DeepMind surface-distance definitions on
  the masks' boundary voxels): HD95 is the larger of the two directed 95th percentiles, ASSD the mean
  of both directions' distances pooled. NaN when either mask is empty.
- **centreline distance** (mean and max), **one-way**: from each point of the predicted centreline
  to the true centreline (the polyline, exactly), both from `ian_node.segment.measure.centreline`
  (the longest path through the mask, every 0.5 mm). It says how far off the course is where the
  network found the nerve; how much of the nerve it found is the detected length. NaN when either
  mask is empty.
- **components** of prediction and truth, and the **Betti-0 error** |components_pred - components_true|.
- **lengths**: `length_true_mm` and `length_pred_mm` are the two centrelines' arc lengths (0 for an
  empty mask); `detected_length_mm` is the arc length of the true centreline lying within
  `DETECTION_TOLERANCE_MM` (2 mm) of the prediction: each 0.5 mm segment of the true centreline counts
  when its midpoint is within 2 mm of a predicted voxel's centre. A gap of g mm in an otherwise
  perfect prediction so loses g - 4 mm (its middle; each 2 mm next to the gap's edges still counts).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.morphology import skeletonize

from ian_node.segment.measure import Centreline, centreline

_FULL = np.ones((3, 3, 3), dtype=bool)

#: How near the prediction (mm, to a predicted voxel's centre) a stretch of the true centreline must
#: lie to count as detected (`detected_length`).
DETECTION_TOLERANCE_MM = 2.0


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
    spacing = _check_spacing(spacing_mm)
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


def surface_distances(prediction: np.ndarray, truth: np.ndarray,
                      spacing_mm: Sequence[float]) -> tuple[float, float]:
    """(HD95, ASSD) in mm of two 3D masks (MONAI, definitions in the module docstring); NaN when one is empty."""
    p, g = _masks(prediction, truth)
    spacing = _check_spacing(spacing_mm)
    if not p.any() or not g.any():
        return math.nan, math.nan
    # MONAI finds the boundaries by erosion: a one-voxel margin around both keeps every boundary voxel.
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(p | g))
    p, g = (torch.from_numpy(np.pad(m[box], 1))[None, None] for m in (p, g))
    kwargs = {"include_background": True, "spacing": spacing.tolist()}
    with warnings.catch_warnings():  # MONAI 1.5+ warns about an argument it passes to itself
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd95 = compute_hausdorff_distance(p, g, percentile=95, **kwargs)
        assd = compute_average_surface_distance(p, g, symmetric=True, **kwargs)
    return float(hd95.item()), float(assd.item())


def centreline_distance(predicted: Centreline, true: Centreline) -> tuple[float, float]:
    """(mean, max) distance in mm from each point of `predicted` to the polyline `true` (one-way)."""
    d = _to_polyline(np.asarray(predicted.points, dtype=np.float64), np.asarray(true.points, dtype=np.float64))
    return float(d.mean()), float(d.max())


def detected_length(true: Centreline, prediction: np.ndarray, affine: np.ndarray,
                    tolerance_mm: float = DETECTION_TOLERANCE_MM) -> float:
    """Arc length (mm) of `true` whose segments' midpoints lie within `tolerance_mm` of a predicted voxel centre."""
    points = np.asarray(true.points, dtype=np.float64)
    mask = np.asarray(prediction, dtype=bool)
    if len(points) < 2 or not mask.any():
        return 0.0
    affine = np.asarray(affine, dtype=np.float64)
    voxels = np.argwhere(mask).astype(np.float64) @ affine[:3, :3].T + affine[:3, 3]
    mids = (points[1:] + points[:-1]) / 2
    near = cKDTree(voxels).query(mids, distance_upper_bound=tolerance_mm * (1 + 1e-9))[0] <= tolerance_mm
    return float(np.linalg.norm(np.diff(points, axis=0), axis=1)[near].sum())


@dataclass(frozen=True)
class NerveRow:
    """One row of ``per_nerve_metrics.csv``: a side's whole 3D prediction against its 3D truth, in mm of
    the source series (definitions in the module docstring; NaN where a distance is undefined)."""

    model: str
    repeat: int
    patient: str
    side: str
    gt_empty: bool
    pred_empty: bool
    dsc: float
    hd95_mm: float
    assd_mm: float
    cldice: float
    centreline_mean_mm: float
    centreline_max_mm: float
    components_pred: int
    components_true: int
    betti0_error: int
    length_true_mm: float
    length_pred_mm: float
    detected_length_mm: float


#: The columns of ``per_nerve_metrics.csv``, in order.
PER_NERVE_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(NerveRow))


def nerve_row(model: str, repeat: int, patient: str, side: str, prediction: np.ndarray, truth: np.ndarray,
              affine: np.ndarray, tolerance_mm: float = DETECTION_TOLERANCE_MM) -> NerveRow:
    """Every per-nerve metric of one side: `prediction` and `truth` are 3D masks in the voxels of the
    series whose index → patient LPS mm map is `affine` (4×4); any model's rows are made here."""
    p, g = _masks(prediction, truth)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    hd95, assd = surface_distances(p, g, spacing)
    p_line, g_line = centreline(p, affine), centreline(g, affine)
    mean, most = (centreline_distance(p_line, g_line) if p_line is not None and g_line is not None
                  else (math.nan, math.nan))
    cp, cg = _components_in_box(p), _components_in_box(g)
    return NerveRow(
        model=model, repeat=int(repeat), patient=patient, side=side, gt_empty=not g.any(), pred_empty=not p.any(),
        dsc=dsc(p, g), hd95_mm=hd95, assd_mm=assd, cldice=cldice(p, g, spacing), centreline_mean_mm=mean,
        centreline_max_mm=most, components_pred=cp, components_true=cg, betti0_error=abs(cp - cg),
        length_true_mm=g_line.length_mm if g_line is not None else 0.0,
        length_pred_mm=p_line.length_mm if p_line is not None else 0.0,
        detected_length_mm=detected_length(g_line, p, affine, tolerance_mm) if g_line is not None else 0.0)


def write_per_nerve_csv(rows: Iterable[NerveRow], path: str | Path) -> Path:
    """``per_nerve_metrics.csv``: `PER_NERVE_COLUMNS`, booleans as 0/1, NaN as an empty field."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(PER_NERVE_COLUMNS)
        for row in rows:
            writer.writerow([_cell(v) for v in astuple(row)])
    tmp.replace(path)
    return path


def read_per_nerve_csv(path: str | Path) -> list[NerveRow]:
    """The rows of a ``per_nerve_metrics.csv`` (as `write_per_nerve_csv` writes it)."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != PER_NERVE_COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames} are not {list(PER_NERVE_COLUMNS)}")
        types = {f.name: f.type for f in fields(NerveRow)}
        return [NerveRow(**{k: _parse(v, types[k]) for k, v in row.items()}) for row in reader]


def _cell(value: object) -> object:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


def _parse(text: str, kind: object) -> object:
    if kind in ("bool", bool):
        return text == "1"
    if kind in ("int", int):
        return int(text)
    if kind in ("float", float):
        return math.nan if text == "" else float(text)
    return text


def _to_polyline(points: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Distance of each point (n, 3) to the polyline through `line` (m, 3): to its nearest segment."""
    if len(line) == 1:
        return np.linalg.norm(points - line[0], axis=1)
    a, b = line[:-1], line[1:]
    ab = b - a
    t = np.einsum("nmk,mk->nm", points[:, None] - a[None], ab) / np.maximum((ab * ab).sum(axis=1), 1e-12)
    nearest = a[None] + np.clip(t, 0.0, 1.0)[..., None] * ab[None]
    return np.linalg.norm(points[:, None] - nearest, axis=2).min(axis=1)


def _components_in_box(mask: np.ndarray) -> int:
    """`components` over the mask's bounding box (the same count, far less to label)."""
    if not mask.any():
        return 0
    return components(mask[tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))])


def _check_spacing(spacing_mm: Sequence[float]) -> np.ndarray:
    spacing = np.asarray(spacing_mm, dtype=float)
    if spacing.shape != (3,) or spacing.min() <= 0:
        raise ValueError(f"spacing_mm must be three positive values, got {tuple(spacing_mm)}")
    return spacing


def _skeleton(mask: np.ndarray) -> np.ndarray:
    """`skeletonize`, working around scikit-image issue #3757 (open): Lee's 3D thinning can delete a
    whole object of even, symmetric thickness. A component left without a skeleton is thickened by
    one voxel on one side of each axis (odd thickness) and thinned again, its skeleton kept inside it;
    failing that, its deepest voxel stands for it."""
    skeleton = skeletonize(mask)
    labels, count = ndimage.label(mask, structure=_FULL)
    lost = np.setdiff1d(np.arange(1, count + 1), labels[skeleton])
    boxes = ndimage.find_objects(labels)  # each component handled in its own box: hundreds of specks stay cheap
    for label in lost:
        box = boxes[label - 1]
        component = np.pad(labels[box] == label, 1)
        grown = component.copy()
        for axis in range(3):
            grown |= np.roll(grown, 1, axis=axis)
        again = (skeletonize(grown) & component)[1:-1, 1:-1, 1:-1]
        if not again.any():
            depth = ndimage.distance_transform_edt(component)[1:-1, 1:-1, 1:-1]
            again[np.unravel_index(int(np.argmax(depth)), depth.shape)] = True
        skeleton[box] |= again
    return skeleton


def _masks(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"prediction {p.shape} and truth {g.shape} must be 3D masks of one shape")
    return p, g
