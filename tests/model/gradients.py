"""The gradient checks the network tests share: which parameters a backward pass left without gradient."""

from __future__ import annotations

from collections.abc import Collection
from itertools import pairwise

import torch
from torch import nn


def parameters_without_gradient(model: nn.Module, zero_allowed: Collection[str] = ()) -> list[str]:
    """Names of the parameters whose gradient is missing, or all zero unless the name is in `zero_allowed`."""
    return [
        name
        for name, p in model.named_parameters()
        if p.grad is None or (name not in zero_allowed and not torch.any(p.grad != 0))
    ]


def conv_biases_feeding_batch_norm(model: nn.Module) -> set[str]:
    """Conv biases directly followed by a BatchNorm in a Sequential: train-mode BN subtracts them
    again, so their exact gradient is zero (MEGANet has them: its convs keep the default bias)."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            for (name, conv), (_, norm) in pairwise(module.named_children()):
                biased = isinstance(conv, nn.Conv2d) and conv.bias is not None
                if biased and isinstance(norm, nn.BatchNorm2d):
                    names.add(f"{prefix}.{name}.bias")
    return names
