"""`segment_series` in each crop mode, the no-region outcome, and the load-time crop/checkpoint check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ian_node.config import CropConfig, ModelConfig
from ian_node.phantom.mr_series import build_mr_series
from ian_node.phantom.study import PhantomConfig, generate_phantom
from ian_node.segment.crop import NO_REGION, CropError, CropMode, CropRequest, NoRegionError
from ian_node.segment.pipeline import PipelineOptions, failure_message, prepare, segment_series
from ian_node.segment.reformat import PatientBox, default_rois
from ian_node.segment.result import load_crop_localiser, load_predictor
from ian_node.segment.volume import SeriesVolume, Side, load_series
from model.localiser import load_localiser
from tests.crop_tools import constant_localiser, crop_checkpoint
from tests.integration.node_harness import untrained_checkpoint

SMALL = PhantomConfig(shape=(24, 96, 96))


class _Counting:
    """A predictor that answers "no nerve" and counts the slices it is asked about."""

    size = 32

    def __init__(self) -> None:
        self.slices: list[int] = []

    def predict(self, images: np.ndarray) -> np.ndarray:
        self.slices.append(len(images))
        return np.zeros(images.shape, dtype=np.float32)


@pytest.fixture(scope="module")
def series() -> SeriesVolume:
    phantom = generate_phantom(0, 7, SMALL)
    return load_series(build_mr_series(phantom.volume, phantom.study, phantom.series))


@pytest.fixture(scope="module")
def found_localiser(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return constant_localiser(tmp_path_factory.mktemp("loc") / "everywhere.pt", 20.0)


@pytest.fixture(scope="module")
def empty_localiser(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return constant_localiser(tmp_path_factory.mktemp("loc") / "nothing.pt", -20.0)


def _boxes(series: SeriesVolume, shrink_mm: float = 5.0) -> dict[Side, PatientBox]:
    """Each half, shrunk on every face: boxes that differ from the halves but select voxels."""
    return {side: PatientBox(*(box.bounds + np.array([shrink_mm, -shrink_mm])).reshape(-1))
            for side, box in default_rois(series).items()}


def test_half_mode_crops_the_volume_halves_and_records_them_without_confidence(series: SeriesVolume) -> None:
    predictor = _Counting()
    result = segment_series(series, predictor, PipelineOptions(crop=CropRequest(CropMode.HALF)))
    assert result.crop is not None and result.crop.found
    halves = default_rois(series)
    for side in Side:
        assert result.crop.sides[side].as_json() == {"mode": "half", "box_mm": halves[side].bounds.tolist(),
                                                     "confidence": None}
    assert predictor.slices == [len(prepare(series, 32).images)]


@pytest.mark.parametrize("mode", [CropMode.BOX, CropMode.ORACLE])
def test_box_and_oracle_modes_segment_in_the_given_boxes_and_record_the_mode(
    series: SeriesVolume, mode: CropMode
) -> None:
    boxes = _boxes(series)
    predictor = _Counting()
    result = segment_series(series, predictor, PipelineOptions(crop=CropRequest(mode, boxes)))
    assert result.crop is not None
    assert {s: c.mode for s, c in result.crop.sides.items()} == {Side.RIGHT: mode, Side.LEFT: mode}
    assert result.crop.as_json()["left"]["box_mm"] == boxes[Side.LEFT].bounds.tolist()
    assert predictor.slices == [len(prepare(series, 32, boxes).images)]
    assert predictor.slices != [len(prepare(series, 32).images)]  # not the halves


def test_auto_mode_segments_in_the_localiser_boxes_with_their_confidence(
    series: SeriesVolume, found_localiser: Path
) -> None:
    localiser = load_localiser(found_localiser)
    result = segment_series(series, _Counting(), PipelineOptions(), localiser)
    assert result.crop is not None and result.crop.found and result.crop.localiser_sha256 == localiser.sha256
    for crop in result.crop.sides.values():
        assert crop.mode is CropMode.AUTO and crop.box is not None and crop.confidence > 0.9
    assert result.crop.sides[Side.RIGHT].box.x_max <= result.crop.sides[Side.LEFT].box.x_min
    assert {"load", "localise", "preprocess", "inference", "inverse_postprocess"} == set(result.timings)
    # no nerve in the answer: each side's QA fails, and carries its localiser's confidence
    assert [(q.side, q.verdict.value, q.reasons) for q in result.qa] == [
        ("right", "FAIL", ("no nerve found",)), ("left", "FAIL", ("no nerve found",))]
    assert [q.localiser_confidence for q in result.qa] == pytest.approx([result.crop.sides[s].confidence for s in Side],
                                                                        abs=1e-4)


def test_no_region_found_stops_before_the_network_with_the_crop_and_a_clear_message(
    series: SeriesVolume, empty_localiser: Path
) -> None:
    predictor = _Counting()
    with pytest.raises(NoRegionError) as info:
        segment_series(series, predictor, PipelineOptions(), load_localiser(empty_localiser))
    assert predictor.slices == []
    exc = info.value
    assert not exc.crop.found and exc.crop.problem.startswith(NO_REGION)
    assert exc.crop.as_json()["right"] == {"mode": "auto", "box_mm": None, "confidence": 0.0}
    assert set(exc.timings) == {"load", "localise"}
    assert failure_message(exc) == f"series {series.series_uid}: {exc.crop.problem}"


def test_segment_when_not_found_uses_the_halves_where_the_localiser_has_no_box_and_keeps_the_problem(
    series: SeriesVolume, empty_localiser: Path
) -> None:
    predictor = _Counting()
    options = PipelineOptions(segment_when_not_found=True)
    result = segment_series(series, predictor, options, load_localiser(empty_localiser))
    assert predictor.slices == [len(prepare(series, 32).images)]
    assert result.crop is not None and not result.crop.found and result.crop.problem.startswith(NO_REGION)
    halves = default_rois(series)
    for side, crop in result.crop.sides.items():
        assert (crop.mode, crop.box, crop.confidence) == (CropMode.HALF, halves[side], 0.0)


def test_a_min_confidence_above_the_localiser_answer_means_no_region(
    series: SeriesVolume, found_localiser: Path
) -> None:
    with pytest.raises(NoRegionError, match="threshold 1.00"):
        segment_series(series, _Counting(), PipelineOptions(min_confidence=1.0 + 1e-9), load_localiser(found_localiser))


def test_a_given_box_outside_the_series_fails_with_a_crop_message(series: SeriesVolume) -> None:
    far = {Side.RIGHT: PatientBox(-900, -800, -50, 50, -50, 50), Side.LEFT: PatientBox(800, 900, -50, 50, -50, 50)}
    with pytest.raises(ValueError) as info:
        segment_series(series, _Counting(), PipelineOptions(crop=CropRequest(CropMode.BOX, far)))
    message = failure_message(info.value)
    assert message.startswith("crop: series ") and "contains no voxel" in message


def test_mode_auto_refuses_a_checkpoint_trained_on_halves_and_names_the_fix(
    tmp_path: Path, found_localiser: Path
) -> None:
    legacy = untrained_checkpoint(tmp_path / "legacy.pt", size=32, attention=False)  # records no crop
    crop = CropConfig(localiser=found_localiser)
    with pytest.raises(CropError, match="left-right halves.*crop mode 'half'"):
        load_predictor(ModelConfig(checkpoint=legacy, device="cpu"), crop, load_crop_localiser(crop))
    assert load_predictor(ModelConfig(checkpoint=legacy, device="cpu"), CropConfig(mode="half")).size == 32


def test_mode_auto_refuses_a_localiser_of_another_crop_definition_and_takes_a_matching_one(tmp_path: Path) -> None:
    checkpoint = crop_checkpoint(tmp_path / "landmarks.pt")
    margins = CropConfig(localiser=constant_localiser(tmp_path / "margins.pt", 20.0, region="nerve-margins"))
    with pytest.raises(CropError, match="trained on 'landmarks' crops.*finds 'nerve-margins'"):
        load_predictor(ModelConfig(checkpoint=checkpoint, device="cpu"), margins, load_crop_localiser(margins))
    landmarks = CropConfig(localiser=constant_localiser(tmp_path / "landmarks-loc.pt", 20.0))
    localiser = load_crop_localiser(landmarks)
    assert localiser is not None and localiser.meta.region == "landmarks"
    assert load_predictor(ModelConfig(checkpoint=checkpoint, device="cpu"), landmarks, localiser).size == 32
    assert load_crop_localiser(CropConfig(mode="half", localiser=landmarks.localiser)) is None  # only auto loads one
