"""The spool: UID-safe paths, atomic writes, a full disk reported as SpoolFullError, and the free space
it keeps (SpoolBelowMinimumError before anything is written)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ian_node.config import StorageConfig
from ian_node.storage.spool import Spool, SpoolBelowMinimumError, SpoolFullError, atomic_write
from ian_node.uids import UnsafeUIDError, checked_uid
from tests.integration.peers import tiny_tmpfs

SERIES = "1.2.826.0.1.3680043.8.498.1"
SOP = "1.2.826.0.1.3680043.8.498.1.7"


@pytest.mark.parametrize("uid", ["1.2.3", "0.1", "2.25.329800735698586629295641978511506172918", "1." + "2" * 62])
def test_valid_uid_is_accepted(uid: str) -> None:
    assert checked_uid(uid, "SeriesInstanceUID") == uid


@pytest.mark.parametrize(
    "uid",
    ["../../etc", "1.2/3", "1.02.3", "1.2.", ".1.2", "1..2", "1.2.3\n", "1.2 3", "", "1." + "2" * 63, None, 123],
)
def test_invalid_uid_is_refused_before_it_reaches_a_path(tmp_path: Path, uid: object) -> None:
    with pytest.raises(UnsafeUIDError):
        checked_uid(uid, "SeriesInstanceUID")
    with pytest.raises(UnsafeUIDError):
        Spool(tmp_path).write_instance(uid, SOP, b"data")  # type: ignore[arg-type]
    assert not any(tmp_path.rglob("*.dcm"))


def test_write_instance_stores_the_bytes_under_series_and_sop_uid(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    relpath = spool.write_instance(SERIES, SOP, b"first")
    assert relpath == f"instances/{SERIES}/{SOP}.dcm"
    assert spool.path(relpath).read_bytes() == b"first"


def test_rewrite_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.write_instance(SERIES, SOP, b"first")
    relpath = spool.write_instance(SERIES, SOP, b"second")
    assert spool.path(relpath).read_bytes() == b"second"
    assert sorted(p.name for p in spool.path(relpath).parent.iterdir()) == [f"{SOP}.dcm"]


def test_path_refuses_anything_outside_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    for relpath in ("../outside.dcm", "/etc/passwd", "instances/../../x", "."):
        with pytest.raises(ValueError, match="outside the spool"):
            spool.path(relpath)


def test_remove_deletes_files_and_the_emptied_series_folder(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    paths = [spool.write_instance(SERIES, f"{SOP}.{i}", b"x") for i in range(3)]
    assert spool.remove(paths + [paths[0]]) == 3
    assert not (tmp_path / "instances" / SERIES).exists()


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.write_instance(SERIES, SOP, b"kept")
    stale = tmp_path / "instances" / SERIES / ".partial-abc123"
    stale.write_bytes(b"half")
    assert spool.remove_stale_temporaries() == 1
    assert not stale.exists()
    assert spool.path(f"instances/{SERIES}/{SOP}.dcm").read_bytes() == b"kept"


def test_full_disk_raises_spool_full_and_keeps_earlier_files_intact() -> None:
    with tiny_tmpfs(64) as mount:
        spool = Spool(mount, min_free_bytes=0, min_free_percent=0)  # no minimum: write until ENOSPC
        written: list[tuple[str, bytes]] = []
        with pytest.raises(SpoolFullError):
            for i in range(100):
                data = bytes([i]) * 10_000
                written.append((spool.write_instance(SERIES, f"{SOP}.{i}", data), data))
        assert written, "the tmpfs should hold at least one file"
        for relpath, data in written:
            assert spool.path(relpath).read_bytes() == data
        assert not list(mount.rglob(".partial-*"))
        with pytest.raises(SpoolFullError):
            atomic_write(mount / "results" / "job-1.dcm", b"y" * 200_000)


def test_purge_keeps_the_file_of_an_instance_recorded_again_after_its_row_was_purged(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    resent, gone = f"{SERIES}.1", f"{SERIES}.2"
    paths = {uid: spool.write_instance(SERIES, uid, b"data") for uid in (resent, gone)}
    recorded = {resent: paths[resent]}  # re-sent after the purge: its new row names the same file
    assert spool.remove_purged(paths.items(), recorded.get) == 1
    assert spool.path(paths[resent]).exists() and not spool.path(paths[gone]).exists()


def test_purge_waits_for_a_resend_in_progress_and_keeps_its_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    uid = f"{SERIES}.1"
    relpath = spool.write_instance(SERIES, uid, b"purged copy")
    recorded: dict[str, str] = {}
    with spool.instance_lock(uid):  # the SCP is storing a re-send of this instance
        purge = threading.Thread(target=spool.remove_purged, args=([(uid, relpath)], recorded.get))
        purge.start()
        purge.join(timeout=0.3)
        assert purge.is_alive() and spool.path(relpath).read_bytes() == b"purged copy"
        spool.write_instance(SERIES, uid, b"re-sent copy")
        recorded[uid] = relpath  # ...and commits its row before it lets go
    purge.join(timeout=10)
    assert not purge.is_alive() and spool.path(relpath).read_bytes() == b"re-sent copy"


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_below_the_minimum_free_space_new_instances_are_refused_before_anything_is_written() -> None:
    with tiny_tmpfs(1024) as mount:
        spool = Spool(mount / "spool", min_free_bytes=512 * 1024, min_free_percent=0)
        spool.write_instance(SERIES, f"{SOP}.1", b"kept")
        free = spool.free_space().free_bytes
        (mount / "ballast").write_bytes(b"\0" * (free - 256 * 1024))
        before = _tree(mount)
        with pytest.raises(SpoolBelowMinimumError) as refused:
            spool.stage_instance(SERIES, f"{SOP}.2", (b"new",))
        with pytest.raises(SpoolBelowMinimumError):
            spool.write_instance(f"{SERIES}.9", SOP, b"new series")
        with pytest.raises(SpoolBelowMinimumError):
            spool.write_instance(SERIES, f"{SOP}.1", b"a re-send")
        assert _tree(mount) == before  # no file, no temporary, no folder
        assert spool.path(f"instances/{SERIES}/{SOP}.1.dcm").read_bytes() == b"kept"
        space = refused.value.space
        assert space.low and space.min_free_bytes == 512 * 1024 and space.free_bytes < 512 * 1024
        message = str(refused.value.strerror)
        assert message.startswith(f"the spool's file system has {space.free_bytes // 1024}.") and "KiB free" in message
        assert "below the minimum of 512.0 KiB (524288 bytes: the larger of storage.min_free_bytes" in message
        assert isinstance(refused.value, SpoolFullError)


def test_results_are_written_below_the_minimum_and_instances_again_once_space_is_freed() -> None:
    with tiny_tmpfs(1024) as mount:
        spool = Spool(mount / "spool", min_free_bytes=512 * 1024, min_free_percent=0)
        ballast = mount / "ballast"
        ballast.write_bytes(b"\0" * (spool.free_space().free_bytes - 256 * 1024))
        assert spool.path(spool.write_result(1, b"SEG" * 1000)).read_bytes() == b"SEG" * 1000
        with pytest.raises(SpoolBelowMinimumError):
            spool.stage_instance(SERIES, SOP, (b"refused",))
        ballast.unlink()
        staged = spool.stage_instance(SERIES, SOP, (b"stored",))
        staged.write_durably()
        assert spool.path(staged.relpath).read_bytes() == b"stored"


def test_the_minimum_is_the_larger_of_the_bytes_and_the_percent_of_the_file_system() -> None:
    with tiny_tmpfs(1024) as mount:
        by_percent = Spool(mount / "a", min_free_bytes=100 * 1024, min_free_percent=50).free_space()
        by_bytes = Spool(mount / "b", min_free_bytes=800 * 1024, min_free_percent=50).free_space()
        unlimited = Spool(mount / "c", min_free_bytes=0, min_free_percent=0).free_space()
    assert by_percent.total_bytes == 1024 * 1024 and by_percent.min_free_bytes == 512 * 1024
    assert by_bytes.min_free_bytes == 800 * 1024 and unlimited.min_free_bytes == 0 and not unlimited.low


def test_a_spool_keeps_the_configured_default_minimum_unless_told_otherwise(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert (spool.min_free_bytes, spool.min_free_percent) == (StorageConfig().min_free_bytes,
                                                              StorageConfig().min_free_percent)
    with pytest.raises(ValueError, match="min_free_percent"):
        Spool(tmp_path, min_free_percent=100)
