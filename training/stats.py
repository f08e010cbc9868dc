"""Paired significance tests: our network against each comparator, per metric (the paper's protocol).

The test is scipy's Wilcoxon signed-rank test on per-image scores paired by image (repeat, patient,
side, slice), two-sided, with scipy's defaults otherwise (`zero_method="wilcox"`: zero differences
are dropped; `method="auto"`: exact for small samples without ties, normal approximation otherwise).

When every paired difference is zero (identical scores, or a single image pair with equal scores)
there is no evidence of a difference and nothing to rank: we return statistic 0.0 and p = 1.0 with
`note="all differences are zero"` rather than scipy's warning-laden undefined case.

Bonferroni: p_adjusted = min(1, p · m). The family of m comparisons is by default the comparisons of
one metric (m = number of comparators, as "ours vs each comparator" is asked per metric); pass
`family="all"` to correct over every metric as well (m = comparators × metrics).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats as scipy_stats

from training.metrics import METRICS, ImageScore

logger = logging.getLogger(__name__)

ALL_ZERO_NOTE = "all differences are zero"


@dataclass(frozen=True)
class PairedTest:
    """One Wilcoxon signed-rank test on `n` pairs, `n_nonzero` of which differ."""

    n: int
    n_nonzero: int
    statistic: float
    p_value: float
    note: str = ""


@dataclass(frozen=True)
class PValueRow:
    """One row of the p-value table; differences are reference minus comparator."""

    metric: str
    reference: str
    comparator: str
    n: int
    statistic: float
    p_value: float
    p_adjusted: float
    significant: bool
    mean_difference: float
    median_difference: float
    note: str = ""


def wilcoxon_paired(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Two-sided Wilcoxon signed-rank test of paired scores a[i] vs b[i]."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"paired scores must be two 1-D sequences of equal length, got {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("paired test needs at least one pair")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("paired scores must be finite")
    diff = x - y
    n_nonzero = int(np.count_nonzero(diff))
    if n_nonzero == 0:
        return PairedTest(n=int(x.size), n_nonzero=0, statistic=0.0, p_value=1.0, note=ALL_ZERO_NOTE)
    with warnings.catch_warnings():
        # scipy warns when it falls back from the exact to the approximate method (ties, zeros).
        warnings.simplefilter("ignore", UserWarning)
        result = scipy_stats.wilcoxon(x, y, zero_method="wilcox", alternative="two-sided")
    return PairedTest(
        n=int(x.size), n_nonzero=n_nonzero, statistic=float(result.statistic), p_value=float(result.pvalue)
    )


def bonferroni(p_values: Sequence[float], m: int | None = None) -> list[float]:
    """Bonferroni-adjusted p-values, min(1, p·m), with m = len(p_values) unless given."""
    m = len(p_values) if m is None else m
    if m < 1:
        raise ValueError(f"the number of comparisons must be >= 1, got {m}")
    for p in p_values:
        if not (0.0 <= p <= 1.0) or math.isnan(p):
            raise ValueError(f"p-values must lie in [0, 1], got {p}")
    return [min(1.0, p * m) for p in p_values]


def compare_to_reference(
    scores: Iterable[ImageScore],
    reference: str,
    metrics: Sequence[str] = METRICS,
    alpha: float = 0.05,
    family: Literal["metric", "all"] = "metric",
) -> list[PValueRow]:
    """The p-value table: `reference` against every other model, for each metric, Bonferroni-corrected.

    Models must have been scored on exactly the same images; a mismatch is an error, not a silent
    intersection, because it means the models were not evaluated on the same test sets.
    """
    if family not in ("metric", "all"):
        raise ValueError(f"family must be 'metric' or 'all', got {family!r}")
    by_model = _index_by_model(scores)
    if reference not in by_model:
        raise ValueError(f"reference model {reference!r} has no scores; models present: {sorted(by_model)}")
    comparators = [m for m in by_model if m != reference]
    if not comparators:
        raise ValueError(f"no comparator models besides {reference!r}")
    ref = by_model[reference]
    keys = sorted(ref)
    for name in comparators:
        if set(by_model[name]) != set(ref):
            missing = len(set(ref) - set(by_model[name]))
            extra = len(set(by_model[name]) - set(ref))
            raise ValueError(
                f"model {name!r} was scored on different images than {reference!r} "
                f"({missing} missing, {extra} extra): the paired test needs the same test images"
            )
    m = len(comparators) * (len(metrics) if family == "all" else 1)
    rows: list[PValueRow] = []
    for metric in metrics:
        a = np.array([getattr(ref[k], metric) for k in keys], dtype=np.float64)
        for name in comparators:
            b = np.array([getattr(by_model[name][k], metric) for k in keys], dtype=np.float64)
            test = wilcoxon_paired(a, b)
            p_adj = bonferroni([test.p_value], m=m)[0]
            rows.append(
                PValueRow(
                    metric=metric,
                    reference=reference,
                    comparator=name,
                    n=test.n,
                    statistic=test.statistic,
                    p_value=test.p_value,
                    p_adjusted=p_adj,
                    significant=p_adj < alpha,
                    mean_difference=float(np.mean(a - b)),
                    median_difference=float(np.median(a - b)),
                    note=test.note,
                )
            )
    logger.info("compared %s against %d models on %d images (Bonferroni m=%d)", reference, len(comparators), len(keys), m)
    return rows


def _index_by_model(scores: Iterable[ImageScore]) -> dict[str, dict[tuple, ImageScore]]:
    out: dict[str, dict[tuple, ImageScore]] = defaultdict(dict)
    for s in scores:
        if s.key in out[s.model]:
            raise ValueError(f"model {s.model!r} has two scores for repeat {s.repeat}, side {s.side}, slice {s.slice}")
        out[s.model][s.key] = s
    return dict(out)
