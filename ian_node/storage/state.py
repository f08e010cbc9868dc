"""The node's single source of truth: SQLite tables for instances, series, jobs and deliveries.

Everything that must survive a crash is here, written in WAL mode with ``synchronous=FULL`` so that a
committed transaction is on disk when the call returns. Timers, the job queue and the delivery queue
are rebuilt from these tables on start-up (:meth:`State.recover`).

Instance rows and their files: a row normally names a file that was durable before the row was
committed. The SCP may instead commit the row before the file is written (to overlap the file's
write and fsync with the commit); such a row carries an ``unconfirmed`` token until the file is known durable, and is
answered to the peer only after both. After a crash, an unconfirmed row either has an intact file
(it is confirmed) or is dropped with :meth:`State.drop_unconfirmed`: it was never acknowledged, so
the sender still holds the instance. Confirmations are written lazily, piggybacked on the next
transaction, so at most the last few rows are ever unconfirmed.

Life cycles:

- **series** ``receiving`` → ``selected`` (a job exists for its current ``version``) or ``skipped``
  (with a reason). Its ``version`` goes up when the series changes (a new instance, or an instance
  re-sent with different content) after a job was created for the current version, so each version
  yields one job and one result (``UNIQUE(series_uid, series_version)``).
- **job** ``queued`` → ``running`` → ``exporting`` → ``done`` | ``failed``.
- **delivery** (job × target) ``pending`` → ``delivered`` | ``failed``; a job is ``done`` when every
  delivery is delivered and ``failed`` when one has failed for good.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ian_node.receive.header import HeaderFacts

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    description TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    peer_host TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    awaiting_completion INTEGER NOT NULL DEFAULT 1,
    status TEXT NOT NULL DEFAULT 'receiving' CHECK (status IN ('receiving', 'selected', 'skipped')),
    status_reason TEXT,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL
);
CREATE TABLE instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL REFERENCES series (series_uid),
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    instance_number INTEGER,
    frames INTEGER NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    received_at REAL NOT NULL,
    times_received INTEGER NOT NULL DEFAULT 1,
    series_version INTEGER,
    unconfirmed INTEGER
);
CREATE INDEX instances_by_series ON instances (series_uid);
CREATE INDEX instances_unconfirmed ON instances (unconfirmed) WHERE unconfirmed IS NOT NULL;
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL REFERENCES series (series_uid),
    series_version INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'exporting', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result_path TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL,
    UNIQUE (series_uid, series_version)
);
CREATE INDEX jobs_by_state ON jobs (state, id);
CREATE TABLE deliveries (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    target TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    last_error TEXT,
    delivered_at REAL,
    PRIMARY KEY (job_id, target)
);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters VALUES ('instances_received', 0);
"""

#: Schema upgrades: the script that takes a database from version N - 1 to N.
_MIGRATIONS = {
    # The series version an instance row was recorded into, and the token of a row whose file was
    # not yet known durable when it was committed.
    2: """
ALTER TABLE instances ADD COLUMN series_version INTEGER;
ALTER TABLE instances ADD COLUMN unconfirmed INTEGER;
CREATE INDEX instances_unconfirmed ON instances (unconfirmed) WHERE unconfirmed IS NOT NULL;
""",
}

_INSTANCE_COLUMNS = (
    "sop_instance_uid, series_uid, sop_class_uid, transfer_syntax_uid, instance_number, frames, path, size,"
    " sha256, received_at, times_received"
)


class StateError(RuntimeError):
    """A transition that the current state does not allow, or an unknown job."""


class StateFullError(OSError):
    """SQLite could not commit because the disk is full: the SCP answers 0xA700."""


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    EXPORTING = "exporting"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class ReceivedInstance:
    """What the SCP knows about one instance it has just written to the spool."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    sha256: str
    frames: int = 1
    instance_number: int | None = None
    modality: str = ""
    description: str = ""
    calling_ae: str = ""
    peer_host: str = ""
    #: False when the file's fsync may still be in flight: the row is then recorded as unconfirmed
    #: (checked on recovery) until :meth:`State.confirm_instances` is given its token.
    file_durable: bool = True

    @classmethod
    def from_facts(cls, facts: HeaderFacts, transfer_syntax_uid: str, calling_ae: str = "", peer_host: str = "",
                   path: str = "", size: int = 0, sha256: str = "") -> ReceivedInstance:
        """The instance described by its header facts (the SCP and the pull read them the same way)."""
        return cls(
            sop_instance_uid=facts.sop_instance_uid, sop_class_uid=facts.sop_class_uid, series_uid=facts.series_uid,
            study_uid=facts.study_uid, transfer_syntax_uid=transfer_syntax_uid, path=path, size=size, sha256=sha256,
            frames=facts.frames, instance_number=facts.instance_number, modality=facts.modality,
            description=facts.description, calling_ae=calling_ae, peer_host=peer_host,
        )


@dataclass(frozen=True)
class RecordOutcome:
    series_uid: str
    series_version: int
    received_at: float
    new_instance: bool
    #: False for an identical re-send (same UID, same bytes).
    changed: bool
    sop_instance_uid: str = ""
    #: The row's unconfirmed token (None when the file was durable before the row).
    confirm_token: int | None = None


@dataclass(frozen=True)
class UnconfirmedInstance:
    """A row committed before its file was known durable: recovery checks the file."""

    sop_instance_uid: str
    series_uid: str
    path: str
    size: int
    sha256: str
    token: int


@dataclass(frozen=True)
class Instance:
    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    frames: int
    path: str
    size: int
    sha256: str
    received_at: float
    times_received: int


@dataclass(frozen=True)
class Series:
    series_uid: str
    study_uid: str
    modality: str
    description: str
    calling_ae: str
    peer_host: str
    version: int
    awaiting_completion: bool
    status: str
    status_reason: str | None
    first_received_at: float
    last_received_at: float
    instance_count: int
    slice_count: int


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    series_version: int
    state: JobState
    attempts: int
    error: str | None
    result_path: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float


@dataclass(frozen=True)
class Delivery:
    job_id: int
    target: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    delivered_at: float | None


@dataclass(frozen=True)
class Settlement:
    """The end of a quiet period: whether it applied (no newer instance), and what it produced."""

    applied: bool
    job: Job | None = None
    #: (SOP Instance UID, path) of each instance row the purge deleted; the caller deletes the files.
    purged: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Recovery:
    """What start-up found: work to resume."""

    requeued_jobs: tuple[int, ...]
    failed_jobs: tuple[int, ...]
    exporting_jobs: tuple[int, ...]
    awaiting_series: tuple[Series, ...]


_SERIES_SELECT = """
SELECT s.*, COUNT(i.sop_instance_uid) AS instance_count, COALESCE(SUM(i.frames), 0) AS slice_count
FROM series s LEFT JOIN instances i ON i.series_uid = s.series_uid
"""


class State:
    """One SQLite connection shared by all threads behind a lock (SQLite serialises writers anyway)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._clock = clock
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            self._db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        elif not 1 <= version <= SCHEMA_VERSION:
            raise StateError(f"{path}: schema version {version}, this node reads {SCHEMA_VERSION}")
        else:
            for target in range(version + 1, SCHEMA_VERSION + 1):
                self._db.executescript(f"BEGIN IMMEDIATE; {_MIGRATIONS[target]} PRAGMA user_version = {target}; COMMIT;")
        # Tokens of unconfirmed rows: unique across restarts of this process, never 0.
        self._tokens = itertools.count(time.time_ns())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a full disk surfaces as StateFullError."""
        with self._lock:
            try:
                if not self._db.in_transaction:
                    self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                if self._db.in_transaction:
                    self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error) and isinstance(full := _state_error(exc, self.path), StateFullError):
                    raise full from exc
                raise

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- instances and series ------------------------------------------------------------------

    def record_instance(self, inst: ReceivedInstance) -> RecordOutcome:
        """Commit one received instance (replacing an earlier one with the same SOP Instance UID)."""
        now = self._clock()
        with self._tx() as db:
            outcome = self._record(db, inst, now)
            db.execute("UPDATE counters SET value = value + 1 WHERE name = 'instances_received'")
        return outcome

    def record_instances(
        self, instances: Sequence[ReceivedInstance], confirmed: Sequence[tuple[str, int]] = ()
    ) -> list[RecordOutcome | Exception]:
        """Commit several instances in one transaction (one WAL fsync), and confirm earlier rows.

        Each instance succeeds or fails alone (its error in its place in the result); a failed commit
        (for example StateFullError) raises for all of them.
        """
        now = self._clock()
        results: list[RecordOutcome | Exception] = []
        with self._tx() as db:
            self._confirm(db, confirmed)
            if len(instances) == 1:  # no savepoint needed: its failure is the transaction's
                results.append(self._record(db, instances[0], now))
            else:
                for inst in instances:
                    db.execute("SAVEPOINT one_instance")
                    try:
                        results.append(self._record(db, inst, now))
                    except sqlite3.Error as exc:
                        db.execute("ROLLBACK TO one_instance")
                        results.append(_state_error(exc, self.path))
                    db.execute("RELEASE one_instance")
            recorded = sum(1 for r in results if isinstance(r, RecordOutcome))
            if recorded:
                db.execute("UPDATE counters SET value = value + ? WHERE name = 'instances_received'", (recorded,))
        return results

    def _record(self, db: sqlite3.Connection, inst: ReceivedInstance, now: float) -> RecordOutcome:
        old = db.execute(
            "SELECT series_uid, sha256 FROM instances WHERE sop_instance_uid = ?", (inst.sop_instance_uid,)
        ).fetchone()
        changed = old is None or old["sha256"] != inst.sha256 or old["series_uid"] != inst.series_uid
        series = db.execute(
            "SELECT version, EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid"
            " AND j.series_version = s.version) AS has_job FROM series s WHERE series_uid = ?",
            (inst.series_uid,),
        ).fetchone()
        if series is None:
            version = 1
            db.execute(
                "INSERT INTO series (series_uid, study_uid, modality, description, calling_ae, peer_host,"
                " first_received_at, last_received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (inst.series_uid, inst.study_uid, inst.modality, inst.description, inst.calling_ae,
                 inst.peer_host, now, now),
            )
        else:
            version = series["version"]
            if changed and series["has_job"]:
                version += 1
            db.execute(
                "UPDATE series SET version = ?, awaiting_completion = 1, status = 'receiving',"
                " status_reason = NULL, last_received_at = ?, modality = ?, description = ?,"
                " calling_ae = ?, peer_host = ? WHERE series_uid = ?",
                (version, now, inst.modality, inst.description, inst.calling_ae, inst.peer_host,
                 inst.series_uid),
            )
        token = None if inst.file_durable else next(self._tokens)
        db.execute(
            "INSERT INTO instances (sop_instance_uid, series_uid, sop_class_uid, transfer_syntax_uid,"
            " instance_number, frames, path, size, sha256, received_at, series_version, unconfirmed)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (sop_instance_uid) DO UPDATE SET series_uid = excluded.series_uid,"
            " sop_class_uid = excluded.sop_class_uid, transfer_syntax_uid = excluded.transfer_syntax_uid,"
            " instance_number = excluded.instance_number, frames = excluded.frames, path = excluded.path,"
            " size = excluded.size, sha256 = excluded.sha256, received_at = excluded.received_at,"
            " times_received = times_received + 1, series_version = excluded.series_version,"
            " unconfirmed = excluded.unconfirmed",
            (inst.sop_instance_uid, inst.series_uid, inst.sop_class_uid, inst.transfer_syntax_uid,
             inst.instance_number, inst.frames, inst.path, inst.size, inst.sha256, now, version, token),
        )
        return RecordOutcome(inst.series_uid, version, now, new_instance=old is None, changed=changed,
                             sop_instance_uid=inst.sop_instance_uid, confirm_token=token)

    def unconfirmed_instances(self) -> list[UnconfirmedInstance]:
        """Rows committed before their file was known durable (after a clean stop: none)."""
        rows = self._rows(
            "SELECT sop_instance_uid, series_uid, path, size, sha256, unconfirmed AS token FROM instances"
            " WHERE unconfirmed IS NOT NULL ORDER BY received_at"
        )
        return [UnconfirmedInstance(**dict(r)) for r in rows]

    def confirm_instances(self, confirmed: Sequence[tuple[str, int]]) -> None:
        """Record that the files of these (SOP Instance UID, token) rows are durable."""
        with self._tx() as db:
            self._confirm(db, confirmed)

    @staticmethod
    def _confirm(db: sqlite3.Connection, confirmed: Sequence[tuple[str, int]]) -> None:
        # The token guards a row re-recorded since: only the write that was confirmed is.
        db.executemany("UPDATE instances SET unconfirmed = NULL WHERE sop_instance_uid = ? AND unconfirmed = ?",
                       confirmed)

    def drop_unconfirmed(self, sop_instance_uid: str, token: int) -> bool:
        """Forget an unconfirmed row whose file is not intact, as if it had never been received.

        Its series goes back to the version it had when the row alone bumped it (so no duplicate
        result is made for unchanged content), and a series left with no instance and no job goes.
        Returns False when the row is no longer that unconfirmed write.
        """
        with self._tx() as db:
            row = db.execute(
                "DELETE FROM instances WHERE sop_instance_uid = ? AND unconfirmed = ? RETURNING series_uid,"
                " series_version", (sop_instance_uid, token),
            ).fetchone()
            if row is None:
                return False
            series_uid, version = row["series_uid"], row["series_version"]
            db.execute("UPDATE counters SET value = value - 1 WHERE name = 'instances_received'")
            jobs = {r[0] for r in db.execute("SELECT series_version FROM jobs WHERE series_uid = ?", (series_uid,))}
            if not jobs and db.execute("SELECT 1 FROM instances WHERE series_uid = ?", (series_uid,)).fetchone() is None:
                db.execute("DELETE FROM series WHERE series_uid = ?", (series_uid,))
            elif version is not None and version not in jobs and version - 1 in jobs:
                others = db.execute(
                    "SELECT 1 FROM instances WHERE series_uid = ? AND series_version = ?", (series_uid, version)
                ).fetchone()
                if others is None:  # the dropped row opened this version: the previous job covers the rest
                    db.execute("UPDATE series SET version = ? WHERE series_uid = ? AND version = ?",
                               (version - 1, series_uid, version))
        return True

    def series(self, series_uid: str) -> Series | None:
        rows = self._rows(_SERIES_SELECT + " WHERE s.series_uid = ? GROUP BY s.series_uid", (series_uid,))
        return _series(rows[0]) if rows else None

    def series_awaiting_completion(self) -> list[Series]:
        """Series whose quiet period has not been concluded: their timers must be (re-)armed."""
        rows = self._rows(
            _SERIES_SELECT + " WHERE s.awaiting_completion = 1 GROUP BY s.series_uid ORDER BY s.last_received_at"
        )
        return [_series(r) for r in rows]

    def instances(self, series_uid: str, for_version: int | None = None) -> list[Instance]:
        """The instances of a series as stored now, in instance-number order.

        With ``for_version`` (a job's), rows of a later version that are still unconfirmed are left
        out: the SCP commits a row before writing its file, so such a file may be empty for a moment.
        """
        later_unconfirmed = "" if for_version is None else " AND NOT (unconfirmed IS NOT NULL AND series_version > ?)"
        rows = self._rows(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE series_uid = ?{later_unconfirmed}"
            " ORDER BY instance_number IS NULL, instance_number, sop_instance_uid",
            (series_uid,) if for_version is None else (series_uid, for_version),
        )
        return [Instance(**dict(r)) for r in rows]

    def settle_series(
        self, series_uid: str, seen_received_at: float, skip_reason: str | None, purge: bool = False
    ) -> Settlement:
        """Conclude a quiet period: queue a job for the current version (``skip_reason`` None) or skip.

        Nothing happens when an instance arrived after ``seen_received_at`` (its own timer concludes
        later). A skipped series with ``purge`` loses its instance rows in the same transaction; the
        caller deletes the returned files.
        """
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                "SELECT version, last_received_at FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
            if row is None or row["last_received_at"] != seen_received_at:
                return Settlement(applied=False)
            status = "selected" if skip_reason is None else "skipped"
            db.execute(
                "UPDATE series SET awaiting_completion = 0, status = ?, status_reason = ? WHERE series_uid = ?",
                (status, skip_reason, series_uid),
            )
            if skip_reason is not None:
                purged: tuple[tuple[str, str], ...] = ()
                if purge:
                    rows = db.execute(
                        "DELETE FROM instances WHERE series_uid = ? RETURNING sop_instance_uid, path", (series_uid,)
                    )
                    purged = tuple((r["sop_instance_uid"], r["path"]) for r in rows.fetchall())
                return Settlement(applied=True, purged=purged)
            cur = db.execute(
                "INSERT OR IGNORE INTO jobs (series_uid, series_version, state, created_at, updated_at)"
                " VALUES (?, ?, 'queued', ?, ?)",
                (series_uid, row["version"], now, now),
            )
            if cur.rowcount == 0:
                return Settlement(applied=True)  # this version already has its job
            job = _job(db.execute("SELECT * FROM jobs WHERE id = ?", (cur.lastrowid,)).fetchone())
            return Settlement(applied=True, job=job)

    def instance_path(self, sop_instance_uid: str) -> str | None:
        """The spool path the instance's row names (None: no row)."""
        rows = self._rows("SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return str(rows[0][0]) if rows else None

    def instances_received(self) -> int:
        """C-STOREs committed since the state was created (re-sends included)."""
        return int(self._rows("SELECT value FROM counters WHERE name = 'instances_received'")[0][0])

    # -- jobs ----------------------------------------------------------------------------------

    def job(self, job_id: int) -> Job | None:
        rows = self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list_jobs(self, state: JobState | None = None, limit: int = 100) -> list[Job]:
        """Newest first."""
        if state is None:
            rows = self._rows("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._rows("SELECT * FROM jobs WHERE state = ? ORDER BY id DESC LIMIT ?", (str(state), limit))
        return [_job(r) for r in rows]

    def job_counts(self) -> dict[JobState, int]:
        counts = dict.fromkeys(JobState, 0)
        for row in self._rows("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[JobState(row[0])] = int(row[1])
        return counts

    def jobs_of_series(self, series_uid: str) -> list[Job]:
        """Every job of one series, oldest (lowest version) first."""
        rows = self._rows("SELECT * FROM jobs WHERE series_uid = ? ORDER BY series_version, id", (series_uid,))
        return [_job(r) for r in rows]

    def claim_next_job(self) -> Job | None:
        """Atomically move the oldest queued job to running and return it (None: queue empty)."""
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, updated_at = ?,"
                " error = NULL WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1)"
                " RETURNING *",
                (now, now),
            ).fetchone()
        return _job(row) if row else None

    def mark_job_exporting(self, job_id: int, result_path: str, targets: Sequence[str]) -> Job:
        """Record a running job's result file and create one pending delivery per target."""
        now = self._clock()
        with self._tx() as db:
            self._require(db, job_id, JobState.RUNNING)
            db.execute(
                "UPDATE jobs SET state = 'exporting', result_path = ?, updated_at = ? WHERE id = ?",
                (result_path, now, job_id),
            )
            db.executemany(
                "INSERT OR IGNORE INTO deliveries (job_id, target, state, next_attempt_at) VALUES (?, ?, 'pending', ?)",
                [(job_id, t, now) for t in targets],
            )
            self._settle_job(db, job_id, now)
        return self._job_or_fail(job_id)

    def fail_job(self, job_id: int, error: str) -> Job:
        """Record why a job failed; the queue moves on."""
        now = self._clock()
        with self._tx() as db:
            self._require(db, job_id, JobState.QUEUED, JobState.RUNNING, JobState.EXPORTING)
            db.execute(
                "UPDATE jobs SET state = 'failed', error = ?, finished_at = ?, updated_at = ? WHERE id = ?",
                (error, now, now, job_id),
            )
        return self._job_or_fail(job_id)

    def retry_job(self, job_id: int) -> Job:
        """Re-deliver a failed job's result, or re-run it when it never produced one."""
        now = self._clock()
        with self._tx() as db:
            row = self._require(db, job_id, JobState.FAILED)
            if row["result_path"] is not None:
                db.execute(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, last_error = NULL"
                    " WHERE job_id = ? AND state = 'failed'",
                    (now, job_id),
                )
                db.execute(
                    "UPDATE jobs SET state = 'exporting', error = NULL, finished_at = NULL, updated_at = ?"
                    " WHERE id = ?",
                    (now, job_id),
                )
                self._settle_job(db, job_id, now)
            else:
                db.execute(
                    "UPDATE jobs SET state = 'queued', attempts = 0, error = NULL, started_at = NULL,"
                    " finished_at = NULL, updated_at = ? WHERE id = ?",
                    (now, job_id),
                )
        return self._job_or_fail(job_id)

    def recover(self, max_job_attempts: int = 3) -> Recovery:
        """Start-up: re-queue jobs a crash interrupted (failing those interrupted too often)."""
        now = self._clock()
        with self._tx() as db:
            running = db.execute("SELECT id, attempts FROM jobs WHERE state = 'running'").fetchall()
            requeued = [r["id"] for r in running if r["attempts"] < max_job_attempts]
            failed = [r["id"] for r in running if r["attempts"] >= max_job_attempts]
            db.executemany("UPDATE jobs SET state = 'queued', updated_at = ? WHERE id = ?", [(now, i) for i in requeued])
            db.executemany(
                "UPDATE jobs SET state = 'failed', finished_at = ?, updated_at = ?,"
                f" error = 'interrupted {max_job_attempts} times while running' WHERE id = ?",
                [(now, now, i) for i in failed],
            )
            exporting = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE state = 'exporting' ORDER BY id")]
        return Recovery(tuple(requeued), tuple(failed), tuple(exporting), tuple(self.series_awaiting_completion()))

    # -- deliveries ----------------------------------------------------------------------------

    def deliveries(self, job_id: int) -> list[Delivery]:
        rows = self._rows("SELECT * FROM deliveries WHERE job_id = ? ORDER BY target", (job_id,))
        return [_delivery(r) for r in rows]

    def delivery_counts(self) -> dict[DeliveryState, int]:
        counts = dict.fromkeys(DeliveryState, 0)
        for row in self._rows("SELECT state, COUNT(*) FROM deliveries GROUP BY state"):
            counts[DeliveryState(row[0])] = int(row[1])
        return counts

    def due_deliveries(self, now: float | None = None) -> list[Delivery]:
        """Pending deliveries whose next attempt is due, oldest first."""
        at = self._clock() if now is None else now
        rows = self._rows(
            "SELECT d.* FROM deliveries d JOIN jobs j ON j.id = d.job_id WHERE d.state = 'pending'"
            " AND j.state = 'exporting' AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at, d.job_id",
            (at,),
        )
        return [_delivery(r) for r in rows]

    def next_delivery_at(self) -> float | None:
        """When the earliest pending delivery is due (None: nothing pending)."""
        rows = self._rows(
            "SELECT MIN(d.next_attempt_at) FROM deliveries d JOIN jobs j ON j.id = d.job_id"
            " WHERE d.state = 'pending' AND j.state = 'exporting'"
        )
        return rows[0][0]

    def delivery_succeeded(self, job_id: int, target: str) -> Job:
        """The target confirmed the result; the job is done once every target has."""
        now = self._clock()
        with self._tx() as db:
            self._update_delivery(
                db, job_id, target,
                "state = 'delivered', attempts = attempts + 1, delivered_at = ?, next_attempt_at = NULL", (now,),
            )
            self._settle_job(db, job_id, now)
        return self._job_or_fail(job_id)

    def delivery_failed(self, job_id: int, target: str, error: str, retry_at: float | None) -> Job:
        """One attempt failed: try again at ``retry_at``, or give up on this target when it is None."""
        now = self._clock()
        with self._tx() as db:
            if retry_at is None:
                sets, params = "state = 'failed', next_attempt_at = NULL", ()
            else:
                sets, params = "next_attempt_at = ?", (retry_at,)
            self._update_delivery(db, job_id, target, f"{sets}, attempts = attempts + 1, last_error = ?", (*params, error))
            self._settle_job(db, job_id, now)
        return self._job_or_fail(job_id)

    # -- helpers -------------------------------------------------------------------------------

    def _require(self, db: sqlite3.Connection, job_id: int, *allowed: JobState) -> sqlite3.Row:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise StateError(f"job {job_id} does not exist")
        if row["state"] not in allowed:
            wanted = " or ".join(allowed)
            raise StateError(f"job {job_id} is {row['state']}, expected {wanted}")
        return row

    def _update_delivery(
        self, db: sqlite3.Connection, job_id: int, target: str, sets: str, params: tuple[object, ...]
    ) -> None:
        cur = db.execute(
            f"UPDATE deliveries SET {sets} WHERE job_id = ? AND target = ? AND state = 'pending'",
            (*params, job_id, target),
        )
        if cur.rowcount != 1:
            raise StateError(f"job {job_id} has no pending delivery to {target!r}")

    @staticmethod
    def _settle_job(db: sqlite3.Connection, job_id: int, now: float) -> None:
        """An exporting job with no pending delivery is done, or failed if any delivery failed."""
        rows = db.execute("SELECT target, state, last_error FROM deliveries WHERE job_id = ?", (job_id,)).fetchall()
        if any(r["state"] == "pending" for r in rows):
            return
        failures = [f"{r['target']}: {r['last_error']}" for r in rows if r["state"] == "failed"]
        db.execute(
            "UPDATE jobs SET state = ?, error = ?, finished_at = ?, updated_at = ? WHERE id = ? AND state = 'exporting'",
            ("failed" if failures else "done", "delivery failed: " + "; ".join(failures) if failures else None,
             now, now, job_id),
        )

    def _job_or_fail(self, job_id: int) -> Job:
        job = self.job(job_id)
        if job is None:
            raise StateError(f"job {job_id} does not exist")
        return job


def _state_error(exc: sqlite3.Error, path: Path) -> Exception:
    """A full disk as StateFullError (the SCP answers out of resources); other errors unchanged."""
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return StateFullError(f"state database {path} is full: {exc}")
    return exc


def _series(row: sqlite3.Row) -> Series:
    values = dict(row)
    values["awaiting_completion"] = bool(values["awaiting_completion"])
    return Series(**values)


def _job(row: sqlite3.Row) -> Job:
    values = dict(row)
    values["state"] = JobState(values["state"])
    return Job(**values)


def _delivery(row: sqlite3.Row) -> Delivery:
    values = dict(row)
    values["state"] = DeliveryState(values["state"])
    return Delivery(**values)
