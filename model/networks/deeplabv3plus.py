"""DeepLabV3+ (Chen et al., 2018) with a ResNet-50 backbone at output stride 16.

- Backbone: torchvision-style ResNet-50 with layer4's stride replaced by dilation 2, so the deepest
  features are at stride 16 (`model.blocks.resnet`).
- ASPP on layer4 (2048 channels): five 256-channel branches (1×1; 3×3 at rates 6, 12, 18; image
  pooling, broadcast back), each conv + BN + ReLU; concatenation; 1×1 projection to 256 + BN +
  ReLU; dropout 0.1.
- Decoder: layer1 (stride 4, 256 channels) reduced to 48 by 1×1 conv + BN + ReLU; the ASPP output
  bilinearly upsampled to that size and concatenated (304 channels); one 3×3 conv to 256 + BN +
  ReLU; a 1×1 classifier to one logit map; bilinear upsampling to the input size.

This is the common torchvision-style form (plain, not depthwise-separable, convs; one decoder
conv): 39,756,705 parameters with 3 input channels and 1 class, against the reference's 39.76 M.
Two decoder convs would give 40.35 M (+1.5 %); separable ASPP/decoder convs (the paper's Xception
form) about 26.6 M.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.blocks.common import ConvBNAct, scale_channels
from model.blocks.resnet import load_torchvision_weights, resnet50
from model.networks.base import SegmentationNetwork

#: Atrous rates of the three 3×3 ASPP branches at output stride 16.
ASPP_RATES: tuple[int, ...] = (6, 12, 18)


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool, 1×1 conv + BN + ReLU, broadcast to the input size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = ConvBNAct(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.conv(self.pool(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1×1, atrous 3×3 at each rate and image pooling, then a 1×1 projection."""

    def __init__(
        self, in_channels: int, out_channels: int, rates: Sequence[int] = ASPP_RATES, dropout: float = 0.1
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [ConvBNAct(in_channels, out_channels, 1)]
        branches += [ConvBNAct(in_channels, out_channels, 3, dilation=r) for r in rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(ConvBNAct(out_channels * len(branches), out_channels, 1), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabV3Plus(SegmentationNetwork):
    """DeepLabV3+ / ResNet-50, output stride 16, one 3×3 decoder conv, one output class."""

    name: ClassVar[str] = "deeplabv3plus"
    # The deepest features are at stride 16; multiples of 16 keep the stride-4 and stride-16 maps
    # exact fractions of the input, so the bilinear upsamplings are aligned. Stride 32 is never reached.
    size_multiple: ClassVar[int] = 16
    loss_weights: ClassVar[tuple[float, ...]] = (1.0,)

    def __init__(self, in_channels: int = 1, width: float = 1.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = resnet50(
            in_channels=in_channels, width=width, replace_stride_with_dilation=(False, False, True)
        )
        low_channels, high_channels = self.backbone.feature_channels[1], self.backbone.feature_channels[4]
        aspp_channels = scale_channels(256, width)
        low_reduced = scale_channels(48, width)
        self.aspp = ASPP(high_channels, aspp_channels, ASPP_RATES, dropout)
        self.low_level = ConvBNAct(low_channels, low_reduced, 1)
        self.fuse = ConvBNAct(low_reduced + aspp_channels, aspp_channels, 3)
        self.classifier = nn.Conv2d(aspp_channels, 1, 1)

    def load_backbone(self, path: str | Path) -> None:
        """Load an official torchvision ResNet-50 ImageNet checkpoint (keys map one to one, `fc.*` skipped)."""
        load_torchvision_weights(self.backbone, path)

    def _forward(self, x: Tensor) -> tuple[Tensor, Sequence[Tensor]]:
        features = self.backbone.forward_features(x)
        low, high = self.low_level(features[1]), self.aspp(features[4])
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.classifier(self.fuse(torch.cat((high, low), dim=1)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False), ()
