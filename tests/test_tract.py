"""The tract step: one continuous tract per side, gaps filled up to a length in mm, islands dropped."""

import numpy as np
import pytest

from ian_node.segment.tract import DEFAULT_MAX_GAP_MM, trace_tract

#: Array axis 0 runs anterior → posterior (LPS y), axis 1 inferior → superior (z), axis 2 is x.
AXES = np.array([[0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]])


def _affine(spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    return AXES @ np.diag([*spacing, 1.0])


def _tube(shape=(80, 30, 30), start=5, stop=75, radius=3.0, p=0.9) -> np.ndarray:
    """A straight nerve along axis 0 (anterior-posterior), probability `p` inside."""
    _, yy, xx = np.indices(shape)
    out = np.zeros(shape, dtype=np.float32)
    inside = (yy - shape[1] // 2) ** 2 + (xx - shape[2] // 2) ** 2 <= radius ** 2
    out[start:stop][inside[start:stop]] = p
    return out


def test_a_gap_shorter_than_max_gap_is_filled_into_one_component():
    prob = _tube()
    prob[30:36] = 0.0
    tract = trace_tract(prob, _affine(), max_gap_mm=10.0)
    assert tract.components_before == 2 and tract.components_after == 1
    assert len(tract.gaps_mm) == 1 and 6.0 <= tract.gaps_mm[0] <= 8.0 and tract.filled == 1
    assert tract.mask[30:36, 15, 15].all()  # the gap's centre line is filled
    assert tract.mask[33].sum() >= 0.5 * (prob[40] > 0).sum()  # with a tube, not a thread


def test_pieces_farther_apart_than_max_gap_are_not_linked_and_the_stronger_is_kept():
    prob = _tube()
    prob[30:45] = 0.0  # 15 mm: the anterior 25 slices and the posterior 30 are separate candidates
    tract = trace_tract(prob, _affine(), max_gap_mm=10.0)
    assert tract.filled == 0 and tract.gaps_mm == () and tract.components_after == 1
    assert tract.mask[45:75].any() and not tract.mask[:45].any()
    assert tract.length_mm < 35.0  # the QA sees a short tract
    assert trace_tract(prob, _affine(), max_gap_mm=20.0).mask[5:75, 15, 15].all()


def test_the_gap_is_measured_in_mm_along_the_tract():
    prob = _tube(shape=(50, 30, 30), start=3, stop=47)
    prob[20:26] = 0.0  # 6 slices: about 7 mm at 1 mm per slice, 14 mm at 2 mm
    assert trace_tract(prob, _affine((1.0, 1.0, 1.0)), max_gap_mm=10.0).filled == 1
    coarse = trace_tract(prob, _affine((2.0, 1.0, 1.0)), max_gap_mm=10.0)
    assert coarse.filled == 0 and not coarse.mask[20:26].any()


def test_an_island_off_the_tract_is_dropped():
    prob = _tube()
    prob[40:44, 2:5, 2:5] = 0.95  # beside the nerve, ~13 mm away
    tract = trace_tract(prob, _affine())
    assert tract.components_before == 2 and tract.components_after == 1
    assert not tract.mask[40:44, 2:5, 2:5].any()
    np.testing.assert_array_equal(tract.mask, _tube() > 0)


def test_a_broken_nerve_wins_over_a_larger_single_look_alike():
    prob = _tube(shape=(100, 60, 30), start=5, stop=95)
    for cut in (25, 45, 65):
        prob[cut:cut + 4] = 0.0  # the nerve in 4 pieces of at most 20 slices
    look_alike = np.zeros_like(prob, dtype=bool)
    look_alike[40:60, 50:57, 10:15] = True  # one bright blob, larger than any nerve piece
    prob[look_alike] = 0.99
    nerve_piece = (prob[5:25] > 0).sum()
    assert look_alike.sum() > nerve_piece
    tract = trace_tract(prob, _affine())
    assert not tract.mask[look_alike].any()
    assert tract.components_after == 1 and tract.mask[5:95, 30, 15].all()


def test_the_path_runs_from_the_top_of_the_ramus_to_the_anterior_end():
    """An L: the body's canal along y (axis 0), then up the ramus (axis 1, superior) at the back."""
    prob = np.zeros((80, 60, 20), dtype=np.float32)
    prob[5:62, 8:13, 8:13] = 0.9
    prob[57:62, 8:55, 8:13] = 0.9
    tract = trace_tract(prob, _affine())
    assert tract.components_after == 1 and tract.mask.sum() == (prob > 0).sum()
    assert tract.path[0, 1] >= 53 and tract.path[-1, 0] <= 6  # superior end first, anterior end last
    assert tract.length_mm == pytest.approx(54 + 43, rel=0.06)  # centreline legs, less the corner


def test_the_length_of_a_straight_tract_is_its_length_in_mm():
    tract = trace_tract(_tube(), _affine((0.8, 1.0, 1.0)))
    assert tract.length_mm == pytest.approx(70 * 0.8, abs=2 * 3.0)  # less up to a radius at each end


def test_the_mean_probability_counts_the_gaps_along_the_tract():
    full = trace_tract(_tube(p=0.8), _affine())
    assert full.mean_probability == pytest.approx(0.8, abs=0.02)
    prob = _tube(p=0.8)
    prob[30:36] = 0.0
    assert trace_tract(prob, _affine()).mean_probability < full.mean_probability - 0.05


def test_no_detection_gives_an_empty_tract():
    tract = trace_tract(np.full((10, 10, 10), 0.3, np.float32), _affine())
    assert tract.empty and tract.components_before == 0 and tract.length_mm == 0.0 and len(tract.path) == 0


def test_a_binary_mask_is_traced_like_a_probability_map():
    mask = _tube() > 0
    mask[30:34] = False
    tract = trace_tract(mask.astype(np.float32), _affine())
    assert tract.components_after == 1 and tract.filled == 1


def test_a_negative_max_gap_is_refused():
    with pytest.raises(ValueError, match="max_gap_mm"):
        trace_tract(_tube(), _affine(), max_gap_mm=-1.0)
    assert DEFAULT_MAX_GAP_MM > 0
