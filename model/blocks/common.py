"""Small helpers every network uses: channel scaling by width and conv + BN + activation."""

from __future__ import annotations

from torch import nn


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
