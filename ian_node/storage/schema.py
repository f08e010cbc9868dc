"""The state's SQLite schema, its migrations, and the connection every query goes through.

WAL mode with ``synchronous=FULL``: a committed transaction is on disk when the call returns.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from ian_node.storage.records import StateError, StateFullError

SCHEMA_VERSION = 5

SCHEMA = """
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
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'exporting', 'held', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result_path TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL,
    crop_request TEXT,
    crop TEXT,
    outcome TEXT CHECK (outcome IN ('segmented', 'no_region', 'segmented_no_region')),
    flag TEXT,
    voxels TEXT,
    timings TEXT,
    qa TEXT,
    results TEXT,
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
CREATE TABLE pull_sources (
    series_uid TEXT NOT NULL REFERENCES series (series_uid),
    series_version INTEGER NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (series_uid, series_version)
);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters VALUES ('instances_received', 0);
"""

#: Schema upgrades: the script that takes a database from version N - 1 to N.
MIGRATIONS = {
    # The series version an instance row was recorded into, and the token of a row whose file was
    # not yet known durable when it was committed.
    2: """
ALTER TABLE instances ADD COLUMN series_version INTEGER;
ALTER TABLE instances ADD COLUMN unconfirmed INTEGER;
CREATE INDEX instances_unconfirmed ON instances (unconfirmed) WHERE unconfirmed IS NOT NULL;
""",
    # Issue 14, each job's crop: the crop requested (JSON: mode, boxes, and whether POST /jobs or the
    # config asked), the crop used (JSON: per side mode, box_mm, confidence), the outcome (segmented,
    # or no mandible region found: not segmented, or segmented anyway), the flag an operator must
    # read (the localiser's problem), and per-side voxel counts and stage timings (JSON).
    3: """
ALTER TABLE jobs ADD COLUMN crop_request TEXT;
ALTER TABLE jobs ADD COLUMN crop TEXT;
ALTER TABLE jobs ADD COLUMN outcome TEXT CHECK (outcome IN ('segmented', 'no_region', 'segmented_no_region'));
ALTER TABLE jobs ADD COLUMN flag TEXT;
ALTER TABLE jobs ADD COLUMN voxels TEXT;
ALTER TABLE jobs ADD COLUMN timings TEXT;
""",
    # Issue 18: per-side QA (JSON list of `ian_node.segment.qa.SideQA.as_json`), every result file of a
    # job (JSON list of spool paths: the SEG first, then the SR and the probability SEG), and the
    # state 'held' (a result a QA FAIL keeps from delivery until an operator releases it). SQLite
    # cannot change a CHECK constraint in place, so the jobs table is rebuilt (its 12-step procedure,
    # with foreign keys off: `Database` turns them on after migrating).
    4: """
CREATE TABLE jobs_v4 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL REFERENCES series (series_uid),
    series_version INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'exporting', 'held', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result_path TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL,
    crop_request TEXT,
    crop TEXT,
    outcome TEXT CHECK (outcome IN ('segmented', 'no_region', 'segmented_no_region')),
    flag TEXT,
    voxels TEXT,
    timings TEXT,
    qa TEXT,
    results TEXT,
    UNIQUE (series_uid, series_version)
);
INSERT INTO jobs_v4 (id, series_uid, series_version, state, attempts, error, result_path, created_at, started_at,
                     finished_at, updated_at, crop_request, crop, outcome, flag, voxels, timings, results)
    SELECT id, series_uid, series_version, state, attempts, error, result_path, created_at, started_at,
           finished_at, updated_at, crop_request, crop, outcome, flag, voxels, timings,
           CASE WHEN result_path IS NULL THEN NULL ELSE json_array(result_path) END FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_v4 RENAME TO jobs;
CREATE INDEX jobs_by_state ON jobs (state, id);
""",
    # Issue 18, routing: the export target a series version was pulled through (POST /jobs), so that
    # its result goes back there. A table rather than a column: a version is pulled, not a series.
    5: """
CREATE TABLE IF NOT EXISTS pull_sources (
    series_uid TEXT NOT NULL REFERENCES series (series_uid),
    series_version INTEGER NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (series_uid, series_version)
);
""",
}

INSTANCE_COLUMNS = (
    "sop_instance_uid, series_uid, sop_class_uid, transfer_syntax_uid, instance_number, frames, path, size,"
    " sha256, received_at, times_received"
)


SERIES_SELECT = """
SELECT s.*, COUNT(i.sop_instance_uid) AS instance_count, COALESCE(SUM(i.frames), 0) AS slice_count,
    COALESCE(SUM(i.series_version = s.version), 0) AS version_instance_count
FROM series s LEFT JOIN instances i ON i.series_uid = s.series_uid
"""

class Database:
    """One SQLite connection shared by all threads behind a lock (SQLite serialises writers anyway).

    Opening it creates the schema or migrates an older one; the queries live in subclasses.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._clock = clock
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            self._db.executescript(f"BEGIN IMMEDIATE; {SCHEMA}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        elif not 1 <= version <= SCHEMA_VERSION:
            raise StateError(f"{path}: schema version {version}, this node reads {SCHEMA_VERSION}")
        else:
            # foreign keys stay off while migrating: a table rebuild drops the table others reference
            # (rows keep their ids), and the pragma cannot change inside a transaction
            for target in range(version + 1, SCHEMA_VERSION + 1):
                self._db.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[target]} PRAGMA user_version = {target}; COMMIT;")
        self._db.execute("PRAGMA foreign_keys=ON")
        # Tokens of unconfirmed rows: unique across restarts of this process, never 0.
        self._tokens = itertools.count(time.time_ns())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
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
                if isinstance(exc, sqlite3.Error) and isinstance(full := state_error(exc, self.path), StateFullError):
                    raise full from exc
                raise

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()


def state_error(exc: sqlite3.Error, path: Path) -> Exception:
    """A full disk as StateFullError (the SCP answers out of resources); other errors unchanged."""
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return StateFullError(f"state database {path} is full: {exc}")
    return exc

