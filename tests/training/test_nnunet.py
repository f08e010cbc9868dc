"""nnU-Net as rows of the benchmark (`train_benchmark --nnunet`), end to end on tiny phantoms on the CPU:
export, nnU-Net's plan and preprocess, training (our 2-iteration trainer), prediction, and its rows scored
by the same code as every network's, per slice and per nerve."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from training.nnunet import CONFIGURATIONS, NnunetError, parse_configurations

nnunetv2 = pytest.importorskip("nnunetv2", reason="nnU-Net rows need the optional extra: pip install ian-node[nnunet]")

from training.benchmark import main  # noqa: E402
from training.data import LoadReport, SampleMeta, SideGeometry, SliceSet  # noqa: E402
from training.nnunet.export import export_raw, write_case  # noqa: E402
from training.nnunet.score import read_predictions  # noqa: E402
from training.runner import BenchmarkPaths, Ledger, load_predictions  # noqa: E402
from training.splits import Split  # noqa: E402

ROWS = tuple(f"nnunet_{c}" for c in CONFIGURATIONS)


def _benchmark(out: Path, *extra: str) -> None:
    threads = torch.get_num_threads()
    try:
        assert main(["--preset", "smoke", "--models", "ian_net", "--threads", "1", "--no-progress",
                     "--localiser-iterations", "0", "--nnunet", ",".join(CONFIGURATIONS),
                     "--nnunet-trainer", "nnUNetTrainer_ianSmoke", "--device", "cpu", "--out", str(out), *extra]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nnunet") / "bench"
    _benchmark(out)
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_configurations_are_checked():
    assert parse_configurations("2d, 3d_fullres,2d") == ("2d", "3d_fullres")
    with pytest.raises(NnunetError, match="3d_lowres"):
        parse_configurations("3d_lowres")


def test_predictions_map_back_to_their_samples(tmp_path):
    """The export's case volumes, read back as if nnU-Net had predicted them, give each sample its own mask."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    metas = tuple(SampleMeta(f"P{p}", side, k) for p in range(3) for side in ("left", "right") for k in (4, 2, 7))
    masks = rng.random((len(metas), 16, 16)) > 0.7
    images = rng.integers(0, 255, (len(metas), 16, 16), dtype=np.uint8)
    geometry = tuple(SideGeometry(f"P{p}", side, 0.5, 2, 0.25, 0.3) for p in range(3) for side in ("left", "right"))
    slices = SliceSet(images, masks, metas, LoadReport("test", "", geometry=geometry))
    dataset = export_raw(slices, Split(0, 1, ("P0",), ("P1",), ("P2",)), tmp_path / "raw")
    predicted = tmp_path / "predicted"
    predicted.mkdir()
    for case in dataset.test:
        volume = sitk.ReadImage(str(dataset.images_ts / f"{case.name}_0000.nii.gz"))
        assert volume.GetSpacing() == pytest.approx((0.3, 0.25, 1.0))  # (columns, rows, slices) in mm
        assert np.array_equal(sitk.GetArrayFromImage(volume), images[list(case.indices)])
        write_case(masks[list(case.indices)].astype(np.uint8), case.spacing, predicted / f"{case.name}.nii.gz")
    indices, back = read_predictions(dataset, predicted, slices)
    test = [i for i, m in enumerate(metas) if m.patient == "P2"]
    assert indices.tolist() == test and [metas[i].slice for i in indices] == [4, 2, 7, 4, 2, 7]
    assert np.array_equal(back, masks[test])


def test_export_is_nnunet_raw_format_with_the_repeats_patient_split(bench):
    ledger = Ledger.read(BenchmarkPaths(bench).ledger)
    split = ledger.splits[0]
    raw = bench / "nnunet" / "raw" / "Dataset100_IAN_repeat0"
    meta = json.loads((raw / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "nerve": 1} and meta["file_ending"] == ".nii.gz"
    assert meta["channel_names"] == {"0": "MR"}
    cases = json.loads((raw / "ian_cases.json").read_text())
    assert {c["patient"] for c in cases["test"]} == set(split.test)
    assert {c["patient"] for c in cases["train"]} == set(split.train)
    assert meta["numTraining"] == len(list((raw / "imagesTr").iterdir())) == len(cases["train"]) + len(cases["val"])
    assert sorted(p.name for p in (raw / "imagesTs").iterdir()) == sorted(f"{c['name']}_0000.nii.gz"
                                                                          for c in cases["test"])
    folds = json.loads((bench / "nnunet" / "preprocessed" / raw.name / "splits_final.json").read_text())
    assert folds == [{"train": [c["name"] for c in cases["train"]], "val": [c["name"] for c in cases["val"]]}]
    plans = json.loads((bench / "nnunet" / "preprocessed" / raw.name / "nnUNetPlans.json").read_text())
    assert plans["transpose_forward"] == [0, 1, 2]  # the 2d configuration slices coronally, as the networks see


def test_nnunet_rows_are_in_the_per_slice_and_per_nerve_tables(bench):
    paths = BenchmarkPaths(bench)
    ledger = Ledger.read(paths.ledger)
    test_patients = set(ledger.splits[0].test)
    per_image = _rows(bench / "reports" / "per_image_metrics.csv")
    reference = [r for r in per_image if r["model"] == "ian_net"]
    for row in ROWS:
        assert ledger.finished(row, 0) is not None
        indices, masks = load_predictions(paths.run_dir(row, 0))
        mine = [r for r in per_image if r["model"] == row]
        assert len(mine) == len(reference) == len(indices) == len(masks)
        assert {r["patient"] for r in mine} == test_patients
        assert all(0.0 <= float(r["dsc"]) <= 1.0 for r in mine)
    table1 = {r["model"] for r in _rows(bench / "reports" / "table1.csv")}
    assert set(ROWS) <= table1
    nerves = _rows(bench / "reports" / "per_nerve_metrics.csv")
    ours = [r for r in nerves if r["model"] == "ian_net"]
    for row in ROWS:
        mine = [r for r in nerves if r["model"] == row]
        assert sorted((r["patient"], r["side"]) for r in mine) == sorted((r["patient"], r["side"]) for r in ours)
        for r in mine:
            assert 0.0 <= float(r["dsc"]) <= 1.0 and float(r["length_true_mm"]) > 0
            assert r["pred_empty"] in ("0", "1") and (r["pred_empty"] == "1" or math.isfinite(float(r["cldice"])))


def test_evaluate_only_reports_the_nnunet_rows_again_without_running_nnunet(bench):
    before = _rows(bench / "reports" / "per_nerve_metrics.csv")
    _benchmark(bench, "--evaluate-only")
    record = json.loads((bench / "summary.json").read_text())["per_nerve"]
    assert record["nnunet_runs"] == len(ROWS) and record["nnunet_runs_predicted"] == 0
    assert _rows(bench / "reports" / "per_nerve_metrics.csv") == before
    assert set(ROWS) <= {r["model"] for r in _rows(bench / "reports" / "per_image_metrics.csv")}
