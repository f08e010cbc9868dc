"""The worker: one job at a time per device, from the SQLite queue to a SEG handed to the exporter.

A job's work is pure apart from reading its instance files and writing its result through the
exporter (which stores it durably before any delivery). A failing job is recorded with its error
and never blocks the queue. SEG UIDs are derived from (source series, series version, model hash),
so a job re-run after a crash produces the same SEG instance and a PACS sees one result per version.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ian_node import __version__
from ian_node.config import ModelConfig
from ian_node.export.exporter import Exporter
from ian_node.polling import PollingThread
from ian_node.segment.pipeline import PipelineOptions, PipelineResult, segment_series
from ian_node.segment.seg import AlgorithmInfo, build_segmentation
from ian_node.storage.spool import Spool
from ian_node.storage.records import Job
from ian_node.storage.state import State
from model.checkpoint import BUNDLED_CHECKPOINT, LoadedCheckpoint, load_checkpoint
from model.predictor import Predictor, PredictorOptions

logger = logging.getLogger(__name__)

#: Longest idle wait between looks at the job queue (jobs from another process appear within it).
IDLE_WAIT_S = 5.0

#: Result series numbers are this plus the source series version, so each version is told apart.
SEG_SERIES_NUMBER_BASE = 9000


def load_predictor(config: ModelConfig) -> Predictor:
    """The configured checkpoint (or the bundled phantom model) on the configured device."""
    path = config.checkpoint or BUNDLED_CHECKPOINT
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    checkpoint = load_checkpoint(path)
    device = None if config.device == "auto" else config.device
    predictor = Predictor(checkpoint, PredictorOptions(device=device, batch_size=config.batch_size))
    logger.info(
        "model %s (%s, sha256 %s) on %s%s",
        checkpoint.meta.architecture, checkpoint.meta.variant, checkpoint.sha256[:12], predictor.device,
        f" [{checkpoint.meta.label}]" if checkpoint.meta.label else "",
    )
    return predictor


def algorithm_info(checkpoint: LoadedCheckpoint) -> AlgorithmInfo:
    meta = checkpoint.meta
    params = {"architecture": meta.architecture, "variant": meta.variant, "input_size": str(meta.input.size)}
    if meta.label:
        params["label"] = meta.label
    return AlgorithmInfo(name=f"ian-node {meta.architecture}", version=__version__,
                         checkpoint_hash=checkpoint.sha256, parameters=params)


def result_segmentation(result: PipelineResult, version: int, checkpoint: LoadedCheckpoint) -> Dataset:
    """The SEG of one series version, with UIDs that are the same every time it is rebuilt."""
    uid = result.series.series_uid
    sources = list({id(f.dataset): f.dataset for f in result.series.frames}.values())
    entropy = [uid, str(version), checkpoint.sha256]
    return build_segmentation(
        sources,
        result.labels,
        algorithm=algorithm_info(checkpoint),
        series_number=SEG_SERIES_NUMBER_BASE + version,
        series_description=f"IAN segmentation (AI) v{version}",
        series_instance_uid=generate_uid(prefix=None, entropy_srcs=entropy + ["series"]),
        sop_instance_uid=generate_uid(prefix=None, entropy_srcs=entropy + ["instance"]),
    )


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
        try:
            paths = [self._spool.path(i.path) for i in self._state.instances(job.series_uid, job.series_version)]
            t0 = time.perf_counter()
            result = segment_series(paths, self.predictor, self._options)
            t1 = time.perf_counter()
            seg = result_segmentation(result, job.series_version, self.predictor.checkpoint)
            t2 = time.perf_counter()
            self._exporter.submit(job.id, seg)
        except Exception as exc:  # any failure is the job's, never the worker's
            error = f"{type(exc).__name__}: {exc}"
            self._state.fail_job(job.id, error)
            logger.error("job %d (series %s v%d) failed: %s", job.id, job.series_uid, job.series_version, error)
            return
        timings = {**result.timings, "seg_build": t2 - t1, "total": t2 - t0}
        for stage, seconds in timings.items():
            self.totals.seconds[stage] += seconds
        self.totals.jobs += 1
        logger.info("job %d (series %s v%d): %s; %s", job.id, job.series_uid, job.series_version,
                    ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()),
                    ", ".join(f"{k} {v} voxels" for k, v in result.voxels.items()))

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
