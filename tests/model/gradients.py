"""The one check the network tests share: which parameters a training step left without gradient."""

from __future__ import annotations

import torch
from torch import nn


def parameters_without_gradient(model: nn.Module) -> list[str]:
    """Names of the parameters whose gradient is missing or all zero after a backward pass."""
    return [name for name, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
