"""Durable, UID-safe files: received instances and results, each written atomically.

A file either exists complete or not at all: it is written to a temporary file in the same
directory, fsynced, renamed over its final name, and the directory is fsynced so that the rename
itself survives a power cut. Paths are built only from UIDs that passed :func:`checked_uid`, so a
hostile UID such as ``../../etc`` can never leave the spool.

Layout under the spool root::

    instances/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    results/job-<id>.dcm
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ian_node.config import is_dicom_uid

logger = logging.getLogger(__name__)

_TEMP_PREFIX = ".partial-"
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
INSTANCES_DIR = "instances"
RESULTS_DIR = "results"


class SpoolFullError(OSError):
    """The spool's file system is full (or over quota): the SCP answers 0xA700 out of resources."""


class UnsafeUIDError(ValueError):
    """A value that should be a DICOM UID is not one, so it must never become part of a path."""


def checked_uid(value: object, what: str) -> str:
    """``value`` if it is a DICOM UID (digits and dots, at most 64 characters); else UnsafeUIDError."""
    if not isinstance(value, str) or not is_dicom_uid(value):
        # The value itself stays out of the message: it may be anything a peer chose to put there.
        if value is None:
            got = "missing"
        else:
            got = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
        raise UnsafeUIDError(f"{what} is not a valid DICOM UID ({got})")
    return str(value)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a create, rename or unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that after a crash ``path`` holds either all of it or its old content."""
    directory = path.parent
    temp_name = None
    try:
        try:
            _ensure_dir(directory)
            fd, temp_name = tempfile.mkstemp(dir=directory, prefix=_TEMP_PREFIX)
        except FileNotFoundError:  # the folder was purged just now: make it again, once
            _ensure_dir(directory)
            fd, temp_name = tempfile.mkstemp(dir=directory, prefix=_TEMP_PREFIX)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp_name, path)
        temp_name = None
        fsync_dir(directory)
    except OSError as exc:
        if temp_name is not None:
            _unlink_quietly(Path(temp_name))
        if exc.errno in _FULL_ERRNOS:
            raise SpoolFullError(exc.errno, f"no space left to write {path.name}") from exc
        raise


def _ensure_dir(directory: Path) -> None:
    if directory.is_dir():
        return
    _ensure_dir(directory.parent)
    try:
        directory.mkdir()
    except FileExistsError:
        return
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

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()

    def write_instance(self, series_uid: str, sop_instance_uid: str, data: bytes) -> str:
        """Store one received instance (replacing an earlier copy); returns its relative path."""
        relpath = self.instance_relpath(series_uid, sop_instance_uid)
        atomic_write(self.root / relpath, data)
        return relpath

    def write_result(self, job_id: int, data: bytes) -> str:
        """Store the result file of job ``job_id``; returns its relative path."""
        if not isinstance(job_id, int) or job_id < 0:
            raise ValueError(f"job_id must be a non-negative integer, got {job_id!r}")
        relpath = f"{RESULTS_DIR}/job-{job_id}.dcm"
        atomic_write(self.root / relpath, data)
        return relpath

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
        removed = 0
        parents: set[Path] = set()
        for relpath in relpaths:
            full = self.path(relpath)
            try:
                full.unlink()
                removed += 1
            except FileNotFoundError:
                continue
            parents.add(full.parent)
        for parent in parents:
            try:
                parent.rmdir()  # a series folder left empty
                fsync_dir(parent.parent)
            except OSError:  # not empty (e.g. new instances arrived meanwhile)
                fsync_dir(parent)
        return removed

    def remove_stale_temporaries(self) -> int:
        """Delete half-written temporaries a crash left behind; returns how many."""
        stale = list(self.root.rglob(f"{_TEMP_PREFIX}*"))
        for path in stale:
            _unlink_quietly(path)
        if stale:
            logger.info("removed %d half-written temporary files from the spool", len(stale))
        return len(stale)
