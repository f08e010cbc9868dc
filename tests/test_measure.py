"""Nerve measurements (ian_node.segment.measure) on tubes of known length and radius, and on phantom truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from ian_node.phantom.study import generate_phantom, phantom_preset
from ian_node.segment.measure import (
    Region,
    RegionSplit,
    centreline,
    measure_labels,
    measure_tract,
    region_map,
    regions_along,
)

SPACING = np.array([1.6, 0.8, 0.8])  # slices, rows, columns (mm): anisotropic like an MRN series


def _affine(rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix() @ np.diag(SPACING)
    affine[:3, 3] = (-40.0, -45.0, -50.0)
    return affine


def _tube(affine: np.ndarray, shape: tuple[int, int, int], path: np.ndarray, radius: float) -> np.ndarray:
    """Voxels whose centre lies within `radius` of the densely sampled LPS `path` (rounded ends)."""
    idx = np.indices(shape).reshape(3, -1).T.astype(float)
    centres = idx @ affine[:3, :3].T + affine[:3, 3]
    dist = cKDTree(path).query(centres)[0]
    return (dist <= radius).reshape(shape)


def _polyline(*corners: tuple[float, float, float], step: float = 0.05) -> np.ndarray:
    pts = [np.linspace(a, b, int(np.linalg.norm(np.subtract(b, a)) / step) + 1)
           for a, b in zip(corners[:-1], corners[1:], strict=True)]
    return np.concatenate(pts)


def _path_length(path: np.ndarray) -> float:
    return float(np.sum(np.linalg.norm(np.diff(path, axis=0), axis=1)))


def test_straight_oblique_tube_gives_its_length_volume_and_diameter():
    affine = _affine((12.0, -8.0, 20.0))
    shape = (60, 110, 110)
    centre = affine[:3, :3] @ (np.array(shape) / 2) + affine[:3, 3]
    direction = np.array([0.5, -0.6, 0.62]) / np.linalg.norm([0.5, -0.6, 0.62])
    path = _polyline(tuple(centre - 30 * direction), tuple(centre + 30 * direction))
    mask = _tube(affine, shape, path, 1.5)
    m = measure_tract(mask, affine)
    assert m is not None
    # A tube's centreline ends at its caps' centres: the path itself.
    assert m.length_mm == pytest.approx(60.0, rel=0.03)
    assert m.volume_mm3 == pytest.approx(mask.sum() * np.prod(SPACING))
    assert m.volume_mm3 == pytest.approx(np.pi * 1.5**2 * 60 + 4 / 3 * np.pi * 1.5**3, rel=0.05)
    assert m.mean_diameter_mm == pytest.approx(3.0, rel=0.08)
    assert 2.6 < m.min_diameter_mm <= m.mean_diameter_mm
    # Every centreline point lies near the true axis: within half a slice at the caps, closer inside.
    off_axis = cKDTree(path).query(m.centreline.points)[0]
    assert off_axis.max() < SPACING.max() / 2 and off_axis[8:-8].max() < 0.4


def test_a_thicker_stretch_shows_in_the_diameter_profile_and_the_minimum_is_the_thin_part():
    affine = _affine()
    shape = (40, 100, 70)
    a, b, c = np.array([-5.0, -40.0, -20.0]), np.array([-5.0, 0.0, -20.0]), np.array([-5.0, 30.0, -20.0])
    thin = _tube(affine, shape, _polyline(tuple(a), tuple(c)), 1.5)
    thick = _tube(affine, shape, _polyline(tuple(b + [0, 5, 0]), tuple(c)), 3.0)
    m = measure_tract(thin | thick, affine)
    # A tube 2 to 4 voxels across: its voxel count, so its area, depends on how it meets the grid.
    assert m.min_diameter_mm == pytest.approx(3.0, rel=0.15)
    assert np.nanmax(m.diameter_profile_mm) == pytest.approx(6.0, rel=0.1)


def test_curved_nerve_runs_from_the_ramus_to_the_mental_end_and_splits_into_regions():
    # LPS: +y posterior, +z superior. Down the ramus 40 mm, a bend, then 60 mm forward (to -y).
    affine = _affine()
    shape = (45, 120, 80)
    origin = affine[:3, 3]
    top = origin + (30.0, 80.0, 65.0)
    corner = top + (0.0, 0.0, -40.0)
    front = corner + (0.0, -60.0, 0.0)
    path = _polyline(tuple(top), tuple(corner), tuple(front))
    mask = _tube(affine, shape, path, 1.3)
    m = measure_tract(mask, affine)
    line = m.centreline
    assert line.points[0][2] > line.points[-1][2] + 30  # starts up in the ramus
    assert line.points[-1][1] < line.points[0][1] - 50  # ends anteriorly
    assert m.length_mm == pytest.approx(_path_length(path), rel=0.04)  # the bend is smoothed a little
    ramus, body, mental = (m.region(r) for r in Region)
    assert ramus.length_mm == pytest.approx(40.0, abs=4.0)
    assert mental.length_mm == pytest.approx(15.0, abs=0.6)
    assert ramus.length_mm + body.length_mm + mental.length_mm == pytest.approx(m.length_mm)
    assert ramus.volume_mm3 + body.volume_mm3 + mental.volume_mm3 == pytest.approx(m.volume_mm3)
    labels = regions_along(line)
    assert np.all(np.diff(labels) >= 0)  # contiguous: ramus, body, mental
    regions = region_map(mask, affine, line)
    assert set(np.unique(regions[mask])) == {1, 2, 3} and not regions[~mask].any()
    assert (regions == Region.BODY).sum() * np.prod(SPACING) == pytest.approx(body.volume_mm3)


def test_a_tract_without_a_ramus_part_is_body_and_mental_only():
    affine = _affine()
    shape = (30, 100, 40)
    start = affine[:3, 3] + (15.0, 70.0, 20.0)
    path = _polyline(tuple(start), tuple(start + (0.0, -55.0, 3.0)))
    m = measure_tract(_tube(affine, shape, path, 1.2), affine)
    assert m.region(Region.RAMUS).length_mm == 0.0 and m.region(Region.RAMUS).volume_mm3 == 0.0
    assert m.region(Region.MENTAL).length_mm == pytest.approx(15.0, abs=0.6)


def test_region_split_refuses_an_inclination_outside_0_to_90():
    with pytest.raises(ValueError, match="body_inclination_deg"):
        RegionSplit(body_inclination_deg=95.0)


@pytest.mark.parametrize("width", [4, 6])
def test_a_blocky_prism_of_even_width_keeps_its_centreline(width: int):
    """Thinning erases a straight prism of even width whole; the length must not collapse to zero."""
    mask = np.zeros((40, 20, 20), dtype=bool)
    mask[5:35, 7:7 + width, 7:7 + width] = True  # 30 voxels of 1 mm along the first axis
    tract = measure_tract(mask, np.eye(4))
    # a tube's centreline runs between its end caps' centres: 30 mm less about one width
    assert 30 - 1.5 * width <= tract.length_mm <= 30
    assert tract.mean_diameter_mm is not None and width <= tract.mean_diameter_mm <= 1.3 * width


def test_empty_mask_has_no_measurements():
    empty = np.zeros((5, 6, 7), dtype=bool)
    assert measure_tract(empty, _affine()) is None
    assert centreline(empty, _affine()) is None


def test_a_single_voxel_has_a_centreline_no_longer_than_the_voxel():
    mask = np.zeros((5, 6, 7), dtype=bool)
    mask[2, 3, 3] = True
    m = measure_tract(mask, _affine())
    assert m.length_mm <= SPACING.max() and m.volume_mm3 == pytest.approx(np.prod(SPACING))


@pytest.mark.parametrize("patient", [0, 1])
def test_demo_phantom_truth_length_within_3_percent(patient: int):
    phantom = generate_phantom(patient, 7, phantom_preset("demo"))
    measured = measure_labels(phantom.labels, phantom.volume.affine)
    for side, value in (("right", 1), ("left", 2)):
        truth = phantom.params["nerve_length_in_fov_mm"][side]
        assert measured[side].length_mm == pytest.approx(truth, rel=0.03), side
        voxels = int((phantom.labels == value).sum())
        assert measured[side].volume_mm3 == pytest.approx(voxels * phantom.volume.voxel_volume, rel=1e-9)
        brush = phantom.params[side]["annotation_inset"] * phantom.params[side]["nerve_radius_mm"]
        assert measured[side].mean_diameter_mm == pytest.approx(2 * brush, rel=0.12), side
