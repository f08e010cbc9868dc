"""Short nnU-Net trainers for smoke runs and the CPU test; real runs use nnU-Net's own `nnUNetTrainer`.

nnU-Net's shortest shipped variant, `nnUNetTrainer_1epoch`, still runs 250 training and 50 validation
iterations, minutes on a CPU even for tiny phantoms. `nnUNetTrainer_ianSmoke` is nnU-Net's
`nnUNetTrainerNoMirroring` (no mirroring in training nor at test time, which would multiply inference
by 4 in 2D and 8 in 3D) for one epoch of 2 iterations (1 validation iteration), and changes nothing
else, so the whole path (plan, preprocess, train, checkpoints, prediction) runs in seconds per step.
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
    nnUNetTrainerNoMirroring,
)


class nnUNetTrainer_ianSmoke(nnUNetTrainerNoMirroring):  # noqa: N801 (nnU-Net's naming of trainer variants)
    """One epoch of two iterations, no mirroring: the nnU-Net path end to end, not a model."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:  # noqa: B008 (nnU-Net's signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1


class nnUNetTrainer_ianCPU(nnUNetTrainerNoMirroring):  # noqa: N801 (nnU-Net's naming of trainer variants)
    """10 epochs of 25 iterations, no mirroring: a reduced nnU-Net for CPU phantom runs, far below its recipe."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:  # noqa: B008 (nnU-Net's signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 10
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 5
