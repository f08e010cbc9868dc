"""The delivery loop: a result goes out to every target with retries, and counts only when confirmed.

The :class:`Exporter` stores a job's result in the spool, creates one delivery per target in the
state, and a background thread works through the due deliveries: a confirmed delivery is recorded as
delivered; a failed one is retried with exponential backoff (``export.backoff_s`` doubling up to
``export.max_backoff_s``) until ``export.max_attempts``, after which it is failed, visible in the
state, and can be retried (:meth:`State.retry_job`). The targets: :mod:`ian_node.export.targets`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from io import BytesIO

from pydicom import Dataset, dcmwrite

from ian_node.config import ExportConfig
from ian_node.export.targets import DeliveryError, ExportTarget, Origin
from ian_node.polling import PollingThread
from ian_node.storage.records import Delivery, Job
from ian_node.storage.spool import Spool
from ian_node.storage.state import State

logger = logging.getLogger(__name__)

#: Longest idle wait between looks at the state: an operator's `ian-node jobs retry` changes the
#: SQLite state from another process, and the running node must act on it within seconds.
POLL_S = 2.0


class Exporter:
    """Delivers results: ``submit`` from the worker, a background thread for attempts and retries."""

    def __init__(
        self,
        state: State,
        spool: Spool,
        targets: Mapping[str, ExportTarget],
        policy: ExportConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = state
        self._spool = spool
        self._targets = dict(targets)
        self._policy = policy
        self._clock = clock
        self._loop = PollingThread("ian-node-exporter", self._pass, error_wait_s=POLL_S)

    def submit(self, job_id: int, result: Dataset) -> Job:
        """Store a running job's result durably and queue one delivery per target."""
        buffer = BytesIO()
        dcmwrite(buffer, result, enforce_file_format=True)
        relpath = self._spool.write_result(job_id, buffer.getvalue())
        job = self._state.mark_job_exporting(job_id, relpath, list(self._targets))
        logger.info("job %d: result %s stored, %d deliveries queued", job_id, result.SOPInstanceUID, len(self._targets))
        self.wake()
        return job

    def wake(self) -> None:
        """Look for due deliveries now (after a submit or an operator's retry)."""
        self._loop.wake()

    def deliver_due(self) -> int:
        """Attempt every delivery that is due now; returns how many were attempted."""
        due = self._state.due_deliveries(self._clock())
        for delivery in due:
            self._attempt(delivery)
        return len(due)

    def _attempt(self, delivery: Delivery) -> None:
        job_id, name = delivery.job_id, delivery.target
        job = self._state.job(job_id)
        series = self._state.series(job.series_uid) if job else None
        target = self._targets.get(name)
        if job is None or job.result_path is None or series is None:
            self._state.delivery_failed(job_id, name, "the job or its result is missing", retry_at=None)
            return
        if target is None:
            self._state.delivery_failed(job_id, name, f"target {name!r} is no longer configured", retry_at=None)
            logger.error("job %d: target %r is no longer configured", job_id, name)
            return
        try:
            target.send(self._spool.path(job.result_path), Origin(series.calling_ae, series.peer_host))
        except Exception as exc:  # any failure of a target is a failed attempt, never a dead thread
            attempts = delivery.attempts + 1
            error = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
            retry_at = None if attempts >= self._policy.max_attempts else self._clock() + self._policy.backoff(attempts)
            self._state.delivery_failed(job_id, name, error, retry_at)
            if retry_at is None:
                logger.error("job %d: delivery to %s failed for good after %d attempts: %s", job_id, name, attempts, error)
            else:
                logger.warning("job %d: delivery to %s failed (attempt %d), retry in %.1f s: %s",
                               job_id, name, attempts, retry_at - self._clock(), error)
            return
        job = self._state.delivery_succeeded(job_id, name)
        logger.info("job %d: delivered to %s%s", job_id, name, " (job done)" if job.state == "done" else "")

    def start(self) -> None:
        """Deliver in a background thread until :meth:`stop`."""
        self._loop.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._loop.stop(timeout)

    def _pass(self) -> float:
        """Deliver what is due; return how long to wait before the next look."""
        self.deliver_due()
        due = self._state.next_delivery_at()
        return POLL_S if due is None else min(max(due - self._clock(), 0.0), POLL_S)
