"""Train one network on one split, resumably, and predict a dataset for evaluation.

Dataset contract (what `training.data.SliceSet.torch_dataset` yields): a map-style torch Dataset whose
items are `(image, mask)` or `(image, mask, meta)`, image float32 (C, H, W) in [0, 1], mask float32
(1, H, W) with values 0/1, and meta a `training.data.SampleMeta` (or any object/mapping with `patient`,
`side`, `slice`). Training ignores meta; `predict_dataset` returns it with each prediction.

Evaluation runs through the node's own `model.predictor.Predictor` (its device choice, memory format,
autocast rule and sigmoid), thresholded `>= threshold` as the node's pipeline does, so a run is scored
as the node would run its checkpoint.

Losses: training uses the network's deep supervision through `deep_supervision_loss` and its
`loss_weights`; the validation loss (early stopping, best checkpoint) is the main output's Focal
Tversky loss in eval mode, the same quantity for every network.

Run folder (same names every run, nnU-Net style): `config.json`, `train.log`, `history.json`,
`checkpoint_latest.pt` (full training state, rewritten atomically after every epoch),
`checkpoint_best.pt` (weights at the lowest validation loss), `checkpoint_final.pt` (weights when
training ended) and `result.json` (written last; its presence means the run is finished and is
never retrained).

Determinism: every epoch reseeds torch, numpy, `random` and the shuffling generator from
(config.seed, epoch), so the random state never has to be carried across a crash: an interrupted
run resumed from `checkpoint_latest.pt` (model, optimiser, scheduler, AMP scaler, epoch, best
validation loss, patience counter) replays the remaining epochs exactly as an uninterrupted run
would, on the same device and thread count (tested with a real SIGKILL in tests/training/test_resume.py).
`deterministic` runs training inside `training.environment.Determinism` (deterministic cuDNN, cuBLAS and
torch algorithms; the operations torch has no deterministic implementation for are recorded, not
refused), restored on return. Each training session's `RunEnvironment` (GPU, CUDA, cuDNN, AMP, torch,
Python, threads, those operations) goes into `config.json`, the latest state and `TrainResult.sessions`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from model.checkpoint import InputContract
from model.predictor import Predictor, PredictorOptions, pick_device
from training.environment import Determinism, RunEnvironment
from training.losses import FocalTverskyLoss, deep_supervision_loss
from training.metrics import ImageScore, image_metrics
from training.settings import reject_unknown_fields

logger = logging.getLogger(__name__)

STATE_FORMAT = "ian-node-train-state/1"
#: Settings that may differ when a run resumes: they do not change what is computed.
RUNTIME_FIELDS = frozenset({"device", "num_workers", "eval_batch_size", "progress"})


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting; the defaults are the paper's protocol."""

    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    min_lr: float = 0.0  # eta_min of the cosine annealing over `epochs`
    patience: int = 25  # epochs without a lower validation loss before stopping
    tversky_alpha: float = 0.7  # weight of false negatives
    tversky_beta: float = 0.3  # weight of false positives
    focal_gamma: float = 2.0
    threshold: float = 0.5  # probability threshold for the validation DSC
    seed: int = 0
    amp: bool = True  # mixed precision; only ever used on CUDA
    deterministic: bool = True  # deterministic torch algorithms (training.environment.Determinism)
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    num_workers: int | None = None  # None: min(8, CPUs) on CUDA, 0 on the CPU
    eval_batch_size: int | None = None  # None: batch_size
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0 or self.weight_decay < 0 or self.min_lr < 0:
            raise ValueError(f"TrainConfig: need lr > 0, weight_decay >= 0, min_lr >= 0, got {self.lr}, "
                             f"{self.weight_decay}, {self.min_lr}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"TrainConfig.num_workers must be >= 0 or None, got {self.num_workers}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"TrainConfig.threshold must be in (0, 1), got {self.threshold}")
        FocalTverskyLoss(self.tversky_alpha, self.tversky_beta, self.focal_gamma)  # validates those three

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        reject_unknown_fields(cls, data, "TrainConfig")
        return cls(**data)


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    val_dsc: float
    lr: float
    seconds: float
    improved: bool


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    train_seconds: float  # summed over every session of a resumed run
    history: tuple[EpochRecord, ...]
    sessions: tuple[RunEnvironment, ...] = ()  # one per training session (a resumed run has several)

    @property
    def training_hours(self) -> float:
        return self.train_seconds / 3600.0

    @property
    def best_checkpoint(self) -> Path:
        return RunPaths(self.run_dir).best

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "run_dir": str(self.run_dir), "history": [asdict(h) for h in self.history],
                "sessions": [s.to_dict() for s in self.sessions]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainResult:
        return cls(**{**data, "run_dir": Path(data["run_dir"]),
                      "history": tuple(EpochRecord(**h) for h in data["history"]),
                      "sessions": tuple(RunEnvironment.from_dict(s) for s in data.get("sessions", ()))})


@dataclass(frozen=True)
class RunPaths:
    root: Path

    config = property(lambda self: self.root / "config.json")
    log = property(lambda self: self.root / "train.log")
    history = property(lambda self: self.root / "history.json")
    latest = property(lambda self: self.root / "checkpoint_latest.pt")
    best = property(lambda self: self.root / "checkpoint_best.pt")
    final = property(lambda self: self.root / "checkpoint_final.pt")
    result = property(lambda self: self.root / "result.json")


@dataclass(frozen=True)
class Predictions:
    """Binary predictions (N, H, W) with their targets and metadata, in dataset order, and timing."""

    masks: np.ndarray
    targets: np.ndarray
    metas: tuple[Any, ...]
    probabilities: np.ndarray | None  # float16 (N, H, W) when asked for
    seconds_per_slice: float  # the predictor's forward + sigmoid only, device-synchronised, after a warm-up
    wall_seconds: float

    def scores(self, model: str, repeat: int) -> list[ImageScore]:
        """The per-image metrics rows of these predictions."""
        return [
            ImageScore.of(model, repeat, str(_field(m, "patient")), str(_field(m, "side")), int(_field(m, "slice")),
                          image_metrics(p, t))
            for p, t, m in zip(self.masks, self.targets, self.metas, strict=True)
        ]


EpochCallback = Callable[[EpochRecord], None]


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and `random`, e.g. before building a model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def collate_samples(batch: Sequence[tuple]) -> tuple[Tensor, Tensor, list[Any]]:
    """Stack images and masks; keep metadata as a plain list (it may be any object)."""
    if not batch or len(batch[0]) not in (2, 3):
        raise ValueError("dataset items must be (image, mask) or (image, mask, meta)")
    images = default_collate([item[0] for item in batch])
    masks = default_collate([item[1] for item in batch])
    metas = [item[2] if len(item) == 3 else None for item in batch]
    return images, masks, metas


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, device: torch.device,
                num_workers: int | None = None, generator: torch.Generator | None = None,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader with worker processes and pinned memory on CUDA so the GPU is not kept waiting."""
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    extra: dict[str, Any] = {"prefetch_factor": 4, "worker_init_fn": _seed_worker} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      pin_memory=device.type == "cuda", collate_fn=collate_samples, generator=generator,
                      drop_last=drop_last, **extra)


def train(model: nn.Module, train_set: Dataset, val_set: Dataset, run_dir: str | Path,
          config: TrainConfig = TrainConfig(), epoch_callback: EpochCallback | None = None) -> TrainResult:
    """Train `model` in `run_dir`, resuming from its latest checkpoint; a finished run is not retrained.

    On return the model holds the final weights (use `load_weights(model, result.best_checkpoint)`
    to evaluate the lowest-validation-loss epoch). `epoch_callback` runs after each epoch's
    checkpoint is written; an exception it raises interrupts the run like a crash would.
    """
    paths = RunPaths(Path(run_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    if len(train_set) == 0 or len(val_set) == 0:  # type: ignore[arg-type]
        raise ValueError(f"run {paths.root.name}: training and validation sets must not be empty "
                         f"(got {len(train_set)} and {len(val_set)} samples)")  # type: ignore[arg-type]
    handler = logging.FileHandler(paths.log, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    old_level = logger.level
    logger.setLevel(min(logging.INFO, logger.getEffectiveLevel()))
    logger.addHandler(handler)
    try:
        with Determinism(config.deterministic) as determinism:
            return _train(model, train_set, val_set, paths, config, epoch_callback, determinism)
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(old_level)


def _train(model: nn.Module, train_set: Dataset, val_set: Dataset, paths: RunPaths, config: TrainConfig,
           epoch_callback: EpochCallback | None, determinism: Determinism) -> TrainResult:
    device = pick_device(config.device)
    if paths.result.exists() and paths.final.exists():
        logger.info("run %s already finished; not retraining", paths.root.name)
        load_weights(model, paths.final)
        return TrainResult.from_dict(json.loads(paths.result.read_text()))
    use_amp = config.amp and device.type == "cuda"
    environment = RunEnvironment.current(device, use_amp, config.deterministic)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=config.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    loss_fn = FocalTverskyLoss(config.tversky_alpha, config.tversky_beta, config.focal_gamma)
    weights = tuple(getattr(model, "loss_weights", (1.0,)))
    name = getattr(model, "name", "") or type(model).__name__

    epoch, best_val, best_epoch, stale, spent = 0, math.inf, 0, 0, 0.0
    history: list[EpochRecord] = []
    earlier: list[RunEnvironment] = []  # the sessions before this one
    if paths.latest.exists():
        state = torch.load(paths.latest, map_location="cpu", weights_only=True)
        _check_resumable(state, config, name, paths)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch, best_val, best_epoch = state["epoch"], state["best_val_loss"], state["best_epoch"]
        stale, spent = state["epochs_without_improvement"], state["train_seconds"]
        history = [EpochRecord(**h) for h in state["history"]]
        earlier = [RunEnvironment.from_dict(s) for s in state.get("sessions", ())]
        logger.info("run %s: resuming after epoch %d (best val loss %.5f at epoch %d)",
                    paths.root.name, epoch, best_val, best_epoch)
    paths.config.write_text(json.dumps({"network": name, "config": asdict(config), "device": str(device),
                                        "amp": use_amp, "n_train": len(train_set), "n_val": len(val_set),
                                        "torch": torch.__version__, "environment": environment.to_dict()},
                                       indent=2))
    logger.info("run %s: %s, %d train / %d val samples, device %s, AMP %s", paths.root.name, name,
                len(train_set), len(val_set), device, use_amp)

    generator = torch.Generator()
    drop_last = len(train_set) % config.batch_size == 1  # a batch of one breaks BatchNorm
    train_loader = make_loader(train_set, config.batch_size, True, device, config.num_workers, generator, drop_last)
    val_loader = make_loader(val_set, config.eval_batch_size or config.batch_size, False, device, config.num_workers)
    session_start = time.perf_counter()
    stopped_early = stale >= config.patience and epoch < config.epochs
    bar = tqdm(total=config.epochs, initial=epoch, desc=f"{name} {paths.root.name}", unit="epoch",
               disable=not config.progress, dynamic_ncols=True)
    try:
        while epoch < config.epochs and not stopped_early:
            epoch += 1
            started = time.perf_counter()
            epoch_seed = _epoch_seed(config.seed, epoch)
            seed_everything(epoch_seed)
            generator.manual_seed(epoch_seed)
            lr = optimizer.param_groups[0]["lr"]
            train_loss = _train_epoch(model, train_loader, optimizer, scaler, loss_fn, weights, device, use_amp,
                                      config.progress)
            val_loss, val_dsc = _validate(model, val_loader, loss_fn, device, use_amp, config.threshold)
            scheduler.step()
            improved = val_loss < best_val
            if improved:
                best_val, best_epoch, stale = val_loss, epoch, 0
                _atomic_save({"format": STATE_FORMAT, "network": name, "kind": "best", "epoch": epoch,
                              "val_loss": val_loss, "model": model.state_dict()}, paths.best)
            else:
                stale += 1
            if not math.isfinite(train_loss):
                logger.warning("epoch %d: training loss is not finite", epoch)
            record = EpochRecord(epoch, train_loss, val_loss, val_dsc, lr, time.perf_counter() - started, improved)
            history.append(record)
            stopped_early = stale >= config.patience and epoch < config.epochs
            _atomic_save({
                "format": STATE_FORMAT, "network": name, "config": asdict(config), "epoch": epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "best_val_loss": best_val, "best_epoch": best_epoch, "epochs_without_improvement": stale,
                "train_seconds": spent + time.perf_counter() - session_start,
                "history": [asdict(h) for h in history],
                "sessions": [s.to_dict() for s in _sessions(earlier, environment, determinism)],
            }, paths.latest)
            paths.history.write_text(json.dumps([asdict(h) for h in history], indent=1))
            logger.info("epoch %d/%d: train loss %.5f, val loss %.5f, val DSC %.4f, lr %.2e, %.1f s%s", epoch,
                        config.epochs, train_loss, val_loss, val_dsc, lr, record.seconds, " *" if improved else "")
            bar.update(1)
            bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", dsc=f"{val_dsc:.3f}")
            if epoch_callback is not None:
                epoch_callback(record)
    finally:
        bar.close()
    if stopped_early:
        logger.info("early stopping after epoch %d: no lower validation loss for %d epochs", epoch, stale)
    result = TrainResult(paths.root, epoch, best_epoch, best_val, stopped_early,
                         spent + time.perf_counter() - session_start, tuple(history),
                         _sessions(earlier, environment, determinism))
    _atomic_save({"format": STATE_FORMAT, "network": name, "kind": "final", "epoch": epoch,
                  "model": model.state_dict()}, paths.final)
    paths.result.write_text(json.dumps(result.to_dict(), indent=1))
    logger.info("run %s finished: %d epochs, best epoch %d (val loss %.5f), %.3f h", paths.root.name, epoch,
                best_epoch, best_val, result.training_hours)
    return result


def load_weights(model: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load the weights of a run checkpoint (best, final or latest) into `model`."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{checkpoint}: not a training checkpoint of format {STATE_FORMAT}")
    model.load_state_dict(state["model"])
    return model


def predict_dataset(model: nn.Module, dataset: Dataset, device: str = "auto", batch_size: int = 32,
                    threshold: float = 0.5, amp: bool = True, keep_probabilities: bool = False,
                    num_workers: int | None = None, progress: bool = False) -> Predictions:
    """Predict every sample of `dataset` in order through the node's `Predictor`; time its forward per slice.

    The input contract (size, channels) is the dataset's own; the first batch is run once untimed, so
    one-off set-up (CUDA context, kernel loading) is not counted as per-slice time.
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("predict_dataset: the dataset is empty")
    first = dataset[0][0]
    contract = InputContract(size=int(first.shape[-1]), in_channels=int(first.shape[0]))
    predictor = Predictor.from_model(model, contract, PredictorOptions(device=device, batch_size=batch_size, amp=amp))
    dev = predictor.device
    masks, targets, probs, metas = [], [], [], []
    forward_seconds = 0.0
    wall_start = time.perf_counter()
    loader = make_loader(dataset, batch_size, False, dev, num_workers)
    batches = tqdm(loader, desc="predict", unit="batch", disable=not progress, leave=False)
    for k, (images, gts, batch_metas) in enumerate(batches):
        images = images.to(dev, non_blocking=True)
        if k == 0:
            predictor.probabilities(images)  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        p = predictor.probabilities(images)
        _sync(dev)
        forward_seconds += time.perf_counter() - t0
        p = p.cpu().numpy()
        masks.append(p >= threshold)
        targets.append(gts[:, 0].numpy() >= 0.5)
        if keep_probabilities:
            probs.append(p.astype(np.float16))
        metas.extend(batch_metas)
    return Predictions(np.concatenate(masks), np.concatenate(targets), tuple(metas),
                       np.concatenate(probs) if keep_probabilities else None, forward_seconds / len(metas),
                       time.perf_counter() - wall_start)


def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, loss_fn: FocalTverskyLoss, weights: tuple[float, ...],
                 device: torch.device, use_amp: bool, progress: bool) -> float:
    model.train()
    total, count = 0.0, 0
    for images, masks, _ in tqdm(loader, unit="batch", leave=False, disable=not progress):
        images, masks = _to_device(images, masks, device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=use_amp):
            output = model(images)
        loss = deep_supervision_loss(output, masks, weights, loss_fn)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += float(loss.detach()) * images.shape[0]
        count += images.shape[0]
    if count == 0:
        raise ValueError("the training loader produced no batches")
    return total / count


@torch.no_grad()
def _validate(model: nn.Module, loader: DataLoader, loss_fn: FocalTverskyLoss, device: torch.device,
              use_amp: bool, threshold: float) -> tuple[float, float]:
    """Mean per-image main-output loss and mean per-image DSC (both-empty = 1, as in metrics.py)."""
    model.eval()
    loss_sum, dsc_sum, count = 0.0, 0.0, 0
    for images, masks, _ in loader:
        images, masks = _to_device(images, masks, device)
        with torch.autocast(device.type, enabled=use_amp):
            logits = model(images).logits
        loss_sum += float(loss_fn.per_image(logits, masks).sum())
        pred = (torch.sigmoid(logits.float()) >= threshold).flatten(1)
        gt = (masks >= 0.5).flatten(1)
        tp = (pred & gt).sum(1).float()
        denom = pred.sum(1).float() + gt.sum(1).float()
        dsc_sum += float(torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.ones_like(denom)).sum())
        count += images.shape[0]
    return loss_sum / count, dsc_sum / count


def _to_device(images: Tensor, masks: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    if images.ndim != 4 or masks.ndim != 4 or masks.shape[1] != 1 or images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"batch shapes image {tuple(images.shape)}, mask {tuple(masks.shape)}: "
                         "expected image (N, C, H, W) and mask (N, 1, H, W) of the same H, W")
    return (images.to(device, torch.float32, non_blocking=True), masks.to(device, torch.float32, non_blocking=True))


def _check_resumable(state: Mapping[str, Any], config: TrainConfig, name: str, paths: RunPaths) -> None:
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{paths.latest}: not a training state of format {STATE_FORMAT}")
    if state["network"] != name:
        raise ValueError(f"{paths.latest}: written by network {state['network']!r}, resuming {name!r}")
    saved, now = dict(state["config"]), asdict(config)
    changed = sorted(k for k in now if k not in RUNTIME_FIELDS and saved.get(k) != now[k])
    if changed:
        raise ValueError(f"run {paths.root}: cannot resume with changed settings {changed}; "
                         "use a new run folder or the original settings")


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _sessions(earlier: list[RunEnvironment], current: RunEnvironment,
              determinism: Determinism) -> tuple[RunEnvironment, ...]:
    return (*earlier, current.with_ops(determinism.ops))


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint32)[0])


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _field(meta: Any, name: str) -> Any:
    if meta is None:
        raise ValueError("predictions need per-sample metadata (patient, side, slice) to be scored")
    return meta[name] if isinstance(meta, Mapping) else getattr(meta, name)
