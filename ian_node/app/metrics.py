"""The node's Prometheus metrics (prometheus-client), on a registry of its own per node.

Everything but the pull counter and the stage histogram is read at scrape time by a custom
collector: jobs, outcomes, QA verdicts, deliveries and the delivery backlog from the SQLite state (so the
numbers agree with `GET /jobs` and `ian-node jobs list`), the refusal and store-failure counters
from the SCP's own :class:`ian_node.receive.counters.ReceiveCounters` (one count per refusal, each
logged once at WARNING, but those for lack of space, which are logged at most once a minute), and
the spool's free space from its file system. Each node has its own
:class:`~prometheus_client.CollectorRegistry`, so that several nodes can run in one process (tests).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from ian_node import __version__
from ian_node.jobs.worker import StageTotals
from ian_node.receive.counters import ReceiveCounters
from ian_node.storage.records import DeliveryState, JobState
from ian_node.storage.state import State

#: The text format the node answers with (0.0.4: what every Prometheus version scrapes).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: Stage timings run from milliseconds (loading a small series) to minutes (a large series on a CPU).
STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 150.0, 300.0, 600.0)
#: The most failed jobs whose deliveries the backlog gauge reads per scrape (newest first).
BACKLOG_FAILED_JOBS = 10_000

# No ``*_created`` series beside each counter and histogram: they double the series and nobody reads them.
# (A switch of the library's, for the whole process: the node's process has no other metrics.)
disable_created_metrics()


class StageSeconds(dict[str, float]):
    """The worker's seconds per stage, remembering what each job added since the last job ended."""

    def __init__(self) -> None:
        super().__init__()
        self.added: dict[str, float] = {}

    def __missing__(self, stage: str) -> float:
        return 0.0

    def __setitem__(self, stage: str, total: float) -> None:
        self.added[stage] = self.added.get(stage, 0.0) + total - self.get(stage, 0.0)
        super().__setitem__(stage, total)


class ObservedStageTotals(StageTotals):
    """The worker's running totals; each job's stage seconds also go into the stage histogram.

    The worker adds a job's seconds per stage, then counts the job: counting it observes what it added.
    """

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._seconds = StageSeconds()
        self._jobs = 0
        super().__init__(seconds=self._seconds)

    @property  # type: ignore[override]
    def jobs(self) -> int:
        return self._jobs

    @jobs.setter
    def jobs(self, count: int) -> None:
        for stage, seconds in self._seconds.added.items():
            self._histogram.labels(stage=stage).observe(seconds)
        self._seconds.added.clear()
        self._jobs = count


class _StateCollector:
    """The families read at scrape time: from the state, the SCP's counters and the spool's file system."""

    def __init__(self, state: State, receive: ReceiveCounters | None) -> None:
        self._state = state
        self._receive = receive

    def describe(self) -> list[Metric]:
        return []  # nothing to check against other collectors; collect() reads the state only when scraped

    def collect(self) -> Iterator[Metric]:
        state, receive = self._state, self._receive
        yield _labelled(GaugeMetricFamily("ian_node_info", "The node's version (always 1).", labels=["version"]),
                        {(__version__,): 1})
        yield CounterMetricFamily(
            "ian_node_instances_received",
            "DICOM instances committed to the spool and state (C-STORE and pulls, re-sends included).",
            value=state.instances_received())
        yield _labelled(GaugeMetricFamily("ian_node_jobs", "Jobs by state.", labels=["state"]),
                        {(str(s),): n for s, n in state.job_counts().items()})
        yield _labelled(GaugeMetricFamily(
            "ian_node_job_outcomes",
            "Jobs by what their segmentation came to: segmented; no_region (no mandible region found, nothing "
            "sent); segmented_no_region (sent anyway, flagged: crop.segment_when_not_found).", labels=["outcome"]),
            {(str(o),): n for o, n in state.outcome_counts().items()})
        yield _labelled(GaugeMetricFamily(
            "ian_node_qa_verdicts",
            "Sides of segmented jobs by QA verdict (PASS, WARN, FAIL; segment.qa): a rising FAIL count "
            "means results an operator must look at (flagged, or held with qa.on_fail = hold).",
            labels=["side", "verdict"]),
            state.qa_counts())
        yield _labelled(GaugeMetricFamily("ian_node_deliveries", "Result deliveries (job x target) by state.",
                                          labels=["state"]),
                        {(str(s),): n for s, n in state.delivery_counts().items()})
        yield _labelled(GaugeMetricFamily(
            "ian_node_delivery_backlog",
            "Result deliveries not made, by target: pending (still being tried) and failed (for good, until a "
            "retry; read from the newest failed jobs).", labels=["target", "state"]),
            delivery_backlog(state))
        yield _labelled(CounterMetricFamily(
            "ian_node_refusals",
            "Refusals by the DICOM listener since the process started, by reason: rejected associations, failed "
            "TLS handshakes, refused presentation contexts (once per association and reason), and C-STOREs "
            "refused for lack of space (disk_full).", labels=["reason"]),
            {(reason,): n for reason, n in (receive.refusals().items() if receive else [])})
        yield _labelled(CounterMetricFamily(
            "ian_node_store_failures",
            "C-STORE requests answered with a failure status since the process started, by status.",
            labels=["status"]),
            {(status,): n for status, n in (receive.store_failures().items() if receive else [])})
        space = receive.spool_space() if receive else None
        yield _labelled(GaugeMetricFamily(
            "ian_node_spool_free_bytes", "Bytes free on the spool's file system (to the node's user), read at "
            "scrape time.", labels=[]), {(): space.free_bytes} if space else {})
        yield _labelled(GaugeMetricFamily(
            "ian_node_spool_min_free_bytes",
            "The free space the spool keeps: below it, new instances are refused with 0xA700 (the larger of "
            "storage.min_free_bytes and storage.min_free_percent of the file system).", labels=[]),
            {(): space.min_free_bytes} if space else {})


def _labelled(family: GaugeMetricFamily | CounterMetricFamily,
              values: dict[tuple[str, ...], float]) -> GaugeMetricFamily | CounterMetricFamily:
    for labels, value in values.items():
        family.add_metric(list(labels), value)
    return family


def delivery_backlog(state: State) -> dict[tuple[str, str], int]:
    """Deliveries not made per (target, state): those the exporter still tries, and those failed for good."""
    backlog: Counter[tuple[str, str]] = Counter(
        (d.target, str(DeliveryState.PENDING)) for d in state.due_deliveries(now=math.inf))
    for job in state.list_jobs(JobState.FAILED, BACKLOG_FAILED_JOBS):
        backlog.update((d.target, str(d.state)) for d in state.deliveries(job.id) if d.state is DeliveryState.FAILED)
    return dict(sorted(backlog.items()))


class NodeMetrics:
    """One node's registry: the state collector, the pull counter and the stage histogram.

    Install :attr:`stage_totals` as the worker's ``totals`` so that its jobs feed the histogram.
    """

    def __init__(self, state: State, receive: ReceiveCounters | None = None) -> None:
        """``receive``: the SCP's refusal and store-failure counters, when the SCP runs in this process."""
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(state, receive))
        self.stage_seconds = Histogram("ian_node_stage_seconds",
                                       "Seconds spent per pipeline stage by the jobs this process ran.",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.pulls = PromCounter("ian_node_pulls", "Pull requests by source and outcome since the process started.",
                                 ["source", "outcome"], registry=self.registry)
        self.stage_totals = ObservedStageTotals(self.stage_seconds)

    def text(self) -> str:
        """The metrics in the Prometheus text format 0.0.4 (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry).decode()
