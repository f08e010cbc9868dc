"""MEGANet (Bui et al., WACV 2024): Res2Net-50 v1b encoder, edge-guided attention (EGA) decoder.

The backbone's stages (strides 4–32) are reduced to 64/128/256/512 channels. The decoder walks
up from stride 32; at each level it predicts a map from the current decoder features, and an
EGA module enhances the skip features with three cues derived from that prediction and from
the image: the reverse attention x·(1 − σ(pred)) (what is not yet found), the boundary term
x·Laplacian(σ(pred)) (the edges of the prediction), and the input-edge term x·L₁ where L₁ is
level 1 of the Laplacian pyramid of the grayscale image (high-frequency image detail). The
three are concatenated, fused by a 3×3 conv, gated by a one-channel sigmoid map, added back to
x and passed through CBAM. The skip level 1 is the stem output (stride 2, not reduced). The
decoder concatenates each EGA output with its own features, applies two convs and upsamples ×2.

Five maps come out (strides 1, 2, 4, 8, 16): the full-resolution map is the main output; the
others are upsampled bilinearly to the input (the original instead downsamples the mask).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.blocks.cbam import CBAM
from model.blocks.common import ConvBNAct, scale_channels
from model.blocks.laplacian import laplacian, laplacian_pyramid_level
from model.blocks.res2net import RES2NET50_LAYERS, Res2NetV1b, load_official_res2net
from model.networks.base import InputSizeError, SegmentationNetwork

#: ITU-R BT.601 luma weights (those of torchvision's rgb_to_grayscale, which MEGANet calls).
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)
#: Laplacian-pyramid level of the grayscale input used as the edge cue (stride 2).
EDGE_LEVEL = 1
#: Reduced channels of backbone stages 1–4 (strides 4, 8, 16, 32).
REDUCED_CHANNELS = (64, 128, 256, 512)


def _up2(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)


def _conv(in_channels: int, out_channels: int) -> ConvBNAct:
    """MEGANet's conv unit: 3×3 conv with bias, BN, ReLU."""
    return ConvBNAct(in_channels, out_channels, 3, bias=True)


class DecoderUp(nn.Module):
    """Concatenate [EGA output, decoder features], two convs (via C/4), upsample ×2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(in_channels, in_channels // 4), _conv(in_channels // 4, out_channels))

    def forward(self, guided: Tensor, decoder: Tensor) -> Tensor:
        return _up2(self.conv(torch.cat((guided, decoder), dim=1)))


class PredictionHead(nn.Module):
    """3×3 conv to C/4 (BN, ReLU), then a 1×1 conv to one logit channel."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv(in_channels, in_channels // 4)
        self.conv2 = nn.Conv2d(in_channels // 4, 1, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class EdgeGuidedAttention(nn.Module):
    """EGA: fuse reverse, boundary and input-edge attention on `x`, gate, add back, CBAM."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fusion_conv = _conv(3 * channels, channels)
        self.attention = nn.Sequential(nn.Conv2d(channels, 1, 3, padding=1), nn.BatchNorm2d(1), nn.Sigmoid())
        self.cbam = CBAM(channels)

    def forward(self, x: Tensor, pred_logits: Tensor, image_edges: Tensor) -> Tensor:
        pred = torch.sigmoid(pred_logits)
        background = x * (1.0 - pred)
        boundary = x * laplacian(pred)
        edges = F.interpolate(image_edges, size=x.shape[-2:], mode="bilinear", align_corners=True)
        fused = self.fusion_conv(torch.cat((background, boundary, x * edges), dim=1))
        return self.cbam(fused * self.attention(fused) + x)


class MEGANet(SegmentationNetwork):
    """MEGANet with one output class; `width` scales the backbone and every decoder width."""

    name: ClassVar[str] = "meganet"
    # Stride-32 features; the decoder concatenates ×2-upsampled maps with the next skip.
    size_multiple: ClassVar[int] = 32
    #: The Laplacian of the stride-16 prediction needs a side of at least 3 pixels (reflect pad).
    min_size: ClassVar[int] = 64
    #: Main (stride 1), then the stride-2, 4, 8 and 16 predictions.
    loss_weights: ClassVar[tuple[float, ...]] = (1.0, 1.0, 1.0, 1.0, 1.0)

    def __init__(self, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"meganet: in_channels must be >= 1, got {in_channels}")
        self.in_channels = in_channels
        self.backbone = Res2NetV1b(RES2NET50_LAYERS, in_channels=in_channels, width=width)
        stem, e2, e3, e4, e5 = self.backbone.out_channels
        r2, r3, r4, r5 = (scale_channels(c, width) for c in REDUCED_CHANNELS)
        self.reduce5 = _conv(e5, r5)
        self.reduce4 = _conv(e4, r4)
        self.reduce3 = _conv(e3, r3)
        self.reduce2 = _conv(e2, r2)
        self.up5 = _conv(r5, r5)
        self.up4 = DecoderUp(r4 + r5, r4)
        self.up3 = DecoderUp(r3 + r4, r3)
        self.up2 = DecoderUp(r2 + r3, r2)
        self.up1 = DecoderUp(stem + r2, r2)
        self.ega4 = EdgeGuidedAttention(r4)
        self.ega3 = EdgeGuidedAttention(r3)
        self.ega2 = EdgeGuidedAttention(r2)
        self.ega1 = EdgeGuidedAttention(stem)
        self.out5 = PredictionHead(r5)
        self.out4 = PredictionHead(r4)
        self.out3 = PredictionHead(r3)
        self.out2 = PredictionHead(r2)
        self.out1 = PredictionHead(r2)

    def check_input(self, x: Tensor) -> None:
        super().check_input(x)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h < self.min_size or w < self.min_size:
            raise InputSizeError(
                f"{self.name}: input size {h}x{w} is not allowed; H and W must be multiples of "
                f"{self.size_multiple} and at least {self.min_size}"
            )

    def load_backbone(self, path: str | Path) -> None:
        """Load an official ImageNet `res2net50_v1b_26w_4s` checkpoint into the backbone."""
        load_official_res2net(self.backbone, path)

    def _grayscale(self, x: Tensor) -> Tensor:
        """The grey image the input edges come from: 1 channel as is, 3 by the original's RGB luma, any
        other count (adjacent slices as channels) its centre channel, the slice being segmented."""
        if self.in_channels == 1:
            return x
        if self.in_channels == 3:
            r, g, b = LUMA_WEIGHTS
            return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]
        centre = self.in_channels // 2
        return x[:, centre : centre + 1]

    def _forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        size = x.shape[-2:]
        image_edges = laplacian_pyramid_level(self._grayscale(x), EDGE_LEVEL)  # stride 2
        stem, e2, e3, e4, e5 = self.backbone(x)
        s2, s3, s4, s5 = self.reduce2(e2), self.reduce3(e3), self.reduce4(e4), self.reduce5(e5)

        d5 = _up2(self.up5(s5))  # stride 16
        o5 = self.out5(d5)
        d4 = self.up4(self.ega4(s4, o5, image_edges), d5)  # stride 8
        o4 = self.out4(d4)
        d3 = self.up3(self.ega3(s3, o4, image_edges), d4)  # stride 4
        o3 = self.out3(d3)
        d2 = self.up2(self.ega2(s2, o3, image_edges), d3)  # stride 2
        o2 = self.out2(d2)
        d1 = self.up1(self.ega1(stem, o2, image_edges), d2)  # stride 1
        o1 = self.out1(d1)

        aux = [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in (o2, o3, o4, o5)]
        return o1, aux
