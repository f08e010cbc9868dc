"""Train the small phantom-only model that ships with ian-node, reproducibly.

    python -m training.default_model --out model/weights/ian_net_phantom.pt

Samples are made by exactly the node's path (`training.data.phantoms.phantom_slice_set`: `prepare` and
`to_model_space` of `ian_node.segment.pipeline`), so the bundled model sees at training time what the
node feeds it, and they are held in the benchmark's `training.data.SliceSet` and fed through its
`SliceDataset`. Each side is cropped by the phantom's landmark crop (crop ``oracle``, region
``landmarks``: the paper's crop, which the node's localiser finds), and every coronal slice of the
crop is a sample, nerve-free ones included, because the node runs on every slice of the crop and must
learn to answer "no nerve"; the checkpoint records that crop (`CheckpointMeta.crop`), so the node
can refuse a crop mode that does not reproduce it. The weights kept are those of the epoch with the
lowest validation loss (never a test score). The validation score is computed through the
node's `model.predictor.Predictor` (`training.loop.predict_dataset`). The result is labelled
phantom-trained and is not for clinical use: point the node at a `train_benchmark` checkpoint for real data.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ian_node.phantom.study import phantom_preset
from ian_node.segment.crop import CropMode
from model import registry
from model.checkpoint import CheckpointMeta, InputContract, save_checkpoint
from training.data import SliceSet
from training.data.phantoms import phantom_slice_set
from training.loop import TrainConfig, load_weights, predict_dataset, seed_everything, train

logger = logging.getLogger(__name__)

LABEL = "phantom-trained demonstration model: NOT FOR CLINICAL USE"


@dataclass(frozen=True)
class DefaultModelRecipe:
    """Every setting of the bundled model; the defaults are what ships."""

    seed: int = 2026
    train_patients: int = 6
    val_patients: int = 2
    architecture: str = "ian_net"
    width: float = 0.125
    size: int = 128
    preset: str = "demo"  # the demo's phantoms: life-size heads, which the bundled localiser finds
    crop: str = CropMode.ORACLE.value  # the phantoms' landmark crop (training.data.collect)
    nerve_slices_only: bool = False  # every slice of the crop, as the node predicts
    epochs: int = 12
    batch_size: int = 16
    lr: float = 2e-3


def train_default_model(out: Path, recipe: DefaultModelRecipe, work_dir: Path) -> dict:
    """Train, evaluate on the validation phantoms, and write the checkpoint; return a summary."""
    def slices(patients: range) -> SliceSet:
        return phantom_slice_set(patients, recipe.seed, phantom_preset(recipe.preset), recipe.size, recipe.crop,
                                 recipe.nerve_slices_only)

    train_slices = slices(range(recipe.train_patients))
    val_slices = slices(range(recipe.train_patients, recipe.train_patients + recipe.val_patients))
    train_set = train_slices.torch_dataset(range(len(train_slices)), in_channels=1)
    val_set = val_slices.torch_dataset(range(len(val_slices)), in_channels=1)
    logger.info("training on %d slices, validating on %d", len(train_set), len(val_set))
    seed_everything(recipe.seed)
    model = registry.build(recipe.architecture, in_channels=1, width=recipe.width)
    config = TrainConfig(
        epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr, patience=recipe.epochs,
        seed=recipe.seed, device="cpu",
    )
    result = train(model, train_set, val_set, work_dir, config)
    load_weights(model, result.best_checkpoint)
    predictions = predict_dataset(model, val_set, device=config.device, batch_size=32)
    scores = predictions.scores("ian_net", 0)
    dsc = float(np.mean([s.dsc for s in scores]))
    summary = {
        "recipe": asdict(recipe),
        "selection": "epoch with the lowest validation loss (validation phantoms; no test data)",
        "train_slices": len(train_set),
        "val_slices": len(val_set),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "val_loss": result.best_val_loss,
        "val_mean_dsc_per_slice": round(dsc, 4),
        "train_hours": round(result.train_seconds / 3600, 4),
        "command": f"python -m training.default_model --out {out}",
    }
    meta = CheckpointMeta(
        architecture=recipe.architecture,
        width=recipe.width,
        options={"attention": True},
        variant=getattr(model, "variant", ""),
        input=InputContract(size=recipe.size, in_channels=1),
        label=LABEL,
        training=summary,
        crop=train_slices.report.checkpoint_crop(),
    )
    summary["sha256"] = save_checkpoint(out, model, meta)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    parser.add_argument("--epochs", type=int, default=DefaultModelRecipe.epochs)
    parser.add_argument("--train-patients", type=int, default=DefaultModelRecipe.train_patients)
    parser.add_argument("--work-dir", type=Path, default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = DefaultModelRecipe(epochs=args.epochs, train_patients=args.train_patients)
    with tempfile.TemporaryDirectory() as tmp:
        summary = train_default_model(args.out, recipe, args.work_dir or Path(tmp))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
