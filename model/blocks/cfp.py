"""Channel-wise feature pyramid (CFP) module, from CFPNet, as CaraNet uses it; plus its conv unit.

CFP widens the receptive field cheaply: a 3×3 conv reduces C to C/4, then four branches with
different dilations each run three grouped 3×3 convs (C/4→C/16→C/16→C/8, groups C/16) and
concatenate the three outputs (C/4 per branch). Branch outputs are summed hierarchically
(b1, b1+b2, b1+b2+b3, ...) so that larger dilations build on smaller ones, concatenated back
to C, normalised, projected by a 1×1 conv and added to the input. CaraNet builds it with d=8,
i.e. dilations 1, 3, 5 and 9.

The conv unit of the CaraNet/CFPNet code is conv (no bias) → BN (eps 1e-3) → PReLU with one
slope per channel; `ConvBNPReLU` reproduces it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: BN epsilon of the CaraNet/CFPNet conv unit.
BN_EPS = 1e-3


class BNPReLU(nn.Sequential):
    """BatchNorm (eps 1e-3) then a per-channel PReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.BatchNorm2d(channels, eps=BN_EPS), nn.PReLU(channels))


class ConvBNPReLU(nn.Sequential):
    """Conv2d without bias, then `BNPReLU`; 'same' padding for odd kernels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, 1, padding, dilation, groups, bias=False),
            BNPReLU(out_channels),
        )


class _DilatedBranch(nn.Module):
    """Three grouped dilated 3×3 convs whose three outputs are concatenated (C/4 channels out)."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        q, s, e = channels // 4, channels // 16, channels // 8
        self.convs = nn.ModuleList(
            [
                ConvBNPReLU(q, s, 3, dilation, groups=s),
                ConvBNPReLU(s, s, 3, dilation, groups=s),
                ConvBNPReLU(s, e, 3, dilation, groups=s),
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        outs = []
        for conv in self.convs:
            x = conv(x)
            outs.append(x)
        return torch.cat(outs, dim=1)


class CFPModule(nn.Module):
    """CFP block: C → C with a residual; `channels` must be a multiple of 16."""

    def __init__(self, channels: int, dilations: Sequence[int] = (1, 3, 5, 9)) -> None:
        super().__init__()
        if channels < 16 or channels % 16:
            raise ValueError(f"CFP channels must be a positive multiple of 16, got {channels}")
        if len(dilations) != 4:
            raise ValueError(f"CFP needs four branch dilations, got {tuple(dilations)}")
        self.pre = BNPReLU(channels)
        self.reduce = ConvBNPReLU(channels, channels // 4, 3)
        self.branches = nn.ModuleList(_DilatedBranch(channels, d) for d in dilations)
        self.post = BNPReLU(channels)
        self.project = nn.Conv2d(channels, channels, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.reduce(self.pre(x))
        acc: Tensor | None = None
        summed = []
        for branch in self.branches:
            b = branch(y)
            acc = b if acc is None else acc + b
            summed.append(acc)
        return self.project(self.post(torch.cat(summed, dim=1))) + x
