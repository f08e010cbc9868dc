"""The SCP's durable ingest path: staged files, group commit, and recovery of unconfirmed rows.

The SCP commits a row while the file's fsync is still in flight (``file_durable=False``). A power
cut in that window can leave the row naming a missing, empty, truncated or zero-filled file; these
tests build exactly those states on a real spool and state, then run the start-up recovery.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from ian_node.receive.commit import GroupCommitter, recover_unconfirmed
from ian_node.storage.records import ReceivedInstance
from ian_node.storage.schema import SCHEMA_VERSION
from ian_node.storage.spool import Spool
from ian_node.storage.state import State

SERIES = "1.2.826.0.1.3680043.8.498.30"


def _scp_file(sop_uid: str) -> tuple[bytes, bytes]:
    """(file bytes, data set bytes) of MR_small as the SCP writes it: preamble, file meta, data set."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = SERIES
    stream = DicomBytesIO()
    stream.is_little_endian, stream.is_implicit_VR = True, False
    write_dataset(stream, ds)
    meta = create_file_meta(sop_class_uid=ds.SOPClassUID, sop_instance_uid=sop_uid,
                            transfer_syntax=pydicom.uid.ExplicitVRLittleEndian)
    return b"\0" * 128 + b"DICM" + encode_file_meta(meta) + stream.getvalue(), stream.getvalue()


def _receive(state: State, spool: Spool, n: int, durable: bool = True) -> ReceivedInstance:
    """Stage and record instance ``n`` as the SCP does; durable=False stops before the confirmation."""
    uid = f"{SERIES}.{n}"
    data, stream = _scp_file(uid)
    staged = spool.stage_instance(SERIES, uid, (data,))
    staged.write_durably()
    inst = ReceivedInstance(
        sop_instance_uid=uid, sop_class_uid=pydicom.uid.MRImageStorage, series_uid=SERIES, study_uid="1.2.3",
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian, path=staged.relpath, size=len(stream),
        sha256=hashlib.sha256(stream).hexdigest(), instance_number=n, modality="MR", file_durable=durable,
    )
    state.record_instance(inst)
    return inst


@pytest.fixture()
def store(tmp_path: Path) -> tuple[State, Spool]:
    with State(tmp_path / "state.sqlite3") as state:
        yield state, Spool(tmp_path / "spool")


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[:-700])
    elif how == "zero-filled block":  # what a lost data block reads as after a power cut
        path.write_bytes(data[:4096] + bytes(4096) + data[8192:])
    elif how == "another instance's":
        path.write_bytes(_scp_file(f"{SERIES}.999")[0])


def test_unconfirmed_row_with_an_intact_file_is_confirmed_and_kept(store: tuple[State, Spool]) -> None:
    state, spool = store
    inst = _receive(state, spool, 1, durable=False)
    assert [u.sop_instance_uid for u in state.unconfirmed_instances()] == [inst.sop_instance_uid]
    assert recover_unconfirmed(state, spool) == (1, 0)
    assert state.unconfirmed_instances() == []
    assert [i.sop_instance_uid for i in state.instances(SERIES)] == [inst.sop_instance_uid]


@pytest.mark.parametrize("how", ["missing", "empty", "truncated", "zero-filled block", "another instance's"])
def test_unconfirmed_row_whose_file_is_not_intact_is_dropped_with_its_file_and_logged(
    store: tuple[State, Spool], how: str, caplog: pytest.LogCaptureFixture
) -> None:
    state, spool = store
    kept = _receive(state, spool, 1)
    bad = _receive(state, spool, 2, durable=False)
    _damage(spool.path(bad.path), how)
    with caplog.at_level(logging.WARNING, logger="ian_node.receive.scp"):
        assert recover_unconfirmed(state, spool) == (0, 1)
    assert [i.sop_instance_uid for i in state.instances(SERIES)] == [kept.sop_instance_uid]
    assert not spool.path(bad.path).exists() and spool.path(kept.path).exists()
    assert state.instances_received() == 1 and state.unconfirmed_instances() == []
    assert any(bad.sop_instance_uid in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)


def test_dropping_the_only_instance_of_a_series_forgets_the_series(store: tuple[State, Spool]) -> None:
    state, spool = store
    bad = _receive(state, spool, 1, durable=False)
    _damage(spool.path(bad.path), "truncated")
    recover_unconfirmed(state, spool)
    assert state.series(SERIES) is None and state.series_awaiting_completion() == []


def test_dropping_the_row_that_opened_a_new_version_restores_the_previous_version(store: tuple[State, Spool]) -> None:
    state, spool = store
    for n in (1, 2):
        _receive(state, spool, n)
    first = state.settle_series(SERIES, state.series(SERIES).last_received_at, None).job
    assert first is not None and first.series_version == 1
    bad = _receive(state, spool, 3, durable=False)  # the series grows: version 2
    assert state.series(SERIES).version == 2
    _damage(spool.path(bad.path), "missing")
    recover_unconfirmed(state, spool)
    series = state.series(SERIES)
    assert series.version == 1 and series.instance_count == 2
    again = state.settle_series(SERIES, series.last_received_at, None)
    assert again.applied and again.job is None  # version 1 already has its result: no duplicate


def test_dropping_one_of_several_rows_of_a_new_version_keeps_that_version(store: tuple[State, Spool]) -> None:
    state, spool = store
    _receive(state, spool, 1)
    state.settle_series(SERIES, state.series(SERIES).last_received_at, None)
    _receive(state, spool, 2)  # version 2, durable
    bad = _receive(state, spool, 3, durable=False)
    _damage(spool.path(bad.path), "empty")
    recover_unconfirmed(state, spool)
    assert state.series(SERIES).version == 2 and state.series(SERIES).instance_count == 2


def test_confirmation_or_drop_with_a_stale_token_leaves_a_newer_write_alone(store: tuple[State, Spool]) -> None:
    state, spool = store
    inst = _receive(state, spool, 1, durable=False)
    stale = state.unconfirmed_instances()[0].token
    state.record_instance(inst)  # the same instance recorded again, unconfirmed: a new token
    newer = state.unconfirmed_instances()[0].token
    assert newer != stale
    state.confirm_instances([(inst.sop_instance_uid, stale)])
    assert not state.drop_unconfirmed(inst.sop_instance_uid, stale)
    assert [u.token for u in state.unconfirmed_instances()] == [newer]
    state.confirm_instances([(inst.sop_instance_uid, newer)])
    assert state.unconfirmed_instances() == []


def test_a_state_written_with_schema_version_1_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    spool = Spool(tmp_path / "spool")
    with State(path) as state:
        old = _receive(state, spool, 1)
    with sqlite3.connect(path) as db:  # version 1 had neither column nor index, nor the jobs' crop columns (3)
        db.executescript(
            "DROP INDEX instances_unconfirmed; ALTER TABLE instances DROP COLUMN unconfirmed;"
            " ALTER TABLE instances DROP COLUMN series_version;"
            + "".join(f" ALTER TABLE jobs DROP COLUMN {c};"
                      for c in ("crop_request", "crop", "outcome", "flag", "voxels", "timings"))
            + " PRAGMA user_version = 1;"
        )
    with State(path) as state:
        assert state.instances(SERIES)[0].sop_instance_uid == old.sop_instance_uid
        _receive(state, spool, 2, durable=False)
        assert recover_unconfirmed(state, spool) == (1, 0)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_one_bad_row_in_a_batch_fails_alone(store: tuple[State, Spool]) -> None:
    state, spool = store
    good = [_receive(state, spool, n) for n in (1, 2)]
    bad = ReceivedInstance(**{**good[0].__dict__, "sop_instance_uid": f"{SERIES}.3", "sop_class_uid": None})
    results = state.record_instances([good[0], bad, good[1]])
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert [r.sop_instance_uid for r in (results[0], results[2])] == [g.sop_instance_uid for g in good]
    assert state.instances_received() == 4 and len(state.instances(SERIES)) == 2


class _GatedClock:
    """A clock whose first reading waits for a gate: the first commit stalls while rows queue up."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.now = 1_000.0

    def __call__(self) -> float:
        self.entered.set()
        self.gate.wait(timeout=10)
        self.now += 1.0
        return self.now


def test_rows_queued_during_a_commit_are_committed_together_in_the_next_one(tmp_path: Path) -> None:
    clock = _GatedClock()
    spool = Spool(tmp_path / "spool")
    with State(tmp_path / "state.sqlite3", clock=clock) as state:
        committer = GroupCommitter(state)
        committer.start()
        try:
            instances = []
            for n in range(5):
                data, stream = _scp_file(f"{SERIES}.{n}")
                staged = spool.stage_instance(SERIES, f"{SERIES}.{n}", (data,))
                staged.write_durably()
                instances.append(ReceivedInstance(
                    sop_instance_uid=f"{SERIES}.{n}", sop_class_uid=pydicom.uid.MRImageStorage, series_uid=SERIES,
                    study_uid="1.2.3", transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian, path=staged.relpath,
                    size=len(stream), sha256=hashlib.sha256(stream).hexdigest(), file_durable=False,
                ))
            futures = [committer.submit(instances[0])]
            assert clock.entered.wait(timeout=10)  # the first batch is committing (stalled)
            futures += [committer.submit(inst) for inst in instances[1:]]
            clock.gate.set()
            outcomes = [f.result(timeout=10) for f in futures]
            for outcome in outcomes:
                committer.confirm(outcome)
        finally:
            committer.stop()  # commits the pending confirmations
        assert len({o.received_at for o in outcomes[1:]}) == 1 != len({o.received_at for o in outcomes})
        assert state.unconfirmed_instances() == [] and state.instances_received() == 5


def test_a_new_instance_is_staged_under_its_final_name_and_a_resend_replaces_it_atomically(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    uid = f"{SERIES}.1"
    first, second = _scp_file(uid)[0], _scp_file(uid)[0] + b"\0\0"
    staged = spool.stage_instance(SERIES, uid, (first,))
    assert not staged.durable and staged.directory == spool.path(staged.relpath).parent
    assert spool.path(staged.relpath).read_bytes() == b""  # the name is taken first; the write follows
    staged.write_durably()
    assert spool.path(staged.relpath).read_bytes() == first
    again = spool.stage_instance(SERIES, uid, (second[:100], second[100:]))
    assert again.durable and again.relpath == staged.relpath  # temp file, fsync, rename, directory fsync
    assert spool.path(again.relpath).read_bytes() == second
    assert [p.name for p in spool.path(again.relpath).parent.iterdir()] == [f"{uid}.dcm"]


def test_a_series_folder_purged_between_two_instances_is_made_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    staged = spool.stage_instance(SERIES, f"{SERIES}.1", (b"first",))
    staged.write_durably()
    assert spool.remove([staged.relpath]) == 1 and not spool.path(staged.relpath).parent.exists()
    staged = spool.stage_instance(SERIES, f"{SERIES}.2", (b"second",))
    staged.write_durably()
    assert spool.path(staged.relpath).read_bytes() == b"second"


def test_a_discarded_staged_file_is_gone(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    staged = spool.stage_instance(SERIES, f"{SERIES}.1", (b"never acknowledged",))
    staged.discard()
    assert not spool.path(staged.relpath).exists()


def test_a_record_whose_folder_cannot_be_fsynced_fails_alone_and_leaves_no_row(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with State(tmp_path / "state.sqlite3") as state:
        committer = GroupCommitter(state)
        committer.start()
        try:
            good, bad = (ReceivedInstance(
                sop_instance_uid=f"{SERIES}.{n}", sop_class_uid=pydicom.uid.MRImageStorage, series_uid=SERIES,
                study_uid="1.2.3", transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian, path=f"x/{n}.dcm",
                size=1, sha256="0" * 64, file_durable=False,
            ) for n in (1, 2))
            ok = committer.submit(good, directory=spool.root)
            failed = committer.submit(bad, directory=tmp_path / "purged-meanwhile")
            assert ok.result(timeout=10).sop_instance_uid == good.sop_instance_uid
            with pytest.raises(FileNotFoundError):
                failed.result(timeout=10)
        finally:
            committer.stop()
        assert [i.sop_instance_uid for i in state.instances(SERIES)] == [good.sop_instance_uid]
