"""The paper's slice transform: hand-computed forward cases, exact mask inverse, model input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from model.preprocess import (
    SliceTransformError,
    image_to_model,
    mask_from_model,
    mask_to_model,
    model_input,
    pad_to_canvas,
    plan_slice_transform,
    probabilities_from_model,
    to_uint8,
)


def _lanczos(canvas: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return np.asarray(Image.fromarray(canvas, mode="L").resize((cols, rows), Image.Resampling.LANCZOS))


def test_min_max_scaling_maps_the_slice_range_onto_0_to_255() -> None:
    img = np.array([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    assert to_uint8(img).tolist() == [[0, 51], [102, 153], [204, 255]]
    assert to_uint8(img).dtype == np.uint8


def test_constant_slice_scales_to_zeros() -> None:
    assert not to_uint8(np.full((4, 5), 7.5)).any()


def test_square_pixels_pad_to_the_matrix_square_and_resize_to_the_full_size() -> None:
    t = plan_slice_transform((3, 2), (1.0, 1.0), size=8)
    assert (t.padded_shape, t.pad_offsets, t.resized_shape, t.offsets) == ((3, 3), (0, 0), (8, 8), (0, 0))


def test_anisotropic_pixels_pad_to_a_physically_square_canvas_before_lanczos() -> None:
    # 2 rows of 2 mm and 4 columns of 0.5 mm: 4 mm x 2 mm, so the canvas is 2 x 8 pixels (4 mm x 4 mm)
    img = np.array([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]])
    t = plan_slice_transform(img.shape, (2.0, 0.5), size=16)
    assert (t.padded_shape, t.pad_offsets, t.resized_shape, t.offsets) == ((2, 8), (0, 2), (16, 16), (0, 0))
    canvas = pad_to_canvas(to_uint8(img), t)
    expected_canvas = np.zeros((2, 8), np.uint8)
    expected_canvas[:, 2:6] = [[0, 36, 73, 109], [146, 182, 219, 255]]
    np.testing.assert_array_equal(canvas, expected_canvas)
    np.testing.assert_array_equal(image_to_model(img, t), _lanczos(expected_canvas, 16, 16))


def test_rounding_left_by_the_canvas_is_centred_with_zero_padding() -> None:
    # 3 x 1 pixels of 1 x 1.7 mm: the canvas rounds to 3 x 2 = 3 mm x 3.4 mm, resized 18 x 20 in 20 x 20
    img = np.array([[1.0], [2.0], [3.0]])
    t = plan_slice_transform(img.shape, (1.0, 1.7), size=20)
    assert (t.padded_shape, t.pad_offsets, t.resized_shape, t.offsets) == ((3, 2), (0, 0), (18, 20), (1, 0))
    canvas = np.array([[0, 0], [128, 0], [255, 0]], np.uint8)
    expected = np.zeros((20, 20), np.uint8)
    expected[1:19, :] = _lanczos(canvas, 18, 20)
    np.testing.assert_array_equal(image_to_model(img, t), expected)


def test_mask_goes_to_model_space_by_nearest_neighbour() -> None:
    t = plan_slice_transform((1, 2), (1.0, 1.0), size=4)  # canvas 2 x 2, mask in row 0
    out = mask_to_model(np.array([[True, False]]), t)
    assert out.dtype == bool
    assert out.astype(int).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_image_and_mask_transforms_put_a_block_in_the_same_place() -> None:
    img = np.zeros((30, 17))
    img[8:14, 3:9] = 1.0
    t = plan_slice_transform(img.shape, (1.3, 0.6), size=64)
    out = image_to_model(img, t).astype(float)
    mask = mask_to_model(img > 0, t)
    centroid_img = np.array([np.average(np.indices(out.shape)[k], weights=out) for k in range(2)])
    centroid_mask = np.argwhere(mask).mean(axis=0)
    assert np.abs(centroid_img - centroid_mask).max() < 0.5


@settings(max_examples=150, deadline=None)
@given(
    h=st.integers(1, 70),
    w=st.integers(1, 70),
    row_mm=st.floats(0.3, 2.0),
    col_mm=st.floats(0.3, 2.0),
    size=st.sampled_from([64, 96, 128, 256]),
    seed=st.integers(0, 2**16),
)
def test_mask_round_trip_is_identical_whenever_the_plan_says_invertible(
    h: int, w: int, row_mm: float, col_mm: float, size: int, seed: int
) -> None:
    t = plan_slice_transform((h, w), (row_mm, col_mm), size)
    mask = np.random.default_rng(seed).random((h, w)) > 0.5
    back = mask_from_model(mask_to_model(mask, t), t)
    if t.invertible:
        np.testing.assert_array_equal(back, mask)
        probs = probabilities_from_model(mask_to_model(mask, t).astype(np.float32), t)
        np.testing.assert_array_equal(probs > 0.5, mask)
    else:
        assert back.shape == mask.shape  # downsampled: defined, but not exact


def test_plan_reports_a_canvas_larger_than_the_model_input_as_not_invertible() -> None:
    t = plan_slice_transform((300, 10), (1.0, 1.0), size=256)
    assert not t.invertible
    with pytest.raises(SliceTransformError, match="300x300 canvas"):
        plan_slice_transform((300, 10), (1.0, 1.0), size=256, require_exact=True)


def test_probabilities_come_back_as_float32_at_source_resolution() -> None:
    t = plan_slice_transform((5, 7), (1.0, 1.0), size=32)
    prob = np.linspace(0, 1, 32 * 32, dtype=np.float64).reshape(32, 32)
    back = probabilities_from_model(prob, t)
    assert back.shape == (5, 7) and back.dtype == np.float32
    assert back[0, 0] == np.float32(prob[t.source_rows()[0], t.source_cols()[0]])


def test_arrays_of_the_wrong_shape_are_refused() -> None:
    t = plan_slice_transform((5, 7), (1.0, 1.0), size=32)
    with pytest.raises(SliceTransformError, match=r"\(5, 7\)"):
        image_to_model(np.zeros((7, 5)), t)
    with pytest.raises(SliceTransformError, match=r"\(32, 32\)"):
        mask_from_model(np.zeros((31, 32), bool), t)
    with pytest.raises(SliceTransformError, match="spacing"):
        plan_slice_transform((5, 7), (0.0, 1.0))


def test_model_input_scales_to_unit_range_and_replicates_grey_to_three_channels() -> None:
    images = np.array([[[0, 255], [51, 102]]] * 2, dtype=np.uint8)
    three = model_input(images, 3)
    assert three.shape == (2, 3, 2, 2) and three.dtype == np.float32
    np.testing.assert_allclose(three[1, 2], [[0.0, 1.0], [0.2, 0.4]], rtol=1e-6)
    assert (three[:, 0] == three[:, 1]).all() and (three[:, 1] == three[:, 2]).all()
    assert model_input(images, 1).shape == (2, 1, 2, 2)
    with pytest.raises(SliceTransformError, match="in_channels"):
        model_input(images, 2)
    with pytest.raises(SliceTransformError, match="uint8"):
        model_input(images.astype(np.float32), 1)
