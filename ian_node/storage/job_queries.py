"""Job and delivery queries: the job queue's transitions and each result's deliveries to its targets."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from ian_node.storage.records import (
    Delivery,
    DeliveryState,
    Job,
    JobOutcome,
    JobState,
    StateError,
    delivery_from_row,
    job_from_row,
)
from ian_node.storage.schema import Database


class JobQueries(Database):
    """The job and delivery half of :class:`~ian_node.storage.state.State`."""


    def job(self, job_id: int) -> Job | None:
        rows = self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return job_from_row(rows[0]) if rows else None

    def list_jobs(self, state: JobState | None = None, limit: int = 100) -> list[Job]:
        """Newest first."""
        if state is None:
            rows = self._rows("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._rows("SELECT * FROM jobs WHERE state = ? ORDER BY id DESC LIMIT ?", (str(state), limit))
        return [job_from_row(r) for r in rows]

    def job_counts(self) -> dict[JobState, int]:
        counts = dict.fromkeys(JobState, 0)
        for row in self._rows("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[JobState(row[0])] = int(row[1])
        return counts

    def jobs_of_series(self, series_uid: str) -> list[Job]:
        """Every job of one series, oldest (lowest version) first."""
        rows = self._rows("SELECT * FROM jobs WHERE series_uid = ? ORDER BY series_version, id", (series_uid,))
        return [job_from_row(r) for r in rows]

    def outcome_counts(self) -> dict[JobOutcome, int]:
        """Jobs by what their segmentation came to (jobs without an outcome are not counted)."""
        counts = dict.fromkeys(JobOutcome, 0)
        for row in self._rows("SELECT outcome, COUNT(*) FROM jobs WHERE outcome IS NOT NULL GROUP BY outcome"):
            counts[JobOutcome(row[0])] = int(row[1])
        return counts

    def qa_counts(self) -> dict[tuple[str, str], int]:
        """Sides judged, by (side, verdict), over every job that recorded QA (the metrics' gauge)."""
        rows = self._rows(
            "SELECT json_extract(q.value, '$.side'), json_extract(q.value, '$.verdict'), COUNT(*)"
            " FROM jobs, json_each(jobs.qa) AS q WHERE jobs.qa IS NOT NULL GROUP BY 1, 2"
        )
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}

    def claim_next_job(self) -> Job | None:
        """Atomically move the oldest queued job to running and return it (None: queue empty).

        What a previous run recorded (crop used, outcome, flag, counts, QA) is cleared; the job's own crop
        request stays.
        """
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, updated_at = ?,"
                " error = NULL, crop = NULL, outcome = NULL, flag = NULL, voxels = NULL, timings = NULL, qa = NULL"
                " WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1)"
                " RETURNING *",
                (now, now),
            ).fetchone()
        return job_from_row(row) if row else None

    def record_segmentation(
        self, job_id: int, *, crop_request: Mapping[str, Any], crop: Mapping[str, Any] | None,
        outcome: JobOutcome, flag: str | None = None, voxels: Mapping[str, int] | None = None,
        timings: Mapping[str, float] | None = None, qa: Sequence[Mapping[str, Any]] | None = None,
    ) -> Job:
        """Record a running job's crop (requested and used), outcome, flag and per-side QA, before it
        exports or fails."""
        now = self._clock()

        def text(value: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> str | None:
            return None if value is None else json.dumps(value, sort_keys=True)

        with self._tx() as db:
            self._require(db, job_id, JobState.RUNNING)
            db.execute(
                "UPDATE jobs SET crop_request = ?, crop = ?, outcome = ?, flag = ?, voxels = ?, timings = ?,"
                " qa = ?, updated_at = ? WHERE id = ?",
                (text(crop_request), text(crop), str(outcome), flag, text(voxels), text(timings),
                 None if qa is None else text(list(qa)), now, job_id),
            )
        return self._job_or_fail(job_id)

    def mark_job_exporting(self, job_id: int, result_paths: str | Sequence[str], targets: Sequence[str],
                           hold: bool = False) -> Job:
        """Record a running job's result files and create one pending delivery per target.

        ``result_paths``: the SEG first (also the job's ``result_path``), then any other result of the
        job (the SR, the probability SEG); each delivery sends them all. With ``hold`` the job is
        ``held``: its deliveries wait until an operator releases it (:meth:`retry_job`).
        """
        paths = [result_paths] if isinstance(result_paths, str) else list(result_paths)
        if not paths:
            raise ValueError(f"job {job_id}: a result needs at least one file")
        now = self._clock()
        with self._tx() as db:
            self._require(db, job_id, JobState.RUNNING)
            db.execute(
                "UPDATE jobs SET state = ?, result_path = ?, results = ?, updated_at = ? WHERE id = ?",
                (str(JobState.HELD if hold else JobState.EXPORTING), paths[0], json.dumps(paths), now, job_id),
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

    def retry_job(self, job_id: int, crop_request: Mapping[str, Any] | None = None) -> Job:
        """Re-deliver a failed job's result, re-run it when it never produced one, or release a held one
        (its result goes out as if it had never been held).

        ``crop_request`` (a re-run only) replaces the job's crop, e.g. a box after "no mandible region found".
        """
        now = self._clock()
        with self._tx() as db:
            row = self._require(db, job_id, JobState.FAILED, JobState.HELD)
            if crop_request is not None:
                if row["result_path"] is not None:
                    raise StateError(f"job {job_id} has a result, which a retry re-delivers: a new crop needs a "
                                     "new segmentation (a new version of the series)")
                db.execute("UPDATE jobs SET crop_request = ? WHERE id = ?",
                           (json.dumps(crop_request, sort_keys=True), job_id))
            if row["result_path"] is not None:
                db.execute(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, last_error = NULL"
                    " WHERE job_id = ? AND state != 'delivered'",
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

    # -- deliveries ----------------------------------------------------------------------------

    def deliveries(self, job_id: int) -> list[Delivery]:
        rows = self._rows("SELECT * FROM deliveries WHERE job_id = ? ORDER BY target", (job_id,))
        return [delivery_from_row(r) for r in rows]

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
        return [delivery_from_row(r) for r in rows]

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

