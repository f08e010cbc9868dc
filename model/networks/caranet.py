"""CaraNet (Lou et al., 2022): Res2Net-101 v1b, partial decoder, three axial reverse-attention stages.

Layers 2, 3 and 4 of the backbone (strides 8, 16, 32) are reduced to 32 channels; PraNet's
partial decoder fuses them into a coarse map at stride 8. Three refinement stages then work
from deep to shallow (stride 32, 16, 8): each passes its reduced features through a CFP module
and an axial attention kernel, weights them by the reverse attention 1 − σ(previous map) so
that the stage looks at what the coarse map missed, predicts a residual with three convs and
adds the previous map back. Four maps come out, each upsampled bilinearly to the input:
the stride-8 refinement (main), then the stride-16 and stride-32 refinements and the decoder map.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.blocks.axial_attention import AxialAttentionKernel
from model.blocks.cfp import CFPModule, ConvBNPReLU
from model.blocks.common import scale_channels
from model.blocks.partial_decoder import PartialDecoder
from model.blocks.res2net import RES2NET101_LAYERS, Res2NetV1b, load_official_res2net
from model.networks.base import SegmentationNetwork

#: Head width of the original; CFP needs a multiple of 16 when scaled.
HEAD_CHANNELS = 32
#: CFP branch dilations (CaraNet builds CFP with d=8: 1, d/4+1, d/2+1, d+1).
CFP_DILATIONS = (1, 3, 5, 9)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class AxialReverseAttention(nn.Module):
    """One refinement stage: CFP → axial attention → × (1 − σ(prev)) → 3 convs → + prev."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.cfp = CFPModule(channels, CFP_DILATIONS)
        self.axial = AxialAttentionKernel(channels, channels)
        self.convs = nn.Sequential(
            ConvBNPReLU(channels, channels, 3),
            ConvBNPReLU(channels, channels, 3),
            ConvBNPReLU(channels, 1, 3),
        )

    def forward(self, features: Tensor, prev: Tensor) -> Tensor:
        reverse = 1.0 - torch.sigmoid(prev)
        attended = self.axial(self.cfp(features)) * reverse
        return self.convs(attended) + prev


class CaraNet(SegmentationNetwork):
    """CaraNet with one output class; `width` scales the backbone and (in steps of 16) the head."""

    name: ClassVar[str] = "caranet"
    # Stride-32 features are upsampled ×2 and multiplied with stride-16 ones in the decoder.
    size_multiple: ClassVar[int] = 32
    #: Main (stride-8 refinement), stride-16 refinement, stride-32 refinement, decoder map.
    loss_weights: ClassVar[tuple[float, ...]] = (1.0, 1.0, 1.0, 1.0)

    def __init__(self, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        self.backbone = Res2NetV1b(RES2NET101_LAYERS, in_channels=in_channels, width=width)
        c = scale_channels(HEAD_CHANNELS, width, divisor=16)
        _, _, c2, c3, c4 = self.backbone.out_channels
        self.reduce2 = ConvBNPReLU(c2, c, 3)
        self.reduce3 = ConvBNPReLU(c3, c, 3)
        self.reduce4 = ConvBNPReLU(c4, c, 3)
        self.decoder = PartialDecoder(c, norm=False)
        self.refine4 = AxialReverseAttention(c)
        self.refine3 = AxialReverseAttention(c)
        self.refine2 = AxialReverseAttention(c)

    def load_backbone(self, path: str | Path) -> None:
        """Load an official ImageNet `res2net101_v1b_26w_4s` checkpoint into the backbone."""
        load_official_res2net(self.backbone, path)

    def _forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        size = x.shape[-2:]
        _, _, f2, f3, f4 = self.backbone(x)
        r2, r3, r4 = self.reduce2(f2), self.reduce3(f3), self.reduce4(f4)
        coarse = self.decoder(r4, r3, r2)  # stride 8
        m4 = self.refine4(r4, _resize(coarse, r4.shape[-2:]))  # stride 32
        m3 = self.refine3(r3, _resize(m4, r3.shape[-2:]))  # stride 16
        m2 = self.refine2(r2, _resize(m3, r2.shape[-2:]))  # stride 8
        return _resize(m2, size), [_resize(m3, size), _resize(m4, size), _resize(coarse, size)]
