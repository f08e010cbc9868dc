"""Durable, UID-safe files: received instances and results.

Paths are built only from UIDs that passed :func:`checked_uid`, so a hostile UID such as
``../../etc`` can never leave the spool.

Two ways to write, by what a crash may do to the name's previous content:

- :func:`atomic_write` (results, and an instance that *replaces* a stored one): temporary file,
  fsync, rename, directory fsync. The name holds either the old or the new content at every
  instant; a crash mid-write leaves a ``.partial-*`` temporary, removed at start-up.
- :meth:`Spool.stage_instance` (an instance the spool does not hold yet, the common case): the file
  is created under its final name (``O_EXCL``: no temporary, no rename, no separate existence
  check) and left empty; the SCP submits the row to SQLite, then :meth:`StagedInstance.write_durably`
  writes and fsyncs the file while the SCP's committer fsyncs the folder and commits the row.
  Nothing old can be lost, since the name was free. A crash before all three returned may leave a
  missing, empty or partial file under the final name: the SCP does not answer before all three,
  recovery checks the files of rows committed meanwhile (:meth:`Spool.verify_instance`), and a file
  with no row is replaced atomically when the sender sends the instance again (it was not
  acknowledged). Until then it is an orphan nobody reads (only rows lead to files); orphans are not
  swept, since telling one from a file whose state was lost needs a full scan against the state.

Why the directory fsync: POSIX makes a new directory entry durable only with an fsync of the
directory. ext4 does more: with a journal, a new file's fsync commits the journal transaction that
holds its creation; without one (``ext4_fsync_nojournal``, as on this machine's root file system,
see ``/sys/fs/ext4/<dev>/journal_task``), it calls ``ext4_sync_parent``, which writes the parent of a
new entry. XFS, btrfs, overlayfs or NFS promise nothing of the kind, so the spool never relies on
it. The SCP's committer fsyncs each folder once per batch of rows, in the thread that commits them
(a separate thread per fsync cost more CPU than the fsync itself). A folder's own entry in its
parent is fsynced once per process (a crashed run may have made the folder without syncing its
parent).

A minimum of free space: while the spool's file system has less free space than the spool keeps
(``storage.min_free_bytes``, or ``storage.min_free_percent`` of its size, whichever is more),
:meth:`Spool.stage_instance` and :meth:`Spool.write_instance` refuse new instances with
:class:`SpoolBelowMinimumError` before they create anything (no file, no temporary). Results are
still written: the space kept is what lets the jobs of series already received finish and deliver.
The check is one ``statvfs`` per instance, uncached: 1.3 µs measured on ext4 here, against about
2.8 ms of CPU per stored instance (``docs/performance.md``), so a cache would save nothing
measurable and would only delay noticing freed space.

Layout under the spool root::

    instances/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    results/job-<id>.dcm
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom

from ian_node.config.sections import DEFAULT_MIN_FREE_BYTES, DEFAULT_MIN_FREE_PERCENT
from ian_node.uids import checked_uid

logger = logging.getLogger(__name__)

_TEMP_PREFIX = ".partial-"
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
INSTANCES_DIR = "instances"
RESULTS_DIR = "results"


class SpoolFullError(OSError):
    """The spool's file system is full (or over quota): the SCP answers 0xA700 out of resources."""


@dataclass(frozen=True)
class FreeSpace:
    """One reading of the spool's file system: bytes free (to the node's user, as ``statvfs``'s
    ``f_bavail``), its size, and the free space the spool keeps (``min_free_bytes``)."""

    free_bytes: int
    total_bytes: int
    min_free_bytes: int

    @property
    def low(self) -> bool:
        """Below the minimum: new instances are refused."""
        return self.free_bytes < self.min_free_bytes


class SpoolBelowMinimumError(SpoolFullError):
    """The spool's file system has less free space than the spool keeps; nothing was written."""

    def __init__(self, space: FreeSpace, reason: str) -> None:
        super().__init__(errno.ENOSPC, reason)
        self.space = space


def size_text(count: int) -> str:
    """``812.3 MiB``: a byte count as an operator reads it."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a create, rename or unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | Sequence[bytes]) -> None:
    """Write ``data`` (bytes, or parts written in order) to ``path`` so that after a crash ``path``
    holds either all of it or its old content."""
    _atomic_write(path, data, _temporary)


def _atomic_write(path: Path, data: bytes | Sequence[bytes], temporary: Callable[[Path], tuple[int, str]]) -> None:
    parts = (data,) if isinstance(data, bytes | bytearray | memoryview) else tuple(data)
    fd, temp_name = temporary(path)
    try:
        try:
            _write_all(fd, parts)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp_name, path)
        temp_name = None
        fsync_dir(path.parent)
    except OSError as exc:
        if temp_name is not None:
            _unlink_quietly(Path(temp_name))
        raise _full_or(exc, path) from exc


def _temporary(path: Path) -> tuple[int, str]:
    """A new temporary file next to ``path`` (its folder made if needed), open for writing."""
    try:
        try:
            return tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX)
        except FileNotFoundError:  # a new folder, or one purged just now: make it (durably), then retry
            _ensure_dir(path.parent)
            return tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX)
    except OSError as exc:
        raise _full_or(exc, path) from exc


def _write_all(fd: int, parts: Sequence[bytes]) -> None:
    """Write every part in order (os.writev may write less than asked, e.g. just before a full disk)."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _full_or(exc: OSError, path: Path) -> OSError:
    """``exc`` as SpoolFullError when the disk is full or over quota, else unchanged."""
    if exc.errno in _FULL_ERRNOS and not isinstance(exc, SpoolFullError):
        return SpoolFullError(exc.errno, f"no space left to write {path.name}")
    return exc


class StagedInstance:
    """A received instance whose name is taken in the spool; :meth:`write_durably` (or
    :meth:`discard`) must follow, once.

    ``durable`` is True when it was written the fully atomic way (it replaced a stored copy): it is
    then complete and durable already. Otherwise the file exists under its final name, still empty,
    and its directory entry is durable only once ``directory`` has been fsynced (the SCP's committer
    does that for every instance of a batch at once).
    """

    def __init__(self, relpath: str, path: Path, fd: int | None = None, parts: Sequence[bytes] = ()) -> None:
        self.relpath = relpath
        self.path = path
        self.durable = fd is None
        self._fd = fd
        self._parts = parts

    @property
    def directory(self) -> Path | None:
        """The folder whose fsync makes the new name durable (None when nothing is left to do)."""
        return None if self.durable else self.path.parent

    def write_durably(self) -> None:
        """Write the content and fsync the file. SpoolFullError or OSError if not."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            _write_all(fd, self._parts)
            os.fsync(fd)
        except OSError as exc:
            raise _full_or(exc, self.path) from exc
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Remove a staged new file that will not be acknowledged."""
        if not self.durable:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)
            _unlink_quietly(self.path)


def _dataset_offset(data: bytes, sop_instance_uid: str) -> int | None:
    """Where the data set starts in a DICOM file written by the SCP, if its preamble and file meta are
    sound and name ``sop_instance_uid``; None otherwise."""
    if len(data) < 144 or data[128:132] != b"DICM":
        return None
    try:
        meta = pydicom.dcmread(io.BytesIO(data[:144 + _u32(data, 140)])).file_meta
        if str(meta.MediaStorageSOPInstanceUID) != sop_instance_uid:
            return None
        return 144 + int(meta.FileMetaInformationGroupLength)
    except Exception:  # anything unreadable in the meta means the file is not whole
        return None


def _u32(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset:offset + 4], "little")


def _ensure_dir(directory: Path) -> None:
    if directory.is_dir():
        return
    _ensure_dir(directory.parent)
    try:
        directory.mkdir()
    except FileExistsError:  # made by another thread just now, whose parent fsync may not be done
        pass
    fsync_dir(directory.parent)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove %s: %s", path, exc.strerror)


class Spool:
    """The node's file store; callers keep paths relative to ``root`` (as the state does)."""

    def __init__(self, root: Path, *, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
                 min_free_percent: float = DEFAULT_MIN_FREE_PERCENT) -> None:
        """``min_free_bytes`` and ``min_free_percent``: the free space kept (``storage.*``; 0 and 0: none)."""
        if min_free_bytes < 0 or not 0 <= min_free_percent < 100:
            raise ValueError(f"min_free_bytes must be >= 0 and min_free_percent in [0, 100), got {min_free_bytes} "
                             f"and {min_free_percent}")
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.min_free_bytes = min_free_bytes
        self.min_free_percent = min_free_percent
        fsync_dir(self.root.parent)
        self._dirs_lock = threading.Lock()
        self._held_changed = threading.Condition()  # instance_lock: the SOP Instance UIDs held now
        self._held: set[str] = set()
        # Folders whose entry in their parent this process has made durable. A folder that already
        # exists is synced once anyway: a crashed run may have made it without syncing its parent.
        self._durable_dirs: set[Path] = {self.root}

    def free_space(self) -> FreeSpace:
        """The free space of the spool's file system now, and the minimum the spool keeps there."""
        st = os.statvfs(self.root)
        total = st.f_blocks * st.f_frsize
        minimum = max(self.min_free_bytes, -(-total * self.min_free_percent // 100))
        return FreeSpace(st.f_bavail * st.f_frsize, total, int(minimum))

    def check_free_space(self) -> FreeSpace:
        """The reading, when it is above the minimum; SpoolBelowMinimumError naming both otherwise."""
        space = self.free_space()
        if space.low:
            raise SpoolBelowMinimumError(space, (
                f"the spool's file system has {size_text(space.free_bytes)} free ({space.free_bytes} bytes), below "
                f"the minimum of {size_text(space.min_free_bytes)} ({space.min_free_bytes} bytes: the larger of "
                f"storage.min_free_bytes = {size_text(self.min_free_bytes)} and storage.min_free_percent = "
                f"{self.min_free_percent:g}% of {size_text(space.total_bytes)})"))
        return space

    def write_instance(self, series_uid: str, sop_instance_uid: str, data: bytes) -> str:
        """Store one received instance (replacing an earlier copy) durably; returns its relative path.

        SpoolBelowMinimumError, with nothing written, while the free space is below the minimum."""
        relpath = self.instance_relpath(series_uid, sop_instance_uid)
        self.check_free_space()
        _atomic_write(self.root / relpath, data, self._temporary)
        return relpath

    def stage_instance(self, series_uid: str, sop_instance_uid: str, parts: Sequence[bytes]) -> StagedInstance:
        """Take the final name of one received instance (``parts`` in order) for a write to follow.

        A new name is created empty (``O_EXCL``: no temporary, no rename, no separate existence check);
        :meth:`StagedInstance.write_durably` writes it, and the caller fsyncs its directory. A name that
        already holds a file (a re-send) is replaced with :func:`atomic_write` at once instead, durable on
        return, so that a crash can never cost the copy stored before. Callers hold
        :meth:`instance_lock` from here until the instance's row is committed. SpoolBelowMinimumError,
        with nothing created, while the free space is below the minimum.
        """
        relpath = self.instance_relpath(series_uid, sop_instance_uid)
        self.check_free_space()
        path = self.root / relpath
        try:
            fd = self._create_new(path)
        except FileExistsError:
            _atomic_write(path, parts, self._temporary)
            return StagedInstance(relpath, path)
        return StagedInstance(relpath, path, fd, parts)

    def _create_new(self, path: Path) -> int:
        """Open ``path`` for writing if no file has that name (FileExistsError otherwise); its folder
        is made, durably, when missing."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            try:
                self._durable_dir(path.parent)
                return os.open(path, flags, 0o600)
            except FileNotFoundError:  # the folder was purged just now: make it again, once
                with self._dirs_lock:
                    self._durable_dirs.discard(path.parent)
                self._durable_dir(path.parent)
                return os.open(path, flags, 0o600)
        except FileExistsError:
            raise
        except OSError as exc:
            raise _full_or(exc, path) from exc

    def verify_instance(self, relpath: str, sop_instance_uid: str, size: int, sha256: str) -> bool:
        """Whether a stored instance file is whole: its file meta names ``sop_instance_uid`` and the data
        set after it has exactly ``size`` bytes with digest ``sha256``; if so, it is made durable now.

        Recovery uses this for instances recorded while their fsync was still in flight.
        """
        try:
            path = self.path(relpath)
            with open(path, "rb") as fh:
                data = fh.read()
                start = _dataset_offset(data, sop_instance_uid)
                intact = (start is not None and len(data) - start == size
                          and hashlib.sha256(memoryview(data)[start:]).hexdigest() == sha256)
                if intact:
                    os.fsync(fh.fileno())
        except (OSError, ValueError):
            return False
        if intact:
            fsync_dir(path.parent)
        return intact

    def write_result(self, job_id: int, data: bytes, part: int = 0) -> str:
        """Store result file ``part`` of job ``job_id`` (0: the SEG; then the SR, ...); returns its relative path."""
        if not isinstance(job_id, int) or job_id < 0:
            raise ValueError(f"job_id must be a non-negative integer, got {job_id!r}")
        if not isinstance(part, int) or part < 0:
            raise ValueError(f"part must be a non-negative integer, got {part!r}")
        relpath = f"{RESULTS_DIR}/job-{job_id}.dcm" if part == 0 else f"{RESULTS_DIR}/job-{job_id}-{part}.dcm"
        _atomic_write(self.root / relpath, data, self._temporary)
        return relpath

    def _temporary(self, path: Path) -> tuple[int, str]:
        """A new temporary file next to ``path``, whose folder exists durably; open for writing."""
        try:
            try:
                self._durable_dir(path.parent)
                return tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX)
            except FileNotFoundError:  # the folder was purged just now: make it again, once
                with self._dirs_lock:
                    self._durable_dirs.discard(path.parent)
                self._durable_dir(path.parent)
                return tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX)
        except OSError as exc:
            raise _full_or(exc, path) from exc

    def _durable_dir(self, directory: Path) -> None:
        """Make ``directory`` (inside the spool) exist with its entry durable in its parent."""
        if directory in self._durable_dirs:
            return
        with self._dirs_lock:
            chain = []
            while directory not in self._durable_dirs:
                if directory == directory.parent:
                    raise ValueError(f"{directory} is outside the spool {self.root}")
                chain.append(directory)
                directory = directory.parent
            for folder in reversed(chain):
                try:
                    folder.mkdir()
                except FileExistsError:
                    pass
                fsync_dir(folder.parent)
                self._durable_dirs.add(folder)

    @staticmethod
    def instance_relpath(series_uid: str, sop_instance_uid: str) -> str:
        series = checked_uid(series_uid, "SeriesInstanceUID")
        sop = checked_uid(sop_instance_uid, "SOPInstanceUID")
        return f"{INSTANCES_DIR}/{series}/{sop}.dcm"

    def path(self, relpath: str) -> Path:
        """The absolute path of a stored relative path; refuses anything outside the spool."""
        full = (self.root / relpath).resolve()
        if not full.is_relative_to(self.root) or full == self.root:
            raise ValueError(f"path {relpath!r} is outside the spool {self.root}")
        return full

    def remove(self, relpaths: Iterable[str]) -> int:
        """Delete stored files (and series folders left empty); returns how many files went."""
        parents: set[Path] = set()
        removed = sum(self._unlink(relpath, parents) for relpath in relpaths)
        self._settle_folders(parents)
        return removed

    def remove_purged(self, purged: Iterable[tuple[str, str]], recorded_path: Callable[[str], str | None]) -> int:
        """Delete the files of purged instances, given as (SOP Instance UID, path), each under its
        :meth:`instance_lock`; a file that a row names again is kept, since the instance was sent again
        after its row was purged (the re-send took the same name). Returns how many files went."""
        parents: set[Path] = set()
        removed = 0
        for uid, relpath in purged:
            with self.instance_lock(uid):
                if recorded_path(uid) != relpath:
                    removed += self._unlink(relpath, parents)
        self._settle_folders(parents)
        return removed

    @contextmanager
    def instance_lock(self, sop_instance_uid: str) -> Iterator[None]:
        """Hold the instance's name: whoever writes, records or removes its file holds this lock."""
        with self._held_changed:
            while sop_instance_uid in self._held:
                self._held_changed.wait()
            self._held.add(sop_instance_uid)
        try:
            yield
        finally:
            with self._held_changed:
                self._held.discard(sop_instance_uid)
                self._held_changed.notify_all()

    def _unlink(self, relpath: str, parents: set[Path]) -> bool:
        full = self.path(relpath)
        try:
            full.unlink()
        except FileNotFoundError:
            return False
        parents.add(full.parent)
        return True

    def _settle_folders(self, parents: Iterable[Path]) -> None:
        """Make removals durable; a series folder left empty goes."""
        for parent in parents:
            try:
                parent.rmdir()
            except OSError:  # not empty (e.g. new instances arrived meanwhile)
                fsync_dir(parent)
                continue
            with self._dirs_lock:
                self._durable_dirs.discard(parent)
            fsync_dir(parent.parent)

    def remove_stale_temporaries(self) -> int:
        """Delete half-written temporaries a crash left behind; returns how many."""
        stale = list(self.root.rglob(f"{_TEMP_PREFIX}*"))
        for path in stale:
            _unlink_quietly(path)
        if stale:
            logger.info("removed %d half-written temporary files from the spool", len(stale))
        return len(stale)
