"""What the SCP answers and refuses: C-STORE statuses, refusal reasons and their thread-safe counts.

The counts are rendered by the metrics endpoint (``ian_node_refusals_total``,
``ian_node_store_failures_total``), one count per WARNING line the SCP logs.
"""

from __future__ import annotations

import threading
from collections import Counter
from enum import IntEnum, StrEnum


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


class ReceiveCounters:
    """Refusals by reason and failed C-STORE answers by status since the SCP was built (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refusals: Counter[Refusal] = Counter()
        self._failures: Counter[int] = Counter()

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
