"""The running node: state, spool, SCP, series timers, worker and exporter, wired one way.

    SCP ──stored──▶ SeriesTracker ──job──▶ Worker ──SEG──▶ Exporter ──▶ targets
    API (POST /jobs) ──pull──▶ Puller ──job──▶ Worker

SQLite is the single source of truth, so `start` first recovers from it: temporaries of a write
that crashed are removed, jobs a crash interrupted are re-queued, results not yet delivered are
re-delivered, and the quiet-period timers of open series are re-armed. Only then do the HTTP API
and the SCP listen.

What an operator sees at the default level (NOTICE, :mod:`ian_node.logs`): one start-up block (DICOM
listener, HTTP API, model, selection rules, storage and targets), the worker's line per job started
and ended, and one line at shutdown.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from ian_node import __version__
from ian_node.app.api import NodeApi, create_app
from ian_node.app.metrics import NodeMetrics
from ian_node.app.server import ApiServer
from ian_node.app.status import StatusSources, status_router
from ian_node.config import NodeConfig
from ian_node.export.exporter import Exporter
from ian_node.export.targets import build_targets
from ian_node.jobs.completion import SeriesTracker
from ian_node.jobs.worker import Worker
from ian_node.logs import NOTICE
from ian_node.receive.pull import Puller
from ian_node.receive.scp import StorageSCP
from ian_node.segment.pipeline import PipelineOptions
from ian_node.storage.spool import Spool, size_text
from ian_node.storage.state import State
from model.predictor import Predictor

logger = logging.getLogger(__name__)


class Node:
    """One node process; `start` / `stop`, or `serve_forever` until SIGTERM or SIGINT."""

    def __init__(self, config: NodeConfig, options: PipelineOptions | None = None,
                 predictor: Predictor | None = None) -> None:
        """`predictor` replaces the configured checkpoint (tests, or an embedding application)."""
        self.config = config
        config.storage.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.state = State(config.storage.state_path)
        self.spool = Spool(config.storage.spool_dir, min_free_bytes=config.storage.min_free_bytes,
                           min_free_percent=config.storage.min_free_percent)
        targets = build_targets(config.export.targets, config.dicom.ae_title)
        self.exporter = Exporter(self.state, self.spool, targets, config.export)
        self.worker = Worker(self.state, self.spool, self.exporter, config.model, options, predictor, crop=config.crop,
                             qa=config.qa, output=config.output)
        self.tracker = SeriesTracker(self.state, self.spool, config.series, on_job=self.worker.wake)
        self.scp = StorageSCP(config.dicom, config.tls, self.state, self.spool, on_stored=self.tracker.instance_stored)
        self.puller = Puller(config, self.state, self.spool, settle=self.tracker.settle_now)
        self.metrics = NodeMetrics(self.state, receive=self.scp.counters)
        self.worker.totals = self.metrics.stage_totals  # each job's stage seconds feed the histogram
        self.api = ApiServer(create_app(NodeApi(self.state, self.worker, self.exporter, self.puller, self.metrics),
                                        config.api), config.api)
        self.api.app.include_router(status_router(StatusSources(config, self.state, self.spool, self.worker, self.exporter)))
        self._stopped = threading.Event()
        self._started_at: float | None = None

    def start(self) -> None:
        """Load the model, recover from the state, then start every part; the API and then the SCP listen last.

        The API's port is taken before anything starts: a port in use stops the start (ApiStartError)."""
        self._started_at = time.monotonic()
        predictor = self.worker.predictor  # a checkpoint that cannot be loaded stops the start, not every job
        self.api.bind()
        removed = self.spool.remove_stale_temporaries()
        recovery = self.state.recover()
        recovered = (len(recovery.requeued_jobs), len(recovery.failed_jobs), len(recovery.exporting_jobs),
                     len(recovery.awaiting_series), removed)
        logger.log(
            NOTICE if any(recovered) else logging.INFO,
            "recovered: %d job(s) re-queued, %d failed after repeated interruptions, %d result(s) to deliver, "
            "%d open series, %d stale temporary file(s) removed", *recovered,
        )
        self.exporter.start()
        self.worker.start()
        self.tracker.start()
        self.api.start()
        self.scp.start()
        self._log_startup(predictor)

    def _log_startup(self, predictor: Predictor) -> None:
        """The start-up block: everything an operator needs to know what this node will do."""
        c = self.config
        tls = "on (mutual, client certificates required)" if c.tls.mutual else "on" if c.tls.enabled else "off"
        allowed = len(c.dicom.allowed_calling_aes)
        logger.log(NOTICE, "ian-node %s listening: DICOM AE %s on %s:%d, TLS %s, calling-AE allow-list: %s",
                   __version__, c.dicom.ae_title, c.dicom.bind, self.scp.port, tls,
                   f"{allowed} AE title(s)" if allowed else "empty (any calling AE)")
        host = f"[{c.api.bind}]" if ":" in c.api.bind else c.api.bind
        logger.log(NOTICE, "HTTP API: http://%s:%d (%s)", host, self.api.port,
                   "bearer token required" if c.api.token else "no token")
        # an embedding application (or a test) may pass any object with the predictor's interface
        checkpoint = getattr(predictor, "checkpoint", None)
        device = getattr(predictor, "device", "its own device")
        if checkpoint is None:
            logger.log(NOTICE, "model: in-memory network (no checkpoint) on %s", device)
        else:
            meta = checkpoint.meta
            logger.log(NOTICE, "model: %s %s, sha256 %s, on %s%s", meta.architecture, meta.variant,
                       checkpoint.sha256[:12], device, f" [{meta.label}]" if meta.label else "")
        logger.log(NOTICE, "crop: %s", self._crop_text())
        logger.log(NOTICE, "results: SEG (empty frames %s, an empty side %s), TID 1500 SR%s; a QA FAIL is %s",
                   "omitted" if c.output.omit_empty_frames else "stored",
                   "left out" if c.output.empty_segments == "omit" else "kept with one empty frame",
                   " and probability SEG" if c.output.probability_seg else "",
                   "held until `ian-node jobs retry`" if c.qa.on_fail == "hold" else "sent, flagged")
        s = c.series
        logger.log(NOTICE, "selection: modalities %s, series description %s, at least %d slices, quiet period %g s, "
                   "unselected series: %s", ",".join(s.modalities),
                   f"matching /{s.description_pattern}/" if s.description_pattern else "any",
                   s.min_slices, s.quiet_period_s, s.retention)
        targets = ", ".join(f"{t.name} ({t.kind})" for t in c.export.targets) or "none (results are kept only)"
        logger.log(NOTICE, "storage: state %s, spool %s (keeps %s free: min_free_bytes %d, min_free_percent %g); "
                   "export targets: %s", c.storage.state_path, c.storage.spool_dir,
                   size_text(self.spool.free_space().min_free_bytes), c.storage.min_free_bytes,
                   c.storage.min_free_percent, targets)

    def _crop_text(self) -> str:
        """The start-up line's crop: the mode, and the localiser or boxes it uses."""
        crop = self.config.crop
        if crop.mode == "auto":
            localiser = self.worker.localiser
            name = "bundled" if crop.localiser is None else str(crop.localiser)
            threshold = crop.min_confidence if crop.min_confidence is not None else (
                localiser.meta.min_confidence if localiser is not None else float("nan"))
            return (f"auto (localiser {name}, sha256 {localiser.sha256[:12] if localiser else '?'}, min confidence "
                    f"{threshold:.2f}); no region found: "
                    + ("segment anyway in its boxes, flagged" if crop.segment_when_not_found else "not segmented"))
        if crop.mode == "half":
            return "half (each left-right half of the volume)"
        boxes = crop.boxes or {}
        return f"{crop.mode} " + ", ".join(f"{side} {[list(r) for r in box]} mm" for side, box in boxes.items())

    def stop(self, reason: str = "") -> None:
        """Stop listening first (SCP, then the API once its requests finish), then the timers, the worker
        and the exporter; close the state."""
        self.scp.stop()
        self.puller.cancel()  # a pull in flight ends now rather than holding up the API's stop
        self.api.stop()
        self.tracker.stop()
        self.worker.stop()
        self.exporter.stop()
        self.state.close()
        self._stopped.set()
        uptime = 0.0 if self._started_at is None else time.monotonic() - self._started_at
        logger.log(NOTICE, "stopped%s after %.0f s; %d job(s) segmented", f" on {reason}" if reason else "",
                   uptime, self.worker.totals.jobs)

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop cleanly."""
        received: list[int] = []

        def _signal(signum: int, _frame: FrameType | None) -> None:
            received.append(signum)  # logged by the main loop: a signal handler must not take logging's locks
            self._stopped.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        # A timed wait: an untimed one was seen to miss a SIGTERM that arrived right after start-up.
        while not self._stopped.wait(0.5):
            pass
        reason = signal.Signals(received[0]).name if received else ""
        logger.info("%s: stopping", reason or "stop requested")
        self.stop(reason)
