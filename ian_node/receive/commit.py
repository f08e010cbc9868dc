"""The group committer: how a received instance becomes durable before its C-STORE is answered.

Done one after the other, the file's fsync, its directory's fsync and the SQLite commit are three
waits for the disk (about three times what a bare "write + fsync" SCP pays). Here they overlap, and the answer waits for all three:

1. the header facts are read (:mod:`ian_node.receive.header`) and the file is created, empty, under its
   final name (:meth:`Spool.stage_instance`);
2. the row goes to the :class:`GroupCommitter`, whose thread hashes the data set (sha256), fsyncs
   the folders of the batch's new files (once per folder) and commits the rows of every association
   that arrived meanwhile in one transaction (one WAL fsync for the batch);
3. meanwhile the handler writes and fsyncs the file, then waits for the commit and answers success.

Because the row is committed before the file is durable, it is recorded *unconfirmed* (with a
token) and confirmed later, in a following transaction at no extra fsync; until then a job of an
earlier series version does not read it (:meth:`State.instances`). A crash (SIGKILL or power loss)
can leave an unconfirmed row naming a missing, empty or partial file. Start-up
(:func:`recover_unconfirmed`, run when the SCP is built, before the series timers or the worker
start) reads every unconfirmed row's file, confirms it when its file meta, size and sha256 match
(fsyncing it first), and otherwise drops the row and the file with a warning. Such an instance was
never acknowledged, so the sender still has it and will send it again.

An instance that *replaces* a stored copy (a re-send) is written the fully atomic way first (temp
file, fsync, rename, directory fsync) and recorded as confirmed, so a crash can never cost the copy
acknowledged before. Two associations sending the same SOP Instance UID at once are serialised by
:meth:`Spool.instance_lock`, which the retention purge takes too.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

from ian_node.storage.records import ReceivedInstance, RecordOutcome
from ian_node.storage.spool import Spool, fsync_dir
from ian_node.storage.state import State

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Record:
    instance: ReceivedInstance
    dataset: bytes | None
    directory: Path | None
    future: Future[RecordOutcome]


_STOP = object()


class GroupCommitter:
    """Records received instances for every association, as many per SQLite transaction as arrived
    while the previous one was committing (group commit: one WAL fsync per batch, not per instance).
    The folders that hold the batch's new files are fsynced first, once per folder and batch.

    Confirmations of unconfirmed rows (:meth:`confirm`) ride along with the next batch; when nothing
    else comes for ``idle_confirm_s`` they are committed on their own.
    """

    def __init__(self, state: State, max_batch: int = 64, idle_confirm_s: float = 0.5) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._state = state
        self._max_batch = max_batch
        self._idle_confirm_s = idle_confirm_s
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._confirms: list[tuple[str, int]] = []
        self._running = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the committer is already running")
            self._running = True
            self._thread = threading.Thread(target=self._run, name="scp-group-commit", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Commit everything submitted so far (and pending confirmations), then end the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._running = False
            self._queue.put(_STOP)
        thread.join()

    def submit(
        self, instance: ReceivedInstance, dataset: bytes | None = None, directory: Path | None = None
    ) -> Future[RecordOutcome]:
        """Queue one instance; the future gives its outcome once committed (or the commit's error).

        With ``dataset``, the instance's size and sha256 are taken from it in the commit thread, so
        that hashing overlaps the submitter's write. With ``directory``, that folder is fsynced before
        the row is committed (the instance's file is new there); the future fails if it cannot be.
        """
        record = _Record(instance, dataset, directory, Future())
        with self._lock:  # nothing is queued behind the stop marker
            if not self._running:
                raise RuntimeError("the SCP's committer is not running")
            self._queue.put(record)
        return record.future

    def confirm(self, outcome: RecordOutcome) -> None:
        """The file of an unconfirmed row is durable: clear its token with the next transaction."""
        if outcome.confirm_token is not None:
            with self._lock:
                self._confirms.append((outcome.sop_instance_uid, outcome.confirm_token))

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self._idle_confirm_s)
            except queue.Empty:  # idle: commit the confirmations that are waiting, if any
                self._commit([])
                continue
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._commit([item for item in batch if isinstance(item, _Record)])
            if any(item is _STOP for item in batch):
                self._commit([])
                return

    def _commit(self, records: list[_Record]) -> None:
        with self._lock:
            confirms, self._confirms = self._confirms, []
        if not records and not confirms:
            return
        records = self._sync_directories(records)
        instances = [
            r.instance if r.dataset is None
            else replace(r.instance, size=len(r.dataset), sha256=hashlib.sha256(r.dataset).hexdigest())
            for r in records
        ]
        try:
            results = self._state.record_instances(instances, confirms)
        except Exception as exc:
            with self._lock:  # try the confirmations again with the next batch
                self._confirms[:0] = confirms
            if not records:
                logger.warning("could not record confirmations (retried later): %s", exc)
            for record in records:
                record.future.set_exception(exc)
            return
        for record, result in zip(records, results, strict=True):
            if isinstance(result, Exception):
                record.future.set_exception(result)
            else:
                record.future.set_result(result)


    @staticmethod
    def _sync_directories(records: list[_Record]) -> list[_Record]:
        """Fsync each folder named in the batch once; the records whose folder failed fail."""
        failed: dict[Path, OSError] = {}
        for directory in {r.directory for r in records if r.directory is not None}:
            try:
                fsync_dir(directory)
            except OSError as exc:
                failed[directory] = exc
        if not failed:
            return records
        for record in records:
            if record.directory in failed:
                record.future.set_exception(failed[record.directory])
        return [r for r in records if r.directory not in failed]


def recover_unconfirmed(state: State, spool: Spool) -> tuple[int, int]:
    """Settle the rows a crash left unconfirmed: confirm those whose file is intact (now made
    durable), drop the others with their file. Returns (confirmed, dropped)."""
    kept = dropped = 0
    for inst in state.unconfirmed_instances():
        if spool.verify_instance(inst.path, inst.sop_instance_uid, inst.size, inst.sha256):
            state.confirm_instances([(inst.sop_instance_uid, inst.token)])
            kept += 1
            continue
        if state.drop_unconfirmed(inst.sop_instance_uid, inst.token):
            spool.remove([inst.path])
            dropped += 1
            logger.warning(
                "instance %s of series %s dropped: its file was not intact after a crash (it was never"
                " acknowledged, so the sender still has it)", inst.sop_instance_uid, inst.series_uid,
            )
    if kept or dropped:
        logger.info("unconfirmed instances after a crash: %d intact, %d dropped", kept, dropped)
    return kept, dropped
