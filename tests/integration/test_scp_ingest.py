"""The SCP's durable ingest under real peers: SIGKILL during parallel associations, concurrent
re-sends of one instance, and header parsing in every uncompressed transfer syntax."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE

from ian_node.config import DicomConfig, TlsConfig
from ian_node.net import free_port
from ian_node.receive.commit import recover_unconfirmed
from ian_node.receive.scp import StorageSCP
from ian_node.storage.spool import Spool
from ian_node.storage.state import State
from tests.integration.peers import MR_SMALL, wait_for_port

pytestmark = pytest.mark.integration

#: An SCP alone (state, spool, listener) in its own process, so that it can be SIGKILLed.
_SCP_PROCESS = """
import sys, threading
from pathlib import Path
from ian_node.config import DicomConfig, TlsConfig
from ian_node.receive.scp import StorageSCP
from ian_node.storage.spool import Spool
from ian_node.storage.state import State
root = Path(sys.argv[1])
scp = StorageSCP(DicomConfig(port=int(sys.argv[2])), TlsConfig(), State(root / "state.sqlite3"), Spool(root / "spool"))
scp.start()
threading.Event().wait()
"""


def _series(count: int, series_uid: str | None = None) -> list[Dataset]:
    template = pydicom.dcmread(MR_SMALL)
    template.SeriesInstanceUID = series_uid or generate_uid(prefix=None)
    out = []
    for number in range(1, count + 1):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = generate_uid(prefix=None)
        ds.InstanceNumber = number
        out.append(ds)
    return out


def _send(port: int, datasets: list[Dataset], acknowledged: list[str], syntax: str = ExplicitVRLittleEndian) -> None:
    """One association sending ``datasets`` in order; appends the UID of each success, stops at the first failure."""
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(MRImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="IANNODE")
    if not assoc.is_established:
        return
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if "Status" not in status or status.Status != 0x0000:
                return
            acknowledged.append(ds.SOPInstanceUID)
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.fixture()
def scp(tmp_path: Path) -> Iterator[tuple[StorageSCP, State, Spool]]:
    state, spool = State(tmp_path / "state.sqlite3"), Spool(tmp_path / "spool")
    node = StorageSCP(DicomConfig(port=0), TlsConfig(), state, spool)
    node.start()
    try:
        yield node, state, spool
    finally:
        node.stop()
        state.close()


def test_sigkill_during_four_associations_keeps_every_acknowledged_instance_intact(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SCP_PROCESS, str(tmp_path), str(port)])
    try:
        wait_for_port(port)
        batches = [_series(40) for _ in range(4)]
        acknowledged: list[str] = []
        senders = [threading.Thread(target=_send, args=(port, b, acknowledged)) for b in batches]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 30 and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: all four associations are sending
    finally:
        proc.kill()
        proc.wait()
    for sender in senders:
        sender.join(timeout=60)
    assert 30 <= len(acknowledged) < 160, "the kill did not land while the senders were sending"

    spool = Spool(tmp_path / "spool")
    with State(tmp_path / "state.sqlite3") as state:
        kept, dropped = recover_unconfirmed(state, spool)
        assert dropped == 0  # after a SIGKILL (the OS survived) every committed row's file is whole
        rows = {i.sop_instance_uid: i for b in batches for i in state.instances(b[0].SeriesInstanceUID)}
        assert set(acknowledged) <= set(rows)
        for row in rows.values():  # no row, acknowledged or not, names a file that is not intact
            assert spool.verify_instance(row.path, row.sop_instance_uid, row.size, row.sha256), row.sop_instance_uid
        sent = {ds.SOPInstanceUID: ds for b in batches for ds in b}
        for uid in acknowledged:
            assert pydicom.dcmread(spool.path(rows[uid].path)).PixelData == sent[uid].PixelData
        assert state.unconfirmed_instances() == []


def test_one_instance_sent_by_four_associations_at_once_is_stored_once_and_consistently(
    scp: tuple[StorageSCP, State, Spool],
) -> None:
    node, state, spool = scp
    ds = _series(1)[0]
    acknowledged: list[str] = []
    senders = [threading.Thread(target=_send, args=(node.port, [ds], acknowledged)) for _ in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=60)
    assert acknowledged == [ds.SOPInstanceUID] * 4
    (row,) = state.instances(ds.SeriesInstanceUID)
    assert row.times_received == 4 and state.instances_received() == 4
    assert spool.verify_instance(row.path, row.sop_instance_uid, row.size, row.sha256)
    assert sorted(p.name for p in spool.path(row.path).parent.iterdir()) == [f"{ds.SOPInstanceUID}.dcm"]


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_header_is_read_in_every_uncompressed_transfer_syntax(scp: tuple[StorageSCP, State, Spool], syntax: UID) -> None:
    node, state, spool = scp
    datasets = _series(2)
    for ds in datasets:  # pynetdicom encodes each data set in the syntax its file meta names
        ds.file_meta.TransferSyntaxUID = syntax
        ds.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian, ds.original_character_set)
    acknowledged: list[str] = []
    _send(node.port, datasets, acknowledged, syntax)
    assert acknowledged == [ds.SOPInstanceUID for ds in datasets]
    rows = state.instances(datasets[0].SeriesInstanceUID)
    assert [(r.instance_number, r.transfer_syntax_uid) for r in rows] == [(1, syntax), (2, syntax)]
    assert state.series(datasets[0].SeriesInstanceUID).modality == "MR"
    back = pydicom.dcmread(spool.path(rows[0].path))
    assert back.SOPInstanceUID == datasets[0].SOPInstanceUID and back.PixelData == datasets[0].PixelData
