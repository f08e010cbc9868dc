"""Short nnU-Net trainers for smoke runs and the CPU test; real runs use nnU-Net's own `nnUNetTrainer`.

nnU-Net's shortest shipped variant, `nnUNetTrainer_1epoch`, still runs 250 training and 50 validation
iterations, minutes on a CPU even for tiny phantoms; `nnUNetTrainer_ianSmoke` runs one epoch of 2
iterations (1 validation iteration) and changes nothing else, so the whole path (plan, preprocess,
train, checkpoints, validation, prediction) is exercised in seconds.
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_ianSmoke(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming of trainer variants)
    """One epoch of two iterations: the nnU-Net path end to end, not a model."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:  # noqa: B008 (nnU-Net's signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
