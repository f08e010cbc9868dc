"""Export targets against real peers: dcmtk storescp (C-STORE), and a real Orthanc (REST and STOW-RS)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from ian_node.config import DicomConfig, DicomTarget, ExportConfig, OrthancTarget, StowRsTarget, TlsConfig
from ian_node.export.exporter import Exporter
from ian_node.export.targets import build_targets
from ian_node.net import free_port
from ian_node.receive.scp import StorageSCP
from ian_node.storage.records import DeliveryState, Job, JobState, ReceivedInstance
from ian_node.storage.spool import Spool
from ian_node.storage.state import State
from tests.integration.orthanc_server import OrthancServer, orthanc_server
from tests.integration.peers import make_mr_series, storescp, storescu

pytestmark = pytest.mark.integration


def _wait(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.05)


def _result_for(source: Path) -> Dataset:
    """A stand-in for the SEG the worker builds: a new instance in a new series of the source study."""
    ds = pydicom.dcmread(source)
    ds.SeriesInstanceUID = generate_uid(prefix=None)
    ds.SOPInstanceUID = generate_uid(prefix=None)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


class Exporting:
    """State, spool and one running job, as the worker leaves them before it hands over its result."""

    def __init__(self, root: Path, source: Path, calling_ae: str = "PACS") -> None:
        self.state = State(root / "state.sqlite3")
        self.spool = Spool(root / "spool")
        ds = pydicom.dcmread(source)
        self.state.record_instance(ReceivedInstance(
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, series_uid=ds.SeriesInstanceUID,
            study_uid=ds.StudyInstanceUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
            path=self.spool.write_instance(ds.SeriesInstanceUID, ds.SOPInstanceUID, source.read_bytes()),
            size=source.stat().st_size, sha256="x", modality="MR", calling_ae=calling_ae, peer_host="127.0.0.1",
        ))
        series = self.state.series(ds.SeriesInstanceUID)
        self.state.settle_series(series.series_uid, series.last_received_at, None)
        self.job: Job = self.state.claim_next_job()
        self.result = _result_for(source)

    def exporter(self, targets: tuple, **policy: float) -> Exporter:  # type: ignore[type-arg]
        config = ExportConfig(targets=targets, **policy)  # type: ignore[arg-type]
        return Exporter(self.state, self.spool, build_targets(config.targets, "IANNODE"), config)

    def job_state(self) -> JobState:
        return self.state.job(self.job.id).state


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    return make_mr_series(tmp_path / "source", 1)[0]


def test_cstore_delivers_the_result_to_storescp(tmp_path: Path, source: Path) -> None:
    port = free_port()
    ex = Exporting(tmp_path, source)
    exporter = ex.exporter((DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=port),))
    with storescp(tmp_path / "received", port):
        exporter.submit(ex.job.id, ex.result)
        assert exporter.deliver_due() == 1
    assert ex.job_state() is JobState.DONE
    (received,) = (tmp_path / "received").iterdir()
    assert pydicom.dcmread(received).SOPInstanceUID == ex.result.SOPInstanceUID
    assert pydicom.dcmread(ex.spool.path(ex.state.job(ex.job.id).result_path)).SOPInstanceUID == ex.result.SOPInstanceUID


def test_destination_down_at_first_gets_the_result_after_it_comes_up(tmp_path: Path, source: Path) -> None:
    port = free_port()
    ex = Exporting(tmp_path, source)
    exporter = ex.exporter(
        (DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=port, timeout_s=2),),
        backoff_s=0.2, max_backoff_s=0.5, max_attempts=100,
    )
    exporter.start()
    try:
        exporter.submit(ex.job.id, ex.result)
        _wait(lambda: ex.state.deliveries(ex.job.id)[0].attempts >= 2, what="two failed attempts")
        delivery = ex.state.deliveries(ex.job.id)[0]
        assert delivery.state is DeliveryState.PENDING and "not established" in delivery.last_error
        assert ex.job_state() is JobState.EXPORTING
        with storescp(tmp_path / "received", port):
            _wait(lambda: ex.job_state() is JobState.DONE, what="delivery after the destination came up")
    finally:
        exporter.stop()
    assert [pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "received").iterdir()] == [ex.result.SOPInstanceUID]


def test_delivery_failing_max_attempts_is_failed_visibly_and_can_be_retried(tmp_path: Path, source: Path) -> None:
    port = free_port()
    ex = Exporting(tmp_path, source)
    exporter = ex.exporter(
        (DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=port, timeout_s=2),),
        backoff_s=0.05, max_backoff_s=0.05, max_attempts=2,
    )
    exporter.submit(ex.job.id, ex.result)
    exporter.deliver_due()
    time.sleep(0.1)
    exporter.deliver_due()
    job = ex.state.job(ex.job.id)
    assert job.state is JobState.FAILED and "pacs: association with DEST@127.0.0.1" in job.error
    assert ex.state.deliveries(ex.job.id)[0].state is DeliveryState.FAILED
    ex.state.retry_job(ex.job.id)
    with storescp(tmp_path / "received", port):
        assert exporter.deliver_due() == 1
    assert ex.job_state() is JobState.DONE


def test_back_to_sender_delivers_to_the_calling_ae_of_the_source_series(tmp_path: Path) -> None:
    """The worker's path: claim the job, read its instances from the spool, hand the result over."""
    state, spool = State(tmp_path / "state.sqlite3"), Spool(tmp_path / "spool")
    scp = StorageSCP(DicomConfig(port=0), TlsConfig(), state, spool)
    scp.start()
    try:
        files = make_mr_series(tmp_path / "in", 2)
        storescu(scp.port, files, calling="MODALITY1")
    finally:
        scp.stop()
    series = state.series(pydicom.dcmread(files[0]).SeriesInstanceUID)
    state.settle_series(series.series_uid, series.last_received_at, None)

    job = state.claim_next_job()
    sources = [pydicom.dcmread(spool.path(i.path)) for i in state.instances(job.series_uid)]
    assert len(sources) == 2
    port = free_port()
    config = ExportConfig(targets=(DicomTarget(name="sender", back_to_sender=True, port=port),))
    exporter = Exporter(state, spool, build_targets(config.targets, "IANNODE"), config)
    with storescp(tmp_path / "received", port, ae_title="MODALITY1"):
        exporter.submit(job.id, _result_for(files[0]))
        exporter.deliver_due()
    assert state.job(job.id).state is JobState.DONE
    assert len(list((tmp_path / "received").iterdir())) == 1


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with orthanc_server(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def test_orthanc_rest_upload_is_confirmed_and_stored(tmp_path: Path, source: Path, orthanc: OrthancServer) -> None:
    ex = Exporting(tmp_path, source)
    target = OrthancTarget(name="orthanc", url=orthanc.url, username=orthanc.username, password=orthanc.password)
    exporter = ex.exporter((target,))
    exporter.submit(ex.job.id, ex.result)
    exporter.deliver_due()
    assert ex.job_state() is JobState.DONE
    assert orthanc.find_instance(ex.result.SOPInstanceUID) is not None


def test_orthanc_with_wrong_credentials_is_a_failed_attempt(tmp_path: Path, source: Path, orthanc: OrthancServer) -> None:
    ex = Exporting(tmp_path, source)
    target = OrthancTarget(name="orthanc", url=orthanc.url, username=orthanc.username, password="wrong")
    exporter = ex.exporter((target,), max_attempts=1)
    exporter.submit(ex.job.id, ex.result)
    exporter.deliver_due()
    job = ex.state.job(ex.job.id)
    assert job.state is JobState.FAILED and "HTTP 401" in job.error
    assert orthanc.find_instance(ex.result.SOPInstanceUID) is None


def test_stow_rs_to_orthanc_dicomweb_is_confirmed_and_stored(tmp_path: Path, source: Path, orthanc: OrthancServer) -> None:
    ex = Exporting(tmp_path, source)
    target = StowRsTarget(name="web", url=orthanc.dicomweb_url, username=orthanc.username, password=orthanc.password)
    exporter = ex.exporter((target,))
    exporter.submit(ex.job.id, ex.result)
    exporter.deliver_due()
    assert ex.job_state() is JobState.DONE, ex.state.deliveries(ex.job.id)
    assert orthanc.find_instance(ex.result.SOPInstanceUID) is not None
