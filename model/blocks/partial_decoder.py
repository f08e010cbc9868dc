"""The partial decoder ("dense aggregation") of PraNet, reused by HarDNet-MSEG and CaraNet.

It fuses three same-width feature maps at strides s, s/2 and s/4 (deepest first) into a
one-channel logit map at the finest of the three (stride s/4): deeper maps are upsampled ×2
(bilinear, align_corners=True as in the originals), multiplied into the shallower ones, the
products are concatenated with further upsampled context, and a 1×1 conv gives the map.

The two originals differ only in the 3×3 convs: HarDNet-MSEG (and PraNet) use conv + BN with
no activation (`norm=True`); CaraNet uses a bare conv without bias (`norm=False`). The final
1×1 conv has a bias in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv3x3(in_channels: int, out_channels: int, norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)]
    if norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return nn.Sequential(*layers)


def _up2(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)


class PartialDecoder(nn.Module):
    """Aggregate (deep /s, mid /(s/2), shallow /(s/4)) maps of `channels` each → (N, 1, ...) at /(s/4)."""

    def __init__(self, channels: int, norm: bool = True) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        c = channels
        self.conv_upsample1 = _conv3x3(c, c, norm)
        self.conv_upsample2 = _conv3x3(c, c, norm)
        self.conv_upsample3 = _conv3x3(c, c, norm)
        self.conv_upsample4 = _conv3x3(c, c, norm)
        self.conv_upsample5 = _conv3x3(2 * c, 2 * c, norm)
        self.conv_concat2 = _conv3x3(2 * c, 2 * c, norm)
        self.conv_concat3 = _conv3x3(3 * c, 3 * c, norm)
        self.conv4 = _conv3x3(3 * c, 3 * c, norm)
        self.conv5 = nn.Conv2d(3 * c, 1, kernel_size=1)

    def forward(self, deep: Tensor, mid: Tensor, shallow: Tensor) -> Tensor:
        deep_up = _up2(deep)
        mid_gated = self.conv_upsample1(deep_up) * mid
        shallow_gated = self.conv_upsample2(_up2(deep_up)) * self.conv_upsample3(_up2(mid)) * shallow
        mid_cat = self.conv_concat2(torch.cat((mid_gated, self.conv_upsample4(deep_up)), dim=1))
        shallow_cat = self.conv_concat3(torch.cat((shallow_gated, self.conv_upsample5(_up2(mid_cat))), dim=1))
        return self.conv5(self.conv4(shallow_cat))
