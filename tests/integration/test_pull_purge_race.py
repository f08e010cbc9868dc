"""A retention purge racing a pull loses nothing: the pull holds each instance's lock until its row is in.

The race, made to happen on purpose: two instances of a series arrive by C-STORE (the node's real
SCP), too few to be selected, and the series is set to be purged. Before their quiet period ends, a
pull of the whole series starts from a real Orthanc and writes its files under the same names. The
pull is held (by a small forwarding proxy in front of Orthanc) just before its last instance, with
every other file written and nothing recorded yet. Now the quiet period ends: the series is skipped,
its two rows are deleted and their files are to be removed. The purge must wait for the pull, then
see the pull's rows and keep the files; afterwards every row of the series names a file on disk
with the pulled content, and the pulled series has its job.

The steps are ordered with events. The one timed wait checks that the purge is held back while the
pull is paused: it cannot fail a correct run, and without the lock the purge finishes well inside it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
import requests

from ian_node.config import DicomConfig, ExportConfig, NodeConfig, OrthancTarget, SeriesConfig, TlsConfig
from ian_node.jobs.completion import settle
from ian_node.receive.pull import OrthancPull, Puller, PullOutcome, dataset_bytes
from ian_node.receive.scp import StorageSCP
from ian_node.storage.records import JobState, SeriesState, Settlement
from ian_node.storage.spool import Spool
from ian_node.storage.state import State
from tests.integration.node_harness import dcmtk_nodelay  # noqa: F401 (a fixture)
from tests.integration.orthanc_server import OrthancServer, orthanc_server
from tests.integration.peers import make_mr_series, storescu

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("dcmtk_nodelay")]

RULES = SeriesConfig(min_slices=5, retention="purge", quiet_period_s=60.0)
#: Upper bound for any one step; a correct run takes well under a second per step.
STEP_S = 60.0


class PausingProxy:
    """Forwards GETs to Orthanc; the request for ``pause_before`` waits until ``release`` is set."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.pause_before: str | None = None
        self.paused, self.release = threading.Event(), threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if proxy.pause_before is not None and self.path == proxy.pause_before:
                    proxy.paused.set()
                    proxy.release.wait(STEP_S)
                answer = requests.get(proxy.upstream + self.path, timeout=30,
                                      headers={"Authorization": self.headers.get("Authorization", "")})
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("Content-Type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> PausingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


class Outcome:
    """What a background call returned or raised."""

    def __init__(self) -> None:
        self.value: object = None
        self.error: BaseException | None = None


def _in_thread(outcome: Outcome, call: object, *args: object) -> threading.Thread:
    def run() -> None:
        try:
            outcome.value = call(*args)  # type: ignore[operator]
        except BaseException as exc:  # reported by the test
            outcome.error = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with orthanc_server(tmp_path_factory.mktemp("orthanc"), plugins=()) as server:
        yield server


def test_purge_racing_a_pull_keeps_every_file_the_pull_records(tmp_path: Path, orthanc: OrthancServer) -> None:
    files = make_mr_series(tmp_path / "series", 6)
    by_uid = {pydicom.dcmread(f).SOPInstanceUID: f for f in files}
    _, statuses = storescu(orthanc.dicom_port, files, calling="MODALITY", called=orthanc.aet)
    assert statuses == [0] * len(files)
    series_uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    (series_id,) = [i["ID"] for i in orthanc.post("/tools/lookup", data=series_uid).json() if i["Type"] == "Series"]
    listed = orthanc.get(f"/series/{series_id}").json()["Instances"]  # the order the pull fetches in
    listed_uids = [orthanc.get(f"/instances/{i}").json()["MainDicomTags"]["SOPInstanceUID"] for i in listed]

    state, spool = State(tmp_path / "state.sqlite3"), Spool(tmp_path / "spool")
    # The first two instances the pull will fetch also arrive by C-STORE first: a series too small to select.
    scp = StorageSCP(DicomConfig(port=0), TlsConfig(), state, spool)
    scp.start()
    try:
        _, statuses = storescu(scp.port, [by_uid[u] for u in listed_uids[:2]])
    finally:
        scp.stop()
    assert statuses == [0, 0]
    early = state.series(series_uid)
    assert early.instance_count == 2 and early.awaiting_completion

    with PausingProxy(orthanc.url) as proxy:
        proxy.pause_before = f"/instances/{listed[-1]}/file"
        target = OrthancTarget(name="orthanc", url=proxy.url, username=orthanc.username, password=orthanc.password)
        config = NodeConfig(series=RULES, export=ExportConfig(targets=(target,)))
        puller = Puller(config, state, spool, settle=lambda s, crop=None: settle(state, spool, RULES, s, crop_request=crop))
        pulled = Outcome()
        pull = _in_thread(pulled, puller.pull, OrthancPull(series=series_id))
        assert proxy.paused.wait(STEP_S), "the pull never asked for its last instance"
        assert pulled.error is None
        # Every file but the last is written now, the two C-STORE'd instances' included; no row is new.
        assert state.series(series_uid).instance_count == 2

        purged = Outcome()
        purge = _in_thread(purged, settle, state, spool, RULES, early)  # the quiet period of the 2 ends now
        purge.join(timeout=1.0)
        assert purge.is_alive(), "the purge did not wait for the pull's instance locks"

        proxy.release.set()
        pull.join(STEP_S)
        purge.join(STEP_S)
    assert not pull.is_alive() and not purge.is_alive()
    assert pulled.error is None and purged.error is None, (pulled.error, purged.error)

    settlement = purged.value
    assert isinstance(settlement, Settlement)
    assert settlement.skip_reason == "2 slices, fewer than the minimum of 5"
    assert sorted(uid for uid, _ in settlement.purged) == sorted(listed_uids[:2])
    outcome = pulled.value
    assert isinstance(outcome, PullOutcome) and outcome.instances == 6
    assert outcome.job is not None and outcome.job.state is JobState.QUEUED
    series = state.series(series_uid)
    assert series.status is SeriesState.SELECTED and series.instance_count == 6
    rows = state.instances(series_uid)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(by_uid)
    for row in rows:
        stored = spool.path(row.path)
        assert stored.exists(), f"{row.sop_instance_uid}: its row names a file the purge deleted"
        assert hashlib.sha256(dataset_bytes(stored.read_bytes())).hexdigest() == row.sha256
    state.close()
