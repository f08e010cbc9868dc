"""DUCK-Net building blocks: the DUCK block, its six branches and the residual block.

Written from the structure of the official Keras code (RazvanDu/DUCK-Net, CC BY 4.0). Two Keras
habits are kept on purpose because they change what the network computes:

- every conv inside these blocks has a bias and is followed by ReLU and only then by BatchNorm
  (Keras ``Conv2D(activation="relu")`` then ``BatchNormalization``);
- Keras ``padding="same"`` pads an even kernel asymmetrically (the extra row/column goes after,
  i.e. bottom/right), which matters for the separated 1×6 / 6×1 branch.

Keras BatchNormalization defaults (momentum 0.99 on the running average, epsilon 1e-3) become
torch ``momentum=0.01, eps=1e-3``. Convs start from He-uniform weights and zero bias, as in the
original's ``kernel_initializer='he_uniform'``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: torch momentum equivalent of the Keras default 0.99 moving-average decay.
KERAS_BN_MOMENTUM = 0.01
#: Keras BatchNormalization default epsilon.
KERAS_BN_EPS = 1e-3


def keras_batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm2d with Keras' default momentum and epsilon."""
    return nn.BatchNorm2d(channels, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM)


def keras_same_padding(kernel_size: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding of Keras/TensorFlow ``same`` for a stride-1 conv along one axis."""
    total = dilation * (kernel_size - 1)
    return total // 2, total - total // 2


def he_uniform_(conv: nn.Conv2d) -> None:
    """Keras ``he_uniform`` kernel (bound sqrt(6 / fan_in)) and zero bias."""
    nn.init.kaiming_uniform_(conv.weight, nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ConvReLUBN(nn.Sequential):
    """Biased conv with Keras ``same`` padding, then ReLU, then BatchNorm (the Keras order)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int] = (3, 3),
        dilation: int = 1,
    ) -> None:
        (top, bottom), (left, right) = (keras_same_padding(k, dilation) for k in kernel_size)
        layers: list[nn.Module] = []
        if top == bottom and left == right:
            padding: tuple[int, int] = (top, left)
        else:
            layers.append(nn.ZeroPad2d((left, right, top, bottom)))
            padding = (0, 0)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation)
        he_uniform_(conv)
        layers += [conv, nn.ReLU(inplace=True), keras_batch_norm(out_channels)]
        super().__init__(*layers)


class WidescopeBranch(nn.Sequential):
    """Three 3×3 convs with dilations 1, 2 and 3: the widest receptive field."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            ConvReLUBN(in_channels, out_channels, dilation=1),
            ConvReLUBN(out_channels, out_channels, dilation=2),
            ConvReLUBN(out_channels, out_channels, dilation=3),
        )


class MidscopeBranch(nn.Sequential):
    """Two 3×3 convs with dilations 1 and 2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            ConvReLUBN(in_channels, out_channels, dilation=1),
            ConvReLUBN(out_channels, out_channels, dilation=2),
        )


class SeparatedBranch(nn.Sequential):
    """A 1×k then a k×1 conv (k = 6 in the DUCK block), with Keras' asymmetric padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 6) -> None:
        super().__init__(
            ConvReLUBN(in_channels, out_channels, (1, kernel_size)),
            ConvReLUBN(out_channels, out_channels, (kernel_size, 1)),
        )


class ResidualBlock(nn.Module):
    """Two 3×3 conv-ReLU-BN plus a 1×1 conv-ReLU shortcut (no BN on it), summed, then BN."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
        he_uniform_(self.shortcut)
        self.conv1 = ConvReLUBN(in_channels, out_channels)
        self.conv2 = ConvReLUBN(out_channels, out_channels)
        self.bn = keras_batch_norm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv2(self.conv1(x)) + torch.relu(self.shortcut(x)))


def residual_stack(in_channels: int, out_channels: int, repeat: int) -> nn.Sequential:
    """`repeat` residual blocks in a row; the first changes the channel count."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    blocks = [ResidualBlock(in_channels, out_channels)]
    blocks += [ResidualBlock(out_channels, out_channels) for _ in range(repeat - 1)]
    return nn.Sequential(*blocks)


class DUCKBlock(nn.Module):
    """The DUCK block ("duckv2" in the original): BN, six parallel branches summed, BN.

    Branches: widescope, midscope, 1, 2 and 3 stacked residual blocks, and the separated
    1×6 + 6×1 conv. Each branch maps `in_channels` to `out_channels` at the same resolution.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn_in = keras_batch_norm(in_channels)
        self.widescope = WidescopeBranch(in_channels, out_channels)
        self.midscope = MidscopeBranch(in_channels, out_channels)
        self.residual1 = residual_stack(in_channels, out_channels, 1)
        self.residual2 = residual_stack(in_channels, out_channels, 2)
        self.residual3 = residual_stack(in_channels, out_channels, 3)
        self.separated = SeparatedBranch(in_channels, out_channels, 6)
        self.bn_out = keras_batch_norm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn_in(x)
        branches = (self.widescope, self.midscope, self.residual1, self.residual2, self.residual3, self.separated)
        total = branches[0](x)
        for branch in branches[1:]:
            total = total + branch(x)
        return self.bn_out(total)
