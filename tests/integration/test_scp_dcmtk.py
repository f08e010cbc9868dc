"""The node's SCP against dcmtk's real echoscu / storescu over loopback."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from ian_node.config import CallingAE, DicomConfig, SeriesConfig, TlsConfig
from ian_node.jobs.completion import SeriesTracker
from ian_node.receive.scp import StorageSCP
from ian_node.storage.records import Job
from ian_node.storage.spool import Spool
from ian_node.storage.state import State
from tests.integration.peers import CT_SMALL, MR_SMALL, echoscu, make_mr_series, storescu, tiny_tmpfs
from tests.tools import dcmtk

pytestmark = pytest.mark.integration

QUIET = 0.5
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC210


class Node:
    """The DICOM-facing node as `serve` wires it: state, spool, series timers and the SCP."""

    def __init__(self, spool_dir: Path, state_path: Path, dicom: DicomConfig, tls: TlsConfig,
                 **spool_minimum: float) -> None:
        self.state = State(state_path)
        self.spool = Spool(spool_dir, **spool_minimum)  # type: ignore[arg-type]
        self.jobs: list[Job] = []
        self.tracker = SeriesTracker(
            self.state, self.spool, SeriesConfig(quiet_period_s=QUIET, min_slices=2), on_job=self.jobs.append
        )
        self.scp = StorageSCP(dicom, tls, self.state, self.spool, on_stored=self.tracker.instance_stored)
        self.tracker.start()
        self.scp.start()
        self.port = self.scp.port

    def close(self) -> None:
        self.scp.stop()
        self.tracker.stop()
        self.state.close()

    def stored_uids(self, series_uid: str) -> set[str]:
        return {i.sop_instance_uid for i in self.state.instances(series_uid)}


ALLOWED = (CallingAE(ae_title="STORESCU"), CallingAE(ae_title="ECHOSCU"), CallingAE(ae_title="FARAWAY", host="10.9.9.9"))


@contextmanager
def running_node(root: Path, spool_dir: Path | None = None, tls: TlsConfig | None = None,
                 spool_minimum: dict[str, float] | None = None, **dicom: object) -> Iterator[Node]:
    config = DicomConfig(port=0, allowed_calling_aes=ALLOWED, **dicom)  # type: ignore[arg-type]
    node = Node(spool_dir or root / "spool", root / "state.sqlite3", config, tls or TlsConfig(), **(spool_minimum or {}))
    try:
        yield node
    finally:
        node.close()


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[Node]:
    with running_node(tmp_path) as n:
        yield n


def _wait_for_jobs(node: Node, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(node.jobs) < count:
        assert time.monotonic() < deadline, f"{len(node.jobs)} jobs after {timeout} s, expected {count}"
        time.sleep(0.05)


def test_echoscu_gets_success(node: Node) -> None:
    assert echoscu(node.port).returncode == 0


def test_storescu_series_is_durable_in_spool_and_state(node: Node, tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "in", 4)
    proc, statuses = storescu(node.port, files)
    assert proc.returncode == 0 and statuses == [SUCCESS] * 4
    sent = [pydicom.dcmread(f) for f in files]
    series_uid = sent[0].SeriesInstanceUID
    stored = node.state.instances(series_uid)
    assert [i.instance_number for i in stored] == [1, 2, 3, 4]
    for ds, inst in zip(sent, stored, strict=True):
        assert inst.sop_instance_uid == ds.SOPInstanceUID
        back = pydicom.dcmread(node.spool.path(inst.path))
        assert back.SOPInstanceUID == ds.SOPInstanceUID and back.PixelData == ds.PixelData
    series = node.state.series(series_uid)
    assert (series.calling_ae, series.peer_host, series.modality) == ("STORESCU", "127.0.0.1", "MR")


def test_calling_ae_not_on_the_allow_list_is_rejected(node: Node, tmp_path: Path) -> None:
    proc = echoscu(node.port, calling="INTRUDER")
    assert proc.returncode != 0 and "Calling AE Title Not Recognized" in proc.stderr
    proc, statuses = storescu(node.port, make_mr_series(tmp_path / "in", 1), calling="INTRUDER")
    assert proc.returncode != 0 and statuses == []
    assert node.state.instances_received() == 0


def test_allowed_calling_ae_from_another_host_is_rejected(node: Node) -> None:
    proc = echoscu(node.port, calling="FARAWAY")  # allowed only from 10.9.9.9
    assert proc.returncode != 0 and "Calling AE Title Not Recognized" in proc.stderr


def test_unknown_sop_class_is_refused_in_negotiation(node: Node) -> None:
    proc, statuses = storescu(node.port, [CT_SMALL])
    assert "No presentation context" in proc.stderr
    assert statuses == [] and node.state.instances_received() == 0


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_malformed_instance_gets_cannot_understand_and_the_rest_is_stored(node: Node, tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "in", 3)
    bad = pydicom.dcmread(files[0])
    bad.SeriesInstanceUID = "../../escaped"  # a hostile UID: it must never become a path
    bad.SOPInstanceUID = generate_uid(prefix=None)
    bad.file_meta.MediaStorageSOPInstanceUID = bad.SOPInstanceUID
    bad_path = tmp_path / "in" / "bad.dcm"
    bad.save_as(bad_path)
    proc, statuses = storescu(node.port, [files[0], bad_path, files[1], files[2]])
    assert statuses == [SUCCESS, CANNOT_UNDERSTAND, SUCCESS, SUCCESS]
    good = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert node.stored_uids(pydicom.dcmread(files[0]).SeriesInstanceUID) == good
    assert not list(tmp_path.rglob("*escaped*")) and node.state.instances_received() == 3


def test_log_names_uids_but_never_the_patient(node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = make_mr_series(tmp_path / "in", 2, PatientName="Doe^Jane", PatientID="PID-4711")
    bad = pydicom.dcmread(files[1])
    del bad.StudyInstanceUID  # refused with 0xC210, so its reason is logged
    bad.save_as(files[1])
    with caplog.at_level("DEBUG", logger="ian_node"):
        _, statuses = storescu(node.port, files)
    assert statuses == [SUCCESS, CANNOT_UNDERSTAND]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert pydicom.dcmread(files[1]).SOPInstanceUID in text and "StudyInstanceUID" in text
    assert "Doe" not in text and "PID-4711" not in text


def test_same_sop_instance_sent_twice_counts_once(node: Node, tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "in", 2)
    storescu(node.port, files)
    _, statuses = storescu(node.port, files[:1])
    assert statuses == [SUCCESS]
    series = node.state.series(pydicom.dcmread(files[0]).SeriesInstanceUID)
    assert (series.instance_count, node.state.instances_received()) == (2, 3)


def test_quiet_period_after_storescu_creates_exactly_one_job(node: Node, tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "in", 4)
    storescu(node.port, files[:2])
    storescu(node.port, files[2:])  # a second association within the quiet period: same series
    _wait_for_jobs(node, 1)
    time.sleep(2 * QUIET)
    jobs = node.state.list_jobs()
    assert [(j.series_uid, j.series_version) for j in jobs] == [(pydicom.dcmread(files[0]).SeriesInstanceUID, 1)]
    assert node.state.series(jobs[0].series_uid).instance_count == 4


def test_growing_series_creates_a_new_version(node: Node, tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "in", 3)
    storescu(node.port, files[:2])
    _wait_for_jobs(node, 1)
    storescu(node.port, files[:2])  # the same instances again: no new version
    storescu(node.port, files[2:])  # a new instance: version 2
    _wait_for_jobs(node, 2)
    time.sleep(2 * QUIET)
    assert [j.series_version for j in node.state.list_jobs()] == [2, 1]


@pytest.mark.parametrize(
    ("tool", "tool_args", "propose", "syntax"),
    [
        ("dcmcjpeg", [], "-xs", "1.2.840.10008.1.2.4.70"),
        ("dcmcjpls", [], "-xt", "1.2.840.10008.1.2.4.80"),
        ("dcmcrle", [], "-xr", "1.2.840.10008.1.2.5"),
        ("dcmconv", ["+td"], "-xd", "1.2.840.10008.1.2.1.99"),
    ],
)
def test_compressed_transfer_syntax_is_accepted_and_stored_as_sent(
    node: Node, tmp_path: Path, tool: str, tool_args: list[str], propose: str, syntax: str
) -> None:
    source = make_mr_series(tmp_path / "in", 1)[0]
    compressed = tmp_path / f"{tool}.dcm"
    subprocess.run([dcmtk(tool), *tool_args, str(source), str(compressed)], check=True, capture_output=True)
    _, statuses = storescu(node.port, [compressed], options=[propose])
    assert statuses == [SUCCESS]
    uid = pydicom.dcmread(source).SeriesInstanceUID
    (inst,) = node.state.instances(uid)
    assert inst.transfer_syntax_uid == syntax
    stored = pydicom.dcmread(node.spool.path(inst.path))
    assert stored.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(stored.pixel_array, pydicom.dcmread(source).pixel_array)


def test_full_spool_answers_out_of_resources_and_keeps_what_it_acknowledged(tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "in", 24)  # about 240 kB against a 128 KiB file system
    no_minimum = {"min_free_bytes": 0, "min_free_percent": 0}  # a disk full for real (ENOSPC), not the minimum
    with tiny_tmpfs(128) as mount, running_node(tmp_path, spool_dir=mount, spool_minimum=no_minimum) as node:
        _, statuses = storescu(node.port, files)
        assert len(statuses) == len(files)
        assert set(statuses) == {SUCCESS, OUT_OF_RESOURCES}
        acknowledged = [pydicom.dcmread(f).SOPInstanceUID for f, s in zip(files, statuses, strict=False) if s == SUCCESS]
        uid = pydicom.dcmread(files[0]).SeriesInstanceUID
        assert node.stored_uids(uid) == set(acknowledged)
        for inst in node.state.instances(uid):
            assert pydicom.dcmread(node.spool.path(inst.path)).SOPInstanceUID == inst.sop_instance_uid
        assert not list(mount.rglob(".partial-*"))


def test_a_burst_refused_for_a_full_disk_is_logged_once_naming_the_free_space(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = make_mr_series(tmp_path / "in", 24)
    no_minimum = {"min_free_bytes": 0, "min_free_percent": 0}
    with tiny_tmpfs(128) as mount, running_node(tmp_path, spool_dir=mount, spool_minimum=no_minimum) as node:
        _, statuses = storescu(node.port, files)
        refused = statuses.count(OUT_OF_RESOURCES)
        assert refused > 1
        lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "0xA700" in r.getMessage()]
        assert len(lines) == 1 and "(the spool's file system has " in lines[0] and "free, minimum 0 B)" in lines[0]
        assert node.scp.counters.refusals()["disk_full"] == refused
        assert node.scp.counters.store_failures()["0xA700"] == refused


def test_associations_beyond_the_maximum_are_rejected(tmp_path: Path) -> None:
    with running_node(tmp_path, max_associations=1) as node:
        scu = AE(ae_title="ECHOSCU")
        scu.add_requested_context(Verification)
        held = scu.associate("127.0.0.1", node.port, ae_title="IANNODE")
        assert held.is_established
        try:
            proc = echoscu(node.port)
            assert proc.returncode != 0 and "Local Limit Exceeded" in proc.stderr
        finally:
            held.release()
        time.sleep(0.2)
        assert echoscu(node.port).returncode == 0


def _make_certificates(folder: Path) -> None:
    """A throw-away CA and a server and client certificate signed by it (real openssl)."""
    folder.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=ian-node test CA")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2")


def test_mutual_tls_accepts_a_client_certificate_from_the_ca_and_nothing_else(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    _make_certificates(certs)
    tls = TlsConfig(cert=certs / "server.crt", key=certs / "server.key", ca=certs / "ca.crt")
    with running_node(tmp_path, tls=tls) as node:
        def echo(*tls_args: str) -> int:
            args = [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "IANNODE", *tls_args, "127.0.0.1", str(node.port)]
            return subprocess.run(args, capture_output=True, timeout=30).returncode

        ca = ["+cf", str(certs / "ca.crt")]
        assert echo("+tls", str(certs / "client.key"), str(certs / "client.crt"), *ca) == 0
        assert echo("+tla", *ca) != 0  # TLS without a client certificate
        assert echo() != 0  # plain TCP


def test_mr_small_fixture_is_what_the_tests_assume() -> None:
    ds = pydicom.dcmread(MR_SMALL)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and ds.Modality == "MR"
