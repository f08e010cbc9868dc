"""Per-nerve 3D metrics against cases whose answer is known by construction."""

import math

import numpy as np
import pytest

from ian_node.segment.measure import Centreline
from training.nerve_metrics import (
    PER_NERVE_COLUMNS,
    centreline_distance,
    cldice,
    components,
    detected_length,
    dsc,
    nerve_row,
    nerve_scores,
    read_per_nerve_csv,
    surface_distances,
    write_per_nerve_csv,
)


def _tube(shape=(60, 20, 20), start=5, stop=55, centre=(10, 10), half=2) -> np.ndarray:
    """A straight square tube of side 2·half along axis 0."""
    out = np.zeros(shape, dtype=bool)
    out[start:stop, centre[0] - half:centre[0] + half, centre[1] - half:centre[1] + half] = True
    return out


def test_dsc_of_a_tube_shifted_by_a_quarter_of_its_width_is_three_quarters():
    assert dsc(_tube(), _tube(centre=(11, 10))) == pytest.approx(0.75)
    assert dsc(_tube(), _tube()) == 1.0


def test_cldice_of_a_shifted_tube_that_still_covers_the_centreline_is_one():
    truth, shifted = _tube(), _tube(centre=(11, 10))
    assert cldice(shifted, truth) == pytest.approx(1.0)
    assert cldice(_tube(centre=(16, 10)), truth) == 0.0  # disjoint tubes: no centreline inside the other


def test_cldice_of_a_broken_tube_loses_the_missing_centreline():
    truth = _tube()
    broken = truth.copy()
    broken[20:30] = False  # 10 of 50 slices missing: topology sensitivity about 0.8, precision 1
    sensitivity = 0.8
    assert cldice(broken, truth) == pytest.approx(2 * sensitivity / (1 + sensitivity), abs=0.03)
    assert dsc(broken, truth) == pytest.approx(2 * 40 / 90)


def test_cldice_is_computed_on_physical_voxels():
    """A tube sampled at 2 mm along its axis: the same physical shape as at 1 mm, the same score."""
    truth = _tube(shape=(30, 20, 20), start=3, stop=28)
    broken = truth.copy()
    broken[10:15] = False
    assert cldice(broken, truth, (2.0, 1.0, 1.0)) == pytest.approx(cldice(broken, truth), abs=0.05)
    with pytest.raises(ValueError, match="spacing_mm"):
        cldice(broken, truth, (0.0, 1.0, 1.0))


def test_components_counts_two_blobs_and_joins_diagonal_neighbours():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[1:3, 1:3, 1:3] = True
    mask[6:8, 6:8, 6:8] = True
    assert components(mask) == 2
    mask[3, 3, 3] = mask[4, 4, 4] = mask[5, 5, 5] = True  # a corner-to-corner chain: 26-connected
    assert components(mask) == 1


def test_empty_masks_score_one_together_and_zero_alone():
    empty = np.zeros((5, 5, 5), dtype=bool)
    assert dsc(empty, empty) == 1.0 and cldice(empty, empty) == 1.0
    assert dsc(_tube(), np.zeros_like(_tube())) == 0.0 and cldice(np.zeros_like(_tube()), _tube()) == 0.0


def test_nerve_scores_gathers_the_three():
    scores = nerve_scores(_tube(), _tube(), (1.0, 1.0, 1.0))
    assert (scores.dsc, scores.cldice, scores.components) == (1.0, 1.0, 1)
    with pytest.raises(ValueError, match="one shape"):
        dsc(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def _affine(spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    return np.diag([*spacing, 1.0])


def _line(shape=(40, 30, 30), at=(10, 10), start=5, stop=35) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[start:stop, at[0], at[1]] = True
    return out


def test_hd95_and_assd_of_a_thin_tube_shifted_sideways_are_the_shift_in_mm():
    # every boundary voxel of a one-voxel line is the line; each lies exactly `shift` from the other line
    spacing = (1.0, 0.5, 2.0)
    assert surface_distances(_line(at=(13, 10)), _line(), spacing) == pytest.approx((1.5, 1.5))
    assert surface_distances(_line(at=(10, 12)), _line(), spacing) == pytest.approx((4.0, 4.0))


def test_hd95_of_a_thick_tube_shifted_sideways_is_the_shift():
    truth = _tube(half=3)
    assert surface_distances(np.roll(truth, 3, axis=1), truth, (1.0, 1.0, 1.0))[0] == pytest.approx(3.0)


def test_one_stray_voxel_moves_assd_by_its_distance_over_the_boundary_count_and_not_hd95():
    truth = _line()
    prediction = truth.copy()
    prediction[20, 10, 25] = True  # 15 mm from the line
    hd95, assd = surface_distances(prediction, truth, (1.0, 1.0, 1.0))
    assert hd95 == 0.0
    assert assd == pytest.approx(15.0 / (30 + 31))  # 61 boundary voxels, one at 15 mm, the rest at 0


def test_surface_distances_are_undefined_when_a_mask_is_empty():
    empty = np.zeros_like(_line())
    assert all(math.isnan(v) for v in surface_distances(empty, _line(), (1.0, 1.0, 1.0)))
    assert all(math.isnan(v) for v in surface_distances(_line(), empty, (1.0, 1.0, 1.0)))


def test_centreline_distance_is_one_way_to_the_true_polyline():
    true = Centreline(np.array([[0.0, 0, 0], [10.0, 0, 0]]))
    assert centreline_distance(Centreline(np.array([[0.0, 1, 0], [5.0, 1, 0]])), true) == pytest.approx((1.0, 1.0))
    # a point beyond the true end is measured to the end; the short prediction is not blamed for what it missed
    assert centreline_distance(Centreline(np.array([[4.0, 0, 0], [12.0, 0, 0]])), true) == pytest.approx((1.0, 2.0))


def test_centreline_distance_of_a_shifted_tube_is_the_shift():
    odd = np.zeros((60, 20, 20), dtype=bool)
    odd[5:55, 7:10, 9:12] = True  # a 3 x 3 tube, centred on (8, 10)
    row = nerve_row("m", 0, "p", "right", np.roll(odd, 2, axis=1), odd, _affine((1.0, 0.8, 0.8)))
    assert row.centreline_mean_mm == pytest.approx(1.6, abs=0.05)
    assert row.centreline_max_mm == pytest.approx(1.6, abs=0.05)


def test_detected_length_of_a_tube_with_a_gap_loses_the_gap_less_the_tolerance_at_both_edges():
    truth = np.zeros((80, 15, 15), dtype=bool)
    truth[5:75, 6:9, 6:9] = True
    broken = truth.copy()
    broken[30:45] = False  # a 15 mm gap: its middle 11 mm lie beyond 2 mm of the prediction
    row = nerve_row("m", 0, "p", "left", broken, truth, _affine())
    assert row.detected_length_mm == pytest.approx(row.length_true_mm - (15 - 4), abs=1.0)
    assert row.components_pred == 2 and row.components_true == 1 and row.betti0_error == 1
    whole = nerve_row("m", 0, "p", "left", truth, truth, _affine())
    assert whole.detected_length_mm == pytest.approx(whole.length_true_mm)
    assert whole.length_true_mm == pytest.approx(70 - 3, abs=1.5)  # from cap centre to cap centre


def test_detected_length_counts_only_midpoints_within_the_tolerance():
    true = Centreline(np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]]))
    prediction = np.zeros((10, 10, 10), dtype=bool)
    prediction[0, 2, 0] = True  # voxel at (0, 2, 0) mm: midpoint (0.5, 0, 0) is 2.06 mm off, (1.5, 0, 0) 2.5 mm
    assert detected_length(true, prediction, _affine()) == 0.0
    assert detected_length(true, prediction, _affine(), tolerance_mm=2.1) == pytest.approx(1.0)


def test_nerve_row_of_a_perfect_prediction():
    truth = _tube(half=1)
    row = nerve_row("unet", 2, "P7", "right", truth, truth, _affine((1.6, 0.8, 0.8)))
    assert (row.dsc, row.cldice, row.hd95_mm, row.assd_mm) == (1.0, 1.0, 0.0, 0.0)
    assert (row.centreline_mean_mm, row.centreline_max_mm) == pytest.approx((0.0, 0.0), abs=1e-9)
    assert (row.components_pred, row.components_true, row.betti0_error) == (1, 1, 0)
    assert row.length_pred_mm == row.length_true_mm == pytest.approx(row.detected_length_mm)
    assert row.length_true_mm > 60  # 50 slices of 1.6 mm, less the caps
    assert not row.gt_empty and not row.pred_empty


def test_nerve_row_of_an_empty_prediction_leaves_the_distances_undefined():
    truth = _tube()
    row = nerve_row("unet", 0, "P1", "left", np.zeros_like(truth), truth, _affine())
    assert row.pred_empty and not row.gt_empty and row.dsc == 0.0 and row.cldice == 0.0
    assert all(math.isnan(v) for v in (row.hd95_mm, row.assd_mm, row.centreline_mean_mm, row.centreline_max_mm))
    assert (row.components_pred, row.betti0_error, row.length_pred_mm, row.detected_length_mm) == (0, 1, 0.0, 0.0)


def test_per_nerve_csv_has_the_schema_and_reads_back(tmp_path):
    truth = _tube()
    rows = [nerve_row("unet", 0, "P1", "left", np.zeros_like(truth), truth, _affine()),
            nerve_row("ian_net", 1, "P2", "right", truth, truth, _affine())]
    path = write_per_nerve_csv(rows, tmp_path / "per_nerve_metrics.csv")
    assert path.read_text().splitlines()[0] == ",".join(PER_NERVE_COLUMNS)
    assert PER_NERVE_COLUMNS == (
        "model", "repeat", "patient", "side", "gt_empty", "pred_empty", "dsc", "hd95_mm", "assd_mm", "cldice",
        "centreline_mean_mm", "centreline_max_mm", "components_pred", "components_true", "betti0_error",
        "length_true_mm", "length_pred_mm", "detected_length_mm")
    back = read_per_nerve_csv(path)
    assert back[1] == rows[1]
    assert back[0].pred_empty is True and math.isnan(back[0].hd95_mm) and back[0].repeat == 0
