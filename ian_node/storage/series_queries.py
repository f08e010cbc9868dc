"""Instance and series queries: recording C-STOREs, confirming files, and settling quiet periods."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from ian_node.storage.records import (
    Instance,
    ReceivedInstance,
    RecordOutcome,
    Series,
    SeriesState,
    Settlement,
    UnconfirmedInstance,
    job_from_row,
    series_from_row,
)
from ian_node.storage.schema import INSTANCE_COLUMNS, SERIES_SELECT, Database, state_error


class SeriesQueries(Database):
    """The instance and series half of :class:`~ian_node.storage.state.State`."""


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
                        results.append(state_error(exc, self.path))
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
        if inst.pulled_from is not None:
            db.execute("INSERT OR REPLACE INTO pull_sources (series_uid, series_version, target) VALUES (?, ?, ?)",
                       (inst.series_uid, version, inst.pulled_from))
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
                db.execute("DELETE FROM pull_sources WHERE series_uid = ?", (series_uid,))
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
        rows = self._rows(SERIES_SELECT + " WHERE s.series_uid = ? GROUP BY s.series_uid", (series_uid,))
        return series_from_row(rows[0]) if rows else None

    def list_series(self, status: SeriesState | None = None, limit: int = 100) -> list[Series]:
        """The most recently received series, optionally only those with ``status`` (e.g. skipped)."""
        where, params = ("WHERE s.status = ? ", (str(status), limit)) if status is not None else ("", (limit,))
        rows = self._rows(
            SERIES_SELECT + where + "GROUP BY s.series_uid ORDER BY s.last_received_at DESC LIMIT ?", params
        )
        return [series_from_row(r) for r in rows]

    def series_awaiting_completion(self) -> list[Series]:
        """Series whose quiet period has not been concluded: their timers must be (re-)armed."""
        rows = self._rows(
            SERIES_SELECT + " WHERE s.awaiting_completion = 1 GROUP BY s.series_uid ORDER BY s.last_received_at"
        )
        return [series_from_row(r) for r in rows]

    def instances(self, series_uid: str, for_version: int | None = None) -> list[Instance]:
        """The instances of a series as stored now, in instance-number order.

        With ``for_version`` (a job's), rows of a later version that are still unconfirmed are left
        out: the SCP commits a row before writing its file, so such a file may be empty for a moment.
        """
        later_unconfirmed = "" if for_version is None else " AND NOT (unconfirmed IS NOT NULL AND series_version > ?)"
        rows = self._rows(
            f"SELECT {INSTANCE_COLUMNS} FROM instances WHERE series_uid = ?{later_unconfirmed}"
            " ORDER BY instance_number IS NULL, instance_number, sop_instance_uid",
            (series_uid,) if for_version is None else (series_uid, for_version),
        )
        return [Instance(**dict(r)) for r in rows]

    def settle_series(
        self, series_uid: str, seen_received_at: float, skip_reason: str | None, purge: bool = False,
        crop_request: Mapping[str, Any] | None = None,
    ) -> Settlement:
        """Conclude a quiet period: queue a job for the current version (``skip_reason`` None) or skip.

        Nothing happens when an instance arrived after ``seen_received_at`` (its own timer concludes
        later). A skipped series with ``purge`` loses its instance rows in the same transaction; the
        caller deletes the returned files. ``crop_request`` (from ``POST /jobs``) is stored with
        a new job, so the worker never sees the job without it.
        """
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                "SELECT version, last_received_at FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
            if row is None or row["last_received_at"] != seen_received_at:
                return Settlement(applied=False)
            status = SeriesState.SELECTED if skip_reason is None else SeriesState.SKIPPED
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
                return Settlement(applied=True, purged=purged, skip_reason=skip_reason)
            cur = db.execute(
                "INSERT OR IGNORE INTO jobs (series_uid, series_version, state, created_at, updated_at, crop_request)"
                " VALUES (?, ?, 'queued', ?, ?, ?)",
                (series_uid, row["version"], now, now,
                 None if crop_request is None else json.dumps(crop_request, sort_keys=True)),
            )
            if cur.rowcount == 0:
                return Settlement(applied=True)  # this version already has its job
            job = job_from_row(db.execute("SELECT * FROM jobs WHERE id = ?", (cur.lastrowid,)).fetchone())
            return Settlement(applied=True, job=job)

    def pull_source(self, series_uid: str, version: int) -> str | None:
        """The export target this series version was pulled from (None: received by C-STORE)."""
        rows = self._rows("SELECT target FROM pull_sources WHERE series_uid = ? AND series_version = ?",
                          (series_uid, version))
        return str(rows[0][0]) if rows else None

    def instance_path(self, sop_instance_uid: str) -> str | None:
        """The spool path the instance's row names (None: no row)."""
        rows = self._rows("SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return str(rows[0][0]) if rows else None

    def instances_received(self) -> int:
        """C-STOREs committed since the state was created (re-sends included)."""
        return int(self._rows("SELECT value FROM counters WHERE name = 'instances_received'")[0][0])

