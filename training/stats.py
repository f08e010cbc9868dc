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

Holm (step-down): sort the m p-values ascending, p_(i)·(m − i + 1) for i = 1..m, made monotone by
a running maximum and capped at 1. It controls the family-wise error as Bonferroni does and is never
less powerful; the per-nerve tests (`training.field_report`) use it.

Bootstrap confidence intervals resample *patients* (`patient_bootstrap_ci`): both nerves of a patient
move together, since they share the scan, the anatomy and the split. The statistic is the mean over
the resampled nerves; the interval is scipy's percentile bootstrap (BCa is unstable with a handful of
patients and undefined for a constant).

Ranking stability: whether the repeats agree on which network is better, independent of the pooled
table. Each repeat ranks the models by their mean test score (1 = best, ties share their average
rank); scipy's Kendall tau-b (ties counted as ties) compares every pair of repeats' rankings, and the
mean tau over the pairs sums it up, beside each model's mean rank over the repeats.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats as scipy_stats
from scipy.stats import rankdata

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


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values, in the order given."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError("Holm's correction needs a non-empty sequence of p-values")
    if np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {list(p_values)}")
    order = np.argsort(p, kind="stable")
    m = p.size
    stepped = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, stepped)
    return [float(v) for v in adjusted]


def patient_bootstrap_ci(values: Sequence[float], patients: Sequence[str], confidence: float = 0.95,
                         n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (one per nerve), resampling patients with all their
    nerves; NaN bounds with fewer than two patients, where resampling says nothing."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size != len(patients):
        raise ValueError(f"one patient per value is needed, got {v.size} values and {len(patients)} patients")
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError("the bootstrap needs at least one value, all finite")
    keys = sorted(set(patients))
    if len(keys) < 2:
        return math.nan, math.nan
    where = {k: i for i, k in enumerate(keys)}
    idx = np.array([where[p] for p in patients])
    sums = np.bincount(idx, weights=v, minlength=len(keys))
    counts = np.bincount(idx, minlength=len(keys)).astype(np.float64)

    def mean_of_nerves(s: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
        return s.sum(axis=axis) / c.sum(axis=axis)

    result = scipy_stats.bootstrap((sums, counts), mean_of_nerves, paired=True, vectorized=True,
                                   n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                                   rng=np.random.default_rng(seed))
    ci = result.confidence_interval
    return float(ci.low), float(ci.high)


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


@dataclass(frozen=True)
class RankAgreement:
    """Kendall's tau-b between the model rankings of two repeats (NaN when one ranking is all ties)."""

    repeat_a: int
    repeat_b: int
    tau: float
    p_value: float


@dataclass(frozen=True)
class RankingStability:
    """Per-repeat mean scores of each model and the rank agreement of every pair of repeats."""

    metric: str
    means: dict[int, dict[str, float]]  # repeat → model → mean score over its test images
    pairs: tuple[RankAgreement, ...]

    @property
    def ranks(self) -> dict[int, dict[str, float]]:
        """repeat → model → rank by mean score (1 = highest; ties share their average rank)."""
        return {r: ranks_of(means) for r, means in self.means.items()}

    @property
    def mean_ranks(self) -> dict[str, float]:
        """Each model's rank averaged over the repeats."""
        ranks = self.ranks
        models = next(iter(ranks.values())).keys()
        return {m: float(np.mean([ranks[r][m] for r in ranks])) for m in models}

    @property
    def mean_tau(self) -> float:
        """Mean tau over the pairs with a defined tau (NaN when there is none)."""
        taus = [p.tau for p in self.pairs if math.isfinite(p.tau)]
        return float(np.mean(taus)) if taus else math.nan


def repeat_means(scores: Iterable[ImageScore], metric: str = "dsc") -> dict[int, dict[str, float]]:
    """Mean `metric` per repeat and model, over the repeat's test images."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    values: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in scores:
        values[s.repeat][s.model].append(getattr(s, metric))
    return {r: {m: float(np.mean(v)) for m, v in sorted(models.items())} for r, models in sorted(values.items())}


def ranks_of(means: Mapping[str, float]) -> dict[str, float]:
    """1 = the highest mean; ties share their average rank."""
    models = list(means)
    ranks = rankdata([-means[m] for m in models], method="average")
    return {m: float(r) for m, r in zip(models, ranks, strict=True)}


def ranking_stability(scores: Iterable[ImageScore], metric: str = "dsc") -> RankingStability:
    """Kendall's tau between the repeats' model rankings by mean per-image `metric`, for every pair of repeats."""
    return rank_agreement(repeat_means(scores, metric), metric)


def rank_agreement(means: Mapping[int, Mapping[str, float]], metric: str) -> RankingStability:
    """Kendall's tau between the model rankings of every pair of repeats, from each repeat's mean scores.

    Every repeat must have scored the same models (otherwise the rankings are not comparable); with
    one repeat there are no pairs.
    """
    means = {r: dict(sorted(v.items())) for r, v in sorted(means.items())}
    if not means:
        raise ValueError("no scores to rank")
    repeats = sorted(means)
    models = sorted(means[repeats[0]])
    if len(models) < 2:
        raise ValueError(f"a ranking needs at least two models, got {models}")
    for r in repeats:
        if sorted(means[r]) != models:
            raise ValueError(f"repeat {r} scored models {sorted(means[r])}, repeat {repeats[0]} scored {models}")
    pairs = []
    for i, a in enumerate(repeats):
        for b in repeats[i + 1:]:
            x, y = ([means[r][m] for m in models] for r in (a, b))
            result = scipy_stats.kendalltau(x, y)  # NaN when one ranking is all ties
            pairs.append(RankAgreement(a, b, float(result.statistic), float(result.pvalue)))
    return RankingStability(metric, means, tuple(pairs))
