"""Convolutional block attention module (CBAM, Woo et al. 2018) in the form MEGANet uses.

Channel attention first: a shared two-layer MLP scores the global average- and max-pooled
descriptors, their sum goes through a sigmoid and rescales the channels. Spatial attention
second: the channel-wise max and mean maps go through one 7×7 conv (with bias, no BN, as in
MEGANet; the CBAM paper's code adds a BN) and a sigmoid that rescales every position.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Fewest hidden units of the channel-gate MLP (only small widths reach it).
MIN_HIDDEN = 4


class ChannelGate(nn.Module):
    """Rescale channels by σ(MLP(avgpool) + MLP(maxpool))."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1, got {channels} and {reduction}")
        # At reduced widths C // reduction drops to 0 or 1, and a lone ReLU unit can start dead;
        # keep a few (never more than C). Widths of 64 and more are unaffected.
        hidden = min(channels, max(MIN_HIDDEN, channels // reduction))
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: Tensor) -> Tensor:
        score = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        return x * torch.sigmoid(score)[:, :, None, None]


class SpatialGate(nn.Module):
    """Rescale positions by σ(conv7×7([max over C, mean over C]))."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2)

    def forward(self, x: Tensor) -> Tensor:
        compressed = torch.cat((x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)), dim=1)
        return x * torch.sigmoid(self.spatial(compressed))


class CBAM(nn.Module):
    """Channel gate then spatial gate; shape-preserving."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.channel_gate = ChannelGate(channels, reduction)
        self.spatial_gate = SpatialGate()

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial_gate(self.channel_gate(x))
