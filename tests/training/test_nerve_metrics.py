"""Per-nerve 3D metrics against cases whose answer is known by construction."""

import numpy as np
import pytest

from training.nerve_metrics import cldice, components, dsc, nerve_scores


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
