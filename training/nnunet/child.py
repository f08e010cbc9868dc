"""nnU-Net's training and test prediction through its Python API, run in a child process by `training.nnunet.run`.

    python -m training.nnunet.child train DATASET_ID CONFIGURATION TRAINER DEVICE
    python -m training.nnunet.child predict DATASET_ID CONFIGURATION TRAINER DEVICE IMAGES_TS OUT

``train`` is what ``nnUNetv2_train DATASET_ID CONFIGURATION 0 -tr TRAINER`` does (nnU-Net's trainer
class, `maybe_load_checkpoint` to continue from ``checkpoint_latest.pth``, `run_training`); ``predict``
runs nnU-Net's `nnUNetPredictor` (without worker processes) with the final checkpoint loaded by the
same trainer class, as the trainer's own validation does. The trainer class is resolved
here rather than by nnU-Net's name search, which imports every trainer module nnU-Net ships and so
fails wherever one of them cannot be imported: with the CPU build of torch that the README pins, PyPI's
torchvision (pulled in by timm for nnU-Net's Primus trainers) is built for CUDA torch and its import
raises. ``nnUNetTrainer`` is imported directly, our variants (`training.nnunet.trainers`) by name, nnU-Net's
shipped variants (``nnUNetTrainer_5epochs``, ...) by a search of its ``variants`` folder alone, any
other name through nnU-Net's own search. nnU-Net reads its folders from the environment at import
time, which is why these steps run in a child process with ``nnUNet_raw`` etc. set.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch


def trainer_class(name: str) -> type:
    """nnU-Net's trainer class of that name: the default directly, ours by name, others by nnU-Net's search."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if name == nnUNetTrainer.__name__:
        return nnUNetTrainer
    from training.nnunet.trainers import ian_trainers

    ours = getattr(ian_trainers, name, None)
    if isinstance(ours, type) and issubclass(ours, nnUNetTrainer):
        return ours
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    # nnU-Net's shipped variants first (they import no torchvision), then nnU-Net's whole search
    found = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer" / "variants"),
                                        name, "nnunetv2.training.nnUNetTrainer.variants", nnunetv2.__path__[0])
    return found if found is not None else recursive_find_trainer_class_by_name(name)


def build_trainer(dataset_id: int, configuration: str, trainer: str, device: str,  # type: ignore[no-untyped-def]
                  resume: bool = False):
    """Fold 0 of the dataset's nnU-Net trainer, as `nnunetv2.run.run_training.get_trainer_from_args` builds it."""
    import json

    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    folder = Path(nnUNet_preprocessed) / maybe_convert_to_dataset_name(dataset_id)
    plans = json.loads((folder / "nnUNetPlans.json").read_text(encoding="utf-8"))
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    plans["continue_training"] = resume
    return trainer_class(trainer)(plans=plans, configuration=configuration, fold=0, dataset_json=dataset_json,
                                  device=torch.device(device))


def train(dataset_id: int, configuration: str, trainer: str, device: str) -> None:
    """Train fold 0, continuing from its latest checkpoint if there is one.

    nnU-Net's own validation of fold 0 (`perform_actual_validation`, which feeds its ensembling and
    post-processing choices) is not run: the benchmark scores the test patients, the same way for every row.
    """
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    fold = Path(nnUNet_results) / maybe_convert_to_dataset_name(dataset_id) / f"{trainer}__nnUNetPlans__{configuration}"
    resume = (fold / "fold_0" / "checkpoint_latest.pth").is_file()
    net = build_trainer(dataset_id, configuration, trainer, device, resume)
    maybe_load_checkpoint(net, resume, False)
    if device == "cuda":
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    net.run_training()


def predict(dataset_id: int, configuration: str, trainer: str, device: str, images: str, out: str) -> None:
    """Segment every case of `images` with fold 0's final checkpoint into `out` (nnU-Net's defaults: Gaussian
    sliding window, step 0.5, mirroring)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    net = build_trainer(dataset_id, configuration, trainer, device)
    net.load_checkpoint(str(Path(net.output_folder) / "checkpoint_final.pth"))
    net.set_deep_supervision_enabled(False)
    network = getattr(net.network, "_orig_mod", net.network)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=device == "cuda", device=torch.device(device),
                                verbose=False, allow_tqdm=False)
    predictor.manual_initialization(net.network, net.plans_manager, net.configuration_manager,
                                    [dict(network.state_dict())], net.dataset_json, type(net).__name__,
                                    net.inference_allowed_mirroring_axes)
    Path(out).mkdir(parents=True, exist_ok=True)  # the sequential predictor does not create it
    predictor.predict_from_files_sequential(images, out, save_probabilities=False, overwrite=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    step, rest = args[0], args[1:]
    if step == "train" and len(rest) == 4:
        train(int(rest[0]), rest[1], rest[2], rest[3])
    elif step == "predict" and len(rest) == 6:
        predict(int(rest[0]), *rest[1:])
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
