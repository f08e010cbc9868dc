"""ResNeSt split attention (Zhang et al., "ResNeSt: Split-Attention Networks").

A layer that has computed `radix` alternative feature maps ("splits") of C channels each lets the
network choose between them per channel, from global context: the splits are summed and
global-average-pooled, fc1 reduces C to max(C·radix/reduction, min_channels) channels, then BN,
ReLU and fc2 expand to C·radix; a softmax across the radix axis (a sigmoid when radix = 1) turns
that into one weight per split and channel, and the output is the weighted sum of the splits.

Parameter names follow ResNeSt's `SplAtConv2d` (`fc1`, `bn1`, `fc2`), so its weights map one to one:

| ResNeSt key (inside a block's conv2) | ours                     |
|--------------------------------------|--------------------------|
| `fc1.weight`, `fc1.bias`             | `fc1.weight`, `fc1.bias` |
| `bn1.*`                              | `bn1.*`                  |
| `fc2.weight`, `fc2.bias`             | `fc2.weight`, `fc2.bias` |

In training mode BN on the pooled (N, C', 1, 1) vector needs a batch of at least 2, as in ResNeSt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention_channels(channels: int, radix: int, reduction: int = 4, min_channels: int = 32) -> int:
    """Width of the fc1 bottleneck: ResNeSt's max(C·radix / reduction, 32)."""
    return max(channels * radix // reduction, min_channels)


def radix_softmax(logits: Tensor, radix: int, cardinality: int = 1) -> Tensor:
    """Per-split channel weights (N, radix, C, 1, 1) from fc2's (N, C·radix, 1, 1) output.

    fc2's channels are laid out cardinal group first, then radix, then channel (ResNeSt's order);
    the softmax runs across the radix axis so the weights of one channel sum to 1 over the splits.
    With radix = 1 there is nothing to choose between and the weight is a sigmoid gate instead.
    """
    n = logits.shape[0]
    if radix == 1:
        return torch.sigmoid(logits).reshape(n, 1, -1, 1, 1)
    grouped = logits.reshape(n, cardinality, radix, -1).transpose(1, 2)
    return F.softmax(grouped, dim=1).reshape(n, radix, -1, 1, 1)


class SplitAttention(nn.Module):
    """Weighted sum of `radix` splits of `channels` channels, the weights learnt from global context."""

    def __init__(
        self,
        channels: int,
        radix: int,
        cardinality: int = 1,
        reduction: int = 4,
        min_channels: int = 32,
    ) -> None:
        super().__init__()
        if radix < 1:
            raise ValueError(f"radix must be >= 1, got {radix}")
        if channels % cardinality:
            raise ValueError(f"channels ({channels}) must be divisible by cardinality ({cardinality})")
        inter = attention_channels(channels, radix, reduction, min_channels)
        self.radix = radix
        self.cardinality = cardinality
        self.fc1 = nn.Conv2d(channels, inter, 1, groups=cardinality)
        self.bn1 = nn.BatchNorm2d(inter)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(inter, channels * radix, 1, groups=cardinality)

    def weights(self, splits: Sequence[Tensor]) -> Tensor:
        """The attention weights (N, radix, C, 1, 1) for `splits`; they sum to 1 over radix when radix > 1."""
        if len(splits) != self.radix:
            raise ValueError(f"expected {self.radix} splits, got {len(splits)}")
        context = F.adaptive_avg_pool2d(torch.stack(tuple(splits)).sum(0), 1)
        return radix_softmax(self.fc2(self.relu(self.bn1(self.fc1(context)))), self.radix, self.cardinality)

    def forward(self, splits: Sequence[Tensor]) -> Tensor:
        weights = self.weights(splits)
        out = weights[:, 0] * splits[0]
        for i in range(1, self.radix):
            out = out + weights[:, i] * splits[i]
        return out
