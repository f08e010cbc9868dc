"""Per-nerve evaluation in the source series: a written phantom study read back, cropped and scored in mm."""

from __future__ import annotations

import numpy as np
import pytest

from ian_node.phantom.study import phantom_preset, write_phantoms
from ian_node.segment.pipeline import PipelineOptions, finish_series, to_model_space
from training.data import SampleMeta, SliceSet
from training.data.collect import Collector, LoadOptions
from training.localiser_run import READERS
from training.nerve_eval import EvalStudy, eval_studies, evaluate_nerves, predict_labels, score_labels
from training.presets import Runtime, preset
from training.runner import BenchmarkPaths, Ledger

SIZE = 64


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> EvalStudy:
    root = tmp_path_factory.mktemp("phantoms")
    [files] = write_phantoms(root, 1, 3, phantom_preset("small"))
    load = LoadOptions(size=SIZE)
    readers = READERS["dicom"](root, load, lambda patient: True, "landmarks")
    [found] = list(eval_studies(readers, Collector(load), SIZE, {files.patient_id: {"right", "left"}}))
    return found


def test_the_truth_as_prediction_scores_perfectly_on_both_sides(study):
    rows = score_labels("unet", 0, study, study.truth)
    assert [r.side for r in rows] == ["right", "left"]
    for r in rows:
        assert (r.dsc, r.cldice, r.hd95_mm, r.assd_mm, r.betti0_error) == (1.0, 1.0, 0.0, 0.0, 0)
        assert r.centreline_max_mm == pytest.approx(0.0, abs=1e-9)
        assert r.detected_length_mm == pytest.approx(r.length_true_mm)
        assert r.length_true_mm > 40  # a whole phantom nerve


def test_the_truth_shifted_by_one_slice_is_one_slice_spacing_off(study):
    spacing = float(np.linalg.norm(study.affine[:3, 0]))  # between slices (axis 0), mm; the series is oblique
    shifted = np.zeros_like(study.truth)
    shifted[1:] = study.truth[:-1]
    for r in score_labels("unet", 0, study, shifted):
        assert r.hd95_mm == pytest.approx(spacing, rel=1e-5)
        assert 0 < r.assd_mm < spacing
        assert r.centreline_max_mm == pytest.approx(spacing, abs=0.05)
        assert 0.5 * spacing < r.centreline_mean_mm < spacing
        assert r.dsc < 0.9 and r.detected_length_mm == pytest.approx(r.length_true_mm)


class TruthInModelSpace:
    """A predictor that answers each slice's ground truth as the model would see it (`to_model_space`)."""

    size = SIZE

    def __init__(self, study: EvalStudy) -> None:
        self.masks = to_model_space(study.prepared, study.truth)

    def predict(self, images: np.ndarray) -> np.ndarray:
        assert images.shape == self.masks.shape
        return self.masks


def test_a_prediction_of_the_truth_in_model_space_comes_back_onto_it_in_source_voxels(study):
    """The node's inverse (unflip, un-resize, un-reformat) puts each side's model-space output back on its
    nerve: only the 64 px resampling is lost, within a voxel."""
    labels = predict_labels(study, TruthInModelSpace(study), 0.5)
    voxel = float(np.linalg.norm(study.affine[:3, :3], axis=0).max())
    for r in score_labels("unet", 0, study, labels):
        assert r.dsc > 0.8 and r.cldice > 0.9
        assert r.hd95_mm <= voxel and r.centreline_mean_mm < 0.5
        assert r.components_pred == 1 and r.detected_length_mm == pytest.approx(r.length_true_mm)


class Noise:
    """A predictor that answers seeded uniform noise: about half of every crop above the threshold."""

    size = SIZE

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.random.default_rng(0).random(images.shape, dtype=np.float32)


@pytest.mark.parametrize("predictor", [Noise, TruthInModelSpace])
def test_predicted_labels_are_the_nodes_labels_without_the_tract_step(study, predictor):
    made = predictor(study) if predictor is TruthInModelSpace else predictor()
    labels = predict_labels(study, made, 0.5)
    node = finish_series(study.prepared, made.predict(study.prepared.images), PipelineOptions(max_gap_mm=None))[0]
    assert labels.any() and np.array_equal(labels, node)


def test_labels_of_another_shape_are_refused(study):
    with pytest.raises(ValueError, match="do not match"):
        score_labels("unet", 0, study, study.truth[1:])


def test_the_2d_folder_form_is_skipped_with_the_reason(tmp_path):
    slices = SliceSet(np.zeros((1, SIZE, SIZE), np.uint8), np.zeros((1, SIZE, SIZE), bool),
                      (SampleMeta("P1", "right", 0),))
    ledger = Ledger(tmp_path / "ledger.json", preset("smoke"), slices.fingerprint(), [])
    result = evaluate_nerves([], ledger, BenchmarkPaths(tmp_path), slices, {"format": "2d", "data": str(tmp_path)},
                             Runtime(device="cpu"))
    assert result.csv is None and result.rows == ()
    assert result.record["status"] == "skipped" and "no 3D geometry" in result.record["reason"]
    assert not (tmp_path / "reports").exists()
