"""The state's records: the rows it returns, their life-cycle enums and its errors (see :mod:`.state`)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class StateError(RuntimeError):
    """A transition that the current state does not allow, or an unknown job."""


class StateFullError(OSError):
    """SQLite could not commit because the disk is full: the SCP answers 0xA700."""


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    EXPORTING = "exporting"
    #: The result is stored with its deliveries, but a QA FAIL keeps it from going out (``qa.on_fail =
    #: "hold"``) until an operator releases it (``ian-node jobs retry``, ``POST /jobs/{id}/retry``).
    #: Start-up recovery leaves it alone.
    HELD = "held"
    DONE = "done"
    FAILED = "failed"


class JobOutcome(StrEnum):
    """What a job's segmentation came to; a job that failed before its crop was decided has none."""

    SEGMENTED = "segmented"
    #: The localiser found no plausible mandible: nothing was segmented or sent (the job fails with
    #: "no mandible region found ...").
    NO_REGION = "no_region"
    #: No region was found but ``crop.segment_when_not_found`` is set: segmented and sent, flagged.
    SEGMENTED_NO_REGION = "segmented_no_region"


class SeriesState(StrEnum):
    RECEIVING = "receiving"
    SELECTED = "selected"
    SKIPPED = "skipped"


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class ReceivedInstance:
    """What the SCP knows about one instance it has just written to the spool."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    sha256: str
    frames: int = 1
    instance_number: int | None = None
    modality: str = ""
    description: str = ""
    calling_ae: str = ""
    peer_host: str = ""
    #: The export target a pull fetched the instance through (None: received by C-STORE).
    pulled_from: str | None = None
    #: False when the file's fsync may still be in flight: the row is then recorded as unconfirmed
    #: (checked on recovery) until :meth:`~ian_node.storage.state.State.confirm_instances` is given its token.
    file_durable: bool = True



@dataclass(frozen=True)
class RecordOutcome:
    series_uid: str
    series_version: int
    received_at: float
    new_instance: bool
    #: False for an identical re-send (same UID, same bytes).
    changed: bool
    sop_instance_uid: str = ""
    #: The row's unconfirmed token (None when the file was durable before the row).
    confirm_token: int | None = None


@dataclass(frozen=True)
class UnconfirmedInstance:
    """A row committed before its file was known durable: recovery checks the file."""

    sop_instance_uid: str
    series_uid: str
    path: str
    size: int
    sha256: str
    token: int


@dataclass(frozen=True)
class Instance:
    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    frames: int
    path: str
    size: int
    sha256: str
    received_at: float
    times_received: int


@dataclass(frozen=True)
class Series:
    series_uid: str
    study_uid: str
    modality: str
    description: str
    calling_ae: str
    peer_host: str
    version: int
    awaiting_completion: bool
    status: SeriesState
    status_reason: str | None
    first_received_at: float
    last_received_at: float
    instance_count: int
    slice_count: int
    #: Instances recorded into the current version (a re-send opens a version that fills up again).
    version_instance_count: int = 0


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    series_version: int
    state: JobState
    attempts: int
    error: str | None
    result_path: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    #: The job's own crop request (``"source": "api"``, from ``POST /jobs``) or the configured one
    #: its last run used (``"source": "config"``): {"mode", "right", "left", "source"}.
    crop_request: dict[str, Any] | None = None
    #: The crop used: {"right": {"mode", "box_mm", "confidence"}, "left": {...}}.
    crop: dict[str, Any] | None = None
    outcome: JobOutcome | None = None
    #: What an operator must know about the result (the localiser's problem); None when nothing.
    flag: str | None = None
    voxels: dict[str, int] | None = None
    timings: dict[str, float] | None = None
    #: Per-side QA, each `ian_node.segment.qa.SideQA.as_json` ({"side", "verdict", "reasons", ...}).
    qa: list[dict[str, Any]] | None = None
    #: Every result file (spool paths): the SEG (also `result_path`), then the SR and the probability SEG.
    results: list[str] | None = None

    @property
    def result_paths(self) -> tuple[str, ...]:
        """The result files that each delivery sends, in order."""
        if self.results:
            return tuple(self.results)
        return () if self.result_path is None else (self.result_path,)

    @property
    def api_crop_request(self) -> dict[str, Any] | None:
        """The crop this job was given through the API (None: the node's configured crop)."""
        request = self.crop_request
        return request if request is not None and request.get("source") == "api" else None


@dataclass(frozen=True)
class Delivery:
    job_id: int
    target: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    delivered_at: float | None


@dataclass(frozen=True)
class Settlement:
    """The end of a quiet period: whether it applied (no newer instance), and what it produced."""

    applied: bool
    job: Job | None = None
    #: Why the series was not selected (None: selected, or the settlement did not apply).
    skip_reason: str | None = None
    #: (SOP Instance UID, path) of each instance row the purge deleted; the caller deletes the files.
    purged: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Recovery:
    """What start-up found: work to resume."""

    requeued_jobs: tuple[int, ...]
    failed_jobs: tuple[int, ...]
    exporting_jobs: tuple[int, ...]
    awaiting_series: tuple[Series, ...]


def series_from_row(row: sqlite3.Row) -> Series:
    values = dict(row)
    values["awaiting_completion"] = bool(values["awaiting_completion"])
    values["status"] = SeriesState(values["status"])
    return Series(**values)


#: Job columns that hold JSON text.
JOB_JSON_COLUMNS = ("crop_request", "crop", "voxels", "timings", "qa", "results")


def job_from_row(row: sqlite3.Row) -> Job:
    values = dict(row)
    values["state"] = JobState(values["state"])
    for key in JOB_JSON_COLUMNS:
        if values.get(key) is not None:
            values[key] = json.loads(values[key])
    if values.get("outcome") is not None:
        values["outcome"] = JobOutcome(values["outcome"])
    return Job(**values)


def delivery_from_row(row: sqlite3.Row) -> Delivery:
    values = dict(row)
    values["state"] = DeliveryState(values["state"])
    return Delivery(**values)
