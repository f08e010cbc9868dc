"""What the status page shows, read from the state (the single source of truth) and the spool.

Privacy: the page shows UIDs, dates and series descriptions. The patient's name and ID are read
from the series' first instance only when :attr:`PageView.identity` is set, which the routes do only
when ``api.show_patient_identity`` is true *and* the user is logged in (so never without
``api.token``). Nothing here logs a header value.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import pydicom

from ian_node import __version__
from ian_node.app.status.overlay import SIDES
from ian_node.config import NodeConfig
from ian_node.export.exporter import Exporter
from ian_node.jobs.worker import Worker
from ian_node.storage.records import Delivery, DeliveryState, Job, JobState
from ian_node.storage.spool import Spool
from ian_node.storage.state import State

logger = logging.getLogger(__name__)

#: How many recent jobs the page lists.
RECENT_JOBS = 25
_HEADER_CACHE_SIZE = 512
_HEADER_TAGS = ["StudyDate", "SeriesDate", "PatientName", "PatientID"]


@dataclass(frozen=True)
class StatusSources:
    """The running node's parts the page reads; ``started_at`` is when it started (epoch seconds)."""

    config: NodeConfig
    state: State
    spool: Spool
    worker: Worker
    exporter: Exporter
    started_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class SeriesHeader:
    """What the page takes from a series' first instance; the identity stays empty unless asked for."""

    study_date: str = ""
    series_date: str = ""
    patient_name: str = ""
    patient_id: str = ""


def _dicom_date(value: object) -> str:
    text = str(value or "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text


class HeaderCache:
    """Headers of recently shown series, keyed by (series UID, version): one small read per series, not per poll."""

    def __init__(self, state: State, spool: Spool) -> None:
        self._state = state
        self._spool = spool
        self._cache: OrderedDict[tuple[str, int], SeriesHeader] = OrderedDict()
        self._lock = threading.Lock()

    def header(self, series_uid: str, version: int) -> SeriesHeader:
        key = (series_uid, version)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        header = self._read(series_uid, version)
        with self._lock:
            self._cache[key] = header
            while len(self._cache) > _HEADER_CACHE_SIZE:
                self._cache.popitem(last=False)
        return header

    def _read(self, series_uid: str, version: int) -> SeriesHeader:
        instances = self._state.instances(series_uid, version)
        if not instances:
            return SeriesHeader()
        try:
            ds = pydicom.dcmread(self._spool.path(instances[0].path), stop_before_pixels=True,
                                 specific_tags=_HEADER_TAGS)
        except (OSError, ValueError, pydicom.errors.InvalidDicomError) as exc:
            logger.debug("series %s: header unreadable for the status page: %s", series_uid, type(exc).__name__)
            return SeriesHeader()
        return SeriesHeader(_dicom_date(ds.get("StudyDate")), _dicom_date(ds.get("SeriesDate")),
                            str(ds.get("PatientName", "") or ""), str(ds.get("PatientID", "") or ""))


def _qa(job: Job) -> list[dict[str, Any]]:
    """The job's per-side QA verdicts and reasons (``SideQA.as_json`` records), right first; empty without QA."""
    order = {side: n for n, side in enumerate(SIDES)}
    items = sorted(job.qa or (), key=lambda i: order.get(str(i.get("side")), len(order)))
    return [{"side": str(i.get("side", "")), "verdict": str(i.get("verdict", "")).upper(),
             "reasons": [str(r) for r in i.get("reasons", ())]} for i in items]


def _duration(job: Job) -> float | None:
    if job.started_at is None:
        return None
    return (job.finished_at or time.time()) - job.started_at


@dataclass
class PageView:
    """Builds the page's records; ``identity``: show the patient's name and ID (see the module's docstring)."""

    sources: StatusSources
    headers: HeaderCache
    identity: bool = False

    def node(self) -> dict[str, Any]:
        config = self.sources.config
        try:
            predictor = self.sources.worker.predictor
            checkpoint = getattr(predictor, "checkpoint", None)
            device = str(getattr(predictor, "device", "its own device"))
            if checkpoint is None:
                model = "in-memory network (no checkpoint)"
            else:
                meta = checkpoint.meta
                model = " ".join(p for p in (meta.architecture, meta.variant, f"sha256 {checkpoint.sha256[:12]}") if p)
                if meta.label:
                    model += f" [{meta.label}]"
        except Exception as exc:  # the node starts without the model only in a failed start
            model, device = f"not loaded ({type(exc).__name__})", "-"
        return {
            "ae_title": config.dicom.ae_title, "version": __version__, "model": model, "device": device,
            "uptime_s": time.time() - self.sources.started_at, "crop": config.crop.mode,
            "targets": [t.name for t in config.export.targets],
        }

    def queue(self) -> dict[str, Any]:
        state = self.sources.state
        jobs = state.job_counts()
        deliveries = state.delivery_counts()
        return {
            "jobs": {str(s): jobs[s] for s in JobState},
            "deliveries": {str(s): deliveries[s] for s in DeliveryState},
            "receiving": len(state.series_awaiting_completion()),
        }

    def job(self, job: Job) -> dict[str, Any]:
        """One job as the page shows it (list row and job page)."""
        series = self.sources.state.series(job.series_uid)
        header = self.headers.header(job.series_uid, job.series_version)
        record: dict[str, Any] = {
            "id": job.id, "series_uid": job.series_uid, "version": job.series_version, "state": str(job.state),
            "attempts": job.attempts, "error": job.error, "has_result": job.result_path is not None,
            "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
            "duration_s": _duration(job), "outcome": None if job.outcome is None else str(job.outcome),
            "flag": job.flag, "qa": _qa(job), "crop": job.crop or {}, "voxels": job.voxels or {},
            "timings": job.timings or {}, "study_date": header.study_date, "series_date": header.series_date,
            "description": series.description if series is not None else "",
            "study_uid": series.study_uid if series is not None else "",
            "modality": series.modality if series is not None else "",
            "instances": series.instance_count if series is not None else 0,
            "calling_ae": series.calling_ae if series is not None else "",
        }
        if self.identity:
            record["patient_name"] = header.patient_name
            record["patient_id"] = header.patient_id
        return record

    def recent_jobs(self) -> list[dict[str, Any]]:
        return [self.job(j) for j in self.sources.state.list_jobs(None, RECENT_JOBS)]

    def deliveries(self, job: Job) -> list[Delivery]:
        return self.sources.state.deliveries(job.id)

    @staticmethod
    def retryable(job: Job) -> bool:
        """A failed job can be retried (its failed deliveries re-sent, or without a result the job re-run),
        and a held one released: both through ``State.retry_job``, as the API's retry."""
        return job.state in (JobState.FAILED, JobState.HELD)
