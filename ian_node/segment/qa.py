"""Quality assurance per side: PASS / WARN / FAIL with the reasons an operator can act on.

The paper's discussion names the need: in one of its 51 nerves every model failed on every slice,
and nothing in a per-slice mask tells a trustworthy result from a failure. The verdict is computed
from the linked tract (`ian_node.segment.tract`), and travels with the result: the job record, the
API, the metrics and the TID 1500 report.

`judge` applies these rules; the verdict is the worst one that fires, and each rule that fires adds
its reason (docs/tract.md has the same table and why):

=============================  ==============================  =================================
figure                         WARN when                       FAIL when
=============================  ==============================  =================================
detections                     -                               none ("no nerve found")
components after linking       -                               > 1 (a gap > max_gap_mm is left)
longest gap (before filling)   > 5 mm                          -
gaps (before filling)          >= 3                            -
components before linking      > 20                            -
tract length                   < 45 mm or > 135 mm             < 20 mm
mean probability on the tract  < 0.5                           < 0.25
localiser confidence (auto)    < 0.7                           -
=============================  ==============================  =================================

The numbers are the module constants below (`GAP_WARN_MM`, `GAPS_WARN`, `COMPONENTS_WARN`,
`LENGTH_RANGE_MM` with `ABOVE_FORAMEN_MM` added to its upper end, `LENGTH_FAIL_MM`,
`PROBABILITY_WARN`, `PROBABILITY_FAIL`, `CONFIDENCE_WARN`); each says where it comes from.
`components` in the record is the count *before* linking (how noisy the network's mask was); the
count after linking is 1 unless the FAIL rule above names it. The length is that of the tract's
centreline (`ian_node.segment.measure.centreline`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from ian_node.segment.tract import Tract

#: Adult IAN length from the mandibular to the mental foramen (mm): the issue's figure (about
#: 45-75 mm), taken as an assumption, not from a cited reference.
LENGTH_RANGE_MM = (45.0, 75.0)
#: How far above the mandibular foramen (mm) a tract may go on up the ramus: the paper's annotations,
#: and so the phantoms and the models trained on them, follow the nerve towards the cranial base.
#: The held-out phantoms' ground-truth tracts measure 101-130 mm (benchmarks/tract.py).
ABOVE_FORAMEN_MM = 60.0
#: A tract shorter than this (mm) is a fragment, not a nerve.
LENGTH_FAIL_MM = 20.0
#: A gap (mm along the tract, before filling) longer than this is filled but worth a look.
GAP_WARN_MM = 5.0
#: This many gaps or more along one tract: the network lost the nerve repeatedly.
GAPS_WARN = 3
#: More connected components than this before linking: a noisy mask with many look-alikes (the
#: bundled phantom model leaves 5-44 per side; the sides above 20 were its weaker ones).
COMPONENTS_WARN = 20
#: Mean network probability along the tract (gaps included) below which it is doubtful / wrong.
PROBABILITY_WARN = 0.5
PROBABILITY_FAIL = 0.25
#: Localiser confidence (crop ``auto``) below which the crop itself is doubtful; the localiser
#: refuses below its own minimum (0.5 for the bundled one).
CONFIDENCE_WARN = 0.7


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


def judge(side: str, tract: Tract, localiser_confidence: float | None, max_gap_mm: float) -> SideQA:
    """One side's verdict from its traced tract, by the rules of the module's table."""
    gaps = tract.gaps_mm
    longest = max(gaps, default=0.0)
    figures = dict(side=side, gaps=len(gaps), longest_gap_mm=round(longest, 2),
                   components=tract.components_before, length_mm=round(tract.length_mm, 2),
                   mean_probability=round(tract.mean_probability, 4),
                   localiser_confidence=None if localiser_confidence is None else round(float(localiser_confidence), 4))
    if tract.empty:
        return SideQA(verdict=Verdict.FAIL, reasons=("no nerve found",), **figures)
    fail, warn = [], []
    if tract.components_after > 1:
        fail.append(f"tract in {tract.components_after} pieces: a gap longer than {max_gap_mm:g} mm is left")
    if longest > GAP_WARN_MM:
        warn.append(f"longest gap {longest:.1f} mm (filled up to {max_gap_mm:g} mm)")
    if len(gaps) >= GAPS_WARN:
        warn.append(f"{len(gaps)} gaps along the tract")
    if tract.components_before > COMPONENTS_WARN:
        warn.append(f"{tract.components_before} components before linking")
    low, high = LENGTH_RANGE_MM[0], LENGTH_RANGE_MM[1] + ABOVE_FORAMEN_MM
    if tract.length_mm < LENGTH_FAIL_MM:
        fail.append(f"tract {tract.length_mm:.0f} mm long, a fragment (< {LENGTH_FAIL_MM:g} mm)")
    elif not low <= tract.length_mm <= high:
        warn.append(f"tract {tract.length_mm:.0f} mm long, outside {low:g}-{high:g} mm")
    if tract.mean_probability < PROBABILITY_FAIL:
        fail.append(f"mean probability {tract.mean_probability:.2f} along the tract (< {PROBABILITY_FAIL:g})")
    elif tract.mean_probability < PROBABILITY_WARN:
        warn.append(f"mean probability {tract.mean_probability:.2f} along the tract (< {PROBABILITY_WARN:g})")
    if localiser_confidence is not None and localiser_confidence < CONFIDENCE_WARN:
        warn.append(f"localiser confidence {localiser_confidence:.2f} (< {CONFIDENCE_WARN:g})")
    verdict = Verdict.FAIL if fail else Verdict.WARN if warn else Verdict.PASS
    return SideQA(verdict=verdict, reasons=tuple(fail + warn), **figures)
