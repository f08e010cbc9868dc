"""What the SCP answers and refuses: C-STORE statuses, refusal reasons and their thread-safe counts.

The counts are rendered by the metrics endpoint (``ian_node_refusals_total``,
``ian_node_store_failures_total``), with the spool's free space read at scrape time
(``ian_node_spool_free_bytes``, ``ian_node_spool_min_free_bytes``). Each refusal is counted; each is
logged once at WARNING, except C-STOREs refused for lack of space, which come in bursts (every
instance of every association) and are logged by :class:`SpaceRefusals`' rule instead.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from enum import IntEnum, StrEnum

from ian_node.storage.spool import FreeSpace


class Status(IntEnum):
    """The C-STORE statuses this SCP answers (PS3.4 B.2.3, PS3.7 C.4)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC210


class Refusal(StrEnum):
    """Why the SCP refused a peer; the value is the ``reason`` label of ``ian_node_refusals_total``."""

    CALLING_AE_NOT_ALLOWED = "calling_ae_not_allowed"
    CALLING_AE_WRONG_HOST = "calling_ae_wrong_host"
    CALLED_AE_MISMATCH = "called_ae_mismatch"
    TOO_MANY_ASSOCIATIONS = "too_many_associations"
    ASSOCIATION_REJECTED = "association_rejected"  # any other A-ASSOCIATE-RJ
    TLS_HANDSHAKE_FAILED = "tls_handshake_failed"
    SOP_CLASS_NOT_CONFIGURED = "sop_class_not_configured"
    NO_ACCEPTABLE_TRANSFER_SYNTAX = "no_acceptable_transfer_syntax"
    ROLE_NOT_ACCEPTED = "role_not_accepted"
    CONTEXT_REJECTED = "context_rejected"  # any other presentation-context result
    DISK_FULL = "disk_full"  # a C-STORE answered 0xA700: spool below its minimum free space, or a disk full


class ReceiveCounters:
    """Refusals by reason and failed C-STORE answers by status since the SCP was built (thread-safe);
    ``space`` reads the spool's free space for the metrics."""

    def __init__(self, space: Callable[[], FreeSpace] | None = None) -> None:
        self._lock = threading.Lock()
        self._refusals: Counter[Refusal] = Counter()
        self._failures: Counter[int] = Counter()
        self._space = space

    def refused(self, reason: Refusal) -> None:
        with self._lock:
            self._refusals[reason] += 1

    def store_failed(self, status: int) -> None:
        with self._lock:
            self._failures[status] += 1

    def refusals(self) -> dict[str, int]:
        """Every reason, those never seen at 0 (so that a rate starts from a sample)."""
        with self._lock:
            return {str(reason): self._refusals[reason] for reason in Refusal}

    def store_failures(self) -> dict[str, int]:
        """``"0xC210"`` -> count for every failure status this SCP answers, those never answered at 0."""
        with self._lock:
            statuses = sorted({*(int(s) for s in Status if s != Status.SUCCESS), *self._failures})
            return {f"0x{status:04X}": self._failures[status] for status in statuses}

    def spool_space(self) -> FreeSpace | None:
        """The spool's free space now (None when there is no spool, or its file system cannot be read)."""
        if self._space is None:
            return None
        try:
            return self._space()
        except OSError:
            return None


class SpaceRefusals:
    """When to log C-STOREs refused for lack of space (thread-safe).

    At most one WARNING per ``interval_s``: the first refusal of a run, then one a while later saying
    how many went unlogged meanwhile. The first instance stored after a run that was logged ends it
    with one line too. A run that falls wholly between two WARNINGs (the free space hovering at the
    minimum) gets no line of its own: its refusals are counted in the next WARNING.
    """

    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._run = 0  # refused since the last instance stored
        self._run_logged = False  # whether a WARNING told of this run
        self._unlogged = 0  # refused since the last WARNING, not counting it
        self._logged_at: float | None = None

    def refused(self) -> int | None:
        """Count one refusal; None: do not log it at WARNING, else how many went unlogged before it."""
        now = self._clock()
        with self._lock:
            self._run += 1
            if self._logged_at is not None and now - self._logged_at < self.interval_s:
                self._unlogged += 1
                return None
            unlogged, self._unlogged, self._logged_at, self._run_logged = self._unlogged, 0, now, True
            return unlogged

    def stored(self) -> int | None:
        """An instance was stored: the count of the logged run of refusals it ends, if any."""
        if not self._run:  # the common case, without the lock (a stale read only delays the line)
            return None
        with self._lock:
            run, logged, self._run, self._run_logged = self._run, self._run_logged, 0, False
        return run if run and logged else None
