"""The whole node over loopback: dcmtk storescu → `ian-node serve` → SEG → dcmtk storescp.

One `serve` subprocess (generated TOML, free ports, 1 s quiet period, an untrained small IAN-Net)
handles every series of this module; each test sends its own phantom patient, so its own UIDs.
The geometry test runs the node in-process with a predictor that answers with the ground truth.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLosslessSV1, JPEGLSLossless, SegmentationStorage

from ian_node.app.node import Node
from ian_node.config import (
    ApiConfig,
    CropConfig,
    DicomConfig,
    DicomTarget,
    ExportConfig,
    ModelConfig,
    NodeConfig,
    SeriesConfig,
    StorageConfig,
)
from ian_node.net import free_port
from ian_node.phantom.study import PhantomFiles, generate_phantom, write_phantom
from ian_node.segment.pipeline import prepare, to_model_space
from ian_node.segment.seg import read_segmentation_labels
from ian_node.segment.volume import load_series
from ian_node.storage.records import DeliveryState, JobState
from model.checkpoint import LoadedCheckpoint, load_checkpoint
from tests.integration.node_harness import SMALL_PHANTOM, small_phantom, untrained_checkpoint, wait_for
from tests.integration.peers import storescu
from tests.integration.serve_process import DEST_AE, NODE_AE, Destination, NodeSetup, ServeProcess, ian_node_command
from tests.tools import dciodvfy_errors, dcmtk

pytestmark = pytest.mark.integration

SUCCESS = 0x0000
#: Seconds a small job may take on a loaded 2-core CI machine, model loading included.
JOB_TIMEOUT = 90.0


@dataclass
class RunningNode:
    setup: NodeSetup
    dest: Destination
    serve: ServeProcess

    def describe(self) -> str:
        return f"{self.setup.describe()}\n--- serve log ---\n{self.serve.log_tail()}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("model") / "small.pt", size=32, attention=False)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[RunningNode]:
    setup = NodeSetup(tmp_path_factory.mktemp("node"), checkpoint)
    with Destination(setup.root / "pacs", setup.dest_port) as dest, ServeProcess(setup) as serve:
        yield RunningNode(setup, dest, serve)
        assert serve.stop() == 0, serve.log_tail()


def _compress(files: PhantomFiles, folder: Path, tool: str) -> list[Path]:
    folder.mkdir(parents=True)
    out = []
    for src in files.instances:
        out.append(folder / src.name)
        subprocess.run([dcmtk(tool), str(src), str(out[-1])], check=True, capture_output=True, timeout=60)
    return out


def _wait_for_done(node: RunningNode, series_uid: str) -> None:
    def done() -> bool:
        job = node.setup.job_for(series_uid)
        assert job is None or job.state is not JobState.FAILED, node.describe()
        return job is not None and job.state is JobState.DONE

    wait_for(done, JOB_TIMEOUT, node.describe)


#: name: (dcmtk encoder or None, storescu option proposing its transfer syntax, expected syntax, patient)
CODECS = {
    "uncompressed": (None, (), None, 0),
    "jpeg-lossless-sv1 (dcmcjpeg)": ("dcmcjpeg", ("-xs",), JPEGLosslessSV1, 1),
    "jpeg-ls-lossless (dcmcjpls)": ("dcmcjpls", ("-xt",), JPEGLSLossless, 2),
}


@pytest.mark.parametrize("codec", list(CODECS))
def test_storescu_series_yields_one_valid_seg_at_storescp(node: RunningNode, tmp_path: Path, codec: str) -> None:
    tool, options, syntax, patient = CODECS[codec]
    phantom = small_phantom(tmp_path / "phantom", patient)
    files = list(phantom.instances) if tool is None else _compress(phantom, tmp_path / "compressed", tool)
    if syntax is not None:
        assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax

    proc, statuses = storescu(node.setup.port, files, options=options)
    assert statuses == [SUCCESS] * len(files), proc.stderr[-2000:]
    _wait_for_done(node, phantom.series_uid)

    (seg,) = node.dest.segs_for(phantom.series_uid)
    path = Path(seg.filename)
    assert dciodvfy_errors(path) == []
    read_back = hd.seg.segread(path)
    sources = [pydicom.dcmread(f) for f in phantom.instances]
    assert read_back.SOPClassUID == SegmentationStorage
    assert read_back.StudyInstanceUID == sources[0].StudyInstanceUID
    assert read_back.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    referenced = {str(i.ReferencedSOPInstanceUID) for s in read_back.ReferencedSeriesSequence
                  for i in s.ReferencedInstanceSequence}
    assert referenced == {str(ds.SOPInstanceUID) for ds in sources}
    assert read_segmentation_labels(read_back, sources).shape == SMALL_PHANTOM.shape


def _rotated_orientation(degrees: float) -> list[float]:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [c, s, 0.0, -s, c, 0.0]


def test_series_that_is_not_one_volume_is_skipped_with_its_reason_and_gets_no_job(
    node: RunningNode, tmp_path: Path
) -> None:
    bad = small_phantom(tmp_path / "bad", 3)
    odd = pydicom.dcmread(bad.instances[5])
    odd.ImageOrientationPatient = _rotated_orientation(10.0)  # one slice tilted against the others
    odd.save_as(bad.instances[5], enforce_file_format=True)

    _, statuses = storescu(node.setup.port, list(bad.instances))
    assert statuses == [SUCCESS] * len(bad.instances)  # acknowledged: the series is judged when complete
    wait_for(lambda: (s := node.setup.series(bad.series_uid)) is not None and s.status == "skipped", 30, node.describe)
    series = node.setup.series(bad.series_uid)
    assert "not one volume" in series.status_reason and "orientation" in series.status_reason
    assert node.setup.job_for(bad.series_uid) is None


def test_malformed_series_fails_its_job_naming_the_instance_and_the_next_series_still_runs(
    node: RunningNode, tmp_path: Path
) -> None:
    bad = small_phantom(tmp_path / "bad", 5)
    broken = pydicom.dcmread(bad.instances[5])
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 2]  # shorter than Rows x Columns declare
    broken.save_as(bad.instances[5], enforce_file_format=True)
    good = small_phantom(tmp_path / "good", 4)

    for files in (bad, good):
        _, statuses = storescu(node.setup.port, list(files.instances))
        assert statuses == [SUCCESS] * len(files.instances)  # acknowledged: the refusal is the job's
        wait_for(lambda uid=files.series_uid: node.setup.job_for(uid), 30, node.describe)

    _wait_for_done(node, good.series_uid)
    failed = node.setup.job_for(bad.series_uid)
    assert failed.state is JobState.FAILED
    assert failed.error is not None and failed.error.startswith("malformed dataset")
    assert str(broken.SOPInstanceUID) in failed.error and "Error" not in failed.error
    assert failed.id < node.setup.job_for(good.series_uid).id  # the queue went past the failed job
    assert node.dest.segs_for(bad.series_uid) == []
    assert len(node.dest.segs_for(good.series_uid)) == 1


class GroundTruthPredictor:
    """Answers with the phantom's ground truth in model space (checking it is asked about the right slices)."""

    def __init__(self, images: np.ndarray, answer: np.ndarray, size: int, checkpoint: LoadedCheckpoint) -> None:
        self.images, self.answer, self.size, self.checkpoint = images, answer, size, checkpoint
        self.calls = 0

    def predict(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        np.testing.assert_array_equal(images, self.images)
        return self.answer


def test_ground_truth_predictor_through_the_node_reproduces_the_ground_truth_in_the_delivered_seg(
    tmp_path: Path, checkpoint: Path
) -> None:
    phantom = generate_phantom(5, 7, SMALL_PHANTOM)
    files = write_phantom(phantom, tmp_path / "phantom")
    prepared = prepare(load_series(list(files.instances)), 128)
    oracle = GroundTruthPredictor(prepared.images, to_model_space(prepared, phantom.labels), 128,
                                  load_checkpoint(checkpoint))
    dest_port = free_port()
    config = NodeConfig(
        dicom=DicomConfig(ae_title=NODE_AE, port=free_port()),
        storage=StorageConfig(spool_dir=tmp_path / "spool", state_path=tmp_path / "state.sqlite3"),
        model=ModelConfig(checkpoint=checkpoint, device="cpu"),
        series=SeriesConfig(quiet_period_s=1.0),
        export=ExportConfig(targets=(DicomTarget(name="pacs", ae_title=DEST_AE, host="127.0.0.1", port=dest_port),)),
        api=ApiConfig(port=0),
        crop=CropConfig(mode="half"),  # the oracle answers for the halves `prepare` cut above
    )
    node = Node(config, predictor=oracle)
    with Destination(tmp_path / "pacs", dest_port) as dest:
        node.start()
        try:
            _, statuses = storescu(node.scp.port, list(files.instances))
            assert statuses == [SUCCESS] * len(files.instances)
            segs = wait_for(lambda: dest.segs_for(files.series_uid), JOB_TIMEOUT,
                              lambda: str(node.state.list_jobs()))
        finally:
            node.stop()
    assert oracle.calls == 1 and len(segs) == 1
    labels = read_segmentation_labels(segs[0], [pydicom.dcmread(f) for f in files.instances])
    assert phantom.labels.any()
    np.testing.assert_array_equal(labels, phantom.labels)


def _jobs_cli(setup: NodeSetup, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ian_node_command(), "jobs", "--config", str(setup.config_path), *args],
                          capture_output=True, text=True, timeout=60)


def test_delivery_failed_after_max_attempts_reaches_the_destination_after_jobs_retry(
    tmp_path: Path, checkpoint: Path
) -> None:
    setup = NodeSetup(tmp_path, checkpoint, max_attempts=2, backoff_s=0.2, max_backoff_s=0.2)
    phantom = small_phantom(tmp_path / "phantom", 6)
    with ServeProcess(setup) as serve:  # the destination is down
        storescu(setup.port, list(phantom.instances))
        wait_for(lambda: (j := setup.job_for(phantom.series_uid)) and j.state is JobState.FAILED, JOB_TIMEOUT,
                   lambda: f"{setup.describe()}\n{serve.log_tail()}")
        job = setup.job_for(phantom.series_uid)
        (delivery,) = setup.deliveries(job.id)
        assert (delivery.state, delivery.attempts) == (DeliveryState.FAILED, 2)
        shown = _jobs_cli(setup, "show", str(job.id))
        assert shown.returncode == 0 and "failed" in shown.stdout and "pacs" in shown.stdout

        with Destination(tmp_path / "pacs", setup.dest_port) as dest:
            retried = _jobs_cli(setup, "retry", str(job.id))
            assert retried.returncode == 0, retried.stderr
            # SQLite is the single source of truth: a running node must notice the operator's retry
            wait_for(lambda: setup.job_for(phantom.series_uid).state is JobState.DONE, 15,
                       lambda: f"the running node did not act on `jobs retry` (changed in its SQLite state): "
                               f"{setup.describe()}\n{serve.log_tail()}")
            assert len(dest.segs_for(phantom.series_uid)) == 1
    assert setup.job_for(phantom.series_uid).attempts == 1  # re-delivered, not re-computed
