"""Region-wise scores: DSC and recall in the ramus, the body and the anterior loop / mental foramen.

The paper scores whole slices, so a network that finds the easy body but loses the nerve where it
turns (the ramus, the anterior loop) looks as good as one that tracks it all. Here each test nerve
(one patient's side in one repeat) is split by position along its ground-truth centreline, with
the node's own definition (`ian_node.segment.measure`: `centreline`, then `region_map`, where every
pixel takes the region of its nearest centreline point), and TP, FP and FN are counted per region.
A false positive far from the nerve thus counts against the region it is nearest to.

The benchmark predicts 2D model-space slices: a side's test slices are stacked in coronal order
(axis 0 A→P, rows S→I, column 0 lateral, as `ian_node.segment.reformat.CoronalStack`) into one
volume whose axis-0 step is the slices' spacing (a `slice_step` apart). Model pixels are square in
millimetres (the slice transform pads to a physically square canvas), so a `StackGeometry` (mm per
slice step and per model pixel) makes that volume metric. The samples do not record it yet, so the
benchmark uses `NOMINAL` (1 mm both ways) and marks its region tables as nominal: the order of the
regions is right, their mm boundaries (15 mm mental stretch, 10 mm flat body) are then in pixels.

Per region the counts follow `training.metrics.ImageMetrics.from_counts`; a region with no ground
truth in a nerve (a crop that cut the ramus off) is kept in the rows but left out of the means.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ian_node.segment.measure import Region, RegionSplit, centreline, region_map
from training.metrics import METRIC_LABELS, ImageMetrics
from training.report import display_name, model_order, report_dir, sample_sd, save_figure, write_csv

#: The regions in anatomical order, ramus first, and their column names.
REGIONS: tuple[Region, ...] = tuple(Region)
REGION_NAMES: dict[Region, str] = {Region.RAMUS: "ramus", Region.BODY: "body", Region.MENTAL: "mental"}
#: Column name → the title tables and figures print.
REGION_TITLES: dict[str, str] = {REGION_NAMES[r]: r.title.capitalize() for r in REGIONS}


@dataclass(frozen=True)
class StackGeometry:
    """Millimetres per step between a side's stacked test slices and per model pixel."""

    slice_mm: float
    pixel_mm: float
    nominal: bool = False  # True: assumed, not read from the data

    def __post_init__(self) -> None:
        if not (self.slice_mm > 0 and self.pixel_mm > 0):
            raise ValueError(f"StackGeometry needs positive sizes, got {self.slice_mm!r} and {self.pixel_mm!r} mm")

    def affine(self) -> np.ndarray:
        """(slice, row, column) → LPS-like mm: slices run posterior (+y), rows inferior (−z), columns along x."""
        out = np.eye(4)
        out[:3, :3] = [[0.0, 0.0, self.pixel_mm], [self.slice_mm, 0.0, 0.0], [0.0, -self.pixel_mm, 0.0]]
        return out


#: What the benchmark assumes while its samples record no geometry.
NOMINAL = StackGeometry(1.0, 1.0, nominal=True)


@dataclass(frozen=True)
class RegionScore:
    """One region of one test nerve for one model: pixel counts over the side's test slices, DSC, recall."""

    model: str
    repeat: int
    patient: str
    side: str
    region: str
    tp: int
    fp: int
    fn: int
    dsc: float
    recall: float

    @property
    def gt_present(self) -> bool:
        return self.tp + self.fn > 0


def side_regions(masks: np.ndarray, geometry: StackGeometry = NOMINAL,
                 split: RegionSplit | None = None) -> np.ndarray | None:
    """The `Region` (int8) of every pixel of a side's stacked slices (n, S, S); None without ground truth.

    `masks` are the ground truth of the side's test slices in coronal order.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be stacked slices (n, S, S), got shape {masks.shape}")
    affine = geometry.affine()
    line = centreline(masks, affine)
    if line is None:
        return None
    return region_map(np.ones(masks.shape, dtype=bool), affine, line, split)


def slice_spacing(slices: Sequence[int]) -> int:
    """The usual step between a side's sampled coronal indices (the samples' `slice_step`), at least 1."""
    steps = np.diff(np.sort(np.asarray(slices, dtype=np.int64)))
    return int(np.median(steps)) if steps.size else 1


def count_regions(prediction: np.ndarray, target: np.ndarray, regions: np.ndarray) -> dict[Region, ImageMetrics]:
    """Per-region metrics of a side's stacked prediction against its ground truth."""
    pred, gt = np.asarray(prediction, bool), np.asarray(target, bool)
    if not pred.shape == gt.shape == regions.shape:
        raise ValueError(f"prediction {pred.shape}, target {gt.shape} and regions {regions.shape} differ")
    out = {}
    for region in REGIONS:
        inside = regions == region
        tp = int(np.count_nonzero(pred & gt & inside))
        out[region] = ImageMetrics.from_counts(tp, int(np.count_nonzero(pred & inside)) - tp,
                                               int(np.count_nonzero(gt & inside)) - tp)
    return out


@dataclass(frozen=True)
class SideStack:
    """One test nerve: its sample indices in coronal order, ground truth stacked, and its regions."""

    patient: str
    side: str
    indices: np.ndarray
    regions: np.ndarray


def side_stacks(metas: Sequence, masks: np.ndarray, indices: Sequence[int],
                geometry: Mapping[tuple[str, str], StackGeometry] | None = None,
                split: RegionSplit | None = None) -> list[SideStack]:
    """The test nerves among samples `indices` (of `metas`/`masks`), each with its region map.

    `metas` are `training.data.SampleMeta`s; `geometry` per (patient, side) mm per model pixel and per
    coronal slice, `NOMINAL` where missing. Sides without ground truth are left out.
    """
    by_side: dict[tuple[str, str], list[int]] = defaultdict(list)
    for k in indices:
        by_side[(metas[k].patient, metas[k].side)].append(int(k))
    out = []
    for key in sorted(by_side):
        ks = np.array(sorted(by_side[key], key=lambda k: metas[k].slice), dtype=np.int64)
        g = (geometry or {}).get(key, NOMINAL)
        step = slice_spacing([metas[k].slice for k in ks])
        regions = side_regions(masks[ks], StackGeometry(g.slice_mm * step, g.pixel_mm, g.nominal), split)
        if regions is not None:
            out.append(SideStack(key[0], key[1], ks, regions))
    return out


def score_regions(model: str, repeat: int, stacks: Sequence[SideStack], masks: np.ndarray,
                  predictions: Mapping[int, np.ndarray]) -> list[RegionScore]:
    """Region rows of one run: `predictions` maps a sample index to its binary mask."""
    rows = []
    for s in stacks:
        pred = np.stack([predictions[int(k)] for k in s.indices])
        for region, m in count_regions(pred, masks[s.indices], s.regions).items():
            rows.append(RegionScore(model, repeat, s.patient, s.side, REGION_NAMES[region], m.tp, m.fp, m.fn,
                                    m.dsc, m.recall))
    return rows


def write_region_reports(rows: Sequence[RegionScore], out_dir: str | Path, nominal: bool) -> dict[str, Path]:
    """region_scores.csv (every nerve and region), regions.csv/.md (mean ± SD per model and region) and
    fig_regions.png; `nominal`: the region boundaries were placed with `training.regions.NOMINAL` geometry."""
    if not rows:
        raise ValueError("no region scores to write")
    out = report_dir(out_dir)
    fields = list(RegionScore.__dataclass_fields__)
    write_csv(out / "region_scores.csv", fields, [[getattr(r, f) for f in fields] for r in rows])
    table = region_table(rows)
    write_csv(out / "regions.csv", ["model", "display_name", "region", "n", "dsc_mean", "dsc_sd", "recall_mean",
                                     "recall_sd"], [[m, display_name(m), g, *v] for (m, g), v in table.items()])
    names = list(REGION_NAMES.values())
    lines = ["**Regions.** DSC and recall per nerve region (mean ± SD over test nerves whose ground truth reaches "
             "the region; n nerves), by position along the ground-truth centreline.", "",
             "| Model | " + " | ".join(f"{REGION_TITLES[g]} DSC | {REGION_TITLES[g]} recall" for g in names) + " |",
             "|---" * (2 * len(names) + 1) + "|"]
    for m in model_order({m for m, _ in table}):
        cells = []
        for g in names:
            n, dsc, dsc_sd, rec, rec_sd = table.get((m, g), (0, np.nan, np.nan, np.nan, np.nan))
            cells += [f"{dsc:.3f} ± {dsc_sd:.3f} (n={n})", f"{rec:.3f} ± {rec_sd:.3f}"] if n else ["–", "–"]
        lines.append(f"| {display_name(m)} | " + " | ".join(cells) + " |")
    split = RegionSplit()
    lines += ["", f"Ramus: from the mandibular foramen until the path turns flatter than {split.body_inclination_deg:g}° "
              f"to the axial plane for {split.body_min_mm:g} mm; anterior loop / mental foramen: the last "
              f"{split.mental_mm:g} mm; body: between (`ian_node.segment.measure`). Every pixel belongs to the "
              "region of its nearest ground-truth centreline point."]
    if nominal:
        lines += ["", f"Nominal geometry: the samples record no millimetres, so a model pixel was taken as "
                  f"{NOMINAL.pixel_mm:g} mm and a coronal slice as {NOMINAL.slice_mm:g} mm; the regions' order is "
                  "right, their boundaries approximate."]
    (out / "regions.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths = {"region_scores_csv": out / "region_scores.csv", "regions_csv": out / "regions.csv",
             "regions_md": out / "regions.md"}
    paths["fig_regions"] = plot_regions(rows, out / "fig_regions.png")
    return paths


def region_table(rows: Iterable[RegionScore]) -> dict[tuple[str, str], tuple[int, float, float, float, float]]:
    """(model, region) → (n, DSC mean, SD, recall mean, SD) over the nerves whose ground truth reaches the region."""
    grouped: dict[tuple[str, str], list[RegionScore]] = defaultdict(list)
    for r in rows:
        if r.gt_present:
            grouped[(r.model, r.region)].append(r)
    order = {g: i for i, g in enumerate(REGION_NAMES.values())}
    models = model_order(m for m, _ in grouped)
    out = {}
    for key in sorted(grouped, key=lambda k: (models.index(k[0]), order[k[1]])):
        dsc = np.array([r.dsc for r in grouped[key]])
        rec = np.array([r.recall for r in grouped[key]])
        out[key] = (len(dsc), float(dsc.mean()), sample_sd(dsc), float(rec.mean()), sample_sd(rec))
    return out


def plot_regions(rows: Sequence[RegionScore], path: str | Path) -> Path:
    """Mean DSC and recall per region (bars, one per model) with each nerve's value as a dot."""
    kept = [r for r in rows if r.gt_present]
    models = model_order({r.model for r in rows})
    names = list(REGION_NAMES.values())
    fig = Figure(figsize=(4.5 + 0.9 * len(models), 3.8), dpi=120, layout="constrained")
    width = 0.8 / max(len(models), 1)
    for i, metric in enumerate(("dsc", "recall")):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, m in enumerate(models):
            x = np.arange(len(names)) - 0.4 + width * (j + 0.5)
            values = [[getattr(r, metric) for r in kept if r.model == m and r.region == g] for g in names]
            ax.bar(x, [np.mean(v) if v else 0.0 for v in values], width * 0.9, label=display_name(m))
            for xi, v in zip(x, values, strict=True):
                ax.plot(np.full(len(v), xi), v, ".", color="black", markersize=3, alpha=0.6)
        ax.set_xticks(range(len(names)), [REGION_TITLES[g].replace(" / ", " /\n") for g in names])
        ax.set_title(METRIC_LABELS[metric])
        ax.set_ylim(0, 1.03)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right", fontsize=8)
    return save_figure(fig, path)
