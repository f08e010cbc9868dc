"""Prometheus text exposition (format 0.0.4) of what the state and the worker know.

Everything except the pull, refusal and store-failure counters is derived from the SQLite state or
the worker's running totals at scrape time, so the numbers agree with `GET /jobs` and
`ian-node jobs list`. The refusal and store-failure counters are the SCP's own
(:class:`ian_node.receive.counters.ReceiveCounters`), one count per refusal (each logged once at
WARNING, but those for lack of space, which are logged at most once a minute). The spool's free
space and the minimum it keeps are read from its file system at scrape time.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping

from ian_node import __version__
from ian_node.jobs.worker import StageTotals
from ian_node.receive.counters import ReceiveCounters
from ian_node.storage.state import State

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class PullCounter:
    """Pulls by source and outcome since the process started (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()

    def add(self, source: str, outcome: str) -> None:
        with self._lock:
            self._counts[(source, outcome)] += 1

    def items(self) -> list[tuple[tuple[str, str], int]]:
        with self._lock:
            return sorted(self._counts.items())


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[str, Mapping[str, str], float]]) -> None:
        """One metric family: HELP, TYPE, then its samples (suffix, labels, value)."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            self.lines.append(f"{name}{suffix}{_labels(labels)} {_number(value)}")


def render_metrics(state: State, totals: StageTotals, pulls: PullCounter | None = None,
                   receive: ReceiveCounters | None = None) -> str:
    """The node's metrics as Prometheus text (``receive``: the SCP's counters, when it runs here)."""
    out = _Writer()
    out.family("ian_node_info", "gauge", "The node's version (always 1).", [("", {"version": __version__}, 1)])
    out.family("ian_node_instances_received_total", "counter",
               "DICOM instances committed to the spool and state (C-STORE and pulls, re-sends included).",
               [("", {}, state.instances_received())])
    out.family("ian_node_jobs", "gauge", "Jobs by state.",
               [("", {"state": str(s)}, n) for s, n in state.job_counts().items()])
    out.family("ian_node_job_outcomes", "gauge",
               "Jobs by what their segmentation came to: segmented; no_region (no mandible region found, nothing "
               "sent); segmented_no_region (sent anyway, flagged: crop.segment_when_not_found).",
               [("", {"outcome": str(o)}, n) for o, n in state.outcome_counts().items()])
    out.family("ian_node_deliveries", "gauge", "Result deliveries (job x target) by state.",
               [("", {"state": str(s)}, n) for s, n in state.delivery_counts().items()])
    seconds = sorted(dict(totals.seconds).items())
    samples: list[tuple[str, Mapping[str, str], float]] = []
    for stage, total in seconds:
        samples.append(("_sum", {"stage": stage}, total))
        samples.append(("_count", {"stage": stage}, totals.jobs))
    out.family("ian_node_stage_seconds", "summary",
               "Seconds spent per pipeline stage by the jobs this process ran.", samples)
    out.family("ian_node_pulls_total", "counter", "Pull requests by source and outcome since the process started.",
               [("", {"source": src, "outcome": outcome}, n) for (src, outcome), n in (pulls.items() if pulls else [])])
    out.family("ian_node_refusals_total", "counter",
               "Refusals by the DICOM listener since the process started, by reason: rejected associations, failed "
               "TLS handshakes, refused presentation contexts (once per association and reason), and C-STOREs "
               "refused for lack of space (disk_full).",
               [("", {"reason": reason}, n) for reason, n in (receive.refusals().items() if receive else [])])
    out.family("ian_node_store_failures_total", "counter",
               "C-STORE requests answered with a failure status since the process started, by status.",
               [("", {"status": status}, n) for status, n in (receive.store_failures().items() if receive else [])])
    space = receive.spool_space() if receive else None
    out.family("ian_node_spool_free_bytes", "gauge",
               "Bytes free on the spool's file system (to the node's user), read at scrape time.",
               [("", {}, space.free_bytes)] if space else [])
    out.family("ian_node_spool_min_free_bytes", "gauge",
               "The free space the spool keeps: below it, new instances are refused with 0xA700 (the larger of "
               "storage.min_free_bytes and storage.min_free_percent of the file system).",
               [("", {}, space.min_free_bytes)] if space else [])
    return "\n".join(out.lines) + "\n"
