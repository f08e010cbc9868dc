"""HarDNet-MSEG (Huang et al. 2021): HarDNet-68 encoder with a PraNet-style RFB + partial decoder.

The stride-8, 16 and 32 backbone taps (320, 640 and 1024 channels) each pass through an
RFB-like module down to 32 channels; the partial decoder fuses them into one logit map at
stride 8, upsampled ×8 bilinearly (align_corners=False, as in the original) to the input size.

Omitted from the official ``HarDMSEG`` because its forward never uses them (15,919,407 parameters):
the reverse-attention convs ``ra2_*``, ``ra3_*``, ``ra4_*``, the convs ``conv2`` to ``conv6``
and the backbone's ImageNet classifier (``base.16``, a 1024→1000 linear layer).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.blocks.common import ConvBNAct, scale_channels
from model.blocks.hardnet import HarDNet68, load_hardnet68_checkpoint
from model.blocks.partial_decoder import PartialDecoder
from model.networks.base import SegmentationNetwork


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], dilation: int = 1) -> ConvBNAct:
    """Conv + BN without activation: the original's ``BasicConv2d`` (its ReLU is never called)."""
    return ConvBNAct(in_channels, out_channels, kernel_size, dilation=dilation, act=None)


class RFBModified(nn.Module):
    """Receptive-field block: four branches (1×1; 1×k, k×1, 3×3 dilated k for k = 3, 5, 7), fused by
    a 3×3 conv, plus a 1×1 shortcut, then ReLU. Every conv is conv + BN."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        c = out_channels
        self.branch0 = _conv_bn(in_channels, c, 1)
        self.branch1, self.branch2, self.branch3 = (
            nn.Sequential(
                _conv_bn(in_channels, c, 1),
                _conv_bn(c, c, (1, k)),
                _conv_bn(c, c, (k, 1)),
                _conv_bn(c, c, 3, dilation=k),
            )
            for k in (3, 5, 7)
        )
        self.conv_cat = _conv_bn(4 * c, c, 3)
        self.conv_res = _conv_bn(in_channels, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        branches = torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], dim=1)
        return torch.relu(self.conv_cat(branches) + self.conv_res(x))


class HarDNetMSEG(SegmentationNetwork):
    """HarDNet-MSEG: one output map; `width` scales the backbone and the 32-channel head."""

    name = "hardnet_mseg"
    size_multiple = 32
    loss_weights = (1.0,)

    def __init__(self, in_channels: int = 1, width: float = 1.0, head_channels: int = 32) -> None:
        super().__init__()
        if head_channels < 1:
            raise ValueError(f"head_channels must be >= 1, got {head_channels}")
        self.hardnet = HarDNet68(in_channels, width)
        c = scale_channels(head_channels, width)
        _, c2, c3, c4 = self.hardnet.tap_channels
        self.rfb2_1 = RFBModified(c2, c)
        self.rfb3_1 = RFBModified(c3, c)
        self.rfb4_1 = RFBModified(c4, c)
        self.agg1 = PartialDecoder(c, norm=True)

    def load_backbone(self, path: str | Path) -> None:
        """Load the official ImageNet ``hardnet68.pth`` the user supplies (see model.blocks.hardnet)."""
        load_hardnet68_checkpoint(self.hardnet, path)

    def _forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        _, x2, x3, x4 = self.hardnet(x)
        stride8 = self.agg1(self.rfb4_1(x4), self.rfb3_1(x3), self.rfb2_1(x2))
        return F.interpolate(stride8, scale_factor=8.0, mode="bilinear", align_corners=False), []
