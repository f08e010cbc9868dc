"""The pipeline's geometry is exact: ground truth taken to model space and back is unchanged."""

import numpy as np
import pytest

from ian_node.phantom.mr_series import build_mr_series
from ian_node.phantom.study import PhantomConfig, generate_phantom
from ian_node.segment.crop import CropMode, CropRequest
from ian_node.segment.pipeline import PipelineOptions, finish, prepare, segment_series, to_model_space
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


def test_postprocessing_keeps_a_continuous_ground_truth_tract(phantom_series):
    phantom, series = phantom_series
    prepared = prepare(series, 128)
    labels = finish(prepared, to_model_space(prepared, phantom.labels), PipelineOptions())
    np.testing.assert_array_equal(labels, phantom.labels)


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


def test_probabilities_for_the_wrong_number_of_slices_are_refused(phantom_series):
    _, series = phantom_series
    prepared = prepare(series, 64)
    with pytest.raises(ValueError, match="expected probabilities for"):
        finish(prepared, np.zeros((1, 64, 64), np.float32), PipelineOptions())
