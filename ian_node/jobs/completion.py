"""Series completion: a quiet-period timer per series, or the series' stated size; then the selection rules.

DICOM has no "end of series" message, so a series counts as complete once no instance of it has
arrived for ``series.quiet_period_s``. Each stored instance restarts its series' timer.

A series that states its own size is concluded as soon as its last instance is in, without waiting
(:class:`SizeRules`): a single multi-frame instance (an enhanced MR volume) at once; a series whose
description matches a configured ``series.expected_counts`` rule at that count; otherwise a series
whose first instance states ``ImagesInAcquisition`` (0020,1002) when that many instances are in and
*every* one of them states the same count and the same ``AcquisitionNumber`` (the count is per
acquisition, and some scanners write it wrong). Never below ``series.stated_size_min_slices``
slices, and only when every instance of the series belongs to its current version (so a re-sent
series is concluded once, when the whole of it is in again). A series that never reaches its stated
size, or exceeds it, is concluded by its quiet period as before, and an instance that arrives after
the conclusion makes a new version, as before.

When a series is concluded, the selection rules decide: a selected series becomes a job for its current version (one job
per version, enforced by the state); a series that is not selected is recorded as skipped with the
reason, and its files are kept or purged according to ``series.retention``.

The timers live in an apscheduler ``BackgroundScheduler``; the state keeps what they need
(``awaiting_completion`` and the last arrival time), so :meth:`SeriesTracker.start` re-arms them
after a restart. A timer that fires while instances are still arriving re-arms at the new deadline.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
           on_job: Callable[[Job], None] | None = None, crop_request: Mapping[str, Any] | None = None,
           headers: Sequence[Dataset] | None = None) -> Settlement:
    """Conclude a complete series: select it and queue its job, or skip it (purging per retention).

    The one settlement for the quiet-period timer, the stated size and the pull. It does nothing when
    an instance arrived after ``series`` was read (that instance's own quiet period decides).
    ``crop_request``: a pull's own crop, stored with the job it creates. ``headers``: the series'
    headers when the caller has read them already.
    """
    reason = skip_reason(series, rules)
    if reason is None:
        headers = _headers(state, spool, series) if headers is None else headers
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


@dataclass(frozen=True)
class StatedSize:
    """How many instances a series says it has, and what says so."""

    instances: int
    #: "rule" (series.expected_counts), "frames" (one multi-frame instance) or "ImagesInAcquisition".
    source: str


@dataclass(frozen=True)
class SizeRules:
    """When a series is concluded as soon as its stated size is in (the quiet period stays the fallback)."""

    enabled: bool = True
    #: Never concluded early with fewer slices (frames) than this.
    min_slices: int = 10
    #: (regular expression searched case-insensitively in Series Description, instance count).
    expected_counts: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_config(cls, rules: SeriesConfig) -> SizeRules:
        return cls(enabled=rules.settle_on_stated_size, min_slices=rules.stated_size_min_slices,
                   expected_counts=tuple((e.series_description, e.count) for e in rules.expected_counts))

    def expected_count(self, description: str) -> int | None:
        """The configured count of the first ``expected_counts`` rule the description matches."""
        for pattern, count in self.expected_counts:
            if re.search(pattern, description, re.IGNORECASE):
                return count
        return None


def stated_images_in_acquisition(ds: Dataset) -> int | None:
    """ImagesInAcquisition (0020,1002) when it is a positive integer, else None."""
    try:
        value = int(ds.get("ImagesInAcquisition"))
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def headers_agree(headers: Sequence[Dataset], count: int) -> bool:
    """Whether ``count`` headers all state ImagesInAcquisition ``count`` in one acquisition.

    Instances of two acquisitions (AcquisitionNumber differs) each state their own acquisition's size,
    not the series'; a count any instance contradicts is not trusted.
    """
    if len(headers) != count or any(stated_images_in_acquisition(ds) != count for ds in headers):
        return False
    return len({str(ds.get("AcquisitionNumber", "")).strip() for ds in headers}) == 1


class SeriesTracker:
    """Owns the quiet-period timers and the stated-size checks; calls ``on_job`` for every job it queues."""

    def __init__(
        self,
        state: State,
        spool: Spool,
        rules: SeriesConfig,
        on_job: Callable[[Job], None] | None = None,
        sizes: SizeRules | None = None,
    ) -> None:
        """``sizes``: when to conclude a series on its stated size (unset: from ``rules``)."""
        self._state = state
        self._spool = spool
        self._rules = rules
        self._sizes = SizeRules.from_config(rules) if sizes is None else sizes
        self._on_job = on_job
        self._lock = threading.Lock()
        self._armed: set[str] = set()  # series with a pending timer
        #: The ImagesInAcquisition each open series' first instance stated (None: none), read once.
        self._stated: dict[str, int | None] = {}
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
        if self._sizes.enabled and outcome.changed:
            self._check_stated_size(outcome)

    def _check_stated_size(self, outcome: RecordOutcome) -> None:
        """Conclude the series now (in the timer thread) when this instance completes its stated size.

        Costs one state query per instance, and one header read per series (its first instance); nothing
        once a series' first instance stated no size and no ``expected_counts`` rule is configured.
        """
        with self._lock:
            unstated = outcome.series_uid in self._stated and self._stated[outcome.series_uid] is None
        if unstated and not self._sizes.expected_counts:
            return
        series = self._state.series(outcome.series_uid)
        if series is None or not series.awaiting_completion or series.version != outcome.series_version:
            return
        stated = self._stated_size(series, outcome)
        if stated is not None and self._complete(series, stated):
            self._scheduler.add_job(self._on_stated_size, args=(series.series_uid, stated),
                                    id=f"{series.series_uid}/size", replace_existing=True)

    def _stated_size(self, series: Series, outcome: RecordOutcome) -> StatedSize | None:
        rule = self._sizes.expected_count(series.description)
        if rule is not None:
            return StatedSize(rule, "rule")
        if series.instance_count == 1 and series.slice_count > 1:
            return StatedSize(1, "frames")
        with self._lock:
            known = series.series_uid in self._stated
            images = self._stated.get(series.series_uid)
        if not known:
            images = self._read_images_in_acquisition(outcome.sop_instance_uid)
            with self._lock:
                images = self._stated.setdefault(series.series_uid, images)
        return None if images is None else StatedSize(images, "ImagesInAcquisition")

    def _read_images_in_acquisition(self, sop_instance_uid: str) -> int | None:
        path = self._state.instance_path(sop_instance_uid)
        if path is None:
            return None
        try:
            ds = dcmread(self._spool.path(path), stop_before_pixels=True, specific_tags=["ImagesInAcquisition"])
        except Exception:  # an unreadable file: its job says why; the quiet period concludes the series
            return None
        return stated_images_in_acquisition(ds)

    def _complete(self, series: Series, stated: StatedSize) -> bool:
        """All of the stated instances are in, all in the current version, and enough slices."""
        return (series.instance_count == stated.instances == series.version_instance_count
                and series.slice_count >= self._sizes.min_slices)

    def _on_stated_size(self, series_uid: str, stated: StatedSize) -> Job | None:
        try:
            series = self._state.series(series_uid)
            if series is None or not series.awaiting_completion or not self._complete(series, stated):
                return None
            headers = _headers(self._state, self._spool, series)
            if stated.source == "ImagesInAcquisition" and (headers is None or not headers_agree(headers, stated.instances)):
                logger.info("series %s: its instances do not agree on ImagesInAcquisition %d; the quiet period "
                            "concludes it", series_uid, stated.instances)
                return None
            settled = settle(self._state, self._spool, self._rules, series, self._on_job, headers=headers)
            if settled.applied:
                self._forget(series_uid)
                logger.info("series %s: concluded on its stated size (%d instance(s), %s), without waiting",
                            series_uid, stated.instances, stated.source)
            return settled.job
        except Exception:  # a timer thread must not die silently
            logger.exception("series %s: concluding on its stated size failed", series_uid)
            raise

    def _forget(self, series_uid: str) -> None:
        with self._lock:
            self._stated.pop(series_uid, None)

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
        settled = self.settle_now(series)
        if settled.applied:
            self._forget(series_uid)
        return settled.job

    def settle_now(self, series: Series, crop_request: Mapping[str, Any] | None = None) -> Settlement:
        """Settle ``series`` without waiting for its quiet period (the pull knows it is complete)."""
        return settle(self._state, self._spool, self._rules, series, self._on_job, crop_request)
