"""The worker records each side's QA on the job, flags a failed side, logs the verdicts, sends the SEG
with its SR, and holds a failed result when ``[qa] on_fail = "hold"``.

The predictor is an oracle that answers with a phantom's ground truth on the right and nothing on the
left (no nerve found: FAIL), or the truth on both sides, so the verdicts are known; everything else
(state, spool, worker, pipeline, SEG, SR and exporter) is the node's own.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from ian_node.config import CropConfig, DicomTarget, ExportConfig, ModelConfig, OutputConfig, QaConfig
from ian_node.export.exporter import Exporter
from ian_node.export.targets import build_targets
from ian_node.jobs.worker import Worker
from ian_node.net import free_port
from ian_node.phantom.study import PhantomFiles, generate_phantom, write_phantom
from ian_node.segment.pipeline import prepare, to_model_space
from ian_node.segment.volume import Side, load_series
from ian_node.storage.records import DeliveryState, Job, JobState, ReceivedInstance
from ian_node.storage.spool import Spool
from ian_node.storage.state import State
from model.checkpoint import LoadedCheckpoint, load_checkpoint
from tests.integration.node_harness import SMALL_PHANTOM, untrained_checkpoint

SIZE = 64


class OraclePredictor:
    """Answers each slice with the given model-space probabilities (the phantom's truth, edited)."""

    def __init__(self, answer: np.ndarray, checkpoint: LoadedCheckpoint) -> None:
        self.answer, self.size, self.checkpoint = answer, SIZE, checkpoint

    def predict(self, images: np.ndarray) -> np.ndarray:
        assert images.shape[0] == self.answer.shape[0]
        return self.answer


@dataclass
class Setup:
    state: State
    spool: Spool
    files: PhantomFiles
    predictor: OraclePredictor
    exporter: Exporter | None = None

    def worker(self, on_fail: str = "send", export: ExportConfig | None = None,
               output: OutputConfig | None = None) -> Worker:
        export = export or ExportConfig()
        self.exporter = Exporter(self.state, self.spool, build_targets(export.targets, "IANNODE"), export)
        return Worker(self.state, self.spool, self.exporter, ModelConfig(device="cpu"), predictor=self.predictor,
                      crop=CropConfig(mode="half"), qa=QaConfig(on_fail=on_fail), output=output)

    def queue(self) -> Job:
        for path in self.files.instances:
            data = path.read_bytes()
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            relpath = self.spool.write_instance(ds.SeriesInstanceUID, ds.SOPInstanceUID, data)
            self.state.record_instance(ReceivedInstance(
                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, series_uid=ds.SeriesInstanceUID,
                study_uid=ds.StudyInstanceUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=relpath,
                size=len(data), sha256=hashlib.sha256(data).hexdigest(), modality="MR", calling_ae="PACS",
                peer_host="127.0.0.1"))
        series = self.state.series(self.files.series_uid)
        job = self.state.settle_series(series.series_uid, series.last_received_at, None).job
        assert job is not None
        return job


def _oracle(folder: Path, both_sides: bool, found: tuple[Side, ...] = (Side.RIGHT,)
            ) -> tuple[PhantomFiles, OraclePredictor]:
    """The phantom's truth on both sides, or on the `found` sides only (none: nothing anywhere)."""
    phantom = generate_phantom(3, 7, SMALL_PHANTOM)
    files = write_phantom(phantom, folder / "phantom")
    kept = tuple(Side) if both_sides else found
    labels = np.where(np.isin(phantom.labels, [s.label for s in kept]), phantom.labels, 0)
    prepared = prepare(load_series(list(files.instances)), SIZE)
    answer = to_model_space(prepared, labels.astype(np.uint8))
    checkpoint = load_checkpoint(untrained_checkpoint(folder / "model.pt", size=SIZE, attention=False))
    return files, OraclePredictor(answer, checkpoint)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomFiles, OraclePredictor]:
    """Right: the phantom's right nerve; left: nothing at all."""
    return _oracle(tmp_path_factory.mktemp("oracle"), both_sides=False)


@pytest.fixture()
def setup(tmp_path: Path, oracle: tuple[PhantomFiles, OraclePredictor]) -> Iterator[Setup]:
    with State(tmp_path / "state.sqlite3") as state:
        yield Setup(state, Spool(tmp_path / "spool"), *oracle)


def _unreachable() -> ExportConfig:
    """One C-STORE target where nothing listens: an attempt would fail and be counted."""
    return ExportConfig(targets=(DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=free_port(),
                                             timeout_s=2),))


def test_each_sides_verdict_is_recorded_and_a_failed_side_flags_the_job(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    job = setup.queue()
    worker = setup.worker()
    with caplog.at_level(logging.INFO, logger="ian_node.jobs.worker"):
        assert worker.run_pending() == 1
    done = setup.state.job(job.id)
    assert done.state is JobState.DONE, done.error  # no target: sent anyway (qa.on_fail = "send")
    right, left = done.qa
    assert (right["side"], left["side"]) == ("right", "left")
    assert right["verdict"] != "FAIL" and right["length_mm"] > 0, right
    assert (left["verdict"], left["reasons"]) == ("FAIL", ["no nerve found"])
    assert done.flag == "QA FAIL left: no nerve found"
    (ended,) = [r.getMessage() for r in caplog.records if " ended: " in r.getMessage()]
    assert ended.endswith(f"QA right {right['verdict']}, left FAIL")


def test_the_job_stores_its_seg_then_an_sr_of_the_seg_with_each_sides_verdict(setup: Setup) -> None:
    job = setup.queue()
    setup.worker().run_pending()
    seg_path, sr_path = setup.state.job(job.id).result_paths
    seg, sr = (pydicom.dcmread(setup.spool.path(p)) for p in (seg_path, sr_path))
    assert (seg.Modality, sr.Modality, sr.SOPClassUID) == ("SEG", "SR", Comprehensive3DSRStorage)
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.SeriesInstanceUID != seg.SeriesInstanceUID
    evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence
    (right,) = hd.sr.srread(setup.spool.path(sr_path)).content.get_volumetric_roi_measurement_groups()
    assert str(right.tracking_identifier) == "Inferior alveolar nerve, right"
    lengths = [m.value for m in right.get_measurements(name=codes.SCT.Length) if not m.finding_sites]
    assert len(lengths) == 1 and lengths[0] > 0
    # the left side has no voxels: no measurements, and its verdict FAIL (DCM 111235 "unusable")
    assert _coded_values(sr).count("111235") == 1


def _coded_values(item: pydicom.Dataset) -> list[str]:
    """Every coded value (CODE content items) in an SR content tree."""
    out = [str(c.CodeValue) for c in item.get("ConceptCodeSequence", [])]
    for child in item.get("ContentSequence", []):
        out += _coded_values(child)
    return out


def test_on_fail_hold_stores_a_failed_result_but_attempts_no_delivery_until_released(
    setup: Setup, tmp_path: Path
) -> None:
    job = setup.queue()
    setup.worker(on_fail="hold", export=_unreachable()).run_pending()
    held = setup.state.job(job.id)
    assert held.state is JobState.HELD and held.flag == "QA FAIL left: no nerve found"
    assert len(held.result_paths) == 2 and all(setup.spool.path(p).is_file() for p in held.result_paths)
    assert setup.exporter.deliver_due() == 0
    setup.state.close()
    with State(tmp_path / "state.sqlite3") as restarted:  # held across a restart: recovery delivers nothing
        restarted.recover()
        assert restarted.job(job.id).state is JobState.HELD and restarted.due_deliveries(1e12) == []
        assert restarted.retry_job(job.id).state is JobState.EXPORTING
        (delivery,) = restarted.due_deliveries()
        assert (delivery.state, delivery.attempts) == (DeliveryState.PENDING, 0)


def test_on_fail_hold_sends_a_result_without_a_failed_side(tmp_path: Path) -> None:
    files, predictor = _oracle(tmp_path / "both", both_sides=True)
    with State(tmp_path / "state.sqlite3") as state:
        setup = Setup(state, Spool(tmp_path / "spool"), files, predictor)
        job = setup.queue()
        setup.worker(on_fail="hold").run_pending()
        done = state.job(job.id)
        assert [q["verdict"] for q in done.qa] != [] and all(q["verdict"] != "FAIL" for q in done.qa), done.qa
        assert done.state is JobState.DONE and done.flag is None


def test_output_omit_empty_frames_false_stores_every_frame_of_both_segments_and_still_an_sr(setup: Setup) -> None:
    job = setup.queue()
    setup.worker(output=OutputConfig(omit_empty_frames=False)).run_pending()
    seg_path, sr_path = setup.state.job(job.id).result_paths
    seg = pydicom.dcmread(setup.spool.path(seg_path))
    assert int(seg.NumberOfFrames) == 2 * SMALL_PHANTOM.shape[0]  # both sides, every source slice
    assert pydicom.dcmread(setup.spool.path(sr_path)).Modality == "SR"


def test_empty_segments_omit_leaves_the_empty_right_side_out_the_left_is_segment_1_and_the_job_says_so(
    tmp_path: Path,
) -> None:
    files, predictor = _oracle(tmp_path / "left", both_sides=False, found=(Side.LEFT,))
    with State(tmp_path / "state.sqlite3") as state:
        setup = Setup(state, Spool(tmp_path / "spool"), files, predictor)
        job = setup.queue()
        setup.worker(output=OutputConfig(empty_segments="omit")).run_pending()
        done = state.job(job.id)
        assert done.state is JobState.DONE, done.error
        assert done.flag == "QA FAIL right: no nerve found | right segment left out: empty"
        seg_path, sr_path = done.result_paths
        seg = hd.seg.segread(setup.spool.path(seg_path))
        assert [(int(s.SegmentNumber), str(s.SegmentLabel)) for s in seg.SegmentSequence] == [
            (1, "Inferior alveolar nerve, left")]
        sr = hd.sr.srread(setup.spool.path(sr_path))
        (left,) = sr.content.get_volumetric_roi_measurement_groups()
        assert str(left.tracking_identifier) == "Inferior alveolar nerve, left"
        assert left.referenced_segment.referenced_segment_numbers == [1]
        (right,) = sr.content.get_image_measurement_groups()  # the left-out side: its QA without a segment
        assert str(right.tracking_identifier) == "Inferior alveolar nerve, right"
        assert [q.value.value for q in right.get_qualitative_evaluations()] == ["111235"]


def test_empty_segments_omit_with_no_nerve_on_either_side_fails_the_job_and_sends_nothing(tmp_path: Path) -> None:
    files, predictor = _oracle(tmp_path / "none", both_sides=False, found=())
    with State(tmp_path / "state.sqlite3") as state:
        setup = Setup(state, Spool(tmp_path / "spool"), files, predictor)
        job = setup.queue()
        setup.worker(export=_unreachable(), output=OutputConfig(empty_segments="omit")).run_pending()
        failed = state.job(job.id)
        assert failed.state is JobState.FAILED
        assert failed.error.startswith("no SEG sent: series ") and "every segment is empty" in failed.error
        assert 'output.empty_segments = "omit"' in failed.error
        assert failed.flag.endswith("right and left segments left out: empty")
        assert [q["verdict"] for q in failed.qa] == ["FAIL", "FAIL"]
        assert failed.result_paths == ()
        assert state.deliveries(job.id) == [] and setup.exporter.deliver_due() == 0


def test_probability_seg_is_the_third_result_fractional_over_the_same_source(setup: Setup) -> None:
    job = setup.queue()
    setup.worker(output=OutputConfig(probability_seg=True)).run_pending()
    done = setup.state.job(job.id)
    assert done.state is JobState.DONE, done.error
    seg_path, sr_path, probability_path = done.result_paths
    seg, probability = (hd.seg.segread(setup.spool.path(p)) for p in (seg_path, probability_path))
    assert pydicom.dcmread(setup.spool.path(sr_path)).Modality == "SR"
    assert (probability.SegmentationType, probability.SegmentationFractionalType) == ("FRACTIONAL", "PROBABILITY")
    assert probability.SOPInstanceUID != seg.SOPInstanceUID and probability.StudyInstanceUID == seg.StudyInstanceUID
    assert int(probability.SeriesNumber) == int(seg.SeriesNumber) + 1000
    # the right side (the oracle's truth) is certain where the SEG has the nerve; the left is all zero
    source = [str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    binary = seg.get_pixels_by_source_instance(source, segment_numbers=[1], dtype=np.uint8)[..., 0]
    fraction = probability.get_pixels_by_source_instance(source, segment_numbers=[1, 2], rescale_fractional=True,
                                                         dtype=np.float32)
    assert binary.any() and np.all(fraction[..., 0][binary > 0] > 0.99)
    assert not fraction[..., 1].any()


def test_probability_seg_is_off_by_default_two_results(setup: Setup) -> None:
    job = setup.queue()
    setup.worker().run_pending()
    assert len(setup.state.job(job.id).result_paths) == 2
