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
- **job** ``queued`` → ``running`` → ``exporting`` → ``done`` | ``failed``; with ``qa.on_fail = "hold"``
  a result whose QA failed goes ``running`` → ``held`` (stored, deliveries not due) until an operator's
  retry releases it to ``exporting``. A job's results are its SEG first, then its SR (and the
  optional probability SEG); a delivery sends them all.
- **delivery** (job × target) ``pending`` → ``delivered`` | ``failed``; a job is ``done`` when every
  delivery is delivered and ``failed`` when one has failed for good.
"""

from __future__ import annotations

from ian_node.storage.job_queries import JobQueries
from ian_node.storage.records import Recovery
from ian_node.storage.series_queries import SeriesQueries


class State(SeriesQueries, JobQueries):
    """The node's state: every query of both halves on one connection."""

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

