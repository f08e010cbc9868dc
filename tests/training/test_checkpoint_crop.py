"""Checkpoints record the crop their samples were made with, and the benchmark exports on validation, not test, data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint
from training.data import LoadReport, SampleMeta, SliceSet
from training.default_model import DefaultModelRecipe, train_default_model
from training.loop import STATE_FORMAT, EpochRecord, TrainResult
from training.metrics import ImageScore
from training.outputs import export_best
from training.presets import PRESETS, Protocol
from training.runner import BenchmarkPaths, Ledger, RunRecord, build_model

SIZE = 64
CROP = {"region": "nerve-margins", "trained_with": "oracle", "samples": "all"}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _slices(patients: int) -> SliceSet:
    metas = tuple(SampleMeta(f"P{p}", "right", k) for p in range(patients) for k in range(2))
    n = len(metas)
    return SliceSet(np.zeros((n, SIZE, SIZE), np.uint8), np.zeros((n, SIZE, SIZE), bool), metas,
                    LoadReport("dicom", "/data", (), {**CROP, "localiser_sha256": None}))


def _finished_run(paths: BenchmarkPaths, ledger: Ledger, repeat: int, val_dsc: float, val_loss: float) -> RunRecord:
    """A finished ian_net run on disk: its best weights and a result.json whose best epoch scored `val_dsc`."""
    split = ledger.splits[repeat]
    run_dir = paths.run_dir("ian_net", repeat)
    run_dir.mkdir(parents=True)
    net = build_model(ledger.protocol, "ian_net", split)
    torch.save({"format": STATE_FORMAT, "model": net.state_dict()}, run_dir / "checkpoint_best.pt")
    history = (EpochRecord(1, 1.0, val_loss + 0.1, val_dsc - 0.1, 1e-3, 1.0, True),
               EpochRecord(2, 0.9, val_loss, val_dsc, 1e-3, 1.0, True))
    result = TrainResult(run_dir, 2, 2, val_loss, False, 2.0, history)
    (run_dir / "result.json").write_text(json.dumps(result.to_dict()))
    return RunRecord("ian_net", repeat, 2, 2, val_loss, False, 2.0, 0.01, 4, 2, 2)


def _test_scores(repeat: int, dsc: float) -> list[ImageScore]:
    return [ImageScore("ian_net", repeat, f"P{p}", "right", 0, dsc, dsc, dsc, dsc) for p in range(2)]


def test_export_takes_the_repeat_with_the_best_validation_dsc_not_the_best_test_dsc(tmp_path):
    protocol = Protocol(models=("ian_net",), repeats=2, width=0.125, size=SIZE, in_channels=1)
    slices = _slices(8)
    paths = BenchmarkPaths(tmp_path)
    ledger = Ledger.open(paths.ledger, protocol, slices)
    records = [_finished_run(paths, ledger, 0, val_dsc=0.40, val_loss=0.30),  # better on test
               _finished_run(paths, ledger, 1, val_dsc=0.60, val_loss=0.35)]  # better on validation
    scores = _test_scores(0, 0.9) + _test_scores(1, 0.2)
    exported = export_best(records, scores, ledger, paths, slices, {})
    assert exported["repeat"] == 1 and exported["val_dsc"] == pytest.approx(0.60)
    meta = load_checkpoint(paths.export).meta
    assert meta.training["repeat"] == 1 and "validation" in meta.training["selection"]
    assert meta.training["test_metrics_mean"]["dsc"] == pytest.approx(0.2)
    assert meta.crop == CROP


def test_export_breaks_a_validation_dsc_tie_by_the_lower_validation_loss(tmp_path):
    protocol = Protocol(models=("ian_net",), repeats=2, width=0.125, size=SIZE, in_channels=1)
    slices = _slices(8)
    paths = BenchmarkPaths(tmp_path)
    ledger = Ledger.open(paths.ledger, protocol, slices)
    records = [_finished_run(paths, ledger, 0, val_dsc=0.5, val_loss=0.40),
               _finished_run(paths, ledger, 1, val_dsc=0.5, val_loss=0.20)]
    exported = export_best(records, _test_scores(0, 0.9) + _test_scores(1, 0.1), ledger, paths, slices, {})
    assert exported["repeat"] == 1


def test_the_paper_preset_takes_nerve_slices_and_the_phantom_presets_every_slice_of_the_oracle_crop():
    assert (PRESETS["paper"].crop, PRESETS["paper"].nerve_slices_only) == ("oracle", True)
    for name in ("smoke", "phantom"):
        assert (PRESETS[name].crop, PRESETS[name].nerve_slices_only) == ("oracle", False)


def test_a_ledger_protocol_of_the_old_crop_names_reads_as_todays():
    old = {**Protocol().to_dict(), "crop": "boxes", "empty_ratio": 0.0}
    del old["nerve_slices_only"]
    protocol = Protocol.from_dict(old)
    assert (protocol.crop, protocol.nerve_slices_only) == ("oracle", True)
    with pytest.raises(ValueError, match="empty_ratio 0.5"):
        Protocol.from_dict({**old, "empty_ratio": 0.5})


def test_the_bundled_models_recipe_records_the_landmark_crop_and_every_slice(tmp_path):
    recipe = DefaultModelRecipe(train_patients=1, val_patients=1, size=SIZE, epochs=1, batch_size=32)
    summary = train_default_model(tmp_path / "model.pt", recipe, tmp_path / "run")
    meta = load_checkpoint(tmp_path / "model.pt").meta
    assert meta.crop == {"region": "landmarks", "trained_with": "oracle", "samples": "all"}
    assert "validation" in summary["selection"] and summary["val_slices"] > 0
