import numpy as np
import pytest

from ian_node.segment.postprocess import keep_main_tract


def _tract() -> np.ndarray:
    mask = np.zeros((20, 30, 30), dtype=bool)
    mask[2:18, 10:12, 10:12] = True  # the main tube
    return mask


def test_far_island_is_dropped():
    mask = _tract()
    mask[5:7, 25:27, 25:27] = True  # ~20 voxels away
    out = keep_main_tract(mask, (1.0, 1.0, 1.0), max_gap_mm=5.0)
    assert out[2:18, 10:12, 10:12].all()
    assert not out[5:7, 25:27, 25:27].any()


def test_island_within_gap_is_kept():
    mask = _tract()
    mask[18:20, 10:12, 14:16] = True  # sqrt(1 + 3**2) ~ 3.2 mm from the tube's end
    out = keep_main_tract(mask, (1.0, 1.0, 1.0), max_gap_mm=4.0)
    assert out[18:20, 10:12, 14:16].all()


def test_gap_is_measured_in_millimetres_not_voxels():
    mask = _tract()
    mask[5, 10:12, 16:18] = True  # 4 voxels along the last axis
    assert keep_main_tract(mask, (1.0, 1.0, 0.5), max_gap_mm=3.0)[5, 10, 16]  # 2 mm away: kept
    assert not keep_main_tract(mask, (1.0, 1.0, 2.0), max_gap_mm=3.0)[5, 10, 16]  # 8 mm away: dropped


def test_empty_mask_stays_empty():
    assert not keep_main_tract(np.zeros((4, 4, 4), bool), (1, 1, 1)).any()


def test_bad_spacing_is_refused():
    with pytest.raises(ValueError, match="spacing_mm"):
        keep_main_tract(np.zeros((4, 4, 4), bool), (1, 0, 1))
