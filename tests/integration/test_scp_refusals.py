"""Every refusal by the SCP, against real dcmtk peers over loopback: its DICOM answer, its one WARNING
line (calling AE, peer address, SOP class, reason) and its count in the metrics."""

from __future__ import annotations

import logging
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification

from ian_node.app.metrics import NodeMetrics
from ian_node.config import CallingAE, DicomConfig, TlsConfig
from ian_node.receive.scp import StorageSCP
from ian_node.storage.spool import Spool
from ian_node.storage.state import State
from tests.integration.peers import CT_SMALL, echoscu, make_mr_series, storescu
from tests.integration.test_scp_dcmtk import _make_certificates
from tests.tools import dcmtk

pytestmark = pytest.mark.integration

CANNOT_UNDERSTAND, SUCCESS = 0xC210, 0x0000
ALLOWED = (CallingAE(ae_title="STORESCU"), CallingAE(ae_title="ECHOSCU"),
           CallingAE(ae_title="FARAWAY", host="127.0.0.2"))


class Listener:
    """The SCP alone (state, spool, listener), as `serve` builds it, and what it logged."""

    def __init__(self, root: Path, caplog: pytest.LogCaptureFixture, tls: TlsConfig | None = None,
                 **dicom: object) -> None:
        self.state = State(root / "state.sqlite3")
        config = DicomConfig(port=0, allowed_calling_aes=ALLOWED, **dicom)  # type: ignore[arg-type]
        self.scp = StorageSCP(config, tls or TlsConfig(), self.state, Spool(root / "spool"))
        self.scp.start()
        self.port = self.scp.port
        self._caplog = caplog

    def warnings(self) -> list[str]:
        return [r.getMessage() for r in self._caplog.records
                if r.name.startswith("ian_node") and r.levelno >= logging.WARNING]

    def warning(self, timeout: float = 5.0) -> str:
        """The one WARNING line logged (the SCP logs after answering, so it may come a moment later)."""
        _wait_for(lambda: bool(self.warnings()), timeout)
        time.sleep(0.2)  # a second line would come as soon
        (line,) = self.warnings()
        return line

    def metric(self, family: str, label: str, value: str) -> int:
        text = NodeMetrics(self.state, receive=self.scp.counters).text()
        prefix = f'{family}{{{label}="{value}"}} '
        (sample,) = [line for line in text.splitlines() if line.startswith(prefix)]
        return int(float(sample.removeprefix(prefix)))

    def close(self) -> None:
        self.scp.stop()
        self.state.close()


@contextmanager
def listening(root: Path, caplog: pytest.LogCaptureFixture, **kwargs: object) -> Iterator[Listener]:
    caplog.set_level(logging.INFO, logger="ian_node")
    listener = Listener(root, caplog, **kwargs)  # type: ignore[arg-type]
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture()
def node(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Listener]:
    with listening(tmp_path, caplog) as listener:
        yield listener


def _wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still not so after {timeout} s"
        time.sleep(0.02)


def _refusals(node: Listener, reason: str) -> int:
    return node.metric("ian_node_refusals_total", "reason", reason)


def test_a_calling_ae_not_on_the_allow_list_is_rejected_and_logged_once(node: Listener, tmp_path: Path) -> None:
    proc, statuses = storescu(node.port, make_mr_series(tmp_path / "in", 1), calling="INTRUDER", options=["-R"])
    assert proc.returncode != 0 and statuses == [] and "Calling AE Title Not Recognized" in proc.stdout + proc.stderr
    line = node.warning()
    assert line.startswith('association refused: calling AE "INTRUDER" at 127.0.0.1:')
    assert 'called AE "IANNODE", SOP class MR Image Storage (1.2.840.10008.5.1.4.1.1.4)' in line
    assert line.endswith(": calling AE title not on the allow-list (calling_ae_not_allowed)")
    assert _refusals(node, "calling_ae_not_allowed") == 1 and _refusals(node, "calling_ae_wrong_host") == 0


def test_an_allowed_calling_ae_from_another_host_is_rejected_naming_the_host_it_may_use(node: Listener) -> None:
    proc = echoscu(node.port, calling="FARAWAY")  # allowed from 127.0.0.2 only; dcmtk connects from 127.0.0.1
    assert proc.returncode != 0 and "Calling AE Title Not Recognized" in proc.stderr
    line = node.warning()
    assert line.startswith('association refused: calling AE "FARAWAY" at 127.0.0.1:')
    assert "Verification SOP Class (1.2.840.10008.1.1)" in line
    assert line.endswith(": calling AE allowed only from 127.0.0.2 (calling_ae_wrong_host)")
    assert _refusals(node, "calling_ae_wrong_host") == 1


def test_the_same_calling_ae_from_its_own_host_is_accepted(node: Listener) -> None:
    scu = AE(ae_title="FARAWAY")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", node.port, ae_title="IANNODE", bind_address=("127.0.0.2", 0))
    try:
        assert assoc.is_established and assoc.send_c_echo().Status == SUCCESS
    finally:
        assoc.release()
    assert node.warnings() == [] and _refusals(node, "calling_ae_wrong_host") == 0


def test_a_called_ae_title_that_is_not_ours_is_rejected(node: Listener) -> None:
    proc = echoscu(node.port, called="ELSEWHERE")
    assert proc.returncode != 0 and "Called AE Title Not Recognized" in proc.stderr
    line = node.warning()
    assert line.startswith('association refused: calling AE "ECHOSCU" at 127.0.0.1:')
    assert line.endswith(': called AE "ELSEWHERE" is not "IANNODE" (called_ae_mismatch)')
    assert _refusals(node, "called_ae_mismatch") == 1


def test_an_association_beyond_the_maximum_is_rejected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with listening(tmp_path, caplog, max_associations=1) as node:
        scu = AE(ae_title="ECHOSCU")
        scu.add_requested_context(Verification)
        held = scu.associate("127.0.0.1", node.port, ae_title="IANNODE")
        try:
            proc = echoscu(node.port)
            assert proc.returncode != 0 and "Local Limit Exceeded" in proc.stderr
            line = node.warning()
        finally:
            held.release()
        assert line.startswith('association refused: calling AE "ECHOSCU" at 127.0.0.1:')
        assert line.endswith(": the maximum of 1 association(s) is reached (too_many_associations)")
        assert _refusals(node, "too_many_associations") == 1


def test_an_unconfigured_sop_class_is_refused_naming_it(node: Listener) -> None:
    proc, statuses = storescu(node.port, [CT_SMALL], options=["-R"])  # propose only what is sent
    assert "No Acceptable Presentation Contexts" in proc.stderr and statuses == []
    line = node.warning()
    assert line.startswith('2 presentation contexts refused: calling AE "STORESCU" at 127.0.0.1:')
    assert line.endswith(", SOP class CT Image Storage (1.2.840.10008.5.1.4.1.1.2): "
                         "SOP class not configured (dicom.extra_sop_classes) (sop_class_not_configured)")
    assert _refusals(node, "sop_class_not_configured") == 1 and node.state.instances_received() == 0


def test_a_peer_proposing_every_storage_class_gets_one_line_not_one_per_context(node: Listener, tmp_path: Path) -> None:
    _, statuses = storescu(node.port, make_mr_series(tmp_path / "in", 1))  # dcmtk's default: ~120 contexts
    assert statuses == [SUCCESS]
    line = node.warning()
    assert " presentation contexts refused: " in line and " more: SOP class not configured" in line
    assert _refusals(node, "sop_class_not_configured") == 1


def test_a_transfer_syntax_the_node_cannot_store_is_refused_naming_it(node: Listener) -> None:
    scu = AE(ae_title="STORESCU")
    scu.add_requested_context(MRImageStorage, ["1.2.840.10008.1.2.4.201"])  # HTJ2K lossless only
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", node.port, ae_title="IANNODE")
    assoc.release()
    line = node.warning()
    assert line.startswith('presentation context 1 refused: calling AE "STORESCU" at 127.0.0.1:')
    assert ", SOP class MR Image Storage (1.2.840.10008.5.1.4.1.1.4): none of the transfer syntaxes" in line
    assert line.endswith("(High-Throughput JPEG 2000 Image Compression (Lossless Only)) (no_acceptable_transfer_syntax)")
    assert _refusals(node, "no_acceptable_transfer_syntax") == 1


def _nested_copy(source: Path, target: Path, depth: int) -> str:
    """``source`` with ``depth`` ContentSequences nested one in another's item, written byte by byte
    (pydicom cannot write what it cannot read); returns its SOP instance UID."""
    ds = pydicom.dcmread(source)
    head = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + struct.pack("<LHHL", 0xFFFFFFFF, 0xFFFE, 0xE000, 0xFFFFFFFF)
    tail = struct.pack("<HHLHHL", 0xFFFE, 0xE00D, 0, 0xFFFE, 0xE0DD, 0)
    parts = []
    for keep in (lambda tag: tag < 0x0040A730, lambda tag: tag > 0x0040A730):
        part = pydicom.Dataset()
        for element in ds:
            if keep(element.tag):
                part.add(element)
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, part)
        parts.append(buffer.getvalue())
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta)
    target.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + parts[0] + head * depth + tail * depth + parts[1])
    return str(ds.SOPInstanceUID)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_data_set_nested_1000_deep_gets_cannot_understand_and_the_next_one_is_stored(
    node: Listener, tmp_path: Path
) -> None:
    first, good = make_mr_series(tmp_path / "in", 2)
    deep = tmp_path / "deep.dcm"
    uid = _nested_copy(first, deep, 1000)  # dcmtk itself reads it (its reader dies near 10,000)
    _, statuses = storescu(node.port, [deep, good], options=["-R"])
    assert statuses == [CANNOT_UNDERSTAND, SUCCESS]
    line = node.warning()
    assert line == (f'C-STORE refused with 0xC210: calling AE "STORESCU" at {line.split(" at ")[1].split(",")[0]}, '
                    f"SOP class MR Image Storage (1.2.840.10008.5.1.4.1.1.4), instance {uid}: "
                    "sequences nested deeper than 32 levels (in (0040,A730) ContentSequence)")
    assert node.state.instances_received() == 1
    assert node.metric("ian_node_store_failures_total", "status", "0xC210") == 1
    assert node.metric("ian_node_store_failures_total", "status", "0xA700") == 0


def test_failed_tls_handshakes_are_refused_and_neither_they_nor_a_silent_peer_hold_up_anyone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    certs = tmp_path / "certs"
    _make_certificates(certs)
    tls = TlsConfig(cert=certs / "server.crt", key=certs / "server.key", ca=certs / "ca.crt")
    with listening(tmp_path, caplog, tls=tls, acse_timeout_s=2.0, max_associations=1) as node:
        def echo(*tls_args: str) -> int:
            args = [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "IANNODE", *tls_args, "127.0.0.1", str(node.port)]
            return subprocess.run(args, capture_output=True, timeout=30).returncode

        ca = ["+cf", str(certs / "ca.crt")]
        good = ["+tls", str(certs / "client.key"), str(certs / "client.crt"), *ca]
        assert echo("+tla", *ca) != 0  # no client certificate
        line = node.warning()
        assert line.startswith("connection refused: peer 127.0.0.1:")
        assert line.endswith(" (calling AE not yet known): TLS handshake failed: "
                             "PEER_DID_NOT_RETURN_A_CERTIFICATE (tls_handshake_failed)")
        assert echo() != 0  # plain TCP
        _wait_for(lambda: len(node.warnings()) == 2, timeout=5.0)
        assert node.warnings()[1].endswith(": TLS handshake failed: WRONG_VERSION_NUMBER (tls_handshake_failed)")
        assert echo(*good) == 0  # neither failure still holds the one association allowed
        with socket.create_connection(("127.0.0.1", node.port)):  # connects, and never says a word
            started = time.monotonic()
            assert echo(*good) == 0
            assert time.monotonic() - started < 2.0
            _wait_for(lambda: len(node.warnings()) == 3, timeout=5.0)
        assert node.warnings()[2].endswith(": no TLS handshake within 2 s (tls_handshake_failed)")
        assert _refusals(node, "tls_handshake_failed") == 3
