"""One background loop shape for the node's worker and exporter.

Both do a pass over the SQLite state, then sleep until woken (a new job, a submitted result, an
operator's retry) or until the wait their pass asked for runs out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class PollingThread:
    """A daemon thread that calls `step` (which returns seconds to wait) until `stop`."""

    def __init__(self, name: str, step: Callable[[], float], error_wait_s: float) -> None:
        self._name = name
        self._step = step
        self._error_wait_s = error_wait_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        """True once `stop` was called: long passes check it between items."""
        return self._stop.is_set()

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                wait = self._step()
            except Exception:  # e.g. the state is unreadable for a moment: try again shortly
                logger.exception("%s: pass failed", self._name)
                wait = self._error_wait_s
            self._wake.wait(wait)
