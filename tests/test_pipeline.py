"""The pipeline's geometry is exact: ground truth taken to model space and back is unchanged."""

import numpy as np
import pytest

from ian_node.phantom.mr_series import build_mr_series
from ian_node.phantom.study import PhantomConfig, generate_phantom
from ian_node.segment.crop import CropMode, CropRequest
from ian_node.segment.pipeline import (
    PipelineOptions,
    clean_up,
    finish,
    finish_series,
    prepare,
    segment_series,
    to_model_space,
)
from ian_node.segment.volume import load_series

SMALL = PhantomConfig(shape=(24, 96, 96))


@pytest.fixture(scope="module", params=[0, 3])
def phantom_series(request):
    phantom = generate_phantom(request.param, seed=11, config=SMALL)
    datasets = build_mr_series(phantom.volume, phantom.study, phantom.series)
    return phantom, load_series(datasets)


@pytest.mark.parametrize("size", [256, 128])
def test_ground_truth_through_model_space_comes_back_identical(phantom_series, size):
    phantom, series = phantom_series
    assert phantom.labels.any()
    prepared = prepare(series, size)
    gt_model = to_model_space(prepared, phantom.labels)
    assert gt_model.shape == (len(prepared.images), size, size)
    labels = finish(prepared, gt_model, PipelineOptions(max_gap_mm=None))
    np.testing.assert_array_equal(labels, phantom.labels)


def test_the_tract_step_keeps_a_continuous_ground_truth_tract(phantom_series):
    phantom, series = phantom_series
    prepared = prepare(series, 128)
    labels = finish(prepared, to_model_space(prepared, phantom.labels), PipelineOptions())
    np.testing.assert_array_equal(labels, phantom.labels)


def test_the_tract_step_drops_an_island_and_fills_a_short_gap(phantom_series):
    phantom, series = phantom_series
    prepared = prepare(series, 128)
    broken = phantom.labels.copy()
    right = np.argwhere(broken == 1)
    along = int(np.argmax(np.ptp(right, axis=0)))  # the array axis the right nerve runs along most
    middle = int(np.median(right[:, along]))
    cut = [slice(None)] * 3
    cut[along] = slice(middle, middle + 1)
    broken[tuple(cut)][broken[tuple(cut)] == 1] = 0  # one slice of the right nerve missing
    island = tuple(int(i) for i in np.argwhere(phantom.labels == 0)[0])
    broken[island] = 1
    labels, qa = finish_series(prepared, to_model_space(prepared, broken), PipelineOptions())
    assert labels[island] == 0
    assert qa[0].gaps >= 1 and qa[0].components >= 3 and 0 < qa[0].longest_gap_mm < 5  # pieces + island
    assert (labels[tuple(cut)] == 1).any()  # the gap is bridged
    right, truth = labels == 1, phantom.labels == 1
    assert 2 * (right & truth).sum() / (right.sum() + truth.sum()) > 0.8
    off, _ = finish_series(prepared, to_model_space(prepared, broken), PipelineOptions(max_gap_mm=None))
    np.testing.assert_array_equal(off, broken)  # the clean-up turned off: the network's masks as they are


def test_clean_up_on_labels_alone_drops_an_island_and_keeps_the_tract(phantom_series):
    """The label-only form (no probabilities: a SEG read back, say) that benchmarks use."""
    phantom, series = phantom_series
    labels = phantom.labels.copy()
    island = tuple(int(i) for i in np.argwhere(phantom.labels == 0)[0])
    labels[island] = 2
    np.testing.assert_array_equal(clean_up(labels, series, 10.0), phantom.labels)


class _Oracle:
    """A predictor that answers with the ground truth for the slices it is asked about."""

    def __init__(self, answer: np.ndarray, size: int) -> None:
        self.answer, self.size = answer, size

    def predict(self, images: np.ndarray) -> np.ndarray:
        assert images.shape == self.answer.shape and images.dtype == np.uint8
        return self.answer


def test_segment_series_times_every_stage(phantom_series):
    phantom, series = phantom_series
    prepared = prepare(series, 128)
    options = PipelineOptions(crop=CropRequest(CropMode.HALF))
    result = segment_series(series, _Oracle(to_model_space(prepared, phantom.labels), 128), options)
    np.testing.assert_array_equal(result.labels, phantom.labels)
    assert set(result.timings) == {"load", "localise", "preprocess", "inference", "inverse_postprocess"}
    assert result.crop is not None and {c.mode for c in result.crop.sides.values()} == {CropMode.HALF}
    assert result.voxels["right"] == int((phantom.labels == 1).sum()) > 0
    assert [q.side for q in result.qa] == ["right", "left"]
    for qa in result.qa:  # the ground truth: one tract each, no gap, and no localiser in half mode
        assert (qa.components, qa.gaps, qa.localiser_confidence) == (1, 0, None)
        assert qa.length_mm > 0 and qa.mean_probability == 1.0


def test_probabilities_for_the_wrong_number_of_slices_are_refused(phantom_series):
    _, series = phantom_series
    prepared = prepare(series, 64)
    with pytest.raises(ValueError, match="expected probabilities for"):
        finish(prepared, np.zeros((1, 64, 64), np.float32), PipelineOptions())


def test_context_inputs_are_windows_of_each_sides_own_stack(phantom_series):
    _, series = phantom_series
    prepared = prepare(series, 64)
    np.testing.assert_array_equal(prepared.inputs(1), prepared.images)
    windows = prepared.inputs(3)
    right, left = (s.images for s in prepared.sides)
    assert windows.shape == (len(right) + len(left), 3, 64, 64)
    np.testing.assert_array_equal(windows[len(right) - 1], right[[-2, -1, -1]])  # the edge slice repeated,
    np.testing.assert_array_equal(windows[len(right)], left[[0, 0, 1]])  # never the other side's slice
    np.testing.assert_array_equal(windows[5], right[4:7])
