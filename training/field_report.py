"""The field-standard tables beside the paper's: per-nerve scores with patient-level statistics.

Input: ``reports/per_nerve_metrics.csv`` (`training.nerve_metrics`, one row per model row × repeat ×
test patient × side). Output, in the same folder: ``field_tables.md``, ``per_nerve_summary.csv``,
``per_nerve_tests.csv``, ``per_nerve_ranking.csv`` / ``_tau.csv`` / ``.md`` and ``fig_per_nerve.png``.
`write_field_reports` is called by ``train_benchmark`` whenever that CSV exists; ``python3 -m
training.field_report REPORTS_DIR`` rebuilds the files from it alone.

The unit of analysis is the nerve, the smallest thing that is close to independent (slices of one
nerve are not). How the rows become one value per nerve and model:

- **Which rows.** Only the (repeat, patient, side) that every model row scored (so every model is
  judged on the same nerves in the same repeats), and never a side whose ground truth is empty: it has
  no nerve to score. Both counts are logged and stated in the caption.
- **Repeats combined.** Monte Carlo repeats draw their test patients independently, so a patient can be
  tested in several repeats; its nerve is then one sample, not several. Its value is the **mean over
  the repeats that tested it** (of the repeats where the metric is defined: HD95, ASSD and the
  centreline distances are undefined where a prediction is empty; how many rows that was is in the
  summary as ``n_undefined``).

On those nerve values:

- **Summaries**: mean over nerves, median, and a 95% bootstrap CI that resamples *patients* (both sides
  move together; `training.stats.patient_bootstrap_ci`, percentile method, seeded, 2000 resamples).
- **Paired tests**: each model row against the reference (our network, ``ian_net``), per metric, over the
  nerves where both are defined: two-sided Wilcoxon signed-rank (`training.stats.wilcoxon_paired`),
  Holm-corrected over the comparators of one metric (the family: "is the reference different from
  each other row on this metric"). The mean difference (reference − comparator) gets a patient
  bootstrap CI too.
- **Ranking stability**: within each repeat the rows are ranked by their mean per-nerve DSC over that
  repeat's test nerves; each row's mean rank over the repeats, and Kendall's τ-b between every pair of
  repeats' rankings with their mean (`training.stats.rank_agreement`).

The paper's pooled per-image Wilcoxon test is repeated under "as in the paper" with its
pseudo-replication stated; its numbers are those of ``pvalues.md``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from model.registry import PAPER_NETWORK
from training.metrics import METRIC_LABELS
from training.nerve_metrics import NerveRow, read_per_nerve_csv
from training.report import (
    POOLED_TEST_NOTE,
    display_name,
    model_order,
    report_dir,
    save_figure,
    write_csv,
    write_ranking,
)
from training.stats import (
    PValueRow,
    RankingStability,
    holm,
    patient_bootstrap_ci,
    rank_agreement,
    wilcoxon_paired,
)

logger = logging.getLogger(__name__)

PER_NERVE_CSV = "per_nerve_metrics.csv"


@dataclass(frozen=True)
class FieldMetric:
    """A per-nerve metric: a `NerveRow` column or a ratio of two, and which direction is better (None:
    neither, the truth's value is best)."""

    name: str
    label: str
    higher_is_better: bool | None
    digits: int

    @property
    def header(self) -> str:
        return self.label + {True: " ↑", False: " ↓", None: ""}[self.higher_is_better]


FIELD_METRICS: dict[str, FieldMetric] = {m.name: m for m in (
    FieldMetric("dsc", "DSC", True, 3),
    FieldMetric("hd95_mm", "HD95 (mm)", False, 2),
    FieldMetric("assd_mm", "ASSD (mm)", False, 2),
    FieldMetric("cldice", "clDice", True, 3),
    FieldMetric("centreline_mean_mm", "Centreline dist. mean (mm)", False, 2),
    FieldMetric("centreline_max_mm", "Centreline dist. max (mm)", False, 2),
    FieldMetric("betti0_error", "Betti-0 error", False, 2),
    FieldMetric("components_pred", "Components", None, 2),
    FieldMetric("detected_length_fraction", "Detected / true length", True, 3),
    FieldMetric("length_ratio", "Predicted / true length", None, 3),
)}
#: The per-nerve table and the topology table; the tests leave out the two without a better direction.
NERVE_TABLE: tuple[str, ...] = ("dsc", "hd95_mm", "assd_mm", "cldice", "centreline_mean_mm", "centreline_max_mm")
TOPOLOGY_TABLE: tuple[str, ...] = ("cldice", "betti0_error", "components_pred", "detected_length_fraction",
                                   "length_ratio")
TESTED: tuple[str, ...] = ("dsc", "hd95_mm", "assd_mm", "cldice", "centreline_mean_mm", "centreline_max_mm",
                           "betti0_error", "detected_length_fraction")
FIGURE_METRICS: tuple[str, ...] = ("dsc", "hd95_mm", "assd_mm", "cldice", "betti0_error", "detected_length_fraction")


@dataclass(frozen=True)
class NerveSummary:
    """One model row's per-nerve values of one metric: mean [95% patient-bootstrap CI], median."""

    model: str
    metric: str
    n_nerves: int
    n_patients: int
    n_undefined: int  # rows (nerve × repeat) where the metric is undefined (an empty prediction)
    mean: float
    ci_low: float
    ci_high: float
    median: float


@dataclass(frozen=True)
class NerveTest:
    """Reference vs comparator on one metric, paired by nerve; differences are reference − comparator."""

    metric: str
    reference: str
    comparator: str
    n_nerves: int
    n_patients: int
    statistic: float
    p_value: float
    p_holm: float
    significant: bool
    mean_difference: float
    ci_low: float
    ci_high: float
    median_difference: float
    note: str = ""


def metric_value(row: NerveRow, metric: str) -> float:
    """A row's value of `metric`; the length ratios are over the true centreline's length."""
    if metric == "detected_length_fraction":
        return row.detected_length_mm / row.length_true_mm if row.length_true_mm > 0 else math.nan
    if metric == "length_ratio":
        return row.length_pred_mm / row.length_true_mm if row.length_true_mm > 0 else math.nan
    if metric not in FIELD_METRICS:
        raise ValueError(f"unknown per-nerve metric {metric!r}; valid: {', '.join(FIELD_METRICS)}")
    return float(getattr(row, metric))


def common_rows(rows: Iterable[NerveRow]) -> list[NerveRow]:
    """The rows of nerves with a ground truth that every model row scored in the same repeat."""
    rows = list(rows)
    if not rows:
        raise ValueError("no per-nerve rows")
    keys: dict[str, set[tuple[int, str, str]]] = defaultdict(set)
    for r in rows:
        keys[r.model].add((r.repeat, r.patient, r.side))
    shared = set.intersection(*keys.values())
    kept = [r for r in rows if (r.repeat, r.patient, r.side) in shared and not r.gt_empty]
    if not kept:
        raise ValueError(f"no nerve with a ground truth was scored by every model row ({sorted(keys)})")
    logger.info("per-nerve rows: %d kept of %d (%d not scored by every model, %d with an empty ground truth)",
                len(kept), len(rows), sum((r.repeat, r.patient, r.side) not in shared for r in rows),
                sum(r.gt_empty and (r.repeat, r.patient, r.side) in shared for r in rows))
    return kept


def nerve_values(rows: Iterable[NerveRow], metric: str) -> dict[str, dict[tuple[str, str], float]]:
    """model → (patient, side) → `metric` averaged over the repeats that tested the nerve (NaN where it is
    undefined in every one of them)."""
    acc: dict[str, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        acc[r.model][(r.patient, r.side)].append(metric_value(r, metric))
    out: dict[str, dict[tuple[str, str], float]] = {}
    for model, nerves in acc.items():
        out[model] = {}
        for nerve, values in sorted(nerves.items()):
            finite = [v for v in values if math.isfinite(v)]
            out[model][nerve] = float(np.mean(finite)) if finite else math.nan
    return out


def summarize_nerves(rows: Sequence[NerveRow], metrics: Sequence[str] = tuple(FIELD_METRICS), seed: int = 0,
                     n_resamples: int = 2000) -> list[NerveSummary]:
    """Mean [patient-bootstrap 95% CI] and median per model row and metric, over nerves."""
    out = []
    for metric in metrics:
        undefined: dict[str, int] = defaultdict(int)
        for r in rows:
            undefined[r.model] += not math.isfinite(metric_value(r, metric))
        for model, nerves in _ordered(nerve_values(rows, metric)):
            defined = [(k, v) for k, v in nerves.items() if math.isfinite(v)]
            if not defined:
                out.append(NerveSummary(model, metric, 0, 0, undefined[model], *(math.nan,) * 4))
                continue
            values = [v for _, v in defined]
            patients = [k[0] for k, _ in defined]
            lo, hi = patient_bootstrap_ci(values, patients, n_resamples=n_resamples, seed=seed)
            out.append(NerveSummary(model, metric, len(values), len(set(patients)), undefined[model],
                                    float(np.mean(values)), lo, hi, float(np.median(values))))
    return out


def compare_nerves(rows: Sequence[NerveRow], reference: str, metrics: Sequence[str] = TESTED, alpha: float = 0.05,
                   seed: int = 0, n_resamples: int = 2000) -> list[NerveTest]:
    """Wilcoxon signed-rank per metric, `reference` vs every other row on the nerves where both are defined,
    Holm-corrected over the comparators of each metric."""
    out = []
    for metric in metrics:
        values = nerve_values(rows, metric)
        if reference not in values:
            raise ValueError(f"reference row {reference!r} has no per-nerve rows; rows: {sorted(values)}")
        comparators = [m for m in model_order(values) if m != reference]
        raw = []
        for name in comparators:
            nerves = [k for k, v in values[reference].items()
                      if math.isfinite(v) and math.isfinite(values[name].get(k, math.nan))]
            a = np.array([values[reference][k] for k in nerves])
            b = np.array([values[name][k] for k in nerves])
            raw.append((name, nerves, a, b, wilcoxon_paired(a, b) if nerves else None))
        tested = [t for t in raw if t[4] is not None]
        adjusted = dict(zip((t[0] for t in tested), holm([t[4].p_value for t in tested]), strict=True)) if tested else {}
        for name, nerves, a, b, test in raw:
            if test is None:
                out.append(NerveTest(metric, reference, name, 0, 0, *(math.nan,) * 3, False, *(math.nan,) * 4,
                                     note="no nerve where both are defined"))
                continue
            patients = [k[0] for k in nerves]
            lo, hi = patient_bootstrap_ci(a - b, patients, n_resamples=n_resamples, seed=seed)
            out.append(NerveTest(metric, reference, name, len(nerves), len(set(patients)), test.statistic,
                                 test.p_value, adjusted[name], adjusted[name] < alpha, float(np.mean(a - b)), lo, hi,
                                 float(np.median(a - b)), test.note))
    return out


def nerve_ranking(rows: Iterable[NerveRow], metric: str = "dsc") -> RankingStability:
    """Each repeat's ranking of the model rows by mean per-nerve `metric` over its test nerves."""
    acc: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        v = metric_value(r, metric)
        if math.isfinite(v):
            acc[r.repeat][r.model].append(v)
    return rank_agreement({rep: {m: float(np.mean(v)) for m, v in ms.items()} for rep, ms in acc.items()}, metric)


def write_field_reports(rows: Iterable[NerveRow], out_dir: str | Path, pooled: Sequence[PValueRow] = (),
                        reference: str | None = None, seed: int = 0, n_resamples: int = 2000) -> dict[str, Path]:
    """Every per-nerve artefact (module docstring) from the rows of ``per_nerve_metrics.csv``."""
    out = report_dir(out_dir)
    all_rows = list(rows)
    kept = common_rows(all_rows)
    models = model_order({r.model for r in kept})
    reference = reference or (PAPER_NETWORK if PAPER_NETWORK in models else models[0])
    summaries = summarize_nerves(kept, seed=seed, n_resamples=n_resamples)
    tests = compare_nerves(kept, reference, seed=seed, n_resamples=n_resamples) if len(models) > 1 else []
    paths = {"per_nerve_summary_csv": out / "per_nerve_summary.csv", "field_tables_md": out / "field_tables.md"}
    summary_fields = [f.name for f in fields(NerveSummary)]
    write_csv(paths["per_nerve_summary_csv"], summary_fields, [[getattr(s, f) for f in summary_fields]
                                                               for s in summaries])
    if tests:
        paths["per_nerve_tests_csv"] = out / "per_nerve_tests.csv"
        test_fields = [f.name for f in fields(NerveTest)]
        write_csv(paths["per_nerve_tests_csv"], test_fields, [[getattr(t, f) for f in test_fields] for t in tests])
    ranking = None
    if len(models) > 1:
        ranking = nerve_ranking(kept)
        paths["per_nerve_ranking_csv"], paths["per_nerve_ranking_tau_csv"], paths["per_nerve_ranking_md"] = (
            write_ranking(ranking, out, stem="per_nerve_ranking", unit="test nerve"))
    lines = _tables_md(all_rows, kept, summaries, tests, ranking, pooled, n_resamples)
    paths["field_tables_md"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["fig_per_nerve"] = plot_per_nerve(kept, summaries, out / "fig_per_nerve.png")
    logger.info("wrote %d per-nerve report files to %s (%d model rows, reference %s)", len(paths), out,
                len(models), reference)
    return paths


def write_field_reports_if_present(out_dir: str | Path, pooled: Sequence[PValueRow] = ()) -> dict[str, Path]:
    """`write_field_reports` from ``out_dir/per_nerve_metrics.csv`` when there is one (train_benchmark's hook)."""
    path = Path(out_dir) / PER_NERVE_CSV
    if not path.exists():
        logger.info("no %s: no per-nerve reports", path)
        return {}
    return write_field_reports(read_per_nerve_csv(path), out_dir, pooled=pooled)


def plot_per_nerve(rows: Sequence[NerveRow], summaries: Sequence[NerveSummary], path: str | Path,
                   metrics: Sequence[str] = FIGURE_METRICS) -> Path:
    """Per metric: every nerve's value (dots) and each row's mean with its patient-bootstrap 95% CI (bars)."""
    table = {(s.model, s.metric): s for s in summaries}
    models = model_order({r.model for r in rows})
    rng = np.random.default_rng(0)  # jitter only
    fig = Figure(figsize=(3.0 * len(metrics), 4.2 + 0.08 * len(models)), dpi=120, layout="constrained")
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        values = nerve_values(rows, metric)
        for x, model in enumerate(models):
            v = np.array([u for u in values.get(model, {}).values() if math.isfinite(u)])
            ax.scatter(x + rng.uniform(-0.18, 0.18, v.size), v, s=8, alpha=0.35, color="tab:blue", linewidths=0)
            s = table.get((model, metric))
            if s is not None and s.n_nerves:
                lo, hi = (s.ci_low, s.ci_high) if math.isfinite(s.ci_low) else (s.mean, s.mean)
                ax.errorbar([x], [s.mean], yerr=[[s.mean - lo], [hi - s.mean]], fmt="o", color="black", capsize=4,
                            markersize=5)
        ax.set_xticks(range(len(models)), [display_name(m) for m in models], rotation=45, ha="right")
        ax.set_title(FIELD_METRICS[metric].label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Per nerve (mean over repeats): mean and 95% CI, bootstrap over patients", fontsize=10)
    return save_figure(fig, path)


def _ordered(values: dict[str, dict]) -> list[tuple[str, dict]]:
    return [(m, values[m]) for m in model_order(values)]


def _cell(s: NerveSummary) -> str:
    if not s.n_nerves:
        return "–"
    d = FIELD_METRICS[s.metric].digits
    ci = f" [{s.ci_low:.{d}f}, {s.ci_high:.{d}f}]" if math.isfinite(s.ci_low) else ""
    return f"{s.mean:.{d}f}{ci}"


def _p(p: float) -> str:
    return "–" if not math.isfinite(p) else (f"{p:.2e}" if p < 0.001 else f"{p:.3f}")


def _summary_table(title: str, metrics: Sequence[str], summaries: Sequence[NerveSummary]) -> list[str]:
    table = {(s.model, s.metric): s for s in summaries}
    models = model_order({s.model for s in summaries})
    lines = [title, "", "| Model | Nerves (patients) | " + " | ".join(FIELD_METRICS[m].header for m in metrics) + " |",
             "|---" * (len(metrics) + 2) + "|"]
    for model in models:
        first = table[(model, metrics[0])]
        lines.append(f"| {display_name(model)} | {first.n_nerves} ({first.n_patients}) | "
                     + " | ".join(_cell(table[(model, m)]) for m in metrics) + " |")
    undefined = {m: sum(table[(x, m)].n_undefined for x in models) for m in metrics}
    notes = [f"{FIELD_METRICS[m].label}: {n}" for m, n in undefined.items() if n]
    if notes:
        lines += ["", "Rows (nerve × repeat) where a metric is undefined (an empty prediction), left out of its "
                  "mean: " + "; ".join(notes) + "."]
    return lines


def _tables_md(all_rows: Sequence[NerveRow], kept: Sequence[NerveRow], summaries: Sequence[NerveSummary],
               tests: Sequence[NerveTest], ranking: RankingStability | None, pooled: Sequence[PValueRow],
               n_resamples: int) -> list[str]:
    repeats = sorted({r.repeat for r in kept})
    nerves = {(r.patient, r.side) for r in kept}
    unit = (f"One value per nerve and model row: the mean over the repeats that tested it ({len(nerves)} nerves of "
            f"{len({p for p, _ in nerves})} patients, repeats {', '.join(map(str, repeats))}; "
            f"{len(all_rows) - len(kept)} of {len(all_rows)} rows left out: not scored by every row, or no nerve in "
            f"the ground truth). Mean [95% CI]: percentile bootstrap over patients ({n_resamples} resamples, "
            "both sides of a patient together).")
    lines = ["# Per-nerve results (field standard)", "", unit, ""]
    lines += _summary_table("**Table F1.** Per-nerve overlap and distances, in mm of the source series.",
                            NERVE_TABLE, summaries)
    lines += [""] + _summary_table("**Table F2.** Topology: clDice, Betti-0 error (|components predicted − true|), "
                                   "predicted components, and the true centreline's length found within 2 mm "
                                   "of the prediction and the predicted centreline's length, each over the true "
                                   "length.", TOPOLOGY_TABLE, summaries)
    if tests:
        m = len({t.comparator for t in tests})
        lines += ["", f"**Table F3.** Paired tests per nerve: {display_name(tests[0].reference)} against each row. "
                  "Two-sided Wilcoxon signed-rank test on the per-nerve values (nerves where both are defined); "
                  f"p-values Holm-corrected over the {m} comparisons of each metric (* adjusted p < 0.05). "
                  "Δ = reference − comparator, mean [95% patient-bootstrap CI].", "",
                  "| Metric | Row | Nerves | Δ mean [95% CI] | p | p (Holm) |", "|---|---|---|---|---|---|"]
        for t in tests:
            d = FIELD_METRICS[t.metric].digits
            delta = "–" if not t.n_nerves else (f"{t.mean_difference:+.{d}f}" + (
                f" [{t.ci_low:+.{d}f}, {t.ci_high:+.{d}f}]" if math.isfinite(t.ci_low) else ""))
            lines.append(f"| {FIELD_METRICS[t.metric].label} | {display_name(t.comparator)} | {t.n_nerves} | {delta} | "
                         f"{_p(t.p_value)} | {_p(t.p_holm)}{' *' if t.significant else ''} |")
    if ranking is not None:
        mean_rank = ranking.mean_ranks
        lines += ["", f"**Table F4.** Ranking stability over {len(ranking.means)} repeat(s): mean rank by mean "
                  "per-nerve DSC within each repeat (1 = best), and Kendall's τ-b between the repeats' rankings "
                  f"(mean over {len(ranking.pairs)} pair(s): "
                  + (f"{ranking.mean_tau:.3f}" if math.isfinite(ranking.mean_tau) else "undefined")
                  + "). Per repeat: `per_nerve_ranking.md`.", "", "| Model | Mean rank |", "|---|---|"]
        lines += [f"| {display_name(m)} | {mean_rank[m]:.2f} |"
                  for m in sorted(mean_rank, key=lambda x: (mean_rank[x], x))]
    lines += ["", "**As in the paper.** The pooled per-image Wilcoxon test (`pvalues.md`, Bonferroni)."]
    if pooled:
        table = {(r.comparator, r.metric): r for r in pooled}
        metrics = list(dict.fromkeys(r.metric for r in pooled))
        lines += ["", "| Row | " + " | ".join(f"{METRIC_LABELS.get(m, m)} p (adj.)" for m in metrics) + " | Images |",
                  "|---" * (len(metrics) + 2) + "|"]
        for c in model_order({r.comparator for r in pooled}):
            lines.append(f"| {display_name(c)} | " + " | ".join(
                _p(table[(c, m)].p_adjusted) + (" *" if table[(c, m)].significant else "") for m in metrics)
                + f" | {table[(c, metrics[0])].n} |")
    lines += ["", POOLED_TEST_NOTE]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild the per-nerve reports of a benchmark's reports folder from its ``per_nerve_metrics.csv``."""
    parser = argparse.ArgumentParser(prog="python3 -m training.field_report", description=main.__doc__)
    parser.add_argument("reports", type=Path, help="folder holding per_nerve_metrics.csv (and pvalues.csv)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pooled = _read_pvalues(args.reports / "pvalues.csv")
    paths = write_field_reports(read_per_nerve_csv(args.reports / PER_NERVE_CSV), args.reports, pooled=pooled,
                                seed=args.seed, n_resamples=args.resamples)
    for p in paths.values():
        print(p)
    return 0


def _read_pvalues(path: Path) -> list[PValueRow]:
    """The rows of ``pvalues.csv`` (`training.report.write_pvalues`); none when there is no such file."""
    if not path.exists():
        return []
    kinds = {f.name: f.type for f in fields(PValueRow)}
    parse = {"int": int, "float": float, "bool": lambda t: t == "True", "str": str}
    with path.open(newline="", encoding="utf-8") as f:
        return [PValueRow(**{k: parse[str(kinds[k])](v) for k, v in r.items()}) for r in csv.DictReader(f)]


if __name__ == "__main__":
    raise SystemExit(main())
