"""Region-wise scores: DSC and recall in the ramus, the body and the anterior loop / mental foramen.

The paper scores whole slices, so a network that finds the easy body but loses the nerve where it
turns (the ramus, the anterior loop) looks as good as one that tracks it all. Here each test nerve
(one patient's side in one repeat) is split by position along its ground-truth centreline, with
the node's own definition (`ian_node.segment.measure`: `centreline`, then `region_map`, where every
pixel takes the region of its nearest centreline point), and TP, FP and FN are counted per region.
A false positive far from the nerve thus counts against the region it is nearest to.

The benchmark predicts 2D model-space slices: a side's test slices are stacked in coronal order
(axis 0 A→P, rows S→I, column 0 lateral, as `ian_node.segment.reformat.CoronalStack`) into one
volume whose axis-0 step is the slices' spacing times their sampling step (`training.data.sampling_step`
of the stacked indices). A `StackGeometry` (mm per coronal slice, per model row and per model column)
makes that volume metric. 3D inputs record it per patient and side while loading
(`training.data.SideGeometry` in `LoadReport.geometry`: the series' coronal spacing, the slice
transform's model pixel), so the regions' mm boundaries (15 mm mental stretch, 10 mm flat body) are
real ("measured"). The paper's 2D folders record no millimetres: their sides use `NOMINAL` (1 mm
everywhere) and every row and table says "nominal": the order of the regions is right, their
boundaries are then in pixels.

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
from training.data import LoadReport, SampleMeta, SideGeometry, sampling_step
from training.metrics import METRIC_LABELS, ImageMetrics
from training.report import display_name, model_order, report_dir, sample_sd, save_figure, write_csv

#: The regions in anatomical order, ramus first, and their column names.
REGIONS: tuple[Region, ...] = tuple(Region)
REGION_NAMES: dict[Region, str] = {Region.RAMUS: "ramus", Region.BODY: "body", Region.MENTAL: "mental"}
#: Column name → the title tables and figures print.
REGION_TITLES: dict[str, str] = {REGION_NAMES[r]: r.title.capitalize() for r in REGIONS}


@dataclass(frozen=True)
class StackGeometry:
    """Millimetres per step between a side's stacked slices and per model pixel (rows, columns)."""

    slice_mm: float
    row_mm: float
    col_mm: float
    nominal: bool = False  # True: assumed, not read from the data

    def __post_init__(self) -> None:
        if not (self.slice_mm > 0 and self.row_mm > 0 and self.col_mm > 0):
            raise ValueError(f"StackGeometry needs positive sizes, got slice {self.slice_mm!r}, row "
                             f"{self.row_mm!r} and column {self.col_mm!r} mm")

    @classmethod
    def from_side(cls, g: SideGeometry) -> StackGeometry:
        """A loaded side's millimetres per coronal index (not yet times a sampling step) and per model pixel."""
        return cls(g.slice_mm, g.row_mm, g.col_mm)

    @property
    def kind(self) -> str:
        """How the sizes were obtained, as the reports write it: "nominal" or "measured"."""
        return "nominal" if self.nominal else "measured"

    def stepped(self, step: int) -> StackGeometry:
        """This geometry for slices `step` coronal indices apart."""
        return StackGeometry(self.slice_mm * step, self.row_mm, self.col_mm, self.nominal)

    def affine(self) -> np.ndarray:
        """(slice, row, column) → LPS-like mm: slices run posterior (+y), rows inferior (−z), columns along x."""
        out = np.eye(4)
        out[:3, :3] = [[0.0, 0.0, self.col_mm], [self.slice_mm, 0.0, 0.0], [0.0, -self.row_mm, 0.0]]
        return out


#: What the benchmark assumes for samples that record no geometry (the paper's 2D folders).
NOMINAL = StackGeometry(1.0, 1.0, 1.0, nominal=True)


def measured_geometry(report: LoadReport) -> dict[tuple[str, str], StackGeometry]:
    """(patient, side) → the millimetres its samples recorded while loading (none for 2D folders)."""
    return {key: StackGeometry.from_side(g) for key, g in report.geometry_of().items()}


#: The line under the region table, per `geometry_kind`.
GEOMETRY_NOTES: dict[str, str] = {
    "measured": "Measured geometry: millimetres per model pixel from each side's slice transform, per slice from "
                "its series' coronal spacing times the sampling step.",
    "nominal": f"Nominal geometry: the samples record no millimetres (the paper's 2D folders hold none), so a model "
               f"pixel was taken as {NOMINAL.row_mm:g} mm and a coronal slice as {NOMINAL.slice_mm:g} mm; the "
               "regions' order is right, their boundaries approximate.",
    "mixed": "Mixed geometry: some sides recorded their millimetres (measured), others none (nominal, 1 mm per "
             "pixel and slice; their boundaries approximate); region_scores.csv says which.",
}


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
    geometry: str = NOMINAL.kind  # "measured" or "nominal": how the region boundaries were placed

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
    geometry: StackGeometry = NOMINAL  # of the stack: axis-0 mm are per sampled slice


def side_stacks(metas: Sequence[SampleMeta], masks: np.ndarray, indices: Sequence[int],
                geometry: Mapping[tuple[str, str], StackGeometry] | None = None,
                split: RegionSplit | None = None) -> list[SideStack]:
    """The test nerves among samples `indices` (of `metas`/`masks`), each with its region map.

    `geometry` is per (patient, side) the mm per model pixel and per coronal index (`measured_geometry`),
    `NOMINAL` where missing; the stack's slice step is that times the sampling step of its indices.
    Sides without ground truth are left out.
    """
    by_side: dict[tuple[str, str], list[int]] = defaultdict(list)
    for k in indices:
        by_side[(metas[k].patient, metas[k].side)].append(int(k))
    out = []
    for key in sorted(by_side):
        ks = np.array(sorted(by_side[key], key=lambda k: metas[k].slice), dtype=np.int64)
        g = (geometry or {}).get(key, NOMINAL).stepped(sampling_step([metas[k].slice for k in ks]))
        regions = side_regions(masks[ks], g, split)
        if regions is not None:
            out.append(SideStack(key[0], key[1], ks, regions, g))
    return out


def score_regions(model: str, repeat: int, stacks: Sequence[SideStack], masks: np.ndarray,
                  predictions: Mapping[int, np.ndarray]) -> list[RegionScore]:
    """Region rows of one run: `predictions` maps a sample index to its binary mask."""
    rows = []
    for s in stacks:
        pred = np.stack([predictions[int(k)] for k in s.indices])
        for region, m in count_regions(pred, masks[s.indices], s.regions).items():
            rows.append(RegionScore(model, repeat, s.patient, s.side, REGION_NAMES[region], m.tp, m.fp, m.fn,
                                    m.dsc, m.recall, s.geometry.kind))
    return rows


def geometry_kind(rows: Iterable[RegionScore]) -> str:
    """How the rows' region boundaries were placed: "measured", "nominal", or "mixed" when both occur."""
    kinds = {r.geometry for r in rows}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def write_region_reports(rows: Sequence[RegionScore], out_dir: str | Path) -> dict[str, Path]:
    """region_scores.csv (every nerve and region), regions.csv/.md (mean ± SD per model and region) and
    fig_regions.png; the table says whether the boundaries were placed in measured or nominal mm."""
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
    lines += ["", GEOMETRY_NOTES[geometry_kind(rows)]]
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
