"""From finished runs to the paper's artefacts: scores, tables, p-values, figures, timing, export, summary.

Reports cover the repeats that every model of the protocol finished (so that the paired tests compare
the same images); runs of other repeats are listed in the summary as left out. With two or more such
repeats the reports also give each repeat's ranking of the models by mean DSC and Kendall's tau
between every pair of repeats (`reports/ranking.md`, `summary.json` `ranking_stability`). Where
``reports/per_nerve_metrics.csv`` exists, `training.field_report` adds the per-nerve tables with
patient-bootstrap CIs, per-nerve paired tests (Holm) and ranking (``reports/field_tables.md``). Every run's
test nerves are also scored per region, ramus, body and anterior loop / mental foramen
(`training.regions`: `reports/regions.md`, `fig_regions.png`, `summary.json` `regions`).

The exported checkpoint is our network's run with the highest validation DSC (the mean per-slice DSC
of its validation patients at its best epoch, the weights exported), never a test score: the test
patients stay unseen by every choice, so the reported test metrics of the exported model are not
optimistically picked. The rule, and the crop the samples were made with (`checkpoint_crop`), are
written into its metadata, with the crop localiser trained for it (`training.localiser_run`).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import subprocess
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ian_node.segment.crop import CropMode, check_crop_compatible
from model.checkpoint import CheckpointMeta, InputContract, save_checkpoint
from model.localiser import load_localiser
from model.predictor import pick_device
from model.registry import PAPER_NETWORK
from training.data import SAMPLES_ALL, SAMPLES_NERVE_ONLY, SliceSet
from training.field_report import write_field_reports_if_present
from training.figures import GridRow, OverlayCase, plot_fig5, plot_fig6, select_fig5_cases, select_fig6_keys
from training.localiser_run import checkpoint_record
from training.loop import TrainResult, load_weights
from training.metrics import METRICS, ImageScore, failure_rates, image_metrics
from training.presets import Protocol
from training.regions import (
    RegionScore,
    SideStack,
    geometry_kind,
    measured_geometry,
    region_table,
    score_regions,
    side_stacks,
    write_region_reports,
)
from training.report import (
    RunTiming,
    summarize,
    write_metric_reports,
    write_ranking,
    write_timing,
)
from training.runner import BenchmarkPaths, Ledger, RunRecord, build_model, load_predictions, write_json
from training.stats import compare_to_reference, ranking_stability

logger = logging.getLogger(__name__)

SOFTWARE = ("ian-node", "torch", "numpy", "scipy", "highdicom", "pydicom", "nibabel", "matplotlib", "pillow")


def complete_repeats(records: list[RunRecord], models: tuple[str, ...]) -> list[int]:
    """Repeats that every model finished."""
    by_repeat: dict[int, set[str]] = defaultdict(set)
    for r in records:
        by_repeat[r.repeat].add(r.model)
    return sorted(k for k, ms in by_repeat.items() if set(models) <= ms)


def score_runs(records: list[RunRecord], paths: BenchmarkPaths, slices: SliceSet) -> list[ImageScore]:
    """Per-image metrics of every run's test predictions against the samples' masks."""
    scores = []
    for r in records:
        indices, masks = load_predictions(paths.run_dir(r.model, r.repeat))
        for k, pred in zip(indices, masks, strict=True):
            m = slices.metas[k]
            scores.append(ImageScore.of(r.model, r.repeat, m.patient, m.side, m.slice,
                                        image_metrics(pred, slices.masks[k])))
    return scores


def score_regions_of_runs(records: list[RunRecord], paths: BenchmarkPaths, slices: SliceSet) -> list[RegionScore]:
    """Per-region DSC and recall (`training.regions`) of every run's test nerves.

    Regions are placed in the millimetres each side recorded while loading (`LoadReport.geometry`),
    nominal 1 mm where it recorded none (the paper's 2D folders). The regions of a repeat's test nerves
    come from their ground truth alone, so they are computed once per set of test samples and shared by
    every model.
    """
    geometry = measured_geometry(slices.report)
    stacks: dict[bytes, list[SideStack]] = {}
    rows = []
    for r in records:
        indices, masks = load_predictions(paths.run_dir(r.model, r.repeat))
        key = np.asarray(indices, dtype=np.int64).tobytes()
        if key not in stacks:
            stacks[key] = side_stacks(slices.metas, slices.masks, indices, geometry)
        rows += score_regions(r.model, r.repeat, stacks[key], slices.masks,
                              {int(k): m for k, m in zip(indices, masks, strict=True)})
    return rows


def _prediction_lookup(paths: BenchmarkPaths, slices: SliceSet, model: str, keys: list[tuple]) -> dict[tuple, np.ndarray]:
    """Predictions of `model` for image keys (repeat, patient, side, slice), loading each run once."""
    index = slices.index_of()
    out = {}
    for repeat in sorted({k[0] for k in keys}):
        indices, masks = load_predictions(paths.run_dir(model, repeat))
        where = {int(i): j for j, i in enumerate(indices)}
        for key in (k for k in keys if k[0] == repeat):
            out[key] = masks[where[index[key[1:]]]]
    return out


def write_figures(scores: list[ImageScore], paths: BenchmarkPaths, slices: SliceSet, models: tuple[str, ...]) -> dict[str, Path]:
    """Fig 5 (our network's overlays) and Fig 6 (every model on representative slices)."""
    index = slices.index_of()
    out: dict[str, Path] = {}
    reference = PAPER_NETWORK if PAPER_NETWORK in models else models[0]
    cases = select_fig5_cases(scores, reference)
    preds = _prediction_lookup(paths, slices, reference, [s.key for _, s in cases])
    out["fig5"] = plot_fig5([
        OverlayCase(slices.images[index[s.key[1:]]] / 255.0, slices.masks[index[s.key[1:]]], preds[s.key],
                    f"{title}\nDSC {s.dsc:.3f}") for title, s in cases
    ], paths.reports / "fig5_overlays.png")
    keys = select_fig6_keys(scores, reference)
    per_model = {m: _prediction_lookup(paths, slices, m, keys) for m in models}
    out["fig6"] = plot_fig6([
        GridRow(slices.images[index[k[1:]]] / 255.0, slices.masks[index[k[1:]]], {m: per_model[m][k] for m in models})
        for k in keys
    ], paths.reports / "fig6_grid.png", models=list(models))
    return out


def write_reports(records: list[RunRecord], ledger: Ledger, paths: BenchmarkPaths, slices: SliceSet) -> dict[str, Any]:
    """Every report file; returns what the summary needs (numbers and file paths)."""
    models = ledger.protocol.models
    repeats = complete_repeats(records, models)
    if not repeats:
        raise ValueError("no repeat has been finished by every model; nothing to report yet")
    used = [r for r in records if r.repeat in repeats]
    left_out = sorted({r.key for r in records} - {r.key for r in used})
    scores = score_runs(used, paths, slices)
    pvalues = compare_to_reference(scores, PAPER_NETWORK) if PAPER_NETWORK in models and len(models) > 1 else []
    files = write_metric_reports(scores, paths.reports, pvalues)
    files.update(write_figures(scores, paths, slices, models))
    region_rows = score_regions_of_runs(used, paths, slices)
    regions = None
    if region_rows:
        files.update(write_region_reports(region_rows, paths.reports))
        regions = {"geometry": geometry_kind(region_rows), "table": [
            {"model": m, "region": g, "n": v[0], "dsc_mean": v[1], "dsc_sd": v[2], "recall_mean": v[3],
             "recall_sd": v[4]} for (m, g), v in region_table(region_rows).items()]}
    files["timing_csv"], files["timing_md"] = write_timing(
        [RunTiming(r.model, r.repeat, r.train_seconds, r.seconds_per_slice) for r in used], paths.reports)
    table1 = {s.model: {"n": s.n, **{m: asdict(s.metrics[m]) for m in METRICS}} for s in summarize(scores)}
    ranking = None
    if len(repeats) >= 2 and len(models) >= 2:
        stability = ranking_stability(scores, "dsc")
        files["ranking_csv"], files["ranking_tau_csv"], files["ranking_md"] = write_ranking(stability, paths.reports)
        ranking = {"metric": stability.metric, "mean_tau": _finite(stability.mean_tau),
                   "means": {str(r): v for r, v in stability.means.items()},
                   "pairs": [{**asdict(p), "tau": _finite(p.tau), "p_value": _finite(p.p_value)}
                             for p in stability.pairs]}
        logger.info("ranking stability over %d repeats: mean Kendall tau %.3f", len(repeats), stability.mean_tau)
    # last, once reports/per_nerve_metrics.csv is written: the per-nerve tables, tests and figure beside the paper's
    files.update(write_field_reports_if_present(paths.reports, pooled=pvalues))
    return {"repeats_reported": repeats, "runs_left_out": left_out, "scores": scores, "table1": table1,
            "regions": regions,
            "pvalues": [asdict(p) for p in pvalues], "ranking_stability": ranking,
            "files": {k: str(v) for k, v in files.items()}}


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined statistic is written as null."""
    return value if np.isfinite(value) else None


def validation_dsc(paths: BenchmarkPaths, record: RunRecord) -> float:
    """A run's validation DSC at its best epoch (`training.loop`'s history), the score its exported weights had."""
    result = TrainResult.from_dict(json.loads((paths.run_dir(record.model, record.repeat) / "result.json").read_text()))
    try:
        return next(h.val_dsc for h in result.history if h.epoch == result.best_epoch)
    except StopIteration:
        raise ValueError(f"run {record.key}: its history has no best epoch {result.best_epoch}") from None


def select_export(records: list[RunRecord], paths: BenchmarkPaths) -> tuple[RunRecord, float]:
    """Our network's run to export: the highest validation DSC; ties to the lower validation loss, then repeat."""
    ours = [(r, validation_dsc(paths, r)) for r in records if r.model == PAPER_NETWORK]
    if not ours:
        raise ValueError(f"no {PAPER_NETWORK} run to export")
    return max(ours, key=lambda rs: (rs[1], -rs[0].best_val_loss, -rs[0].repeat))


def checkpoint_crop(protocol: Protocol, slices: SliceSet) -> dict[str, Any]:
    """`CheckpointMeta.crop` of a benchmark's samples: what `training.data` recorded while loading them.

    Samples cached before crops were recorded carry none; theirs follows from the protocol (an old
    "boxes" crop, now oracle, read the landmark boxes of each study's summary.json).
    """
    if slices.report.crop:
        return slices.report.checkpoint_crop()
    region = {CropMode.HALF.value: "half", CropMode.ORACLE.value: "landmarks"}.get(protocol.crop)
    if region is None:
        raise ValueError(f"the samples record no crop and crop {protocol.crop!r} does not say which region")
    return {"region": region, "trained_with": protocol.crop,
            "samples": SAMPLES_NERVE_ONLY if protocol.nerve_slices_only else SAMPLES_ALL}


def export_choice(records: list[RunRecord], scores: list[ImageScore],
                  paths: BenchmarkPaths) -> tuple[RunRecord, float] | None:
    """The run `export_best` exports and its validation DSC, among the reported repeats; None without one."""
    reported = {s.repeat for s in scores}  # repeats every model finished: the exported one has test metrics
    candidates = [r for r in records if r.model == PAPER_NETWORK and r.repeat in reported]
    if not candidates:
        return None
    return select_export(candidates, paths)


def export_best(records: list[RunRecord], scores: list[ImageScore], ledger: Ledger, paths: BenchmarkPaths,
                slices: SliceSet, context: dict[str, Any], localiser: dict[str, Any] | None = None,
                ) -> dict[str, Any] | None:
    """Our network's best repeat on validation data (`select_export`) as a self-describing node checkpoint.

    `localiser` is the record of its crop localiser (`training.localiser_run`), written into the
    metadata (`crop["localiser_sha256"]`, `training["localiser"]`) once checked to be accepted by the
    node next to this checkpoint in crop mode ``auto``.
    """
    protocol = ledger.protocol
    choice = export_choice(records, scores, paths)
    if choice is None:
        logger.info("%s is not among the models of a reported repeat; no checkpoint to export", PAPER_NETWORK)
        return None
    best, val_dsc = choice
    split = next(s for s in ledger.splits if s.repeat == best.repeat)
    net = build_model(protocol, PAPER_NETWORK, split)
    load_weights(net, paths.run_dir(PAPER_NETWORK, best.repeat) / "checkpoint_best.pt")
    mine = [s for s in scores if s.model == PAPER_NETWORK and s.repeat == best.repeat]
    test = {m: float(np.mean([getattr(s, m) for s in mine])) for m in METRICS}
    crop = checkpoint_crop(protocol, slices)
    paired = checkpoint_record(localiser)
    if paired is not None:
        crop["localiser_sha256"] = paired["sha256"]
    meta = CheckpointMeta(
        architecture=PAPER_NETWORK, width=protocol.width, options=protocol.model_options(PAPER_NETWORK),
        variant=getattr(net, "variant", ""), input=InputContract(size=protocol.size, in_channels=protocol.in_channels,
                                                                context=protocol.context),
        threshold=protocol.threshold, label="Inferior alveolar nerve", crop=crop,
        training={
            "selection": "repeat with the highest validation DSC (per-slice mean on its validation patients at its "
                         "best epoch); test data played no part in the choice",
            "repeat": best.repeat, "split_seed": split.seed, "val_dsc": val_dsc,
            "patients": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
            "samples": {"train": best.n_train, "val": best.n_val, "test": best.n_test},
            "epochs_run": best.epochs_run, "best_epoch": best.best_epoch, "best_val_loss": best.best_val_loss,
            "stopped_early": best.stopped_early, "training_hours": best.train_seconds / 3600,
            "test_metrics_mean": test, "protocol": protocol.to_dict(), "data_fingerprint": ledger.fingerprint,
            "data": context.get("data", {}), "software": context.get("software", {}),
            "localiser_sha256": slices.report.crop.get("localiser_sha256"),
            "git_commit": context.get("git", {}).get("commit"), "device": context.get("device", {}).get("name"),
            "localiser": paired,
        })
    if paired is not None:
        check_crop_compatible(meta, CropMode.AUTO, load_localiser(paths.localiser))
    sha = save_checkpoint(paths.export, net, meta)
    logger.info("exported %s repeat %d (validation DSC %.4f; crop %s) to %s", PAPER_NETWORK, best.repeat, val_dsc,
                crop, paths.export)
    return {"path": str(paths.export), "sha256": sha, "repeat": best.repeat, "selection": "validation DSC",
            "val_dsc": val_dsc, "crop": crop, "test_metrics_mean": test}


def environment(device: str) -> dict[str, Any]:
    """Software versions, device and git commit, for the summary and the exported checkpoint."""
    versions = {"python": sys.version.split()[0]}
    for name in SOFTWARE:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    dev = pick_device(device)
    info = {"type": dev.type, "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
            or platform.machine(), "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda}
    return {"software": versions, "device": info, "platform": platform.platform(), "git": _git()}


def _git() -> dict[str, Any]:
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def write_summary(paths: BenchmarkPaths, ledger: Ledger, records: list[RunRecord], reports: dict[str, Any],
                  exported: dict[str, Any] | None, slices: SliceSet, context: dict[str, Any],
                  localiser: dict[str, Any] | None = None) -> Path:
    by_model: dict[str, list[float]] = defaultdict(list)
    for s in reports["scores"]:
        by_model[s.model].append(s.dsc)
    summary = {
        **context,
        "protocol": ledger.protocol.to_dict(),
        "data_fingerprint": ledger.fingerprint,
        "samples": len(slices), "patients": len(set(slices.patients)),
        "crop": slices.report.crop,
        "data_report": slices.report.to_dict(),
        "splits": [s.to_dict() for s in ledger.splits],
        "runs": [asdict(r) for r in records],
        "repeats_reported": reports["repeats_reported"], "runs_left_out": reports["runs_left_out"],
        "table1": reports["table1"],
        "table2": {m: asdict(failure_rates(v)) for m, v in by_model.items()},
        "pvalues": reports["pvalues"],
        "ranking_stability": reports["ranking_stability"],
        "regions": reports["regions"],
        "timing": {r.key: {"train_hours": r.train_seconds / 3600, "seconds_per_slice": r.seconds_per_slice}
                   for r in records},
        "files": reports["files"],
        "exported_checkpoint": exported,
        "localiser": localiser,
    }
    write_json(paths.summary, summary)
    return paths.summary
