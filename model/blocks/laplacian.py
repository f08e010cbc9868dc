"""Gaussian/Laplacian pyramid operators (Burt–Adelson), as MEGANet uses them for edge cues.

A Laplacian level is the image minus its blurred, decimated and re-expanded copy, i.e. its
high-frequency detail. The blur is the 5×5 binomial kernel (1 4 6 4 1)ᵀ(1 4 6 4 1)/256 with
reflect padding; expansion inserts zeros at odd positions and blurs with 4× the kernel. All
operators are differentiable: MEGANet takes the Laplacian of its own sigmoid predictions.
Reflect padding needs every spatial side to be at least 3 pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)
#: Smallest spatial side the 5×5 reflect-padded blur accepts.
MIN_SIDE = 3


def _kernel(channels: int, like: Tensor) -> Tensor:
    b = torch.tensor(_BINOMIAL, device=like.device, dtype=like.dtype)
    k = torch.outer(b, b) / 256.0
    return k.expand(channels, 1, 5, 5)


def gaussian_blur(x: Tensor, gain: float = 1.0) -> Tensor:
    """Per-channel 5×5 binomial blur with reflect padding; `gain` scales the kernel."""
    if min(x.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"gaussian_blur needs H and W >= {MIN_SIDE}, got {tuple(x.shape[-2:])}")
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    return F.conv2d(padded, _kernel(x.shape[1], x) * gain, groups=x.shape[1])


def pyramid_down(x: Tensor) -> Tensor:
    """Blur, then keep every second row and column (the next Gaussian-pyramid level)."""
    return gaussian_blur(x)[..., ::2, ::2]


def pyramid_up(x: Tensor) -> Tensor:
    """Insert zeros between samples (2× size), then blur with 4× the kernel to interpolate."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[..., ::2, ::2] = x
    return gaussian_blur(up, gain=4.0)


def laplacian(x: Tensor) -> Tensor:
    """The detail of `x` lost by one pyramid step, at the size of `x`."""
    expanded = pyramid_up(pyramid_down(x))
    if expanded.shape[-2:] != x.shape[-2:]:
        expanded = F.interpolate(expanded, size=x.shape[-2:], mode="nearest")
    return x - expanded


def laplacian_pyramid_level(x: Tensor, level: int) -> Tensor:
    """Level `level` of the Laplacian pyramid of `x` (0 = full size), at 1/2**level of its size."""
    if level < 0:
        raise ValueError(f"pyramid level must be >= 0, got {level}")
    for _ in range(level):
        x = pyramid_down(x)
    return laplacian(x)
