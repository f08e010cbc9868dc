"""The tract step against the old clean-up: per-nerve DSC, clDice and components on held-out phantoms.

    python benchmarks/tract.py                       # 8 held-out demo phantoms (16 nerves), ~3 min on 1 core
    python benchmarks/tract.py --patients 2          # quicker
    python benchmarks/tract.py --json out.json --figure docs/images/tract_before_after.png

Held-out phantoms: `demo` preset (the bundled model's), seed 0, patients 100 onwards (`--first`);
the bundled model was trained on patients 0-7 of seed 2026 (`training.default_model`) and the
bundled localiser on seeds 11-14 (`training.localiser`). Each study is built as a DICOM series
(`build_mr_series`) and read by the node's loader, as `training.data.phantoms` does; the phantom's
labels are put in the loaded series' voxel order (`in_loaded_order`). Each series runs through the node's own steps (`resolve_crop` with
the bundled localiser, `prepare`, the bundled model, `finish_series`) once, and the same network
output is cleaned up three ways, scored per nerve (`training.nerve_metrics`):

- ``raw``: the thresholded masks, no clean-up (`PipelineOptions(max_gap_mm=None)`);
- ``old``: the previous clean-up, largest 26-component plus every component within 5 mm
  (`keep_main_tract`, kept here only as this baseline);
- ``tract``: the node's tract step (`ian_node.segment.tract`, default options), with its QA.

Printed: medians and means per method, the paired differences tract - old (mean, median, Wilcoxon
signed-rank p), the QA verdicts, and the ground truth's own tract length (for the QA's length range).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ian_node.phantom.mr_series import build_mr_series, in_loaded_order  # noqa: E402
from ian_node.phantom.study import generate_phantom, phantom_preset  # noqa: E402
from ian_node.segment.crop import CropRequest, resolve_crop  # noqa: E402
from ian_node.segment.measure import centreline  # noqa: E402
from ian_node.segment.pipeline import PipelineOptions, finish_series, prepare  # noqa: E402
from ian_node.segment.tract import voxel_spacing  # noqa: E402
from ian_node.segment.volume import Side, load_series  # noqa: E402
from model.checkpoint import BUNDLED_CHECKPOINT, load_checkpoint  # noqa: E402
from model.localiser import load_localiser  # noqa: E402
from model.predictor import Predictor, PredictorOptions  # noqa: E402
from training.nerve_metrics import nerve_scores  # noqa: E402

METHODS = ("raw", "old", "tract")
OLD_MAX_GAP_MM = 5.0


def keep_main_tract(mask: np.ndarray, spacing_mm: Sequence[float], max_gap_mm: float = OLD_MAX_GAP_MM) -> np.ndarray:
    """The old clean-up (the baseline): the largest 26-connected component plus every component
    whose nearest voxel is within `max_gap_mm` of it."""
    mask = np.asarray(mask, dtype=bool)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    main = int(np.argmax(sizes))
    distance = ndimage.distance_transform_edt(labels != main, sampling=tuple(float(s) for s in spacing_mm))
    nearest = np.full(count + 1, np.inf)
    np.minimum.at(nearest, labels[mask], distance[mask])
    keep = nearest <= max_gap_mm
    keep[0], keep[main] = False, True
    return keep[labels]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    config = phantom_preset("demo")
    localiser = load_localiser()
    loaded = load_checkpoint(args.checkpoint)
    predictor = Predictor(loaded, PredictorOptions(device="cpu"))
    rows: list[dict[str, Any]] = []
    pictures: dict[tuple[int, str], dict[str, np.ndarray]] = {}  # sagittal views per nerve
    for index in range(args.first, args.first + args.patients):
        phantom = generate_phantom(index, args.seed, config)
        series = load_series(build_mr_series(phantom.volume, phantom.study, phantom.series))
        truth = in_loaded_order(phantom.labels, phantom.volume.affine, series.volume.affine)
        affine = np.asarray(series.volume.affine)
        spacing = voxel_spacing(affine)
        crop = resolve_crop(series, CropRequest(), localiser)
        if not crop.found:
            print(f"patient {index}: no region found ({crop.problem}); scored as empty", flush=True)
        prepared = prepare(series, predictor.size, crop.rois) if crop.found else None
        probabilities = predictor.predict(prepared.images) if prepared is not None else None
        raw = (finish_series(prepared, probabilities, PipelineOptions(max_gap_mm=None), crop)[0]
               if prepared is not None else np.zeros_like(truth))
        start = time.perf_counter()
        tract, qa = (finish_series(prepared, probabilities, PipelineOptions(), crop)
                     if prepared is not None else (np.zeros_like(truth), ()))
        seconds = time.perf_counter() - start
        for i, side in enumerate(Side):
            gt = truth == side.label
            masks = {"raw": raw == side.label, "old": keep_main_tract(raw == side.label, spacing),
                     "tract": tract == side.label}
            row: dict[str, Any] = {"patient": index, "side": side.value, "finish_seconds": round(seconds, 3),
                                   "truth_length_mm": round(centreline(gt, affine).length_mm, 1)}
            for method, mask in masks.items():
                s = nerve_scores(mask, gt, spacing)
                row.update({f"{method}_dsc": s.dsc, f"{method}_cldice": s.cldice,
                            f"{method}_components": s.components})
            if qa:
                row["qa"] = qa[i].as_json()
            rows.append(row)
            pictures[(index, side.value)] = {k: sagittal(v, affine) for k, v in {"truth": gt, **masks}.items()}
            print(f"patient {index} {side.value}: " + ", ".join(
                f"{m} dsc {row[f'{m}_dsc']:.3f} cldice {row[f'{m}_cldice']:.3f} comp {row[f'{m}_components']}"
                for m in METHODS) + (f"; QA {qa[i].verdict.value} {list(qa[i].reasons)}" if qa else ""), flush=True)
    summary = summarise(rows)
    if args.figure:
        figure(rows, pictures, affine, args.figure)
    return {"settings": {k: str(v) for k, v in vars(args).items()}, "checkpoint_sha256": loaded.sha256,
            "localiser_sha256": localiser.sha256, "nerves": rows, "summary": summary}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"nerves": len(rows)}
    for metric in ("dsc", "cldice", "components"):
        for method in METHODS:
            values = [r[f"{method}_{metric}"] for r in rows]
            out[f"{method}_{metric}"] = {"median": round(float(np.median(values)), 4),
                                         "mean": round(float(np.mean(values)), 4)}
        diffs = np.array([r[f"tract_{metric}"] - r[f"old_{metric}"] for r in rows], dtype=float)
        nonzero = diffs[diffs != 0]
        out[f"tract_minus_old_{metric}"] = {
            "median": round(float(np.median(diffs)), 4), "mean": round(float(np.mean(diffs)), 4),
            "better": int((diffs > 0).sum() if metric != "components" else (diffs < 0).sum()),
            "worse": int((diffs < 0).sum() if metric != "components" else (diffs > 0).sum()),
            "wilcoxon_p": float(f"{stats.wilcoxon(nonzero).pvalue:.2g}") if len(nonzero) >= 2 else None}
    out["one_component"] = {m: sum(r[f"{m}_components"] == 1 for r in rows) for m in METHODS}
    verdicts = [r["qa"]["verdict"] for r in rows if "qa" in r]
    out["qa_verdicts"] = {v: verdicts.count(v) for v in ("PASS", "WARN", "FAIL")}
    out["qa_tract_dsc_mean"] = {v: round(float(np.mean([r["tract_dsc"] for r in rows if r["qa"]["verdict"] == v])), 4)
                                for v in ("PASS", "WARN", "FAIL") if v in verdicts}
    lengths = [r["truth_length_mm"] for r in rows]
    out["truth_length_mm"] = {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)}
    out["finish_seconds_median"] = statistics.median(r["finish_seconds"] for r in rows)
    return out


def sagittal(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A mask's maximum projection along LPS x: rows superior → inferior, columns anterior → posterior."""
    dominant = np.argmax(np.abs(np.asarray(affine)[:3, :3]), axis=1)  # the array axis of LPS x, y, z
    view = mask.any(axis=int(dominant[0]))
    kept = [a for a in range(3) if a != dominant[0]]
    if kept.index(int(dominant[2])) != 0:
        view = view.T  # rows along z
    if affine[2, dominant[2]] > 0:
        view = view[::-1]  # superior first
    if affine[1, dominant[1]] < 0:
        view = view[:, ::-1]  # anterior (small y) first
    return view


def figure(rows: list[dict[str, Any]], pictures: dict, affine: np.ndarray, out: Path) -> None:
    """Box plots of DSC, clDice and components per method, and the nerve the tract step changed most
    (sagittal maximum projections of the truth, the old clean-up and the tract). `pictures` holds
    each nerve's `sagittal` views, `affine` a series' (for the voxel aspect: the phantoms share it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 7.5), constrained_layout=True)
    grid = fig.add_gridspec(2, 3)
    for j, (metric, label) in enumerate((("dsc", "3D DSC"), ("cldice", "clDice"), ("components", "components"))):
        ax = fig.add_subplot(grid[0, j])
        data = [[r[f"{m}_{metric}"] for r in rows] for m in METHODS]
        ax.boxplot(data, tick_labels=["raw", "old (5 mm)", "tract"], showmeans=True)
        for k, values in enumerate(data):
            ax.scatter(np.full(len(values), k + 1) + np.linspace(-0.12, 0.12, len(values)), values, s=10,
                       alpha=0.6, color="tab:blue")
        ax.set_title(f"{label} per nerve (n = {len(rows)})")
        if metric == "components":
            ax.set_yscale("log")
    best = max(rows, key=lambda r: r["tract_cldice"] - r["old_cldice"])
    views = pictures[(best["patient"], best["side"])]
    both = np.logical_or.reduce(list(views.values()))
    box = tuple(slice(max(int(i.min()) - 8, 0), int(i.max()) + 9) for i in np.nonzero(both))
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    dominant = np.argmax(np.abs(np.asarray(affine)[:3, :3]), axis=1)
    aspect = float(spacing[dominant[2]] / spacing[dominant[1]])  # z mm per row over y mm per column
    for j, (name, title) in enumerate((("truth", "ground truth"), ("old", "old clean-up"), ("tract", "tract"))):
        ax = fig.add_subplot(grid[1, j])
        view, truth = views[name][box], views["truth"][box]
        rgb = np.zeros(view.shape + (3,))
        rgb[..., 1] = truth * 0.6
        if name != "truth":
            rgb[..., 0] = view
        ax.imshow(rgb, aspect=aspect, interpolation="nearest")
        ax.set_title(f"patient {best['patient']} {best['side']}: {title}"
                     + ("" if name == "truth" else f" (clDice {best[f'{name}_cldice']:.2f}, "
                                                   f"{best[f'{name}_components']} comp.)"), fontsize=9)
        ax.set_xlabel("anterior → posterior")
        ax.set_ylabel("inferior ← superior")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Tract step vs the old clean-up, bundled model, {len(rows) // 2} held-out demo phantoms "
                 "(bottom: sagittal projection; green truth, red mask, yellow both)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--first", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=BUNDLED_CHECKPOINT)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--figure", type=Path, default=None, help="PNG: box plots and one nerve before/after")
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
