"""The worker: one job at a time per device, from the SQLite queue to a SEG handed to the exporter.

A job's work is pure apart from reading its instance files and writing its result through the
exporter (which stores it durably before any delivery). A failing job is recorded with its error
and never blocks the queue. The model and the SEG come from :mod:`ian_node.segment.result`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from ian_node.config import ModelConfig
from ian_node.export.exporter import Exporter
from ian_node.logs import NOTICE, exception_text
from ian_node.polling import PollingThread
from ian_node.segment.pipeline import PipelineOptions, failure_message, segment_series
from ian_node.segment.result import load_predictor, result_segmentation
from ian_node.storage.records import Job
from ian_node.storage.spool import Spool
from ian_node.storage.state import State
from model.predictor import Predictor

logger = logging.getLogger(__name__)

#: Longest idle wait between looks at the job queue (jobs from another process appear within it).
IDLE_WAIT_S = 5.0

@dataclass
class StageTotals:
    """Seconds spent per stage and jobs counted, for the metrics endpoint."""

    seconds: dict[str, float]
    jobs: int = 0


class Worker:
    """Runs queued jobs in a background thread; `wake` after queueing one."""

    def __init__(self, state: State, spool: Spool, exporter: Exporter, model: ModelConfig,
                 options: PipelineOptions | None = None, predictor: Predictor | None = None) -> None:
        self._state = state
        self._spool = spool
        self._exporter = exporter
        self._model_config = model
        self._options = options or PipelineOptions()
        self._predictor = predictor  # None: load the configured checkpoint on first use
        self._loop = PollingThread("ian-node-worker", self._pass, error_wait_s=IDLE_WAIT_S)
        self.totals = StageTotals(defaultdict(float))

    @property
    def predictor(self) -> Predictor:
        """Loaded on first use, so that `serve` starts listening at once."""
        if self._predictor is None:
            self._predictor = load_predictor(self._model_config)
        return self._predictor

    def run_job(self, job: Job) -> None:
        """Segment one claimed job and hand its SEG to the exporter; record a failure otherwise."""
        started = time.perf_counter()
        logger.log(NOTICE, "job %d started: series %s v%d", job.id, job.series_uid, job.series_version)
        try:
            paths = [self._spool.path(i.path) for i in self._state.instances(job.series_uid, job.series_version)]
            t0 = time.perf_counter()
            result = segment_series(paths, self.predictor, self._options)
            t1 = time.perf_counter()
            seg = result_segmentation(result, job.series_version, self.predictor.checkpoint)
            t2 = time.perf_counter()
            exported = self._exporter.submit(job.id, seg)
        except Exception as exc:  # any failure is the job's, never the worker's
            error = failure_message(exc)  # what the state, the API and `jobs list` show
            self._state.fail_job(job.id, error)
            # a library's exception may quote the patient's values: the log gets them redacted
            logger.error("job %d ended: series %s v%d, %.1f s, failed: %s", job.id, job.series_uid,
                         job.series_version, time.perf_counter() - started, exception_text(exc))
            return
        timings = {**result.timings, "seg_build": t2 - t1, "total": t2 - t0}
        for stage, seconds in timings.items():
            self.totals.seconds[stage] += seconds
        self.totals.jobs += 1
        logger.info("job %d (series %s v%d): %s; %s", job.id, job.series_uid, job.series_version,
                    ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()),
                    ", ".join(f"{k} {v} voxels" for k, v in result.voxels.items()))
        logger.log(NOTICE, "job %d ended: series %s v%d, %.1f s, %s (%d instances)", job.id, job.series_uid,
                   job.series_version, time.perf_counter() - started, exported.state, len(paths))

    def run_pending(self) -> int:
        """Run queued jobs until the queue is empty; returns how many ran."""
        count = 0
        while not self._loop.stopping and (job := self._state.claim_next_job()) is not None:
            self.run_job(job)
            count += 1
        return count

    def wake(self, *_: object) -> None:
        self._loop.wake()

    def start(self) -> None:
        self._loop.start()

    def stop(self, timeout: float = 60.0) -> None:
        self._loop.stop(timeout)

    def _pass(self) -> float:
        self.run_pending()
        return IDLE_WAIT_S
