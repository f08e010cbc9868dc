"""Security at the DICOM boundary, against real peers over loopback: mutual TLS with dcmtk's storescu,
the calling-AE allow-list with its host check, and hostile UIDs that must never become spool paths.

What other modules already cover, and this one does not repeat:

- the allow-list's host check by echoscu and pynetdicom, with its WARNING line and count:
  ``test_scp_refusals.py::test_an_allowed_calling_ae_from_another_host_is_rejected_naming_the_host_it_may_use``,
  ``::test_the_same_calling_ae_from_its_own_host_is_accepted`` and
  ``test_scp_dcmtk.py::test_allowed_calling_ae_from_another_host_is_rejected``;
- failed TLS handshakes by echoscu (no certificate, plain TCP, a silent peer):
  ``test_scp_refusals.py::test_failed_tls_handshakes_are_refused_and_neither_they_nor_a_silent_peer_hold_up_anyone``;
- the API token on every route but /health, compared with hmac.compare_digest: ``tests/test_api.py``;
- UIDs refused before they reach a path, unit by unit: ``tests/test_spool.py``, ``tests/test_header.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest

from ian_node.config import CallingAE, DicomConfig, TlsConfig
from ian_node.receive.scp import StorageSCP
from ian_node.storage.spool import Spool
from ian_node.storage.state import State
from tests.integration.peers import make_mr_series, send_raw, storescu
from tests.integration.test_scp_dcmtk import _make_certificates

pytestmark = pytest.mark.integration

SUCCESS, CANNOT_UNDERSTAND = 0x0000, 0xC210
ALLOWED = (CallingAE(ae_title="STORESCU"), CallingAE(ae_title="RAWSCU"),
           CallingAE(ae_title="FARAWAY", host="127.0.0.2"))


class Listener:
    """The SCP as `serve` builds it: the state in ``root/state``, the spool in ``root/data/spool``."""

    def __init__(self, root: Path, tls: TlsConfig | None = None) -> None:
        (root / "state").mkdir(parents=True, exist_ok=True)
        self.state = State(root / "state" / "state.sqlite3")
        self.spool = Spool(root / "data" / "spool")
        self.scp = StorageSCP(DicomConfig(port=0, allowed_calling_aes=ALLOWED), tls or TlsConfig(), self.state,
                              self.spool)
        self.scp.start()
        self.port = self.scp.port

    def stored_files(self) -> list[Path]:
        return [p for p in self.spool.root.rglob("*") if p.is_file()]

    def close(self) -> None:
        self.scp.stop()
        self.state.close()


@contextmanager
def listening(root: Path, tls: TlsConfig | None = None) -> Iterator[Listener]:
    listener = Listener(root, tls)
    try:
        yield listener
    finally:
        listener.close()


# -- mutual TLS with dcmtk's storescu -------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Our CA (server and client certificates), and ANOTHER CA with a client certificate of its own."""
    root = tmp_path_factory.mktemp("pki")
    _make_certificates(root / "ours")
    _make_certificates(root / "other")
    return root / "ours", root / "other"


@contextmanager
def mutual_tls(root: Path, ours: Path) -> Iterator[Listener]:
    tls = TlsConfig(cert=ours / "server.crt", key=ours / "server.key", ca=ours / "ca.crt")
    with listening(root, tls) as listener:
        yield listener


def _send_over_tls(listener: Listener, files: list[Path], ours: Path, *client: str) -> tuple[int, list[int]]:
    """storescu over TLS, trusting our CA for the server; ``client``: its own TLS options."""
    proc, statuses = storescu(listener.port, files, options=[*client, "+cf", str(ours / "ca.crt")])
    return proc.returncode, statuses


def test_mutual_tls_stores_an_instance_from_a_client_certified_by_the_configured_ca(
    tmp_path: Path, certificates: tuple[Path, Path]
) -> None:
    ours, _ = certificates
    files = make_mr_series(tmp_path / "in", 1)
    with mutual_tls(tmp_path, ours) as listener:
        code, statuses = _send_over_tls(listener, files, ours, "+tls", str(ours / "client.key"),
                                        str(ours / "client.crt"))
        assert (code, statuses) == (0, [SUCCESS])
        uid = str(pydicom.dcmread(files[0]).SOPInstanceUID)
        assert listener.state.instance_path(uid) is not None and len(listener.stored_files()) == 1


@pytest.mark.parametrize(("client", "reason"), [
    ("no certificate", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    ("a certificate from another CA", "CERTIFICATE_VERIFY_FAILED"),
])
def test_mutual_tls_refuses_at_the_handshake_a_client_without_a_certificate_from_the_ca_and_stores_nothing(
    tmp_path: Path, certificates: tuple[Path, Path], caplog: pytest.LogCaptureFixture, client: str, reason: str
) -> None:
    ours, other = certificates
    options = ["+tla"] if client == "no certificate" else ["+tls", str(other / "client.key"), str(other / "client.crt")]
    files = make_mr_series(tmp_path / "in", 2)
    caplog.set_level(logging.INFO, logger="ian_node")
    with mutual_tls(tmp_path, ours) as listener:
        code, statuses = _send_over_tls(listener, files, ours, *options)
        assert code != 0 and statuses == []  # no association, so not a single C-STORE answered
        assert listener.state.instances_received() == 0 and listener.stored_files() == []
        assert listener.scp.counters.refusals()["tls_handshake_failed"] == 1
        refusals = [r.getMessage() for r in caplog.records if "(tls_handshake_failed)" in r.getMessage()]
        assert len(refusals) == 1 and refusals[0].endswith(f": TLS handshake failed: {reason} (tls_handshake_failed)")


# -- the allow-list's host check, with storescu -----------------------------------------------------


def test_an_allowed_calling_ae_from_the_wrong_address_stores_nothing(tmp_path: Path) -> None:
    with listening(tmp_path) as listener:  # FARAWAY may connect from 127.0.0.2 only; storescu uses 127.0.0.1
        proc, statuses = storescu(listener.port, make_mr_series(tmp_path / "in", 1), calling="FARAWAY")
        assert proc.returncode != 0 and statuses == []
        assert "Calling AE Title Not Recognized" in proc.stdout + proc.stderr
        assert listener.state.instances_received() == 0 and listener.stored_files() == []
        assert listener.scp.counters.refusals()["calling_ae_wrong_host"] == 1


# -- hostile UIDs, sent as raw bytes ----------------------------------------------------------------

#: (label, value): each would take a spool path elsewhere, or is no UID at all.
HOSTILE_UIDS = [
    ("../", "1.2.826.0.1.3680043.8.498/../../../../escaped"),
    ("NUL", "1.2.826.0.1.3680043.8.498\x00/../../../../escaped"),
    ("200 characters", "1.2." + "3" * 196),
]



def _tree(root: Path, leave_out: set[Path]) -> dict[str, int]:
    """Every path under ``root`` (its size; -1 for a folder), outside the folders in ``leave_out``."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")
            if not any(p == folder or p.is_relative_to(folder) for folder in leave_out)}


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore::UserWarning")
def test_hostile_uids_get_cannot_understand_and_nothing_is_written_outside_the_spool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sources = make_mr_series(tmp_path / "in", len(HOSTILE_UIDS) * 2 + 1)
    hostile: list[Path] = []
    for i, (element, (label, value)) in enumerate(
            (e, h) for e in ("SeriesInstanceUID", "SOPInstanceUID") for h in HOSTILE_UIDS):
        ds = pydicom.dcmread(sources[i])
        setattr(ds, element, value)  # in the data set; the file meta (and so the command) keeps a valid UID
        path = tmp_path / "in" / f"hostile-{element}-{label.replace(' ', '-').replace('/', '')}.dcm"
        ds.save_as(path)
        hostile.append(path)
        assert value.encode() in path.read_bytes()  # the raw bytes carry the hostile value itself
    good = sources[-1]
    leave_out = {tmp_path / "in", tmp_path / "state"}
    with listening(tmp_path) as listener:
        before = _tree(tmp_path, leave_out)
        statuses = send_raw(listener.port, [*hostile, good])
        after = _tree(tmp_path, leave_out)
        assert statuses == [CANNOT_UNDERSTAND] * len(hostile) + [SUCCESS]
        ds = pydicom.dcmread(good)
        stored = f"data/spool/instances/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        assert set(after) - set(before) == {"data/spool/instances", str(Path(stored).parent), stored}
        assert {k: v for k, v in after.items() if k in before} == before  # nothing else changed
        assert listener.state.instances_received() == 1
        assert listener.scp.counters.store_failures()["0xC210"] == len(hostile)
    reasons = [r.getMessage().rsplit(": ", 1)[1] for r in caplog.records if "refused with 0xC210" in r.getMessage()]
    assert reasons == [f"{element} is not a valid DICOM UID ({len(value)} characters)"
                       for element in ("SeriesInstanceUID", "SOPInstanceUID") for _, value in HOSTILE_UIDS]
    assert not list(tmp_path.rglob("*escaped*"))
