"""The worker: one job at a time per device, from the SQLite queue to a SEG and its SR handed to the exporter.

A job's work is pure apart from reading its instance files and writing its results through the
exporter (which stores them durably before any delivery). A failing job is recorded with its error
and never blocks the queue. The model, the SEG and the TID 1500 SR come from
:mod:`ian_node.segment.result`.

Each side's QA (`ian_node.segment.qa`) is recorded on the job and named in its "ended" log line. A
side that FAILs flags the job (which side, and why); ``[qa] on_fail = "hold"`` also keeps the result
from delivery (job state ``held``) until an operator releases it (``ian-node jobs retry``).

Each job is cropped as the ``[crop]`` config says, unless it carries its own request (``POST /jobs``
with a ``roi``). The crop requested and used, the outcome and per-side voxel counts and timings are
recorded on the job. When the localiser finds no mandible the job fails with "no mandible region
found" and outcome ``no_region``, nothing is sent; with ``crop.segment_when_not_found`` it is
segmented and sent anyway, with outcome ``segmented_no_region`` and the localiser's problem as its flag.

``[output]`` decides the rest: ``empty_segments = "omit"`` leaves an empty side's segment out of the
SEG and flags the job ("left segment left out: empty"); with both sides empty there is no SEG, the job
fails with that reason and nothing is sent. ``probability_seg = true`` also sends the network's
per-side probabilities as a FRACTIONAL SEG, the third result file after the SEG and the SR.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

from ian_node.config import CropConfig, ModelConfig, OutputConfig, QaConfig
from ian_node.export.exporter import Exporter
from ian_node.logs import NOTICE, exception_text
from ian_node.polling import PollingThread
from ian_node.segment.crop import NoRegionError, check_crop_compatible
from ian_node.segment.pipeline import PipelineOptions, failure_message, segment_series
from ian_node.segment.result import (
    load_crop_localiser,
    load_predictor,
    omitted_flag,
    qa_failed,
    qa_flag,
    qa_summary,
    request_from_record,
    request_record,
    result_probability_segmentation,
    result_report,
    result_segmentation,
)
from ian_node.segment.seg import NoSegmentsError
from ian_node.storage.records import Job, JobOutcome
from ian_node.storage.spool import Spool
from ian_node.storage.state import State
from model.localiser import LoadedLocaliser
from model.predictor import Predictor

logger = logging.getLogger(__name__)

#: Longest idle wait between looks at the job queue (jobs from another process appear within it).
IDLE_WAIT_S = 5.0


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in timings.items()}


@dataclass
class StageTotals:
    """Seconds spent per stage and jobs counted, for the metrics endpoint."""

    seconds: dict[str, float]
    jobs: int = 0


class Worker:
    """Runs queued jobs in a background thread; `wake` after queueing one."""

    def __init__(self, state: State, spool: Spool, exporter: Exporter, model: ModelConfig,
                 options: PipelineOptions | None = None, predictor: Predictor | None = None,
                 crop: CropConfig | None = None, localiser: LoadedLocaliser | None = None,
                 qa: QaConfig | None = None, output: OutputConfig | None = None) -> None:
        """`options`: threshold and clean-up (its crop fields come from `crop` and each job's own request).
        `qa`: what a QA FAIL does to the result; `output`: the SEG's viewer-compatibility choices.

        `predictor` and `localiser` replace the configured ones (tests, or an embedding application).
        """
        self._state = state
        self._spool = spool
        self._exporter = exporter
        self._model_config = model
        self._crop = crop or CropConfig()
        self._options = options or PipelineOptions()
        self._qa = qa or QaConfig()
        self._output = output or OutputConfig()
        self._predictor = predictor  # None: load the configured checkpoint on first use
        self._localiser = localiser
        self._loaded = False
        self._loop = PollingThread("ian-node-worker", self._pass, error_wait_s=IDLE_WAIT_S)
        self.totals = StageTotals(defaultdict(float))

    @property
    def predictor(self) -> Predictor:
        """Loaded on first use, so that `serve` starts listening at once; with the localiser, and checked
        against the crop mode (a checkpoint the configured crop cannot reproduce is refused)."""
        if not self._loaded:
            if self._localiser is None:
                self._localiser = load_crop_localiser(self._crop)
            if self._predictor is None:
                self._predictor = load_predictor(self._model_config, self._crop, self._localiser)
            elif (checkpoint := getattr(self._predictor, "checkpoint", None)) is not None:
                check_crop_compatible(checkpoint.meta, self._crop.mode, self._localiser)
            self._loaded = True
        assert self._predictor is not None
        return self._predictor

    @property
    def localiser(self) -> LoadedLocaliser | None:
        """The crop localiser (None unless the crop mode is ``auto``)."""
        _ = self.predictor  # loads both
        return self._localiser

    def _job_options(self, job: Job) -> tuple[dict[str, Any], PipelineOptions]:
        """The crop request this job runs with (its own, or the configured one) and the pipeline options."""
        record = job.api_crop_request or request_record(self._crop)
        return record, replace(self._options, crop=request_from_record(record),
                               min_confidence=self._crop.min_confidence,
                               segment_when_not_found=self._crop.segment_when_not_found,
                               keep_probabilities=self._output.probability_seg)

    def run_job(self, job: Job) -> None:
        """Segment one claimed job and hand its results (SEG, SR, [probability SEG]) to the exporter; record a
        failure otherwise."""
        started = time.perf_counter()
        logger.log(NOTICE, "job %d started: series %s v%d", job.id, job.series_uid, job.series_version)
        try:
            paths = [self._spool.path(i.path) for i in self._state.instances(job.series_uid, job.series_version)]
            request, options = self._job_options(job)
            t0 = time.perf_counter()
            try:
                result = segment_series(paths, self.predictor, options, self.localiser)
            except NoRegionError as exc:
                self._not_segmented(job, request, exc, started)
                return
            t1 = time.perf_counter()
            crop = result.crop
            assert crop is not None  # segment_series always records its crop
            output = self._output
            try:
                seg = result_segmentation(result, job.series_version, self.predictor.checkpoint,
                                          empty_segments=output.empty_segments,
                                          omit_empty_frames=output.omit_empty_frames)
                no_seg, omitted = None, omitted_flag(seg)
            except NoSegmentsError as exc:  # recorded with the segmentation below, then the job fails
                no_seg, omitted = exc, "right and left segments left out: empty"
            t2 = time.perf_counter()
            flag = " | ".join(f for f in (crop.problem or None, qa_flag(result.qa), omitted) if f) or None
            self._state.record_segmentation(
                job.id, crop_request=request, crop=crop.as_json(),
                outcome=JobOutcome.SEGMENTED if crop.found else JobOutcome.SEGMENTED_NO_REGION,
                flag=flag, voxels=result.voxels, timings=_rounded(result.timings),
                qa=[q.as_json() for q in result.qa])
            if not crop.found:
                logger.warning("job %d (series %s v%d): %s; segmented anyway in %s (crop.segment_when_not_found)",
                               job.id, job.series_uid, job.series_version, crop.problem,
                               ", ".join(f"{s.value} {c.mode.value}" for s, c in crop.sides.items()))
            if no_seg is not None:
                raise no_seg  # nothing is sent
            results = [seg, result_report(result, seg)]
            t3 = time.perf_counter()
            if output.probability_seg:
                results.append(result_probability_segmentation(
                    result, job.series_version, self.predictor.checkpoint, empty_segments=output.empty_segments,
                    omit_empty_frames=output.omit_empty_frames))
            t4 = time.perf_counter()
            hold = self._qa.on_fail == "hold" and qa_failed(result.qa)
            exported = self._exporter.submit(job.id, results, hold=hold)
        except Exception as exc:  # any failure is the job's, never the worker's
            error = failure_message(exc)  # what the state, the API and `jobs list` show
            self._state.fail_job(job.id, error)
            # a library's exception may quote the patient's values: the log gets them redacted
            logger.error("job %d ended: series %s v%d, %.1f s, failed: %s", job.id, job.series_uid,
                         job.series_version, time.perf_counter() - started, exception_text(exc))
            return
        timings = {**result.timings, "seg_build": t2 - t1, "sr_build": t3 - t2,
                   **({"probability_seg_build": t4 - t3} if self._output.probability_seg else {}), "total": t4 - t0}
        for stage, seconds in timings.items():
            self.totals.seconds[stage] += seconds
        self.totals.jobs += 1
        logger.info("job %d (series %s v%d): %s; %s", job.id, job.series_uid, job.series_version,
                    ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()),
                    ", ".join(f"{k} {v} voxels" for k, v in result.voxels.items()))
        logger.log(NOTICE, "job %d ended: series %s v%d, %.1f s, %s (%d instances); %s", job.id, job.series_uid,
                   job.series_version, time.perf_counter() - started, exported.state, len(paths), qa_summary(result.qa))

    def _not_segmented(self, job: Job, request: dict[str, Any], exc: NoRegionError, started: float) -> None:
        """No mandible region found: the job fails with that reason and outcome ``no_region``; nothing is sent."""
        self._state.record_segmentation(job.id, crop_request=request, crop=exc.crop.as_json(),
                                        outcome=JobOutcome.NO_REGION, flag=exc.crop.problem,
                                        timings=_rounded(exc.timings))
        self._state.fail_job(job.id, failure_message(exc))
        for stage, seconds in exc.timings.items():
            self.totals.seconds[stage] += seconds
        self.totals.jobs += 1
        logger.log(NOTICE, "job %d ended: series %s v%d, %.1f s, not segmented: %s", job.id, job.series_uid,
                   job.series_version, time.perf_counter() - started, exc.crop.problem)

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
