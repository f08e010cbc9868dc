"""Quality assurance per side: PASS / WARN / FAIL with the reasons an operator can act on.

The paper's discussion names the need: in one of its 51 nerves every model failed on every slice,
and nothing in a per-slice mask tells a trustworthy result from a failure. The verdict is computed
from the linked tract (`ian_node.segment.tract`), and travels with the result: the job record, the
API, the metrics and the TID 1500 report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class Verdict(StrEnum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class SideQA:
    """One side's verdict, its reasons (empty for PASS), and the figures it was judged on."""

    side: str  # "right" | "left"
    verdict: Verdict
    reasons: tuple[str, ...]
    gaps: int
    longest_gap_mm: float
    components: int
    length_mm: float
    mean_probability: float
    localiser_confidence: float | None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["verdict"] = self.verdict.value
        out["reasons"] = list(self.reasons)
        return out
