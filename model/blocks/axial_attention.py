"""Axial self-attention and CaraNet's axial attention kernel ("AA kernel").

Attention along one axis (height or width): every row (or column) position is a token whose
feature vector is its whole line of C'×(other axis) values; query and key are 1×1 projections
to C/8 channels, the value a 1×1 projection to C. As in CaraNet, the attention weights are a
sigmoid of the dot products (not a softmax), and the result enters through a learned scale
`gamma` that starts at 0, so the block starts as the identity.

Deviation from the CaraNet code: there the tokens are formed with `view(B, -1, H)` on a
(B, C, H, W) tensor, which for square inputs makes both the "height" and the "width" block
attend along the width axis, and for non-square inputs groups unrelated pixels. We attend
along height and then along width, as the CaraNet paper describes. Parameters and
multiply-accumulates are identical on square inputs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn


class AxialSelfAttention(nn.Module):
    """Sigmoid self-attention along one spatial axis, added to the input with a learned scale."""

    def __init__(self, channels: int, axis: Literal["h", "w"]) -> None:
        super().__init__()
        if axis not in ("h", "w"):
            raise ValueError(f"axis must be 'h' or 'w', got {axis!r}")
        if channels < 8:
            raise ValueError(f"axial attention needs at least 8 channels, got {channels}")
        self.axis = axis
        self.query_conv = nn.Conv2d(channels, channels // 8, kernel_size=1, bias=False)
        self.key_conv = nn.Conv2d(channels, channels // 8, kernel_size=1, bias=False)
        self.value_conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        # Work on a view whose dim 2 is the attended axis; 1×1 convs commute with the transpose.
        t = x if self.axis == "h" else x.transpose(2, 3)
        b, c, n, m = t.shape
        query = self.query_conv(t).permute(0, 2, 1, 3).reshape(b, n, -1)  # (B, n, C'·m)
        key = self.key_conv(t).permute(0, 1, 3, 2).reshape(b, -1, n)  # (B, C'·m, n)
        attention = torch.sigmoid(torch.bmm(query, key))  # (B, n, n)
        value = self.value_conv(t).permute(0, 1, 3, 2).reshape(b, c * m, n)
        out = torch.bmm(value, attention.transpose(1, 2)).reshape(b, c, m, n).permute(0, 1, 3, 2)
        out = self.gamma * out + t
        return out if self.axis == "h" else out.transpose(2, 3)


class AxialAttentionKernel(nn.Module):
    """CaraNet's AA kernel: 1×1 conv, 3×3 conv (both bare), height attention, width attention."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.conv1 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.h_attn = AxialSelfAttention(out_channels, "h")
        self.w_attn = AxialSelfAttention(out_channels, "w")

    def forward(self, x: Tensor) -> Tensor:
        return self.w_attn(self.h_attn(self.conv1(self.conv0(x))))
