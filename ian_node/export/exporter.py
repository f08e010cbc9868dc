"""The delivery loop: a result goes out to its targets with retries, and counts only when confirmed.

The :class:`Exporter` stores a job's result in the spool, creates one delivery per target that its
series is routed to (:mod:`ian_node.export.routing`: every target, unless a target's match rules
say otherwise), and a background thread works through the due deliveries:

- a confirmed delivery is recorded as delivered;
- a refusal (:class:`~ian_node.export.targets.DeliveryRefused`: the destination answered "no", e.g.
  C-STORE 0xC000 or HTTP 400) fails the delivery at once with the peer's reason;
- any other failure is retried after a capped, jittered backoff (:func:`jittered_backoff`) until
  ``export.max_attempts``, after which the delivery is failed.

A failed delivery is visible in the state (``last_error``, and the job's error) and is sent again by
:meth:`State.retry_job` (``ian-node jobs retry``, ``POST /jobs/{id}/retry``). The targets:
:mod:`ian_node.export.targets`.

While a destination is down the thread only sleeps: it wakes when the earliest delivery is due, on
a submit or an operator's retry, and otherwise every :data:`POLL_S` seconds for one SQLite query (an
operator's retry may come from another process).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from io import BytesIO

from pydicom import Dataset, dcmwrite

from ian_node.config import ExportConfig
from ian_node.export.routing import Route, routed_targets, routes_for
from ian_node.export.targets import DeliveryError, DeliveryRefused, ExportTarget, Origin
from ian_node.polling import PollingThread
from ian_node.storage.records import Delivery, Job
from ian_node.storage.spool import Spool
from ian_node.storage.state import State

logger = logging.getLogger(__name__)

#: Longest idle wait between looks at the state: an operator's `ian-node jobs retry` changes the
#: SQLite state from another process, and the running node must act on it within seconds.
POLL_S = 2.0


def jittered_backoff(policy: ExportConfig, attempts: int, draw: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: "equal jitter" on ``policy.backoff``.

    With ``b = policy.backoff(attempts)`` (``backoff_s`` doubling, capped at ``max_backoff_s``), the wait
    is uniform in ``[b / 2, b]``: never above the cap, never below half of ``b`` (so at least
    ``backoff_s / 2``: a dead destination is never hammered), and drawn per attempt, so that deliveries
    that failed together (a destination went down) do not all retry at the same moment.
    ``draw`` returns a number in ``[0, 1)``; tests pass their own.
    """
    base = policy.backoff(attempts)
    return base / 2 + min(max(draw(), 0.0), 1.0) * base / 2


class Exporter:
    """Delivers results: ``submit`` from the worker, a background thread for attempts and retries."""

    def __init__(
        self,
        state: State,
        spool: Spool,
        targets: Mapping[str, ExportTarget],
        policy: ExportConfig,
        clock: Callable[[], float] = time.time,
        draw: Callable[[], float] = random.random,
        routes: Mapping[str, Route] | None = None,
    ) -> None:
        """``clock`` (epoch seconds, as the state stores them) and ``draw`` (the backoff's jitter,
        in [0, 1)) are the exporter's only sources of time and chance, for tests to replace.
        ``routes``: each target's match rules (unset: those of ``policy.targets``)."""
        self._state = state
        self._spool = spool
        self._targets = dict(targets)
        self._policy = policy
        self._routes = dict(routes_for(policy.targets) if routes is None else routes)
        self._clock = clock
        self._draw = draw
        self._loop = PollingThread("ian-node-exporter", self._pass, error_wait_s=POLL_S)

    def submit(self, job_id: int, results: Dataset | Sequence[Dataset], hold: bool = False) -> Job:
        """Store a running job's results durably and queue one delivery per target it is routed to.

        ``results``: the SEG first, then the job's other results (the SR, a probability SEG); each
        delivery sends them all, and is confirmed only when every one is. Every file is durable before
        the deliveries exist, so a crash in between re-runs the job (same UIDs), never loses a result.
        ``hold``: the job is held (a QA FAIL) until an operator releases it (`State.retry_job`).
        """
        datasets = [results] if isinstance(results, Dataset) else list(results)
        relpaths = []
        for part, dataset in enumerate(datasets):
            buffer = BytesIO()
            dcmwrite(buffer, dataset, enforce_file_format=True)
            relpaths.append(self._spool.write_result(job_id, buffer.getvalue(), part))
        names = self.targets_for(job_id)
        job = self._state.mark_job_exporting(job_id, relpaths, names, hold=hold)
        logger.info("job %d: result %s stored (%d files), %d deliveries queued%s", job_id, datasets[0].SOPInstanceUID,
                    len(relpaths), len(names), " and held (QA FAIL)" if hold else
                    "" if names or not self._targets else " (no target's rules match its series: job done)")
        self.wake()
        return job

    def targets_for(self, job_id: int) -> list[str]:
        """The names of the targets a job's result goes to (its series' route)."""
        job = self._state.job(job_id)
        series = self._state.series(job.series_uid) if job is not None else None
        if job is None or series is None:
            return list(self._targets)  # the attempt fails each delivery with the reason
        pulled_from = self._state.pull_source(job.series_uid, job.series_version)
        return routed_targets(self._targets, self._routes, series, pulled_from)

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
            for relpath in job.result_paths:  # the SEG first: a target that refuses it gets nothing else
                target.send(self._spool.path(relpath), Origin(series.calling_ae))
        except Exception as exc:  # any failure of a target is a failed attempt, never a dead thread
            self._failed(delivery, exc)
            return
        job = self._state.delivery_succeeded(job_id, name)
        logger.info("job %d: delivered to %s%s", job_id, name, " (job done)" if job.state == "done" else "")

    def _failed(self, delivery: Delivery, exc: Exception) -> None:
        """Record a failed attempt: a refusal ends the delivery now, anything else waits its backoff."""
        job_id, name = delivery.job_id, delivery.target
        attempts = delivery.attempts + 1
        error = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, DeliveryRefused):
            self._state.delivery_failed(job_id, name, error, retry_at=None)
            logger.error("job %d: delivery to %s refused (attempt %d), not retried: %s", job_id, name, attempts, error)
            return
        if attempts >= self._policy.max_attempts:
            self._state.delivery_failed(job_id, name, error, retry_at=None)
            logger.error("job %d: delivery to %s failed for good after %d attempts: %s", job_id, name, attempts, error)
            return
        wait = jittered_backoff(self._policy, attempts, self._draw)
        self._state.delivery_failed(job_id, name, error, retry_at=self._clock() + wait)
        logger.warning("job %d: delivery to %s failed (attempt %d), retry in %.1f s: %s",
                       job_id, name, attempts, wait, error)

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
