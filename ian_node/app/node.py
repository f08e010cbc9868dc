"""The running node: state, spool, SCP, series timers, worker and exporter, wired one way.

    SCP ──stored──▶ SeriesTracker ──job──▶ Worker ──SEG──▶ Exporter ──▶ targets
    API (POST /jobs) ──pull──▶ Puller ──job──▶ Worker

SQLite is the single source of truth, so `start` first recovers from it: temporaries of a write
that crashed are removed, jobs a crash interrupted are re-queued, results not yet delivered are
re-delivered, and the quiet-period timers of open series are re-armed. Only then do the HTTP API
and the SCP listen.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from ian_node.app.api import ApiServer, NodeApi
from ian_node.config import NodeConfig
from ian_node.export.exporter import Exporter
from ian_node.export.targets import build_targets
from ian_node.jobs.completion import SeriesTracker
from ian_node.jobs.worker import Worker
from ian_node.receive.pull import Puller
from ian_node.receive.scp import StorageSCP
from ian_node.segment.pipeline import PipelineOptions
from ian_node.storage.spool import Spool
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
        self.spool = Spool(config.storage.spool_dir)
        targets = build_targets(config.export.targets, config.dicom.ae_title)
        self.exporter = Exporter(self.state, self.spool, targets, config.export)
        self.worker = Worker(self.state, self.spool, self.exporter, config.model, options, predictor)
        self.tracker = SeriesTracker(self.state, self.spool, config.series, on_job=self.worker.wake)
        self.scp = StorageSCP(config.dicom, config.tls, self.state, self.spool, on_stored=self.tracker.instance_stored)
        self.puller = Puller(config, self.state, self.spool, settle=self.tracker.settle_now)
        self.api = ApiServer(NodeApi(config.api, self.state, self.worker, self.exporter, self.puller))
        self._stopped = threading.Event()

    def start(self) -> None:
        """Recover from the state, then start every part; the API and then the SCP listen last."""
        removed = self.spool.remove_stale_temporaries()
        recovery = self.state.recover()
        logger.info(
            "recovered: %d job(s) re-queued, %d failed after repeated interruptions, %d result(s) to deliver, "
            "%d open series, %d stale temporary file(s) removed",
            len(recovery.requeued_jobs), len(recovery.failed_jobs), len(recovery.exporting_jobs),
            len(recovery.awaiting_series), removed,
        )
        self.exporter.start()
        self.worker.start()
        self.tracker.start()
        self.api.start()
        self.scp.start()

    def stop(self) -> None:
        """Stop listening first (SCP, then the API once its requests finish), then the timers, the worker
        and the exporter; close the state."""
        self.scp.stop()
        self.api.stop()
        self.tracker.stop()
        self.worker.stop()
        self.exporter.stop()
        self.state.close()
        self._stopped.set()

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop cleanly."""

        def _signal(signum: int, _frame: FrameType | None) -> None:
            logger.info("signal %d: stopping", signum)
            self._stopped.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        # A timed wait: an untimed one was seen to miss a SIGTERM that arrived right after start-up.
        while not self._stopped.wait(0.5):
            pass
        self.stop()
