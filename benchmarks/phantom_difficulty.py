"""How hard are the paper-preset phantoms? Two tuned trivial baselines next to a small network, same slices.

    python benchmarks/phantom_difficulty.py                          # CPU: ~5 min on 2 idle cores
    python benchmarks/phantom_difficulty.py --checkpoint model/weights/ian_net_phantom.pt --json out.json

Development phantoms (default patients 0-3 of seed 13) and evaluation phantoms (patients 100-101) are
generated with `phantom_preset("paper")` and cut into model-space slices by the node's own path with each
side's manual crop (`training.data.phantoms.phantom_slice_set`, crop "oracle"). The two baselines of
`training.baselines` are tuned on the development slices; a network with the bundled model's
architecture and width (`training.default_model.DefaultModelRecipe`) is trained briefly on the same
development phantoms (the last one validates) with `training.loop.train`, or read from `--checkpoint`.
All three are then scored on the evaluation phantoms as the benchmark scores: per-slice DSC over the
coronal slices that carry nerve, the network through the node's `Predictor` (`predict_dataset`).
Issue 13 asks both baselines to stay below a mean DSC of 0.2 and the network to be clearly higher.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ian_node.phantom.study import phantom_preset  # noqa: E402
from model import registry  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from training.baselines import baselines, evaluate, tune  # noqa: E402
from training.data import SliceSet, subset  # noqa: E402
from training.data.phantoms import phantom_slice_set  # noqa: E402
from training.default_model import DefaultModelRecipe  # noqa: E402
from training.loop import TrainConfig, load_weights, predict_dataset, seed_everything, train  # noqa: E402
from training.metrics import failure_rates  # noqa: E402

logger = logging.getLogger("benchmarks.phantom_difficulty")


@dataclass(frozen=True)
class Settings:
    seed: int = 13
    dev_patients: tuple[int, ...] = (0, 1, 2, 3)  # tune the baselines; train the network (the last validates)
    eval_patients: tuple[int, ...] = (100, 101)
    size: int = DefaultModelRecipe.size
    epochs: int = 12
    batch_size: int = DefaultModelRecipe.batch_size
    lr: float = DefaultModelRecipe.lr
    checkpoint: str | None = None  # an ian-node checkpoint to score instead of training one


@dataclass(frozen=True)
class NetworkScore:
    architecture: str
    width: float
    source: str  # "trained here" or the checkpoint's path
    mean_dsc: float
    n_slices: int
    tracking_failure: float
    train_slices: int = 0
    epochs_run: int = 0
    train_seconds: float = 0.0


def nerve_slices(slices: SliceSet) -> SliceSet:
    """The slices the benchmark scores: those whose mask carries nerve."""
    return subset(slices, np.flatnonzero(slices.masks.any(axis=(1, 2))))


def train_network(dev: SliceSet, settings: Settings, work_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The bundled architecture and width, trained on every development phantom but the last, which validates."""
    recipe = DefaultModelRecipe()
    val_patient = dev.metas[-1].patient
    train_idx = [i for i, m in enumerate(dev.metas) if m.patient != val_patient]
    val_idx = [i for i, m in enumerate(dev.metas) if m.patient == val_patient]
    seed_everything(settings.seed)
    model = registry.build(recipe.architecture, in_channels=1, width=recipe.width)
    config = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                         patience=settings.epochs, seed=settings.seed, device="cpu", progress=False)
    result = train(model, dev.torch_dataset(train_idx, 1), dev.torch_dataset(val_idx, 1), work_dir, config)
    load_weights(model, result.best_checkpoint)
    return model, {"source": "trained here", "architecture": recipe.architecture, "width": recipe.width,
                   "train_slices": len(train_idx), "epochs_run": result.epochs_run,
                   "train_seconds": round(result.train_seconds, 1)}


def score_network(model: torch.nn.Module, info: dict[str, Any], evaluation: SliceSet) -> NetworkScore:
    """Per-slice DSC of the network on the evaluation nerve slices, through the node's predictor."""
    predictions = predict_dataset(model, evaluation.torch_dataset(range(len(evaluation)), 1), device="cpu")
    dsc = [s.dsc for s in predictions.scores(info["architecture"], 0)]
    return NetworkScore(mean_dsc=float(np.mean(dsc)), n_slices=len(dsc), tracking_failure=failure_rates(dsc).tracking,
                        **info)


def run(settings: Settings, work_dir: Path) -> dict[str, Any]:
    """Everything the script prints, as one JSON-able record."""
    timings: dict[str, float] = {}
    checkpoint = load_checkpoint(settings.checkpoint) if settings.checkpoint else None
    size = checkpoint.meta.input.size if checkpoint else settings.size
    config = phantom_preset("paper")
    t0 = time.perf_counter()
    # every slice of each crop: a volume-wide percentile sees the crop's empty slices, and the node runs on them
    dev = phantom_slice_set(settings.dev_patients, settings.seed, config, size, "oracle")
    evaluation = phantom_slice_set(settings.eval_patients, settings.seed, config, size, "oracle")
    timings["phantoms_s"] = time.perf_counter() - t0
    logger.info("%d development and %d evaluation slices (%d with nerve) at %d px", len(dev), len(evaluation),
                int(evaluation.masks.any(axis=(1, 2)).sum()), size)

    t0 = time.perf_counter()
    baseline_rows = []
    for baseline in baselines(size):
        tuned = tune(baseline, dev)
        held_out = evaluate(baseline, tuned.params, evaluation)
        baseline_rows.append({"tuned_on_dev": tuned.to_dict(), "evaluation": held_out.to_dict()})
    timings["baselines_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if checkpoint:
        model, info = checkpoint.model, {"source": str(checkpoint.path), "architecture": checkpoint.meta.architecture,
                                         "width": checkpoint.meta.width}
        if checkpoint.meta.input.in_channels != 1:
            raise SystemExit(f"{checkpoint.path}: only 1-channel checkpoints are scored here")
    else:
        model, info = train_network(dev, settings, work_dir)
    network = score_network(model, info, nerve_slices(evaluation))
    timings["network_s"] = time.perf_counter() - t0
    return {"settings": asdict(settings), "size": size, "dev_slices": len(dev), "eval_slices": len(evaluation),
            "baselines": baseline_rows, "network": asdict(network),
            "timings_s": {k: round(v, 1) for k, v in timings.items()}}


def _table(result: dict[str, Any]) -> str:
    lines = ["| Method | Parameters | Mean DSC (evaluation) | DSC < 0.2 | Slices |", "|---|---|---|---|---|"]
    for row in result["baselines"]:
        e = row["evaluation"]
        params = ", ".join(f"{k}={v}" for k, v in e["params"].items() if k != "kind")
        lines.append(f"| {e['name']} | {params} | {e['mean_dsc']:.3f} | {e['tracking_failure']:.0%} | {e['n_slices']} |")
    n = result["network"]
    trained = f"{n['source']}, {n['epochs_run']} epochs on {n['train_slices']} slices" if n["epochs_run"] else n["source"]
    lines.append(f"| {n['architecture']} width {n['width']} | {trained} | "
                 f"{n['mean_dsc']:.3f} | {n['tracking_failure']:.0%} | {n['n_slices']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--dev-patients", type=int, nargs="+", default=list(Settings.dev_patients),
                        help="patient indices that tune the baselines and train the network (the last validates)")
    parser.add_argument("--eval-patients", type=int, nargs="+", default=list(Settings.eval_patients))
    parser.add_argument("--size", type=int, default=Settings.size, help="model-space slice size (ignored with "
                        "--checkpoint, whose own size is used)")
    parser.add_argument("--epochs", type=int, default=Settings.epochs)
    parser.add_argument("--checkpoint", type=Path, default=None, help="score this ian-node checkpoint, no training")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--work-dir", type=Path, default=None, help="training run folder (default: temporary)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if len(args.dev_patients) < 2 and args.checkpoint is None:
        parser.error("--dev-patients needs at least 2 patients to train and validate a network")
    if set(args.dev_patients) & set(args.eval_patients):
        parser.error("development and evaluation patients must differ")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    settings = Settings(seed=args.seed, dev_patients=tuple(args.dev_patients), eval_patients=tuple(args.eval_patients),
                        size=args.size, epochs=args.epochs, checkpoint=str(args.checkpoint) if args.checkpoint else None)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(settings, args.work_dir or Path(tmp))
    print(_table(result))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
