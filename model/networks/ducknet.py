"""DUCK-Net (Dumitru et al. 2023), re-implemented in PyTorch from the official Keras structure.

Encoder: five levels, each a 2×2 stride-2 conv of the previous level ADDED to a side path of
2×2 stride-2 convs taken straight from the image, then a DUCK block. Bottleneck: two residual
blocks at 32f and two at 16f. Decoder: nearest ×2 upsampling, skip ADDED, then a DUCK block that
halves the channels. Filters are f, 2f, 4f, 8f, 16f and 32f with f = 17 in the paper.

Departures from the original: the last 1×1 conv returns logits (the original applies a sigmoid),
and `width` scales f. No pretrained weights exist for DUCK-Net.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from model.blocks.common import scale_channels
from model.blocks.duck import DUCKBlock, residual_stack
from model.networks.base import SegmentationNetwork

#: Number of stride-2 levels; H and W must be multiples of 2**LEVELS.
LEVELS = 5


def _glorot_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """Biased conv with Keras' default init (glorot-uniform kernel, zero bias); no padding is needed."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride)
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class DUCKNet(SegmentationNetwork):
    """DUCK-Net with `starting_filters` f (17 in the paper), scaled by `width`; one logit map."""

    name = "ducknet"
    size_multiple = 2**LEVELS
    loss_weights = (1.0,)

    def __init__(self, in_channels: int = 1, width: float = 1.0, starting_filters: int = 17) -> None:
        super().__init__()
        if starting_filters < 1:
            raise ValueError(f"starting_filters must be >= 1, got {starting_filters}")
        f = scale_channels(starting_filters, width)
        enc = [f * 2**i for i in range(LEVELS + 1)]  # f, 2f, 4f, 8f, 16f, 32f
        self.side = nn.ModuleList(
            _glorot_conv(in_channels if i == 0 else enc[i], enc[i + 1], 2, 2) for i in range(LEVELS)
        )
        self.down = nn.ModuleList(_glorot_conv(enc[i], enc[i + 1], 2, 2) for i in range(LEVELS))
        self.encoder = nn.ModuleList(
            DUCKBlock(in_channels if i == 0 else enc[i], enc[i]) for i in range(LEVELS)
        )
        self.bottleneck = nn.Sequential(
            residual_stack(enc[5], enc[5], 2),
            residual_stack(enc[5], enc[4], 2),
        )
        # Decoder level i: upsampled features + encoder skip (enc[i] channels) -> enc[i - 1].
        self.decoder = nn.ModuleList(
            DUCKBlock(enc[i], enc[i - 1] if i > 0 else enc[0]) for i in range(LEVELS - 1, -1, -1)
        )
        self.head = _glorot_conv(enc[0], 1, 1)

    def _forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        side = x
        feature = self.encoder[0](x)
        skips = [feature]
        for level in range(LEVELS):
            side = self.side[level](side)
            feature = self.down[level](feature) + side
            if level + 1 < LEVELS:
                feature = self.encoder[level + 1](feature)
                skips.append(feature)
        feature = self.bottleneck(feature)
        for block, skip in zip(self.decoder, reversed(skips), strict=True):
            feature = block(F.interpolate(feature, scale_factor=2.0, mode="nearest") + skip)
        return self.head(feature), []
