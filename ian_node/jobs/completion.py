"""Series completion: a quiet-period timer per series, then the selection rules.

DICOM has no "end of series" message, so a series counts as complete once no instance of it has
arrived for ``series.quiet_period_s``. Each stored instance restarts its series' timer. When a timer
fires, the selection rules decide: a selected series becomes a job for its current version (one job
per version, enforced by the state); a series that is not selected is recorded as skipped with the
reason, and its files are kept or purged according to ``series.retention``.

The timers live in an apscheduler ``BackgroundScheduler``; the state keeps what they need
(``awaiting_completion`` and the last arrival time), so :meth:`SeriesTracker.start` re-arms them
after a restart. A timer that fires while instances are still arriving re-arms at the new deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from pydicom import Dataset, dcmread

from ian_node.config import SeriesConfig
from ian_node.segment.volume import MalformedDatasetError, SeriesError, SeriesGeometryError, check_geometry
from ian_node.storage.records import Job, RecordOutcome, Series, Settlement
from ian_node.storage.spool import Spool
from ian_node.storage.state import State

logger = logging.getLogger(__name__)


def settle(state: State, spool: Spool, rules: SeriesConfig, series: Series,
           on_job: Callable[[Job], None] | None = None, crop_request: Mapping[str, Any] | None = None) -> Settlement:
    """Conclude a complete series: select it and queue its job, or skip it (purging per retention).

    The one settlement for the quiet-period timer and the pull. It does nothing when an instance
    arrived after ``series`` was read (that instance's own quiet period decides). ``crop_request``:
    a pull's own crop, stored with the job it creates.
    """
    reason = skip_reason(series, rules)
    if reason is None:
        headers = _headers(state, spool, series)
        reason = None if headers is None else volume_skip_reason(headers, rules)
    purge = reason is not None and rules.retention == "purge"
    settled = state.settle_series(series.series_uid, series.last_received_at, reason, purge=purge,
                                  crop_request=crop_request)
    if not settled.applied:
        return settled
    if reason is not None:
        logger.info("series %s not selected: %s", series.series_uid, reason)
        if purge:
            removed = spool.remove_purged(settled.purged, state.instance_path)
            logger.info("series %s: purged %d files (retention policy)", series.series_uid, removed)
    elif settled.job is not None:
        logger.info("series %s version %d complete with %d instances: job %d queued",
                    series.series_uid, settled.job.series_version, series.instance_count, settled.job.id)
        if on_job is not None:
            on_job(settled.job)
    return settled


def skip_reason(series: Series, rules: SeriesConfig) -> str | None:
    """Why a complete series is not selected, or None when it is."""
    if series.modality not in rules.modalities:
        return f"modality {series.modality or '(none)'!r} is not one of {', '.join(rules.modalities)}"
    if rules.description_pattern and not rules.description_regex.search(series.description):
        # The description itself is not repeated: it may carry free text about the patient.
        return f"series description does not match {rules.description_pattern!r}"
    if series.slice_count < rules.min_slices:
        return f"{series.slice_count} slices, fewer than the minimum of {rules.min_slices}"
    return None


def volume_skip_reason(headers: Sequence[Dataset], rules: SeriesConfig) -> str | None:
    """Why a series can never be the one volume the network segments, from its headers alone.

    Localizers and scouts (by ImageType), stacks that are not one volume (mixed orientations, a
    single slice, irregular positions) and images the network cannot read (colour, palette, 1-bit)
    are skipped before any work. Broken data sets are not
    reasons to skip: the job fails on them and names the instance ("malformed dataset").
    """
    wanted = {t.upper() for t in rules.skip_image_types}
    for ds in headers:
        found = wanted.intersection(str(v).strip().upper() for v in (ds.get("ImageType") or []))
        if found:
            return f"ImageType {'/'.join(sorted(found))}: localizers and scouts are not volumes"
    try:
        check_geometry(headers, min_slices=rules.min_slices)
    except MalformedDatasetError:
        return None
    except SeriesGeometryError as exc:
        return f"not one volume: {exc.problem}"
    except SeriesError as exc:  # e.g. colour or 1-bit pixels: a valid image, but not one the network reads
        return f"cannot be segmented: {exc.problem}"
    return None


def _headers(state: State, spool: Spool, series: Series) -> list[Dataset] | None:
    """The series' current instances read without pixel data; None when one cannot be read (the job says why)."""
    try:
        return [dcmread(spool.path(i.path), stop_before_pixels=True)
                for i in state.instances(series.series_uid, series.version)]
    except Exception as exc:  # an unreadable file fails its job with a clear message instead
        logger.info("series %s: headers not checked before the job (%s)", series.series_uid, type(exc).__name__)
        return None


class SeriesTracker:
    """Owns the quiet-period timers; calls ``on_job`` for every job it queues (to wake the worker)."""

    def __init__(
        self,
        state: State,
        spool: Spool,
        rules: SeriesConfig,
        on_job: Callable[[Job], None] | None = None,
    ) -> None:
        self._state = state
        self._spool = spool
        self._rules = rules
        self._on_job = on_job
        self._lock = threading.Lock()
        self._armed: set[str] = set()  # series with a pending timer
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
        )

    def start(self) -> None:
        """Start the scheduler and re-arm the timer of every series the state says is still open."""
        self._scheduler.start()
        pending = self._state.series_awaiting_completion()
        # Downtime is not quiet time: a sender cut off by the crash gets a whole quiet period, from
        # now, to resume before its series is concluded (else the rest would become a new version).
        started = time.time()
        for series in pending:
            self._arm(series.series_uid, max(series.last_received_at, started) + self._rules.quiet_period_s)
        if pending:
            logger.info("re-armed quiet-period timers for %d series", len(pending))

    def stop(self) -> None:
        """Stop the timers (their state stays in SQLite for the next start)."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    def instance_stored(self, outcome: RecordOutcome) -> None:
        """Restart the series' quiet period: the SCP calls this after each committed instance.

        The deadline (last arrival + quiet period) moves with every instance, but the scheduler is
        touched only when the series has no timer yet: a timer that fires before the moved deadline
        re-arms itself at it, so a series of N instances costs a few timer events, not N.
        """
        self._arm(outcome.series_uid, outcome.received_at + self._rules.quiet_period_s, only_if_idle=True)

    def _arm(self, series_uid: str, deadline: float, only_if_idle: bool = False) -> None:
        with self._lock:
            if only_if_idle and series_uid in self._armed:
                return
            self._armed.add(series_uid)
        self._scheduler.add_job(
            self._on_timer,
            trigger="date",
            run_date=datetime.fromtimestamp(deadline, tz=UTC),
            args=(series_uid,),
            id=series_uid,
            replace_existing=True,
        )

    def _on_timer(self, series_uid: str) -> Job | None:
        with self._lock:
            self._armed.discard(series_uid)  # from here on, a new instance arms a new timer
        try:
            return self._settle(series_uid)
        except Exception:  # a timer thread must not die silently
            logger.exception("series %s: concluding the quiet period failed", series_uid)
            raise

    def _settle(self, series_uid: str) -> Job | None:
        series = self._state.series(series_uid)
        if series is None or not series.awaiting_completion:
            return None
        deadline = series.last_received_at + self._rules.quiet_period_s
        if time.time() < deadline:  # instances arrived since this timer was armed
            self._arm(series_uid, deadline, only_if_idle=True)
            return None
        return self.settle_now(series).job

    def settle_now(self, series: Series, crop_request: Mapping[str, Any] | None = None) -> Settlement:
        """Settle ``series`` without waiting for its quiet period (the pull knows it is complete)."""
        return settle(self._state, self._spool, self._rules, series, self._on_job, crop_request)
