"""One benchmark in one folder: its samples, its splits, the run ledger, and training every (model, repeat).

Folder layout (`BenchmarkPaths`, the same names every time, nnU-Net style):

    OUT/ledger.json                    protocol, data fingerprint, splits, and the state of every run
    OUT/benchmark.log                  the whole benchmark's log
    OUT/data/samples.npz               the model-space samples every run used (and their load report)
    OUT/data/phantoms/                 generated phantom studies (when no --data was given)
    OUT/runs/<model>/repeat_<k>/       training.loop's run folder (config, train.log, history, best /
                                       latest / final checkpoints, result.json) plus test_predictions.npz
                                       and evaluation.json (with the evaluation's environment)
    OUT/reports/                       tables, p-values, timing, figures
    OUT/export/ian_net_best.pt         the best repeat of our network, in model/checkpoint.py format
    OUT/export/localiser.pt            its crop localiser, trained on that repeat's training and validation
                                       patients (`training.localiser_run`)
    OUT/summary.json                   everything, with software versions, device and git commit

The ledger is rewritten atomically after every run. A run it lists as finished (with its predictions
on disk) is never retrained; any other run is (re)started through `training.loop.train`, which resumes
from the run's latest checkpoint. Every repeat starts each network from the weights drawn after
`seed_everything(split.seed)`, so a run's result depends only on the protocol and the data. Each run's
ledger record names what it ran on (`RunRecord.environment`: GPU, CUDA, cuDNN, AMP, torch, Python, threads,
deterministic mode and the operations torch could not make deterministic, per training session and for
its evaluation; `training.environment`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.predictor import pick_device
from model.registry import build
from training.data import LoadOptions, SliceSet, load_dataset, load_slice_set, save_slice_set
from training.environment import Determinism, RunEnvironment
from training.loop import TrainConfig, TrainResult, load_weights, predict_dataset, seed_everything, train
from training.presets import Protocol, Runtime, load_row_pretrained
from training.splits import Split, monte_carlo_splits, split_indices

logger = logging.getLogger(__name__)

LEDGER_FORMAT = "ian-node-benchmark-ledger/1"


class BenchmarkError(ValueError):
    """A benchmark folder or setting that cannot be used as asked."""


@dataclass(frozen=True)
class BenchmarkPaths:
    root: Path

    ledger = property(lambda self: self.root / "ledger.json")
    log = property(lambda self: self.root / "benchmark.log")
    samples = property(lambda self: self.root / "data" / "samples.npz")
    phantoms = property(lambda self: self.root / "data" / "phantoms")
    reports = property(lambda self: self.root / "reports")
    export = property(lambda self: self.root / "export" / "ian_net_best.pt")
    localiser = property(lambda self: self.root / "export" / "localiser.pt")
    summary = property(lambda self: self.root / "summary.json")

    def run_dir(self, model: str, repeat: int) -> Path:
        return self.root / "runs" / model / f"repeat_{repeat}"


@dataclass(frozen=True)
class RunRecord:
    """A finished run as the ledger keeps it."""

    model: str
    repeat: int
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    train_seconds: float
    seconds_per_slice: float
    n_train: int
    n_val: int
    n_test: int
    # what the run ran on (training.environment.RunEnvironment as dicts): {"training": [one per session],
    # "evaluation": the test prediction's}; None in ledgers written before it was recorded
    environment: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return run_key(self.model, self.repeat)


def run_key(model: str, repeat: int) -> str:
    return f"{model}/repeat_{repeat}"


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (temp file, fsync, rename): a crash never leaves half a ledger."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


# ---------------------------------------------------------------- data
def ensure_phantoms(paths: BenchmarkPaths, protocol: Protocol) -> Path:
    """Generate the protocol's phantom patients once (atomically, by folder rename) and reuse them."""
    from ian_node.phantom.study import phantom_preset, write_phantoms

    try:
        config = phantom_preset(protocol.phantom_preset)
    except (KeyError, ValueError) as exc:
        raise BenchmarkError(f"phantom_preset {protocol.phantom_preset!r}: {exc}") from exc
    target = paths.phantoms
    wanted = {"seed": protocol.phantom_seed, "patients": protocol.phantom_patients,
              "preset": protocol.phantom_preset, "shape": list(config.shape)}
    marker = target / "benchmark_phantoms.json"
    if target.is_dir():
        if marker.is_file() and json.loads(marker.read_text()) == wanted:
            return target
        raise BenchmarkError(f"{target} holds other phantoms than this protocol asks for ({wanted})")
    partial = target.with_name("phantoms.partial")
    shutil.rmtree(partial, ignore_errors=True)
    logger.info("generating %d %r phantom patients of shape %s (seed %d)", protocol.phantom_patients,
                protocol.phantom_preset, config.shape, protocol.phantom_seed)
    write_phantoms(partial, protocol.phantom_patients, protocol.phantom_seed, config)
    (partial / marker.name).write_text(json.dumps(wanted))
    partial.rename(target)
    return target


def prepare_data(paths: BenchmarkPaths, protocol: Protocol, data: Path | None, fmt: str,
                 load: LoadOptions, reuse: bool = False) -> tuple[SliceSet, dict[str, Any]]:
    """The benchmark's samples and where they came from: from the folder's cache, else read from
    `data` (or generated phantoms) and cached.

    `reuse` takes the cached samples whatever they were read from (`--evaluate-only` without --data:
    the ledger's fingerprint still checks that they are the samples the runs used).
    """
    if paths.samples.is_file() and reuse and data is None:
        return load_slice_set(paths.samples)
    if data is None and not protocol.phantom_patients:
        raise BenchmarkError("--data is required: this preset does not generate phantom data")
    load = LoadOptions(**{**asdict(load), "size": protocol.size, "crop": protocol.crop,
                          "nerve_slices_only": protocol.nerve_slices_only, "slice_step": protocol.slice_step,
                          "context": protocol.context})
    source = {"data": str(Path(data).resolve()) if data is not None else "generated phantoms",
              "format": fmt if data is not None else "dicom", "load": asdict(load)}
    if paths.samples.is_file():
        slices, stored = load_slice_set(paths.samples)
        if stored != source:
            raise BenchmarkError(f"{paths.root} was built from other data or sample settings ({stored}); "
                                 "use a new --out folder")
        logger.info("samples from %s (%d)", paths.samples, len(slices))
        return slices, stored
    root = Path(data) if data is not None else ensure_phantoms(paths, protocol)
    slices = load_dataset(root, source["format"], load)
    save_slice_set(slices, paths.samples, source)
    return slices, source


# ---------------------------------------------------------------- ledger
class Ledger:
    """The run ledger: protocol, data fingerprint, splits, one record per finished run, and the
    exported checkpoint's localiser (`training.localiser_run`; None until one was trained or skipped)."""

    def __init__(self, path: Path, protocol: Protocol, fingerprint: str, splits: list[Split],
                 runs: dict[str, dict[str, Any]] | None = None, preset: str = "",
                 localiser: dict[str, Any] | None = None) -> None:
        self.path, self.protocol, self.fingerprint, self.splits = path, protocol, fingerprint, splits
        self.runs: dict[str, dict[str, Any]] = runs or {}
        self.preset = preset
        self.localiser = localiser

    @classmethod
    def read(cls, path: Path) -> Ledger:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchmarkError(f"{path}: cannot read the run ledger: {exc}") from exc
        if data.get("format") != LEDGER_FORMAT:
            raise BenchmarkError(f"{path}: not a benchmark ledger of format {LEDGER_FORMAT}")
        return cls(path, Protocol.from_dict(data["protocol"]), data["data_fingerprint"],
                   [Split.from_dict(s) for s in data["splits"]], data["runs"], data.get("preset", ""),
                   data.get("localiser"))

    @classmethod
    def open(cls, path: Path, protocol: Protocol, slices: SliceSet, preset: str = "") -> Ledger:
        """The folder's ledger, checked against `protocol` and the samples; a new one if there is none."""
        fingerprint = slices.fingerprint()
        splits = monte_carlo_splits(slices.patients, protocol.repeats, protocol.fractions, protocol.seed)
        if not path.exists():
            ledger = cls(path, protocol, fingerprint, splits, preset=preset)
            ledger.save()
            return ledger
        ledger = cls.read(path)
        diff = ledger.protocol.differences(protocol)
        if diff:
            raise BenchmarkError(f"{path.parent} holds a benchmark with other settings ({'; '.join(diff)}); "
                                 "use a new --out folder or the original settings")
        if ledger.fingerprint != fingerprint or [s.to_dict() for s in ledger.splits] != [s.to_dict() for s in splits]:
            raise BenchmarkError(f"{path.parent} was trained on other samples or splits; use a new --out folder")
        return ledger

    def save(self) -> None:
        write_json(self.path, {"format": LEDGER_FORMAT, "preset": self.preset, "protocol": self.protocol.to_dict(),
                               "data_fingerprint": self.fingerprint,
                               "splits": [s.to_dict() for s in self.splits], "runs": self.runs,
                               "localiser": self.localiser})

    def finished(self, model: str, repeat: int) -> RunRecord | None:
        entry = self.runs.get(run_key(model, repeat))
        if not entry or entry.get("status") != "finished":
            return None
        return RunRecord(**entry["record"])

    def mark(self, model: str, repeat: int, status: str, record: RunRecord | None = None) -> None:
        self.runs[run_key(model, repeat)] = {"status": status, **({"record": asdict(record)} if record else {})}
        self.save()


# ---------------------------------------------------------------- predictions
def save_predictions(run_dir: Path, indices: np.ndarray, masks: np.ndarray, evaluation: dict[str, Any]) -> None:
    tmp = run_dir / "test_predictions.tmp.npz"
    np.savez(tmp, indices=np.asarray(indices, np.int64), masks=np.packbits(masks.astype(bool)),
             shape=np.asarray(masks.shape, np.int64))
    tmp.replace(run_dir / "test_predictions.npz")
    write_json(run_dir / "evaluation.json", evaluation)


def load_predictions(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(sample indices, boolean masks (N, S, S)) of a run's test predictions."""
    with np.load(run_dir / "test_predictions.npz") as data:
        shape = tuple(int(v) for v in data["shape"])
        masks = np.unpackbits(data["masks"], count=int(np.prod(shape))).reshape(shape).astype(bool)
        return data["indices"].copy(), masks


# ---------------------------------------------------------------- training
def train_config(protocol: Protocol, runtime: Runtime, seed: int) -> TrainConfig:
    return TrainConfig(epochs=protocol.epochs, batch_size=protocol.batch_size, lr=protocol.lr,
                       weight_decay=protocol.weight_decay, min_lr=protocol.min_lr, patience=protocol.patience,
                       tversky_alpha=protocol.tversky_alpha, tversky_beta=protocol.tversky_beta,
                       focal_gamma=protocol.focal_gamma, threshold=protocol.threshold, seed=seed,
                       amp=protocol.amp, deterministic=protocol.deterministic, device=runtime.device,
                       num_workers=runtime.num_workers,
                       eval_batch_size=runtime.eval_batch_size, progress=runtime.progress)


def build_model(protocol: Protocol, model: str, split: Split) -> torch.nn.Module:
    """The network of one run, with the repeat's initial weights."""
    seed_everything(split.seed)
    return build(model, in_channels=protocol.in_channels, width=protocol.width, **protocol.model_options(model))


def evaluate_run(model_net: torch.nn.Module, slices: SliceSet, test: list[int], run_dir: Path, protocol: Protocol,
                 runtime: Runtime) -> float:
    """Predict the test split with the run's best weights through the node's `Predictor` (`predict_dataset`),
    in the protocol's deterministic mode; store the predictions and the environment; return s/slice."""
    load_weights(model_net, run_dir / "checkpoint_best.pt")
    with Determinism(protocol.deterministic) as determinism:
        preds = predict_dataset(model_net, slices.torch_dataset(test, protocol.in_channels), device=runtime.device,
                                batch_size=runtime.eval_batch_size or protocol.batch_size,
                                threshold=protocol.threshold, amp=protocol.amp, num_workers=runtime.num_workers)
    device = pick_device(runtime.device)
    environment = RunEnvironment.current(device, protocol.amp and device.type == "cuda", protocol.deterministic,
                                         tuple(determinism.ops))
    save_predictions(run_dir, np.asarray(test), preds.masks,
                     {"seconds_per_slice": preds.seconds_per_slice, "wall_seconds": preds.wall_seconds,
                      "n_test": len(test), "device": runtime.device, "environment": environment.to_dict()})
    return preds.seconds_per_slice


def run_environment(result: TrainResult, run_dir: Path) -> dict[str, Any]:
    """A run's record of what it ran on: each training session's environment and its evaluation's."""
    evaluation = run_dir / "evaluation.json"
    stored = json.loads(evaluation.read_text()).get("environment") if evaluation.is_file() else None
    return {"training": [s.to_dict() for s in result.sessions], "evaluation": stored}


def run_one(ledger: Ledger, paths: BenchmarkPaths, slices: SliceSet, model: str, split: Split,
            runtime: Runtime) -> RunRecord:
    """Train (or resume) one run, evaluate its best checkpoint on the test split, record it."""
    protocol = ledger.protocol
    roles = split_indices(slices.patients, split)
    run_dir = paths.run_dir(model, split.repeat)
    ledger.mark(model, split.repeat, "running")
    net = build_model(protocol, model, split)
    load_row_pretrained(net, protocol, runtime)  # the row's ImageNet backbone, when the protocol has one
    result: TrainResult = train(net, slices.torch_dataset(roles["train"], protocol.in_channels),
                                slices.torch_dataset(roles["val"], protocol.in_channels), run_dir,
                                train_config(protocol, runtime, split.seed))
    seconds = evaluate_run(net, slices, roles["test"], run_dir, protocol, runtime)
    record = RunRecord(model, split.repeat, result.epochs_run, result.best_epoch, result.best_val_loss,
                       result.stopped_early, result.train_seconds, seconds, len(roles["train"]),
                       len(roles["val"]), len(roles["test"]), run_environment(result, run_dir))
    ledger.mark(model, split.repeat, "finished", record)
    return record


def train_all(ledger: Ledger, paths: BenchmarkPaths, slices: SliceSet, runtime: Runtime) -> list[RunRecord]:
    """Every (repeat, model) run, repeat by repeat; finished runs are skipped, interrupted ones resume."""
    protocol = ledger.protocol
    records = []
    todo = [(split, m) for split in ledger.splits for m in protocol.models]
    done = sum(ledger.finished(m, s.repeat) is not None and _has_predictions(paths, m, s.repeat) for s, m in todo)
    if done:
        logger.info("%d of %d runs already finished; not retraining them", done, len(todo))
    with tqdm(total=len(todo), initial=done, desc="runs", unit="run", disable=not runtime.progress,
              dynamic_ncols=True) as bar:
        for split, model in todo:
            record = ledger.finished(model, split.repeat)
            if record is not None and _has_predictions(paths, model, split.repeat):
                records.append(record)
                continue
            bar.set_postfix_str(f"{model} repeat {split.repeat}")
            logger.info("run %s: training", run_key(model, split.repeat))
            records.append(run_one(ledger, paths, slices, model, split, runtime))
            bar.update(1)
    return records


def _has_predictions(paths: BenchmarkPaths, model: str, repeat: int) -> bool:
    run_dir = paths.run_dir(model, repeat)
    return (run_dir / "test_predictions.npz").is_file() and (run_dir / "evaluation.json").is_file()


def reevaluate(ledger: Ledger, paths: BenchmarkPaths, slices: SliceSet, runtime: Runtime) -> list[RunRecord]:
    """`--evaluate-only`: the finished runs, predicting again where a run has a checkpoint but no predictions."""
    protocol = ledger.protocol
    records = []
    for split in ledger.splits:
        roles = split_indices(slices.patients, split)
        for model in protocol.models:
            run_dir = paths.run_dir(model, split.repeat)
            record = ledger.finished(model, split.repeat)
            result_file = run_dir / "result.json"
            if record is None and not result_file.is_file():
                logger.warning("run %s has not finished; left out of the reports", run_key(model, split.repeat))
                continue
            if not _has_predictions(paths, model, split.repeat):
                logger.info("run %s: predicting the test split from checkpoint_best.pt", run_key(model, split.repeat))
                seconds = evaluate_run(build_model(protocol, model, split), slices, roles["test"], run_dir,
                                       protocol, runtime)
                if record is None:
                    result = TrainResult.from_dict(json.loads(result_file.read_text()))
                    record = RunRecord(model, split.repeat, result.epochs_run, result.best_epoch,
                                       result.best_val_loss, result.stopped_early, result.train_seconds, seconds,
                                       len(roles["train"]), len(roles["val"]), len(roles["test"]),
                                       run_environment(result, run_dir))
                    ledger.mark(model, split.repeat, "finished", record)
            records.append(record)
    return records
