"""Small helpers every network uses: channel scaling by width, conv + BN + activation, and fitting an
ImageNet (RGB) first-conv kernel to another input channel count."""

from __future__ import annotations

import math

from torch import Tensor, nn


def scale_channels(channels: int, width: float, divisor: int = 1) -> int:
    """Channels scaled by `width`, rounded to a multiple of `divisor` and never below `divisor`.

    Width 1.0 must return `channels` unchanged so that full-width parameter counts match the originals.
    """
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    if width == 1.0:
        return channels
    scaled = int(round(channels * width / divisor)) * divisor
    return max(divisor, scaled)


class ConvBNAct(nn.Sequential):
    """Conv2d, BatchNorm2d, then an activation (ReLU by default; pass `act=None` for none)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int = 1,
        padding: int | tuple[int, int] | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        act: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        if padding is None:
            k = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
            padding = (dilation * (k[0] - 1) // 2, dilation * (k[1] - 1) // 2)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias),
            nn.BatchNorm2d(out_channels),
        ]
        if act is not None:
            layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6) else act())
        super().__init__(*layers)


def adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """An RGB first-conv kernel (out, 3, kh, kw) fitted to `in_channels` inputs, the rule timm uses.

    3 channels: unchanged. 1 channel: summed over RGB, so a grey image gives the response the RGB kernel
    gives to that grey replicated. C channels otherwise (adjacent slices as channels): the RGB kernel
    repeated over the channels, cut to C and scaled by 3/C, which keeps the response to C equal
    channels equal to the RGB kernel's response to three.
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected an RGB conv kernel (out, 3, kh, kw), got shape {tuple(weight.shape)}")
    if in_channels == 3:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeated = weight.repeat(1, math.ceil(in_channels / 3), 1, 1)[:, :in_channels]
    return repeated * (3 / in_channels)
