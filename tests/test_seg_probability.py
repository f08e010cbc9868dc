"""The optional probability SEG: FRACTIONAL (PROBABILITY) per side, valid, and read back to 8-bit precision;
the pipeline keeps the probabilities it is built from only when asked, and `ian-node predict
--probability-seg` writes one."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy.ndimage import gaussian_filter

from ian_node.app.cli import main
from ian_node.phantom.study import Phantom, PhantomConfig, generate_phantom, phantom_datasets
from ian_node.segment.crop import CropMode, CropRequest
from ian_node.segment.pipeline import PipelineOptions, prepare, segment_series, to_model_space
from ian_node.segment.seg import (
    AlgorithmInfo,
    SegmentationSourceError,
    build_probability_segmentation,
    segment_labels,
)
from ian_node.segment.volume import Side, load_series, source_frames
from tests.integration.node_harness import small_phantom, untrained_checkpoint
from tests.integration.test_sr_delivery import blind_checkpoint
from tests.tools import dciodvfy_errors

CONFIG = PhantomConfig(shape=(12, 64, 64), oblique_probability=1.0, max_oblique_deg=10.0)
AI = AlgorithmInfo(name="IANNet", version="0.1.0", checkpoint_hash="sha256:" + "ef" * 32)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return generate_phantom(3, 41, CONFIG)


@pytest.fixture(scope="module")
def source(phantom: Phantom) -> list[pydicom.Dataset]:
    return phantom_datasets(phantom)


def _probabilities(phantom: Phantom) -> dict[Side, np.ndarray]:
    """Smooth maps that are not just 0/1, like a network's output near the nerve."""
    return {side: np.clip(gaussian_filter((phantom.labels == side.label).astype(np.float32), 1.0) * 1.7, 0, 1)
            for side in Side}


def _written(seg: pydicom.Dataset, folder) -> hd.seg.Segmentation:
    path = folder / "prob.dcm"
    pydicom.dcmwrite(path, seg, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    return hd.seg.segread(path)


def _read_side(seg: hd.seg.Segmentation, source: list[pydicom.Dataset], label: int) -> np.ndarray:
    number = next(n for n, v in segment_labels(seg).items() if v == label)
    return np.asarray(seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in source], segment_numbers=[number], combine_segments=False,
        rescale_fractional=True, dtype=np.float32))[..., 0]


def _volume_order(source: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The instances in the order the probability arrays are indexed (highdicom's volume order)."""
    return [f.dataset for f in source_frames(source)]


def test_probability_seg_is_fractional_probability_and_reads_back_within_one_step(phantom: Phantom, source,
                                                                                  tmp_path):
    probs = _probabilities(phantom)
    seg = build_probability_segmentation(source, probs, algorithm=AI, series_number=301,
                                         series_description="IAN probability (AI)")
    assert (seg.SegmentationType, seg.SegmentationFractionalType) == ("FRACTIONAL", "PROBABILITY")
    assert int(seg.MaximumFractionalValue) == 255
    back = _written(seg, tmp_path)
    ordered = _volume_order(source)
    for side in Side:
        got = _read_side(back, ordered, side.label)
        want = probs[side]
        assert 0 < want.max() and ((want > 0) & (want < 1)).any()  # a real probability map, not a mask
        assert np.abs(got - want).max() <= 0.5 / 255 + 1e-6


def test_probabilities_may_come_as_one_stacked_array(phantom: Phantom, source, tmp_path):
    probs = _probabilities(phantom)
    stacked = np.stack([probs[Side.RIGHT], probs[Side.LEFT]], axis=-1)
    seg = build_probability_segmentation(source, stacked, algorithm=AI, series_number=301, series_description="P")
    back = _written(seg, tmp_path)
    got = _read_side(back, _volume_order(source), Side.LEFT.label)
    assert np.abs(got - probs[Side.LEFT]).max() <= 0.5 / 255 + 1e-6


def test_an_all_zero_side_keeps_one_zero_frame_or_is_omitted(phantom: Phantom, source, tmp_path):
    probs = _probabilities(phantom)
    probs[Side.LEFT] = np.full_like(probs[Side.LEFT], 0.001)  # rounds to 0 in 8 bits: empty
    kept = build_probability_segmentation(source, probs, algorithm=AI, series_number=301, series_description="P")
    assert kept.empty_sides == (Side.LEFT,)
    frames = [i for i, item in enumerate(kept.PerFrameFunctionalGroupsSequence)
              if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == 2]
    assert len(frames) == 1
    assert not _written(kept, tmp_path).pixel_array[frames[0]].any()
    omitted = build_probability_segmentation(source, probs, algorithm=AI, series_number=301,
                                             series_description="P", empty_segments="omit")
    assert omitted.omitted_sides == (Side.LEFT,) and len(omitted.SegmentSequence) == 1


def test_empty_frames_can_be_kept_in_the_probability_seg(phantom: Phantom, source, tmp_path):
    seg = build_probability_segmentation(source, _probabilities(phantom), algorithm=AI, series_number=301,
                                         series_description="P", omit_empty_frames=False)
    assert int(_written(seg, tmp_path).NumberOfFrames) == 2 * phantom.labels.shape[0]


def test_probabilities_outside_zero_to_one_are_refused(phantom: Phantom, source):
    probs = _probabilities(phantom)
    probs[Side.RIGHT] = probs[Side.RIGHT] * 2.0
    with pytest.raises(ValueError, match="right.*within \\[0, 1\\]"):
        build_probability_segmentation(source, probs, algorithm=AI, series_number=301, series_description="P")


def test_probabilities_of_the_wrong_shape_are_refused(phantom: Phantom, source):
    probs = {side: p[1:] for side, p in _probabilities(phantom).items()}
    with pytest.raises(SegmentationSourceError, match="shape"):
        build_probability_segmentation(source, probs, algorithm=AI, series_number=301, series_description="P")


class Answer:
    """A predictor that answers every slice with fixed model-space probabilities."""

    size = 32

    def __init__(self, answer: np.ndarray) -> None:
        self.answer = answer

    def predict(self, images: np.ndarray) -> np.ndarray:
        assert images.shape[0] == self.answer.shape[0]
        return self.answer


def _halves(keep: bool) -> PipelineOptions:
    return PipelineOptions(crop=CropRequest(CropMode.HALF), max_gap_mm=None, keep_probabilities=keep)


def test_the_pipeline_keeps_each_sides_probabilities_in_source_voxels_only_when_asked(phantom: Phantom, source):
    series = load_series(source)
    truth = to_model_space(prepare(series, Answer.size), phantom.labels.astype(np.uint8))
    predictor = Answer(0.1 + 0.8 * truth)  # 0.9 on the nerve, 0.1 elsewhere in each crop
    assert segment_series(series, predictor, _halves(False)).probabilities is None
    result = segment_series(series, predictor, _halves(True))
    assert set(result.probabilities) == set(Side)
    for side in Side:
        values = result.probabilities[side]
        assert values.dtype == np.float32 and values.shape == series.shape
        assert set(np.unique(np.round(values.astype(np.float64), 4)).tolist()) == {0.0, 0.1, 0.9}  # 0 outside the side's crop
        np.testing.assert_array_equal(values >= 0.5, result.labels == side.label)
    right, left = (result.probabilities[side] > 0 for side in Side)
    assert not (right & left).any()  # each side's halves, never both


def test_predict_writes_a_valid_probability_seg_beside_the_seg(tmp_path, capsys):
    study = small_phantom(tmp_path / "study", 0)
    model = untrained_checkpoint(tmp_path / "small.pt", size=32, attention=False)
    out, probability, report = tmp_path / "seg.dcm", tmp_path / "prob" / "p.dcm", tmp_path / "report.json"
    assert main(["predict", str(study.series_dir), "--out", str(out), "--probability-seg", str(probability),
                 "--report", str(report), "--checkpoint", str(model), "--device", "cpu", "--crop", "half"]) == 0
    assert "FRACTIONAL SEG" in capsys.readouterr().out
    assert dciodvfy_errors(probability) == []
    seg, back = hd.seg.segread(out), hd.seg.segread(probability)
    assert (back.SegmentationType, back.SegmentationFractionalType) == ("FRACTIONAL", "PROBABILITY")
    assert back.StudyInstanceUID == seg.StudyInstanceUID and back.SeriesInstanceUID != seg.SeriesInstanceUID
    assert str(probability) in report.read_text()


def test_predict_with_empty_segments_omit_and_no_nerve_writes_no_seg_and_exits_1(tmp_path, capsys):
    study = small_phantom(tmp_path / "study", 0)
    out = tmp_path / "seg.dcm"
    assert main(["predict", str(study.series_dir), "--out", str(out), "--empty-segments", "omit",
                 "--checkpoint", str(blind_checkpoint(tmp_path / "blind.pt")), "--device", "cpu",
                 "--crop", "half"]) == 1
    assert "every segment is empty" in capsys.readouterr().err and not out.exists()
