"""Export targets against real peers: dcmtk storescp (C-STORE), and a real Orthanc (REST and STOW-RS).

Refusals against real peers too: a pynetdicom SCP answering a C-STORE failure status, dcmtk's
storescp rejecting the association (--refuse), and a small HTTP server answering STOW-RS with an
HTTP error; each either fails its delivery at once with the peer's reason or keeps it for a retry.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt

from ian_node.config import (
    DicomConfig,
    DicomTarget,
    ExportConfig,
    OrthancTarget,
    SenderAE,
    SenderTarget,
    StowRsTarget,
    TlsConfig,
)
from ian_node.export.exporter import Exporter
from ian_node.export.targets import build_targets
from ian_node.net import free_port
from ian_node.receive.scp import StorageSCP
from ian_node.storage.records import DeliveryState, Job, JobState, ReceivedInstance
from ian_node.storage.spool import Spool
from ian_node.storage.state import State
from tests.integration.node_harness import (
    api_url,
    node_config,
    running_node,
    small_phantom,
    untrained_checkpoint,
    wait_for,
)
from tests.integration.orthanc_server import OrthancServer, orthanc_server
from tests.integration.peers import make_mr_series, storescp, storescu, wait_for_port
from tests.integration.serve_process import ian_node_command
from tests.tools import dcmtk

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


def test_a_sender_target_delivers_to_the_calling_ae_of_the_source_series(tmp_path: Path) -> None:
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
    config = ExportConfig(targets=(SenderTarget(name="sender", senders=(SenderAE(ae_title="MODALITY1", host="127.0.0.1",
                                                                             port=port),)),))
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


def test_orthanc_with_wrong_credentials_is_refused_at_once(tmp_path: Path, source: Path, orthanc: OrthancServer) -> None:
    ex = Exporting(tmp_path, source)
    target = OrthancTarget(name="orthanc", url=orthanc.url, username=orthanc.username, password="wrong")
    _attempt_once(ex, target)
    _assert_refused(ex, "Orthanc upload refused", "HTTP 401")
    assert orthanc.find_instance(ex.result.SOPInstanceUID) is None


def test_stow_rs_to_orthanc_dicomweb_is_confirmed_and_stored(tmp_path: Path, source: Path, orthanc: OrthancServer) -> None:
    ex = Exporting(tmp_path, source)
    target = StowRsTarget(name="web", url=orthanc.dicomweb_url, username=orthanc.username, password=orthanc.password)
    exporter = ex.exporter((target,))
    exporter.submit(ex.job.id, ex.result)
    exporter.deliver_due()
    assert ex.job_state() is JobState.DONE, ex.state.deliveries(ex.job.id)
    assert orthanc.find_instance(ex.result.SOPInstanceUID) is not None


# -- refusals and transient failures ---------------------------------------------------------------

class AnsweringSCP:
    """A pynetdicom storage SCP that answers every C-STORE with ``status`` (settable while it runs)."""

    def __init__(self, status: int, ae_title: str = "DEST") -> None:
        self.status = status
        self.stored: list[str] = []
        self.port = free_port()
        self._ae = AE(ae_title=ae_title)
        self._ae.supported_contexts = StoragePresentationContexts
        self._server = None

    def _on_store(self, event: evt.Event) -> int:
        if self.status == 0x0000:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def __enter__(self) -> AnsweringSCP:
        self._server = self._ae.start_server(("127.0.0.1", self.port), block=False,
                                             evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()


@contextmanager
def refusing_storescp() -> Iterator[int]:
    """dcmtk's storescp with --refuse (it rejects every association request); yields its port.

    Another process may take a free port before storescp binds it (other suites run on this machine
    too): storescp then exits at once, and a new port is tried.
    """
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen([dcmtk("storescp"), "--refuse", "-aet", "DEST", str(port)],
                                env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_for_port(port)
            if proc.poll() is None:
                yield port
                return
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    pytest.fail("storescp --refuse could not listen on a free port three times")


@contextmanager
def http_answering(status: int, text: str) -> Iterator[str]:
    """A DICOMweb stand-in that answers every POST with ``status`` and ``text``; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


RETRY_POLICY = {"backoff_s": 30.0, "max_backoff_s": 60.0, "max_attempts": 5}


def _attempt_once(ex: Exporting, target: object) -> None:
    exporter = ex.exporter((target,), **RETRY_POLICY)
    exporter.submit(ex.job.id, ex.result)
    assert exporter.deliver_due() == 1


def _assert_refused(ex: Exporting, *reason: str) -> None:
    """Failed at the first attempt, with the peer's reason in the delivery and in the job's error."""
    (delivery,) = ex.state.deliveries(ex.job.id)
    assert (delivery.state, delivery.attempts, delivery.next_attempt_at) == (DeliveryState.FAILED, 1, None)
    for part in reason:
        assert part in delivery.last_error, delivery.last_error
    job = ex.state.job(ex.job.id)
    assert job.state is JobState.FAILED and delivery.last_error in job.error


def _assert_kept_for_retry(ex: Exporting, *reason: str) -> None:
    """Still pending after one failed attempt, due again within the jittered backoff of the first retry."""
    (delivery,) = ex.state.deliveries(ex.job.id)
    assert (delivery.state, delivery.attempts) == (DeliveryState.PENDING, 1)
    wait = delivery.next_attempt_at - time.time()
    assert RETRY_POLICY["backoff_s"] / 2 - 5 <= wait <= RETRY_POLICY["backoff_s"]
    for part in reason:
        assert part in delivery.last_error, delivery.last_error
    assert ex.job_state() is JobState.EXPORTING


@pytest.mark.parametrize(("status", "meaning"), [(0xA900, "Does Not Match SOP Class"), (0xC000, "Cannot Understand")])
def test_cstore_failure_status_fails_the_delivery_at_once_with_the_status(
    tmp_path: Path, source: Path, status: int, meaning: str
) -> None:
    ex = Exporting(tmp_path, source)
    with AnsweringSCP(status) as scp:
        _attempt_once(ex, DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=scp.port, timeout_s=5))
    _assert_refused(ex, "refused", f"0x{status:04X}", meaning)


@pytest.mark.parametrize(("status", "meaning"), [(0x0110, "Processing Failure"), (0xA700, "Out of Resources")])
def test_cstore_processing_failure_or_out_of_resources_is_retried(
    tmp_path: Path, source: Path, status: int, meaning: str
) -> None:
    ex = Exporting(tmp_path, source)
    with AnsweringSCP(status) as scp:
        _attempt_once(ex, DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=scp.port, timeout_s=5))
    _assert_kept_for_retry(ex, f"0x{status:04X}", meaning)


def test_association_rejected_by_storescp_refuse_fails_the_delivery_at_once(tmp_path: Path, source: Path) -> None:
    ex = Exporting(tmp_path, source)
    with refusing_storescp() as port:
        _attempt_once(ex, DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=port, timeout_s=5))
    _assert_refused(ex, "rejected the association", "Rejected Permanent")


def test_destination_that_never_answers_is_a_timeout_and_retried(tmp_path: Path, source: Path) -> None:
    ex = Exporting(tmp_path, source)
    with socket.socket() as silent:  # the kernel completes the TCP handshake; nothing ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        started = time.monotonic()
        _attempt_once(ex, DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=port, timeout_s=1))
        assert time.monotonic() - started < 10
    _assert_kept_for_retry(ex, "not established")


@pytest.mark.parametrize("status", [400, 403, 409])
def test_stow_rs_http_4xx_fails_the_delivery_at_once_with_the_status_and_text(
    tmp_path: Path, source: Path, status: int
) -> None:
    ex = Exporting(tmp_path, source)
    with http_answering(status, "the server says no: missing Study Date") as url:
        _attempt_once(ex, StowRsTarget(name="web", url=url, timeout_s=5))
    _assert_refused(ex, "STOW-RS refused", f"HTTP {status}", "the server says no: missing Study Date")


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_stow_rs_http_5xx_408_and_429_are_retried(tmp_path: Path, source: Path, status: int) -> None:
    ex = Exporting(tmp_path, source)
    with http_answering(status, "try later") as url:
        _attempt_once(ex, StowRsTarget(name="web", url=url, timeout_s=5))
    _assert_kept_for_retry(ex, f"HTTP {status}", "try later")


def test_stow_rs_to_a_closed_port_is_retried(tmp_path: Path, source: Path) -> None:
    ex = Exporting(tmp_path, source)
    _attempt_once(ex, StowRsTarget(name="web", url=f"http://127.0.0.1:{free_port()}/dicom-web", timeout_s=5))
    _assert_kept_for_retry(ex, "ConnectionError")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("model") / "small.pt", size=32, attention=False)


def _jobs_cli(config: Path, *args: str) -> str:
    proc = subprocess.run([*ian_node_command(), "jobs", *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_refused_delivery_shows_its_reason_in_jobs_list_show_and_the_api_and_jobs_retry_sends_it_again(
    tmp_path: Path, checkpoint: Path
) -> None:
    reason = "refused the result: C-STORE status 0xC000 (Cannot Understand)"
    phantom = small_phantom(tmp_path / "phantom")
    with AnsweringSCP(0xC000) as pacs:
        target = DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=pacs.port, timeout_s=5)
        config = node_config(tmp_path / "node", checkpoint, export=ExportConfig(targets=(target,), **RETRY_POLICY))
        cli_config = tmp_path / "ian-node.toml"
        cli_config.write_text(f'[storage]\nspool_dir = "{config.storage.spool_dir}"\n'
                              f'state_path = "{config.storage.state_path}"\n')
        with running_node(config) as node:
            _, statuses = storescu(node.scp.port, list(phantom.instances))
            assert statuses == [0] * len(phantom.instances)
            job = wait_for(lambda: next((j for j in node.state.list_jobs() if j.state is JobState.FAILED), None),
                           120, lambda: f"a failed job: {node.state.list_jobs()}")
            (delivery,) = node.state.deliveries(job.id)
            assert delivery.attempts == 1 and reason in delivery.last_error

            shown = requests.get(f"{api_url(node)}/jobs/{job.id}", timeout=10).json()
            assert shown["state"] == "failed" and reason in shown["error"]
            assert [(d["target"], d["state"], d["attempts"]) for d in shown["deliveries"]] == [("pacs", "failed", 1)]
            assert reason in shown["deliveries"][0]["last_error"]
            assert reason in _jobs_cli(cli_config, "list")
            assert f"-> pacs: failed, attempts 1, last error: DEST@127.0.0.1:{pacs.port} {reason}" in _jobs_cli(
                cli_config, "show", str(job.id))

            pacs.status = 0x0000  # the PACS was fixed; the operator retries from another process
            assert "exporting" in _jobs_cli(cli_config, "retry", str(job.id))
            wait_for(lambda: node.state.job(job.id).state is JobState.DONE, 30, "the retried delivery")
            result_paths = [config.storage.spool_dir / p for p in node.state.job(job.id).result_paths]
        result_uids = [pydicom.dcmread(p).SOPInstanceUID for p in result_paths]
    assert pacs.stored == result_uids  # the SEG, then its SR, each stored once
