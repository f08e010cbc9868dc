"""Plain 2D U-Net (Ronneberger, Fischer & Brox, MICCAI 2015): the baseline the segmentation field trusts.

Structure, as in the paper's Fig. 1, at `width` 1.0:

- five levels of 64/128/256/512/1024 channels; each level is a double 3×3 conv;
- four down-steps, each a 2×2 max-pool (stride 2) followed by the next level's double conv;
- four up-steps, each a 2×2 transposed conv (stride 2) halving the channels, concatenation with the
  encoder's feature map of the same resolution (the skip), then a double 3×3 conv;
- a 1×1 conv to one logit map. No deep supervision.

Two departures from 2015, both the common practice today and what every other network here does:

- **BatchNorm** after each 3×3 conv (conv → BN → ReLU; the convs have no bias, which BN would cancel).
  The original predates BN (Ioffe & Szegedy, 2015) and used none.
- **Padded ("same") convs**, so the output has the input's size and needs no cropping of the skips;
  the original used unpadded convs and tiled inputs with an overlap. H and W must be multiples of 16
  (four pool steps).

The original's dropout at the end of the contracting path is left out, as in most re-implementations;
weights are He-initialised (the original's Gaussian with std sqrt(2/N) is He's rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.blocks.common import ConvBNAct, scale_channels
from model.networks.base import SegmentationNetwork

#: Channels of the five levels at width 1.0.
LEVEL_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 1024)


class DoubleConv(nn.Sequential):
    """Two 3×3 conv + BN + ReLU: one U-Net level."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvBNAct(in_channels, out_channels, 3), ConvBNAct(out_channels, out_channels, 3))


class UpStep(nn.Module):
    """2×2 transposed conv (halving the channels), concatenation with the skip, double conv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(out_channels + skip_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat((skip, self.up(x)), dim=1))


class UNet(SegmentationNetwork):
    """The 2015 U-Net with BN and padded convs; `width` scales every level's channels."""

    name: ClassVar[str] = "unet"
    size_multiple: ClassVar[int] = 16
    loss_weights: ClassVar[tuple[float, ...]] = (1.0,)

    def __init__(self, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"unet: in_channels must be >= 1, got {in_channels}")
        channels = [scale_channels(c, width) for c in LEVEL_CHANNELS]
        self.encoder = nn.ModuleList(
            DoubleConv(a, b) for a, b in zip([in_channels, *channels[:-1]], channels, strict=True)
        )
        deep = list(reversed(channels))  # 1024, 512, 256, 128, 64
        self.decoder = nn.ModuleList(UpStep(a, b, b) for a, b in zip(deep[:-1], deep[1:], strict=True))
        self.head = nn.Conv2d(channels[0], 1, 1)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")

    def _forward(self, x: Tensor) -> tuple[Tensor, Sequence[Tensor]]:
        skips: list[Tensor] = []
        for level, block in enumerate(self.encoder):
            if level:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for step in self.decoder:
            x = step(x, skips.pop())
        return self.head(x), ()
