"""The paper's tables and figures, written from in-memory records into an output folder.

Fig 5 and Fig 6 (pictures of slices) are in `training.figures`.
Every function takes records (per-image `ImageScore`s, p-value rows, run timings, image arrays) and a
path, and writes one artefact; nothing here reads model outputs or training state. Figures use
matplotlib's object API (`Figure`, rendered by Agg), so no pyplot state or display is involved.

Summary statistics: mean, sample standard deviation (ddof = 1; 0 for a single image) and median
over all test images of all repeats, per model and metric. Failure rates follow `training.metrics`.
Beside the paper's tables, with their numbers unchanged: Table 2's complete failures split by cause
(no prediction, misplaced, prediction on a nerve-free slice) and the false-positive table of the
nerve-free slices (`fp_nerve_free.md`), both from the pixel counts the per-image CSV now keeps. The
paper's pooled per-image test is labelled "as in the paper": its images are not independent samples
(`training.field_report` tests per nerve).
With two or more repeats, `write_ranking` adds each repeat's ranking of the models and Kendall's tau
between the repeats (`training.stats.ranking_stability`): a pooled table can hide repeats that disagree.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from model.registry import NETWORKS
from training.metrics import (
    METRIC_LABELS,
    METRICS,
    ImageScore,
    complete_failures,
    failure_rates,
    false_positive_rate,
)
from training.stats import PValueRow, RankingStability

logger = logging.getLogger(__name__)

#: Registry name → the name the paper's tables use.
DISPLAY_NAMES: dict[str, str] = {
    "ian_net": "Our model",
    "caranet": "CaraNet",
    "ds_transunet": "DS-TransUNet",
    "ducknet": "DUCKNet",
    "deeplabv3plus": "DeepLabV3+",
    "hardnet_mseg": "HarDNet-MSEG",
    "meganet": "MEGANet",
    "ian_net_released": "Our model (released code, no attention)",
    "unet": "U-Net",
    "nnunet_2d": "nnU-Net 2D",
    "nnunet_3d_fullres": "nnU-Net 3D full-res",
}
#: Pixel counts of each image, and whether its ground truth is empty (a nerve-free slice).
COUNT_FIELDS: tuple[str, ...] = ("tp", "fp", "fn", "gt_empty")
PER_IMAGE_FIELDS: tuple[str, ...] = ("model", "repeat", "patient", "side", "slice", *METRICS, *COUNT_FIELDS)
#: Why the paper's pooled per-image p-values are kept but not to be read as evidence.
POOLED_TEST_NOTE = ("Pseudo-replication: the slices of one nerve are strongly correlated and patients recur across "
                    "repeats, so these images are not independent samples and the p-values overstate the evidence. "
                    "The per-nerve tests (`field_tables.md`) are the ones to read.")


@dataclass(frozen=True)
class MetricSummary:
    mean: float
    sd: float
    median: float


@dataclass(frozen=True)
class ModelSummary:
    """One row of Table 1: a model's summaries per metric over `n` images."""

    model: str
    n: int
    metrics: Mapping[str, MetricSummary]


@dataclass(frozen=True)
class RunTiming:
    """Timing of one training run: total training seconds and inference seconds per slice."""

    model: str
    repeat: int
    train_seconds: float
    seconds_per_slice: float


def display_name(model: str) -> str:
    return DISPLAY_NAMES.get(model, model)


def model_order(models: Iterable[str]) -> list[str]:
    """The paper's order (our network, then the comparators as in Table 1); unknown names last, sorted."""
    present = set(models)
    known = [m for m in NETWORKS if m in present]
    return known + sorted(present - set(known))


def summarize(scores: Iterable[ImageScore], metrics: Sequence[str] = METRICS) -> list[ModelSummary]:
    """Table 1's numbers: mean, SD and median of each metric per model, in the paper's order."""
    grouped = by_model(scores)
    rows = []
    for model in model_order(grouped):
        items = grouped[model]
        summaries = {}
        for metric in metrics:
            v = np.array([getattr(s, metric) for s in items], dtype=np.float64)
            summaries[metric] = MetricSummary(float(np.mean(v)), sample_sd(v), float(np.median(v)))
        rows.append(ModelSummary(model, len(items), summaries))
    return rows


def write_per_image_csv(scores: Iterable[ImageScore], path: str | Path) -> Path:
    """The per-image metrics table; floats at full precision so that summaries can be recomputed exactly.

    tp, fp, fn are pixel counts and gt_empty is 1 on a nerve-free slice; all four are blank for a score
    without counts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(PER_IMAGE_FIELDS)
        for s in scores:
            counts = [s.tp, s.fp, s.fn, int(s.gt_empty)] if s.has_counts else ["", "", "", ""]
            writer.writerow([s.model, s.repeat, s.patient, s.side, s.slice,
                             *(float(getattr(s, m)) for m in METRICS), *counts])
    return path


def read_per_image_csv(path: str | Path) -> list[ImageScore]:
    """Scores from `write_per_image_csv`'s table, or from the older one without pixel counts."""
    legacy = PER_IMAGE_FIELDS[: -len(COUNT_FIELDS)]
    with Path(path).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) not in (PER_IMAGE_FIELDS, legacy):
            raise ValueError(f"{path}: expected columns {list(PER_IMAGE_FIELDS)}, got {reader.fieldnames}")
        return [
            ImageScore(r["model"], int(r["repeat"]), r["patient"], r["side"], int(r["slice"]),
                       *(float(r[m]) for m in METRICS),
                       *(int(r[c]) if r.get(c) else None for c in ("tp", "fp", "fn")))
            for r in reader
        ]


def write_table1(scores: Iterable[ImageScore], out_dir: str | Path) -> tuple[Path, Path]:
    """table1.csv (numbers) and table1.md (the paper's layout, best mean per metric in bold)."""
    rows = summarize(scores)
    out = report_dir(out_dir)
    header = ["model", "display_name", "n"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "sd", "median")]
    write_csv(out / "table1.csv", header, [
        [r.model, display_name(r.model), r.n]
        + [getattr(r.metrics[m], s) for m in METRICS for s in ("mean", "sd", "median")] for r in rows
    ])
    best = {m: max(r.metrics[m].mean for r in rows) for m in METRICS}
    lines = [
        f"**Table 1.** Performance of {len(rows)} models on four metrics (per test image, all repeats).",
        "",
        "| Model | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|",
        "| | " + " | ".join("Mean ± SD (median)" for _ in METRICS) + " |",
    ]
    for r in rows:
        cells = []
        for m in METRICS:
            s = r.metrics[m]
            cell = f"{s.mean:.3f} ± {s.sd:.3f} ({s.median:.4f})"
            cells.append(f"**{cell}**" if s.mean == best[m] else cell)
        lines.append(f"| {display_name(r.model)} | " + " | ".join(cells) + " |")
    n_images = sorted({r.n for r in rows})
    lines += ["", f"n = {', '.join(map(str, n_images))} images per model. Best mean in bold.",
              "DSC, dice similarity coefficient; IoU, intersection over union; SD, standard deviation."]
    (out / "table1.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "table1.csv", out / "table1.md"


def write_table2(scores: Iterable[ImageScore], out_dir: str | Path) -> tuple[Path, Path]:
    """table2.csv and table2.md: failure rates in percent, lowest per column in bold.

    With pixel counts, the complete failures are also split by cause: extra CSV columns after the
    paper's, and a second table below it in the markdown (the paper's table itself is unchanged).
    """
    grouped = by_model(scores)
    out = report_dir(out_dir)
    rates = {m: failure_rates(s.dsc for s in grouped[m]) for m in model_order(grouped)}
    split = {m: complete_failures(grouped[m]) for m in rates} if all(s.has_counts for v in grouped.values()
                                                                      for s in v) else {}
    causes = ("no_prediction", "misplaced", "fp_nerve_free")
    write_csv(out / "table2.csv", ["model", "display_name", "n", "complete_pct", "tracking_pct", "boundary_pct"]
              + ([f"complete_{c}_pct" for c in causes] if split else []), [
        [m, display_name(m), r.n, 100 * r.complete, 100 * r.tracking, 100 * r.boundary]
        + ([100 * getattr(split[m], c) for c in causes] if split else []) for m, r in rates.items()
    ])
    kinds = ("complete", "tracking", "boundary")
    lowest = {k: min(round(100 * getattr(r, k), 1) for r in rates.values()) for k in kinds}
    lines = [
        "**Table 2.** Segmentation failure rates.",
        "",
        "| Model | Complete failure (%) | Tracking failure (%) | Boundary delineation failure (%) |",
        "|---|---|---|---|",
    ]
    for m, r in rates.items():
        cells = [f"{100 * getattr(r, k):.1f}" for k in kinds]
        cells = [f"**{c}**" if float(c) == lowest[k] else c for c, k in zip(cells, kinds, strict=True)]
        lines.append(f"| {display_name(m)} | " + " | ".join(cells) + " |")
    lines += ["", "Complete failure: DSC = 0; tracking failure: DSC < 0.2; boundary delineation failure: "
              "DSC < 0.3 (cumulative)."]
    if split:
        lines += ["", "**Table 2b.** Complete failures (DSC = 0) by cause, in percent of all images (the three "
                  "add up to Table 2's complete failure).", "",
                  "| Model | No prediction (%) | Misplaced (%) | Prediction on a nerve-free slice (%) |",
                  "|---|---|---|---|"]
        lines += [f"| {display_name(m)} | " + " | ".join(f"{100 * getattr(c, k):.1f}" for k in causes) + " |"
                  for m, c in split.items()]
        lines += ["", "No prediction: nerve on the slice, nothing predicted (the paper's definition). Misplaced: "
                  "nerve on the slice, a prediction without overlap. Nerve-free slices are only in the test sets "
                  "when all slices are used (`--all-slices`); `fp_nerve_free.md` gives their false-positive rates."]
    (out / "table2.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "table2.csv", out / "table2.md"


def write_fp_table(scores: Iterable[ImageScore], out_dir: str | Path) -> tuple[Path, Path]:
    """fp_nerve_free.csv and .md: per model, the fraction of nerve-free slices with any predicted pixel
    and the mean number of false-positive pixels on them (the per-image DSC cannot show either)."""
    grouped = by_model(scores)
    out = report_dir(out_dir)
    rates = {m: false_positive_rate(grouped[m]) for m in model_order(grouped)}
    write_csv(out / "fp_nerve_free.csv", ["model", "display_name", "n_nerve_free", "any_prediction_pct",
                                           "mean_fp_pixels"],
              [[m, display_name(m), r.n_nerve_free, 100 * r.any_prediction, r.mean_fp_pixels]
               for m, r in rates.items()])
    lines = ["**False positives on nerve-free slices.** Per model: the nerve-free test slices (all repeats), the "
             "percentage of them with any predicted pixel, and the mean number of predicted pixels on them.", "",
             "| Model | Nerve-free slices | With a prediction (%) | Mean FP pixels |", "|---|---|---|---|"]
    for m, r in rates.items():
        cells = ("–", "–") if r.n_nerve_free == 0 else (f"{100 * r.any_prediction:.1f}", f"{r.mean_fp_pixels:.1f}")
        lines.append(f"| {display_name(m)} | {r.n_nerve_free} | {cells[0]} | {cells[1]} |")
    if not any(r.n_nerve_free for r in rates.values()):
        lines += ["", "The test sets hold no nerve-free slice (`--nerve-slices-only`, the paper's samples)."]
    (out / "fp_nerve_free.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "fp_nerve_free.csv", out / "fp_nerve_free.md"


def write_pvalues(rows: Sequence[PValueRow], out_dir: str | Path) -> tuple[Path, Path]:
    """pvalues.csv (every field) and pvalues.md (Bonferroni-adjusted p per comparator and metric)."""
    if not rows:
        raise ValueError("no p-value rows to write")
    out = report_dir(out_dir)
    fields = list(PValueRow.__dataclass_fields__)
    write_csv(out / "pvalues.csv", fields, [[getattr(r, f) for f in fields] for r in rows])
    metrics = list(dict.fromkeys(r.metric for r in rows))
    table = {(r.comparator, r.metric): r for r in rows}
    reference = rows[0].reference
    lines = [
        f"**p-values, as in the paper.** {display_name(reference)} against each comparator: two-sided Wilcoxon "
        "signed-rank test on paired per-image scores pooled over all repeats, Bonferroni-adjusted (* p < 0.05).",
        "",
        "| Comparator | " + " | ".join(METRIC_LABELS.get(m, m) for m in metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    for comparator in model_order(r.comparator for r in rows):
        cells = []
        for m in metrics:
            r = table[(comparator, m)]
            cells.append(_format_p(r.p_adjusted) + (" *" if r.significant else ""))
        lines.append(f"| {display_name(comparator)} | " + " | ".join(cells) + " |")
    lines += ["", POOLED_TEST_NOTE]
    (out / "pvalues.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "pvalues.csv", out / "pvalues.md"


def write_timing(timings: Iterable[RunTiming], out_dir: str | Path) -> tuple[Path, Path]:
    """timing.csv and timing.md: inference s/slice and training hours per run (mean) and in total."""
    grouped: dict[str, list[RunTiming]] = defaultdict(list)
    for t in timings:
        grouped[t.model].append(t)
    if not grouped:
        raise ValueError("no run timings to write")
    out = report_dir(out_dir)
    rows = []
    for m in model_order(grouped):
        ts = grouped[m]
        hours = [t.train_seconds / 3600 for t in ts]
        rows.append([m, display_name(m), len(ts), float(np.mean([t.seconds_per_slice for t in ts])),
                     float(np.mean(hours)), float(np.sum(hours))])
    write_csv(out / "timing.csv", ["model", "display_name", "runs", "seconds_per_slice",
                                    "training_hours_per_run", "training_hours_total"], rows)
    lines = ["**Timing.** Inference time per slice and training time (mean per run, and summed over runs).", "",
             "| Model | Runs | Inference (s/slice) | Training (h/run) | Training total (h) |", "|---|---|---|---|---|"]
    lines += [f"| {r[1]} | {r[2]} | {r[3]:.4f} | {r[4]:.3f} | {r[5]:.3f} |" for r in rows]
    (out / "timing.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "timing.csv", out / "timing.md"


def write_ranking(stability: RankingStability, out_dir: str | Path, stem: str = "ranking",
                  unit: str = "test image") -> tuple[Path, Path, Path]:
    """<stem>.csv (mean score and rank per model and repeat), <stem>_tau.csv (Kendall's tau per pair of
    repeats) and <stem>.md (both, each model's mean rank and the mean tau): whether the repeats agree on the
    order of the models. `unit` names what the means are over (test images, or nerves)."""
    out = report_dir(out_dir)
    repeats = sorted(stability.means)
    models = model_order(stability.means[repeats[0]])
    ranks = stability.ranks
    mean_rank = stability.mean_ranks
    write_csv(out / f"{stem}.csv", ["model", "display_name", "repeat", f"mean_{stability.metric}", "rank"], [
        [m, display_name(m), r, stability.means[r][m], ranks[r][m]] for r in repeats for m in models])
    write_csv(out / f"{stem}_tau.csv", ["repeat_a", "repeat_b", "kendall_tau", "p_value"],
               [[p.repeat_a, p.repeat_b, p.tau, p.p_value] for p in stability.pairs])
    label = METRIC_LABELS.get(stability.metric, stability.metric)
    lines = [f"**Ranking stability.** Mean {label} per {unit} of each model per repeat (rank, 1 = best), the mean "
             f"rank over the repeats, and Kendall's τ-b between the rankings of every pair of repeats.", "",
             "| Model | " + " | ".join(f"Repeat {r}" for r in repeats) + " | Mean rank |",
             "|---" * (len(repeats) + 2) + "|"]
    lines += [f"| {display_name(m)} | " + " | ".join(f"{stability.means[r][m]:.3f} ({ranks[r][m]:g})"
                                                    for r in repeats) + f" | {mean_rank[m]:.2f} |" for m in models]
    lines += ["", "| Repeats | Kendall's τ | p |", "|---|---|---|"]
    lines += [f"| {p.repeat_a} vs {p.repeat_b} | {p.tau:.3f} | {_format_p(p.p_value)} |" for p in stability.pairs]
    lines += ["", f"Mean τ over {len(stability.pairs)} pair(s) of repeats: {stability.mean_tau:.3f} "
              "(1: the same order in every repeat, 0: unrelated orders)."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / f"{stem}.csv", out / f"{stem}_tau.csv", out / f"{stem}.md"


def plot_fig4(scores: Iterable[ImageScore], path: str | Path) -> Path:
    """Box plots of the four metrics for every model, means marked with "x"."""
    grouped = by_model(scores)
    models = model_order(grouped)
    fig = Figure(figsize=(3.2 * len(METRICS) + 0.3 * len(models), 4.2), dpi=120, layout="constrained")
    for i, metric in enumerate(METRICS):
        ax = fig.add_subplot(1, len(METRICS), i + 1)
        data = [[getattr(s, metric) for s in grouped[m]] for m in models]
        ax.boxplot(data, showmeans=True, widths=0.6, flierprops={"marker": ".", "markersize": 3, "alpha": 0.5},
                   meanprops={"marker": "x", "markeredgecolor": "black", "markersize": 7},
                   medianprops={"color": "tab:orange"})
        ax.set_xticks(range(1, len(models) + 1), [display_name(m) for m in models], rotation=45, ha="right")
        ax.set_title(METRIC_LABELS[metric])
        ax.set_ylim(-0.03, 1.03)
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def write_metric_reports(scores: Sequence[ImageScore], out_dir: str | Path,
                         pvalues: Sequence[PValueRow] = ()) -> dict[str, Path]:
    """Everything that needs only the per-image scores (and p-values): CSV, Tables 1 and 2, Fig 4."""
    out = report_dir(out_dir)
    paths = {"per_image_csv": write_per_image_csv(scores, out / "per_image_metrics.csv")}
    paths["table1_csv"], paths["table1_md"] = write_table1(scores, out)
    paths["table2_csv"], paths["table2_md"] = write_table2(scores, out)
    if all(s.has_counts for s in scores):
        paths["fp_nerve_free_csv"], paths["fp_nerve_free_md"] = write_fp_table(scores, out)
    else:
        logger.info("scores without pixel counts: no complete-failure split and no false-positive table")
    if pvalues:
        paths["pvalues_csv"], paths["pvalues_md"] = write_pvalues(pvalues, out)
    paths["fig4"] = plot_fig4(scores, out / "fig4_boxplots.png")
    logger.info("wrote %d report files to %s", len(paths), out)
    return paths


def by_model(scores: Iterable[ImageScore]) -> dict[str, list[ImageScore]]:
    """Scores grouped by model row (ValueError when there are none)."""
    grouped: dict[str, list[ImageScore]] = defaultdict(list)
    for s in scores:
        grouped[s.model].append(s)
    if not grouped:
        raise ValueError("no per-image scores")
    return dict(grouped)


def sample_sd(values: np.ndarray) -> float:
    """Sample standard deviation (ddof = 1); 0 for a single value, as in Table 1."""
    return float(np.std(values, ddof=1)) if values.size > 1 else 0.0


def _format_p(p: float) -> str:
    return f"{p:.2e}" if p < 0.001 else f"{p:.3f}"


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def report_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
