"""`train_benchmark --preset smoke` end to end on generated phantoms: every artefact, consistent (the exported
checkpoint with its crop localiser); resume after SIGKILL."""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import json
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from ian_node.segment.crop import check_crop_compatible
from model.checkpoint import load_checkpoint
from model.localiser import load_localiser
from model.registry import NETWORKS
from training.benchmark import main
from training.data import load_slice_set
from training.localiser_run import benchmark_localiser, patient_key
from training.metrics import METRICS
from training.nerve_metrics import PER_NERVE_COLUMNS, read_per_nerve_csv
from training.presets import Runtime, localiser_preset
from training.runner import BenchmarkPaths, Ledger, load_predictions

SMOKE = ["--preset", "smoke", "--threads", "1", "--no-progress"]
REPORTS = ("per_image_metrics.csv", "table1.csv", "table1.md", "table2.csv", "table2.md", "pvalues.csv",
           "pvalues.md", "timing.csv", "timing.md", "fig4_boxplots.png", "fig5_overlays.png", "fig6_grid.png",
           "region_scores.csv", "regions.csv", "regions.md", "fig_regions.png", "per_nerve_metrics.csv")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("smoke") / "bench"
    try:
        assert main([*SMOKE, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_writes_every_artefact(smoke):
    for name in REPORTS:
        assert (smoke / "reports" / name).stat().st_size > 0, name
    for name in ("fig4_boxplots.png", "fig5_overlays.png", "fig6_grid.png", "fig_regions.png"):
        assert (smoke / "reports" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for model in NETWORKS:
        run = smoke / "runs" / model / "repeat_0"
        for name in ("train.log", "checkpoint_best.pt", "checkpoint_final.pt", "result.json", "test_predictions.npz"):
            assert (run / name).is_file(), f"{model}: {name}"
    assert (smoke / "benchmark.log").stat().st_size > 0
    assert (smoke / "export" / "ian_net_best.pt").is_file()
    assert (smoke / "export" / "localiser.pt").is_file()


def test_table1_means_equal_the_means_of_the_per_image_csv(smoke):
    per_image = _rows(smoke / "reports" / "per_image_metrics.csv")
    assert {r["model"] for r in per_image} == set(NETWORKS)
    table = {r["model"]: r for r in _rows(smoke / "reports" / "table1.csv")}
    for model in NETWORKS:
        rows = [r for r in per_image if r["model"] == model]
        assert int(table[model]["n"]) == len(rows) > 0
        for metric in METRICS:
            values = np.array([float(r[metric]) for r in rows])
            assert float(table[model][f"{metric}_mean"]) == pytest.approx(values.mean(), abs=1e-12)
            assert float(table[model][f"{metric}_median"]) == pytest.approx(np.median(values), abs=1e-12)


def test_table2_rates_follow_the_dsc_thresholds_of_the_per_image_csv(smoke):
    dsc = defaultdict(list)
    for r in _rows(smoke / "reports" / "per_image_metrics.csv"):
        dsc[r["model"]].append(float(r["dsc"]))
    for row in _rows(smoke / "reports" / "table2.csv"):
        v = np.array(dsc[row["model"]])
        assert float(row["complete_pct"]) == pytest.approx(100 * np.mean(v == 0))
        assert float(row["tracking_pct"]) == pytest.approx(100 * np.mean(v < 0.2))
        assert float(row["boundary_pct"]) == pytest.approx(100 * np.mean(v < 0.3))


def test_per_nerve_csv_scores_every_run_and_test_nerve_in_the_schema(smoke):
    """One row per (model, repeat, patient, side) that the per-image table has, in mm of the source series."""
    path = smoke / "reports" / "per_nerve_metrics.csv"
    assert path.read_text().splitlines()[0] == ",".join(PER_NERVE_COLUMNS)
    rows = read_per_nerve_csv(path)
    per_image = {(r["model"], int(r["repeat"]), r["patient"], r["side"])
                 for r in _rows(smoke / "reports" / "per_image_metrics.csv")}
    assert sorted((r.model, r.repeat, r.patient, r.side) for r in rows) == sorted(per_image)
    for r in rows:
        assert not r.gt_empty and r.length_true_mm > 20 and r.components_true >= 1
        assert 0.0 <= r.dsc <= 1.0 and 0.0 <= r.detected_length_mm <= r.length_true_mm + 1e-6
        assert np.isnan(r.hd95_mm) == r.pred_empty
    assert json.loads((smoke / "summary.json").read_text())["per_nerve"]["nerves"] == len(rows)


def test_region_table_means_the_nerves_of_the_region_scores(smoke):
    rows = [r for r in _rows(smoke / "reports" / "region_scores.csv") if int(r["tp"]) + int(r["fn"]) > 0]
    assert {r["model"] for r in rows} == set(NETWORKS) and {r["region"] for r in rows} == {"ramus", "body", "mental"}
    table = {(r["model"], r["region"]): r for r in _rows(smoke / "reports" / "regions.csv")}
    for (model, region), row in table.items():
        mine = [r for r in rows if (r["model"], r["region"]) == (model, region)]
        assert int(row["n"]) == len(mine) > 0
        assert float(row["recall_mean"]) == pytest.approx(np.mean([float(r["recall"]) for r in mine]), abs=1e-12)
    summary = json.loads((smoke / "summary.json").read_text())
    assert summary["regions"]["geometry"] == "measured" and len(summary["regions"]["table"]) == len(table)


def test_pvalue_table_compares_our_network_with_every_other_row_on_four_metrics(smoke):
    rows = _rows(smoke / "reports" / "pvalues.csv")
    assert {r["reference"] for r in rows} == {"ian_net"}
    assert {r["comparator"] for r in rows} == set(NETWORKS) - {"ian_net"}
    assert len(rows) == (len(NETWORKS) - 1) * 4 and {r["metric"] for r in rows} == set(METRICS)
    assert all(0 <= float(r["p_adjusted"]) <= 1 for r in rows)


def test_exported_checkpoint_loads_and_reproduces_its_runs_test_predictions(smoke):
    loaded = load_checkpoint(smoke / "export" / "ian_net_best.pt")
    meta = loaded.meta
    assert meta.architecture == "ian_net" and meta.variant == "paper-attention" and meta.width == 0.125
    assert (meta.input.size, meta.input.in_channels) == (64, 1)
    assert meta.training["repeat"] == 0 and meta.training["protocol"]["epochs"] == 1
    assert "validation" in meta.training["selection"]
    assert meta.crop == {"region": "landmarks", "trained_with": "oracle", "samples": "all",
                         "localiser_sha256": load_localiser(smoke / "export" / "localiser.pt").sha256}
    assert set(meta.training["test_metrics_mean"]) == set(METRICS)
    slices, _ = load_slice_set(smoke / "data" / "samples.npz")
    indices, saved = load_predictions(smoke / "runs" / "ian_net" / "repeat_0")
    x = torch.from_numpy(slices.images[indices]).float().div(255)[:, None]
    with torch.no_grad():
        pred = torch.sigmoid(loaded.model(x).logits)[:, 0].numpy() >= meta.threshold
    np.testing.assert_array_equal(pred, saved)


def test_summary_holds_results_versions_device_and_commit(smoke):
    summary = json.loads((smoke / "summary.json").read_text())
    assert summary["software"]["torch"] == importlib.metadata.version("torch")
    assert summary["device"]["type"] == "cpu" and "commit" in summary["git"]
    assert len(summary["runs"]) == len(NETWORKS) == 9 and summary["repeats_reported"] == [0]
    assert set(summary["table1"]) == set(NETWORKS) and len(summary["pvalues"]) == (len(NETWORKS) - 1) * 4
    assert summary["protocol"]["size"] == 64 and summary["data_report"]["n_skipped"] == 0
    assert (summary["protocol"]["crop"], summary["protocol"]["nerve_slices_only"]) == ("oracle", False)
    assert summary["crop"] == {"region": "landmarks", "trained_with": "oracle", "samples": "all"}
    exported = summary["exported_checkpoint"]
    assert exported["sha256"] == hashlib.sha256((smoke / "export" / "ian_net_best.pt").read_bytes()).hexdigest()


def test_smoke_run_trains_a_localiser_the_node_accepts_next_to_the_exported_checkpoint(smoke):
    checkpoint = load_checkpoint(smoke / "export" / "ian_net_best.pt")
    localiser = load_localiser(smoke / "export" / "localiser.pt")
    assert localiser.meta.region == checkpoint.meta.crop["region"] == "landmarks"
    check_crop_compatible(checkpoint.meta, "auto", localiser)
    assert localiser.meta.spacing_mm == 6.0 and localiser.meta.training["iterations"] == 20  # the smoke preset's
    summary = json.loads((smoke / "summary.json").read_text())
    record = summary["localiser"]
    assert record["status"] == "trained" and record["sha256"] == localiser.sha256
    assert record["safety_margin_mm"] == localiser.meta.safety_margin_mm and record["validation"]["sides"] == 2
    assert checkpoint.meta.crop["localiser_sha256"] == localiser.sha256
    assert checkpoint.meta.training["localiser"]["sha256"] == localiser.sha256
    assert "patients" not in checkpoint.meta.training["localiser"]  # the deployed checkpoint names no patient
    assert json.loads((smoke / "ledger.json").read_text())["localiser"] == record


def test_the_localiser_learns_the_exported_repeats_train_and_validation_patients_never_its_test_patients(smoke):
    summary = json.loads((smoke / "summary.json").read_text())
    split = next(s for s in summary["splits"] if s["repeat"] == summary["exported_checkpoint"]["repeat"])
    record = summary["localiser"]
    assert record["patients"] == {"train": sorted(split["train"]), "val": sorted(split["val"])}
    studies = load_localiser(smoke / "export" / "localiser.pt").meta.training["benchmark"]["studies"]
    assert sorted(studies["train"]) == sorted(patient_key(p) for p in split["train"])
    assert sorted(studies["val"]) == sorted(patient_key(p) for p in split["val"])
    assert not {patient_key(p) for p in split["test"]} & set(studies["train"] + studies["val"])


def test_a_rerun_keeps_the_localiser_of_the_same_repeat_and_settings(smoke):
    path = smoke / "export" / "localiser.pt"
    stamp, sha = path.stat().st_mtime_ns, load_localiser(path).sha256
    ledger = Ledger.read(smoke / "ledger.json")
    source = json.loads((smoke / "summary.json").read_text())["data"]
    record = benchmark_localiser(BenchmarkPaths(smoke), ledger, source, "landmarks", 0, localiser_preset("smoke"),
                                 Runtime(threads=1, progress=False))
    assert record["status"] == "kept" and record["sha256"] == sha and path.stat().st_mtime_ns == stamp
    assert record["patients"]  # carried over from the ledger


def test_evaluate_only_rebuilds_identical_reports_from_saved_predictions_and_checkpoints(smoke):
    before = (smoke / "reports" / "per_image_metrics.csv").read_bytes()
    table1 = (smoke / "reports" / "table1.csv").read_bytes()
    for name in REPORTS:
        (smoke / "reports" / name).unlink()
    run = smoke / "runs" / "meganet" / "repeat_0"
    (run / "test_predictions.npz").unlink()  # this run is predicted again from checkpoint_best.pt
    assert main(["--out", str(smoke), "--evaluate-only", "--threads", "1", "--no-progress"]) == 0
    assert (run / "test_predictions.npz").is_file()
    assert (smoke / "reports" / "per_image_metrics.csv").read_bytes() == before
    assert (smoke / "reports" / "table1.csv").read_bytes() == table1
    assert all((smoke / "reports" / name).is_file() for name in REPORTS)
    assert json.loads((smoke / "summary.json").read_text())["localiser"]["status"] == "kept"


def test_changed_settings_in_an_existing_folder_are_refused(smoke, caplog):
    ledger = (smoke / "ledger.json").read_bytes()
    assert main([*SMOKE, "--out", str(smoke), "--epochs", "2"]) == 2
    assert "other settings (epochs: 1 vs 2)" in caplog.text
    assert (smoke / "ledger.json").read_bytes() == ledger


def test_paper_preset_without_data_is_refused(tmp_path, caplog):
    assert main(["--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--data is required" in caplog.text


def test_killed_run_resumes_and_matches_an_uninterrupted_run(smoke, tmp_path):
    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "-m", "training.benchmark", *SMOKE, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the benchmark exited ({proc.returncode}) before a run had finished")
            ledger = out / "ledger.json"
            if ledger.is_file():
                runs = json.loads(ledger.read_text())["runs"]
                if any(r["status"] == "finished" for r in runs.values()):
                    break
            assert time.monotonic() < deadline, "no run finished in time"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    runs = json.loads((out / "ledger.json").read_text())["runs"]
    finished = [k for k, r in runs.items() if r["status"] == "finished"]
    assert 1 <= len(finished) < len(NETWORKS)
    first = out / "runs" / finished[0] / "result.json"
    stamp = first.stat().st_mtime_ns
    threads = torch.get_num_threads()
    try:
        assert main([*SMOKE, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert first.stat().st_mtime_ns == stamp  # a finished run is never retrained
    assert (out / "reports" / "per_image_metrics.csv").read_bytes() == (
        smoke / "reports" / "per_image_metrics.csv").read_bytes()
