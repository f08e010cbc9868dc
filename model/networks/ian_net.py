"""The paper's network (IAN-Net): a max-unpooling U-Net whose encoder blocks carry MSPA and split attention.

Structure, as in the authors' released `IANNet.py` (class `ObsNet_Remove_att_r_v7`):

- stem at full resolution: 3×3 conv (in→64), 3×3 conv (64→64), 1×1 conv (64→64), each with bias,
  BN and ReLU;
- four encoder stages, each a 2×2 max-pool that keeps its indices followed by one bottleneck
  (planes 32/64/128/128, out 4·planes; a 1×1 conv + BN shortcut where the width changes);
- the bottleneck is 1×1 conv → MSPA → 1×1 conv → residual add → ReLU, and MSPA is
  MSA (3×3 grouped conv to 4 splits; kernels 1/3/5/7 on the splits) + MPA (average pools 1/2/3,
  1×1 convs, bilinear upsampling, concatenation, 1×1 fusion);
- decoder levels: max-unpool with the stored indices, concatenate the pre-pool skip, 3×3 convs
  with bias, BN and ReLU (1024→512→512→256, 512→256→256→128, 256→128→64, 128→128);
- a 3×3 conv head to one logit map. No deep supervision.

Two variants (see `VARIANTS`, recorded in checkpoints through `variant`):

- `attention=True`, "paper-attention" (default): the paper's text. The MSA's four kernel branches
  are combined by ResNeSt split attention (radix 4 over the branch outputs) instead of a plain
  sum, and the MPA output is gated by a sigmoid of a 1×1 conv of itself. Both use exactly the
  modules the released code builds and leaves unused, so the parameter count is the released
  15,316,097 (in_channels=3).
- `attention=False`, "released-no-attention": the released forward pass (plain sum, no gate),
  without the unused modules: 15,085,953 parameters (in_channels=3), 230,144 fewer.

As in the released code, MSPA sits in every encoder bottleneck, not only at the deepest one.

The registry lists both variants as rows of the benchmark: `ian_net` (this class, the paper variant by
default) and `ian_net_released` (`IANNetReleased`, always the released variant). The authors' released
code ("Remove_att") suggests that the paper's Table 1 came from the released variant. Both have the same
state-dict layout as `IANNet` with the same `attention`, so a checkpoint of either loads through either
registry name with the recorded options.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.blocks.common import ConvBNAct, scale_channels
from model.blocks.split_attention import SplitAttention
from model.networks.base import SegmentationNetwork

#: Bottleneck planes of the four encoder stages at width 1.0 (out channels are 4× these).
STAGE_PLANES: tuple[int, ...] = (32, 64, 128, 128)
#: MSA kernel sizes, one per split; their number is the split-attention radix.
MSA_KERNELS: tuple[int, ...] = (1, 3, 5, 7)
#: MPA adaptive-average-pool output sizes.
MPA_POOLS: tuple[int, ...] = (1, 2, 3)
#: Bottleneck expansion: out channels = EXPANSION · planes.
EXPANSION = 4


class MultiSplitAggregation(nn.Module):
    """MSA: one grouped 3×3 conv makes a split per kernel size; each split gets its own kernel.

    The branch outputs are fused by split attention (`attention=True`) or summed (released code).
    """

    def __init__(self, channels: int, attention: bool, kernel_sizes: Sequence[int] = MSA_KERNELS) -> None:
        super().__init__()
        radix = len(kernel_sizes)
        self.channels = channels
        self.expand = ConvBNAct(channels, channels * radix, 3, groups=radix)
        self.branches = nn.ModuleList(ConvBNAct(channels, channels, k) for k in kernel_sizes)
        self.attention = SplitAttention(channels, radix) if attention else None

    def forward(self, x: Tensor) -> Tensor:
        splits = torch.split(self.expand(x), self.channels, dim=1)
        outs = [branch(split) for branch, split in zip(self.branches, splits, strict=True)]
        if self.attention is not None:
            return self.attention(outs)
        total = outs[0]
        for out in outs[1:]:
            total = total + out
        return total


class MultiPoolAggregation(nn.Module):
    """MPA: context from average pools at a few grid sizes, upsampled back and fused by a 1×1 conv.

    With `gate=True` the fused map is multiplied by sigmoid(1×1 conv of itself), the gate the
    released code builds but does not apply.
    """

    def __init__(self, channels: int, gate: bool, pool_sizes: Sequence[int] = MPA_POOLS) -> None:
        super().__init__()
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(size), ConvBNAct(channels, channels, 1)) for size in pool_sizes
        )
        self.fuse = ConvBNAct(channels * len(pool_sizes), channels, 1)
        self.gate = nn.Conv2d(channels, channels, 1) if gate else None

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(pool(x), size=size, mode="bilinear", align_corners=True) for pool in self.pools]
        fused = self.fuse(torch.cat(pooled, dim=1))
        if self.gate is not None:
            fused = fused * torch.sigmoid(self.gate(fused))
        return fused


class MSPA(nn.Module):
    """Multi split-pool aggregation: MSA(x) + MPA(x), both on the same input."""

    def __init__(self, channels: int, attention: bool) -> None:
        super().__init__()
        self.msa = MultiSplitAggregation(channels, attention)
        self.mpa = MultiPoolAggregation(channels, gate=attention)

    def forward(self, x: Tensor) -> Tensor:
        return self.msa(x) + self.mpa(x)


class MSPABottleneck(nn.Module):
    """ResNeSt-style bottleneck (stride 1) whose middle 3×3 conv is replaced by MSPA."""

    def __init__(self, in_channels: int, planes: int, attention: bool) -> None:
        super().__init__()
        out_channels = EXPANSION * planes
        self.reduce = ConvBNAct(in_channels, planes, 1)
        self.mspa = MSPA(planes, attention)
        self.expand = ConvBNAct(planes, out_channels, 1, act=None)
        self.shortcut: nn.Module = (
            ConvBNAct(in_channels, out_channels, 1, act=None) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.expand(self.mspa(self.reduce(x))) + self.shortcut(x))


def _conv_stack(channels: Sequence[int]) -> nn.Sequential:
    """3×3 conv (with bias, as released) + BN + ReLU for each consecutive pair in `channels`."""
    return nn.Sequential(*(ConvBNAct(a, b, 3, bias=True) for a, b in zip(channels[:-1], channels[1:], strict=True)))


class IANNet(SegmentationNetwork):
    """The paper's IAN segmentation network; `attention` picks the paper's or the released variant."""

    name: ClassVar[str] = "ian_net"
    size_multiple: ClassVar[int] = 16
    loss_weights: ClassVar[tuple[float, ...]] = (1.0,)
    #: Checkpoint variant name → constructor options.
    VARIANTS: ClassVar[dict[str, dict[str, bool]]] = {
        "paper-attention": {"attention": True},
        "released-no-attention": {"attention": False},
    }

    def __init__(self, in_channels: int = 1, width: float = 1.0, attention: bool = True) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.attention = bool(attention)
        stem = scale_channels(64, width)
        # Planes stay multiples of 4: the MSA's grouped conv has one group per kernel size.
        planes = [scale_channels(p, width, divisor=len(MSA_KERNELS)) for p in STAGE_PLANES]
        enc = [EXPANSION * p for p in planes]  # 128, 256, 512, 512 at width 1.0

        self.stem = nn.Sequential(
            ConvBNAct(in_channels, stem, 3, bias=True),
            ConvBNAct(stem, stem, 3, bias=True),
            ConvBNAct(stem, stem, 1, bias=True),
        )
        ins = [stem, *enc[:-1]]
        self.encoder = nn.ModuleList(MSPABottleneck(i, p, self.attention) for i, p in zip(ins, planes, strict=True))
        # Decoder level k unpools to the resolution of encoder skip k and concatenates it.
        self.decoder = nn.ModuleList(
            [
                _conv_stack([2 * stem, 2 * stem]),  # level 1: 128 → 128
                _conv_stack([2 * enc[0], enc[0], stem]),  # level 2: 256 → 128 → 64
                _conv_stack([2 * enc[1], enc[1], enc[1], enc[0]]),  # level 3: 512 → 256 → 256 → 128
                _conv_stack([enc[3] + enc[2], enc[2], enc[2], enc[1]]),  # level 4: 1024 → 512 → 512 → 256
            ]
        )
        self.head = nn.Conv2d(2 * stem, 1, 3, padding=1)
        self._init_encoder()

    @property
    def variant(self) -> str:
        """The name a checkpoint records to rebuild this model: paper-attention or released-no-attention."""
        return "paper-attention" if self.attention else "released-no-attention"

    @classmethod
    def from_variant(cls, variant: str, in_channels: int = 1, width: float = 1.0) -> IANNet:
        """Rebuild the model a checkpoint's `variant` names."""
        try:
            options = cls.VARIANTS[variant]
        except KeyError:
            raise ValueError(f"unknown ian_net variant {variant!r}; valid: {', '.join(cls.VARIANTS)}") from None
        return cls(in_channels=in_channels, width=width, **options)

    def _init_encoder(self) -> None:
        """He (fan-out) init for the encoder convs, as the released code's ResNeSt constructor does."""
        for module in self.encoder.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _forward(self, x: Tensor) -> tuple[Tensor, Sequence[Tensor]]:
        skips: list[Tensor] = []
        indices: list[Tensor] = []
        x = self.stem(x)
        for block in self.encoder:
            skips.append(x)
            x, idx = F.max_pool2d(x, kernel_size=2, stride=2, return_indices=True)
            indices.append(idx)
            x = block(x)
        for level in reversed(range(len(self.decoder))):
            x = F.max_unpool2d(x, indices[level], kernel_size=2, stride=2, output_size=skips[level].shape[-2:])
            x = self.decoder[level](torch.cat((x, skips[level]), dim=1))
        return self.head(x), ()


class IANNetReleased(IANNet):
    """The released variant ("released-no-attention") as a registry row of its own, beside `ian_net`."""

    name: ClassVar[str] = "ian_net_released"

    def __init__(self, in_channels: int = 1, width: float = 1.0, attention: bool = False) -> None:
        if attention:
            raise ValueError("ian_net_released is the variant without attention; use ian_net for attention=True")
        super().__init__(in_channels=in_channels, width=width, attention=False)
