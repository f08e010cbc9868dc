"""nnU-Net's plan, preprocess, train and predict through its own command-line entry points, per repeat.

Folders (`NnunetPaths`, under the benchmark's ``--out``; nnU-Net's three environment variables point there):

    OUT/nnunet/raw/DatasetNNN_IAN_repeatK/       nnUNet_raw: the repeat's export (`training.nnunet.export`)
    OUT/nnunet/preprocessed/DatasetNNN_.../      nnUNet_preprocessed: plans, preprocessed data, splits_final.json
    OUT/nnunet/results/DatasetNNN_.../           nnUNet_results: TRAINER__nnUNetPlans__CONFIG/fold_0/
    OUT/nnunet/predictions/CONFIG/repeat_K/      nnUNetv2_predict's output for the repeat's imagesTs
    OUT/nnunet/logs/                             each step's console output
    OUT/runs/nnunet_CONFIG/repeat_K/             test_predictions.npz and evaluation.json, as every network's

Each step runs in a child Python with nnU-Net's environment set, so that nnU-Net's import-time settings
and worker processes stay out of the benchmark's process: planning and preprocessing by the entry
function of ``nnUNetv2_plan_and_preprocess`` (or ``nnUNetv2_preprocess``), training and prediction
through nnU-Net's trainer and predictor API (`training.nnunet.child`, which says why not its CLI). A finished run is recorded in the benchmark's ledger like a network's run and
never redone; an interrupted training continues from nnU-Net's latest checkpoint (``--c``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.predictor import pick_device
from training.data import SliceSet
from training.nnunet import DEFAULT_TRAINER, NnunetError, require_nnunet, row_name
from training.nnunet.export import RawDataset, export_raw, write_splits
from training.nnunet.score import read_predictions
from training.runner import BenchmarkPaths, Ledger, RunRecord, save_predictions
from training.splits import Split, split_indices

logger = logging.getLogger(__name__)

PLANS = "nnUNetPlans"
#: Console script name → (module, function), as nnunetv2's package metadata declares them.
ENTRY_POINTS: dict[str, tuple[str, str]] = {
    "nnUNetv2_plan_and_preprocess": ("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
                                     "plan_and_preprocess_entry"),
    "nnUNetv2_preprocess": ("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "preprocess_entry"),
}


@dataclass(frozen=True)
class NnunetPaths:
    root: Path

    raw = property(lambda self: self.root / "raw")
    preprocessed = property(lambda self: self.root / "preprocessed")
    results = property(lambda self: self.root / "results")
    logs = property(lambda self: self.root / "logs")

    @classmethod
    def of(cls, paths: BenchmarkPaths) -> NnunetPaths:
        return cls(paths.root / "nnunet")

    def predictions(self, configuration: str, repeat: int) -> Path:
        return self.root / "predictions" / configuration / f"repeat_{repeat}"

    def fold_dir(self, dataset: RawDataset, configuration: str, trainer: str) -> Path:
        return self.results / dataset.name / f"{trainer}__{PLANS}__{configuration}" / "fold_0"


@dataclass(frozen=True)
class NnunetSettings:
    """Which nnU-Net runs: its configurations, trainer and device (``auto``: CUDA when present)."""

    configurations: tuple[str, ...]
    trainer: str = DEFAULT_TRAINER
    device: str = "auto"
    processes: int = max(1, min(4, os.cpu_count() or 1))  # preprocessing and export workers

    @property
    def device_type(self) -> str:
        return pick_device(self.device).type


def nnunet_env(paths: NnunetPaths, settings: NnunetSettings) -> dict[str, str]:
    """The child processes' environment: nnU-Net's folders, our trainers, and (unless set) `processes` workers
    for nnU-Net's data augmentation (its planner also takes its CPU threads from that number)."""
    env = dict(os.environ)
    env.update(nnUNet_raw=str(paths.raw), nnUNet_preprocessed=str(paths.preprocessed),
               nnUNet_results=str(paths.results))
    env.setdefault("nnUNet_n_proc_DA", str(settings.processes))
    return env


def nnunet_command(script: str, args: list[str], env: dict[str, str], log: Path) -> None:
    """Run one of nnU-Net's console scripts (by its entry function); its output goes to `log`."""
    module, function = ENTRY_POINTS[script]
    code = f"import sys; from {module} import {function} as main; sys.argv[0] = {script!r}; sys.exit(main())"
    _child(script, ["-c", code, *args], env, log)


def child_step(step: str, args: list[str], env: dict[str, str], log: Path) -> None:
    """Run a step of `training.nnunet.child` (nnU-Net's training or prediction API); its output goes to `log`."""
    _child(f"nnunet {step}", ["-m", "training.nnunet.child", step, *args], env, log)


def _child(what: str, args: list[str], env: dict[str, str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    shown = " ".join(args[2:] if args[0] == "-c" else args[1:])
    logger.info("%s: %s", what, shown)
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ {what}: {shown}\n")
        out.flush()
        done = subprocess.run([sys.executable, *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
        raise NnunetError(f"{what} failed with exit status {done.returncode} (log {log}):\n{tail}")


def plan_and_preprocess(dataset: RawDataset, paths: NnunetPaths, settings: NnunetSettings,
                        env: dict[str, str]) -> dict:
    """nnU-Net's plans for the dataset, planning and preprocessing the configurations not done yet."""
    folder = paths.preprocessed / dataset.name
    plans_file = folder / f"{PLANS}.json"
    log = paths.logs / f"{dataset.name}_preprocess.log"
    missing = [c for c in settings.configurations if not (folder / f"{PLANS}_{c}").is_dir()]
    n = str(settings.processes)
    if not plans_file.is_file():
        nnunet_command("nnUNetv2_plan_and_preprocess",
                       ["-d", str(dataset.dataset_id), "-c", *settings.configurations,
                        "-np", *([n] * len(settings.configurations)), "-npfp", n, "--verify_dataset_integrity",
                        "--no_pbar"], env, log)
    elif missing:
        nnunet_command("nnUNetv2_preprocess", ["-d", str(dataset.dataset_id), "-c", *missing,
                                               "-np", *([n] * len(missing))], env, log)
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    absent = [c for c in settings.configurations if c not in plans.get("configurations", {})]
    if absent:
        raise NnunetError(f"nnU-Net planned no {', '.join(absent)} configuration for {dataset.name} "
                          f"(planned: {', '.join(plans.get('configurations', {}))})")
    if list(plans.get("transpose_forward", [0, 1, 2])) != [0, 1, 2]:
        logger.warning("%s: nnU-Net's plans transpose the axes (%s): its 2d configuration does not slice "
                       "coronally here", dataset.name, plans["transpose_forward"])
    return plans


def train_fold(dataset: RawDataset, configuration: str, paths: NnunetPaths, settings: NnunetSettings,
               env: dict[str, str]) -> Path:
    """nnU-Net's fold 0 (the repeat's split), trained or continued; returns its final checkpoint."""
    fold = paths.fold_dir(dataset, configuration, settings.trainer)
    final = fold / "checkpoint_final.pth"
    if final.is_file():
        return final
    if settings.device_type == "cpu" and "nnUNet_n_proc_DA" not in os.environ:
        env = {**env, "nnUNet_n_proc_DA": "0"}  # on a CPU, augmentation workers only compete with training
    child_step("train", [str(dataset.dataset_id), configuration, settings.trainer, settings.device_type], env,
               paths.logs / f"{dataset.name}_{configuration}_train.log")
    if not final.is_file():
        raise NnunetError(f"nnUNetv2_train ended without {final}")
    return final


def predict_test(dataset: RawDataset, configuration: str, paths: NnunetPaths, settings: NnunetSettings,
                 env: dict[str, str]) -> tuple[Path, float]:
    """nnU-Net's prediction of the repeat's test cases (imagesTs); returns its folder and the wall seconds."""
    out = paths.predictions(configuration, dataset.repeat)
    start = time.perf_counter()
    child_step("predict", [str(dataset.dataset_id), configuration, settings.trainer, settings.device_type,
                           str(dataset.images_ts), str(out)], env,
               paths.logs / f"{dataset.name}_{configuration}_predict.log")
    return out, time.perf_counter() - start


def run_record(row: str, repeat: int, checkpoint: Path, seconds_per_slice: float, roles: dict[str, list[int]],
               ) -> RunRecord:
    """The ledger's record of an nnU-Net run, from its final checkpoint's log (best epoch: the highest EMA
    pseudo-Dice, nnU-Net's own choice of checkpoint_best)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    log = state["logging"]
    ema = np.asarray(log["ema_fg_dice"], dtype=float)
    best = int(np.argmax(ema)) if ema.size else 0
    val_losses = log["val_losses"]
    seconds = float(sum(e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"],
                                              strict=False)))
    return RunRecord(row, repeat, int(state["current_epoch"]), best + 1,  # epochs counted from 1, as the loop's
                     float(val_losses[best]) if val_losses else float("nan"), False, seconds, seconds_per_slice,
                     len(roles["train"]), len(roles["val"]), len(roles["test"]))


def run_nnunet(ledger: Ledger, paths: BenchmarkPaths, slices: SliceSet, split: Split, configuration: str,
               settings: NnunetSettings) -> RunRecord:
    """One nnU-Net run (configuration × repeat): export, plan, train, predict, store its predictions, record it."""
    require_nnunet()
    row = row_name(configuration)
    npaths = NnunetPaths.of(paths)
    env = nnunet_env(npaths, settings)
    dataset = export_raw(slices, split, npaths.raw)
    ledger.mark(row, split.repeat, "running")
    plan_and_preprocess(dataset, npaths, settings, env)
    write_splits(dataset, npaths.preprocessed)
    checkpoint = train_fold(dataset, configuration, npaths, settings, env)
    folder, seconds = predict_test(dataset, configuration, npaths, settings, env)
    indices, masks = read_predictions(dataset, folder, slices)
    roles = split_indices(slices.patients, split)
    if sorted(roles["test"]) != indices.tolist():
        raise NnunetError(f"{dataset.name}: the predicted samples are not the repeat's test samples")
    run_dir = paths.run_dir(row, split.repeat)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_predictions(run_dir, indices, masks, {
        "seconds_per_slice": seconds / len(indices), "wall_seconds": seconds, "n_test": len(indices),
        "device": settings.device_type, "nnunet": {"dataset": dataset.name, "configuration": configuration,
                                                   "trainer": settings.trainer, "plans": PLANS,
                                                   "checkpoint": str(checkpoint)}})
    record = run_record(row, split.repeat, checkpoint, seconds / len(indices), roles)
    ledger.mark(row, split.repeat, "finished", record)
    return record


def nnunet_rows(ledger: Ledger, paths: BenchmarkPaths, slices: SliceSet, settings: NnunetSettings,
                train: bool = True) -> list[RunRecord]:
    """Every (configuration, repeat) nnU-Net run of the benchmark: finished ones from the ledger, the others
    run now (or, with `train` False, `--evaluate-only`, left out with a warning)."""
    records = []
    for split in ledger.splits:
        for configuration in settings.configurations:
            row = row_name(configuration)
            record = ledger.finished(row, split.repeat)
            run_dir = paths.run_dir(row, split.repeat)
            if record is not None and (run_dir / "test_predictions.npz").is_file():
                records.append(record)
            elif train:
                logger.info("run %s/repeat_%d: nnU-Net %s, trainer %s", row, split.repeat, configuration,
                            settings.trainer)
                records.append(run_nnunet(ledger, paths, slices, split, configuration, settings))
            else:
                logger.warning("nnU-Net run %s/repeat_%d has not finished; left out of the reports", row, split.repeat)
    return records
