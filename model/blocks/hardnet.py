"""HarDNet-68 backbone (Chao et al. 2019), as HarDNet-MSEG uses it, without the classifier.

Structure (read from james128333/HarDNet-MSEG ``lib/hardnet_68.py`` and PingoLH/Pytorch-HarDNet):
every conv is a ``ConvLayer`` = conv (no bias) + BatchNorm + ReLU6. The stem is a 3×3 stride-2
conv to 32 channels, a 3×3 conv to 64 and a 3×3 stride-2 max-pool. Five harmonic dense blocks
follow, each closed by a 1×1 ConvLayer to 128/256/320/640/1024 channels, with a 2×2 max-pool
after blocks 1, 3 and 4. Inside a block, layer i (1-based) reads the concatenation of layers
i − 2^k for every 2^k dividing i (layer 0 is the block input) and has growth·1.7^(links−1)
channels rounded to even; the block outputs the odd layers and the last one.

Pretrained weights: the official ImageNet file ``hardnet68.pth`` (a plain state dict) loads with
`load_hardnet68_checkpoint`. Our modules sit in ``base`` at the official indices, so the mapping is:

=============================  ==============================  ==================================
official key                   ours                            note
=============================  ==============================  ==================================
``base.{i}.conv.weight``       ``base.{i}.conv.weight``        i = 0, 1, 4, 7, 9, 12, 15
``base.{i}.norm.*``            ``base.{i}.norm.*``             weight, bias, running stats
``base.{i}.layers.{j}.conv.*`` ``base.{i}.layers.{j}.conv.*``  i = 3, 6, 8, 11, 14 (blocks)
``base.{i}.layers.{j}.norm.*`` ``base.{i}.layers.{j}.norm.*``
``base.16.3.weight/bias``      (dropped)                       ImageNet classifier, never used
``base.0.conv.weight``         ``adapt_input_conv``            when ``in_channels != 3``
=============================  ==============================  ==================================

Indices 2, 5, 10 and 13 are max-pools (no parameters). A leading ``module.`` (DataParallel) is
stripped. Only width 1.0 can load the file; any missing, unexpected or mis-shaped key is an error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from model.blocks.common import adapt_input_conv, scale_channels

logger = logging.getLogger(__name__)

#: HarDNet-68: stem channels, then per block: transition channels, growth, layers, pool after.
STEM_CHANNELS = (32, 64)
BLOCK_CHANNELS = (128, 256, 320, 640, 1024)
GROWTH = (14, 16, 20, 40, 160)
N_LAYERS = (8, 16, 16, 16, 4)
DOWNSAMPLE = (True, False, True, True, False)
GROWTH_MULTIPLIER = 1.7
#: Indices in `HarDNet68.base` whose outputs are returned: strides 4, 8, 16 and 32.
TAP_INDICES = (4, 9, 12, 15)
#: Official key prefix of the ImageNet classifier, which we do not build.
CLASSIFIER_PREFIX = "base.16."


class ConvLayer(nn.Sequential):
    """Conv (no bias, 'same' padding for odd kernels) + BatchNorm + ReLU6, keys conv/norm/relu."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.add_module(
            "conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        )
        self.add_module("norm", nn.BatchNorm2d(out_channels))
        self.add_module("relu", nn.ReLU6(inplace=True))


def harmonic_links(layer: int) -> list[int]:
    """Earlier layers that `layer` (1-based; 0 is the block input) reads: layer − 2^k for 2^k | layer."""
    links = []
    step = 1
    while step <= layer:
        if layer % step == 0:
            links.append(layer - step)
        step *= 2
    return links


def harmonic_out_channels(layer: int, growth: int, multiplier: float) -> int:
    """Channels of `layer`: growth × multiplier^(links − 1), rounded as the original does."""
    channels = growth * multiplier ** (len(harmonic_links(layer)) - 1)
    return int(int(channels + 1) / 2) * 2


class HarDBlock(nn.Module):
    """Harmonic dense block: sparse concatenation links; outputs the odd layers and the last."""

    def __init__(self, in_channels: int, growth: int, multiplier: float, n_layers: int) -> None:
        super().__init__()
        widths = [in_channels] + [harmonic_out_channels(i, growth, multiplier) for i in range(1, n_layers + 1)]
        self.links = [harmonic_links(i) for i in range(1, n_layers + 1)]
        self.layers = nn.ModuleList(
            ConvLayer(sum(widths[k] for k in links), widths[i + 1]) for i, links in enumerate(self.links)
        )
        self.kept = [i for i in range(1, n_layers + 1) if i % 2 == 1 or i == n_layers]
        self.out_channels = sum(widths[i] for i in self.kept)

    def forward(self, x: Tensor) -> Tensor:
        outputs = [x]
        for layer, links in zip(self.layers, self.links, strict=True):
            inputs = [outputs[k] for k in links]
            outputs.append(layer(inputs[0] if len(inputs) == 1 else torch.cat(inputs, 1)))
        return torch.cat([outputs[i] for i in self.kept], 1)


class HarDNet68(nn.Module):
    """HarDNet-68 features; `forward` returns the stride-4/8/16/32 taps (128/320/640/1024 channels)."""

    def __init__(self, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.width = width
        stem = [scale_channels(c, width) for c in STEM_CHANNELS]
        self.base = nn.ModuleList(
            [
                ConvLayer(in_channels, stem[0], 3, stride=2),
                ConvLayer(stem[0], stem[1], 3),
                nn.MaxPool2d(3, 2, 1),
            ]
        )
        channels = stem[1]
        for out, growth, n_layers, pool in zip(BLOCK_CHANNELS, GROWTH, N_LAYERS, DOWNSAMPLE, strict=True):
            block = HarDBlock(channels, scale_channels(growth, width), GROWTH_MULTIPLIER, n_layers)
            channels = scale_channels(out, width)
            self.base.append(block)
            self.base.append(ConvLayer(block.out_channels, channels, 1))
            if pool:
                self.base.append(nn.MaxPool2d(2, 2))
        #: Channels of each tap in `TAP_INDICES` order.
        self.tap_channels = tuple(scale_channels(c, width) for c in (128, 320, 640, 1024))

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for index, module in enumerate(self.base):
            x = module(x)
            if index in TAP_INDICES:
                taps.append(x)
        return taps


def official_to_ours(state_dict: dict[str, Tensor], in_channels: int) -> dict[str, Tensor]:
    """Map an official hardnet68.pth state dict to `HarDNet68` keys (see the module docstring)."""
    mapped: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith(CLASSIFIER_PREFIX):
            continue
        mapped[key] = value
    first = "base.0.conv.weight"
    if in_channels != 3 and first in mapped and mapped[first].shape[1] == 3:
        mapped[first] = adapt_input_conv(mapped[first], in_channels)
    return mapped


def load_hardnet68_checkpoint(backbone: HarDNet68, path: str | Path) -> None:
    """Load a user-supplied official ImageNet HarDNet-68 file into `backbone` (nothing is downloaded)."""
    path = Path(path)
    if backbone.width != 1.0:
        raise ValueError(f"{path}: pretrained HarDNet-68 weights need width 1.0, got width {backbone.width}")
    if not path.is_file():
        raise FileNotFoundError(f"HarDNet-68 checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    mapped = official_to_ours(state, backbone.in_channels)
    ours = backbone.state_dict()
    # BN counters may be absent (files saved before torch 0.4.1): ours are kept
    mapped = {**{k: v for k, v in ours.items() if k.endswith("num_batches_tracked")}, **mapped}
    missing = sorted(set(ours) - set(mapped))
    unexpected = sorted(set(mapped) - set(ours))
    if missing or unexpected:
        raise ValueError(
            f"{path}: not a HarDNet-68 checkpoint; missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    for key, value in mapped.items():
        if value.shape != ours[key].shape:
            raise ValueError(f"{path}: key {key} has shape {tuple(value.shape)}, expected {tuple(ours[key].shape)}")
    backbone.load_state_dict(mapped)
    logger.info("loaded HarDNet-68 weights from %s (%d tensors)", path, len(mapped))
