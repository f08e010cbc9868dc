"""Res2Net v1b (26w×4s) backbone, as CaraNet (Res2Net-101) and MEGANet (Res2Net-50) use it.

v1b differs from the plain Res2Net in two places: a deep stem of three 3×3 convs instead of one
7×7, and an average pool in front of the 1×1 projection on strided shortcuts. Each bottleneck
splits its 1×1-expanded features into `scale` groups of `width = floor(planes·26/64)` channels;
group i (i ≥ 1) gets a 3×3 conv applied to itself plus the previous group's output, which gives
one block several receptive-field sizes. The first block of a stage ("stage" type) instead convs
every group independently with the stride and average-pools the last group.

No classifier (avgpool + fc) is built: the segmentation heads only take the feature maps.

Pretrained weights. Our parameter names are the official ones (Res2Net-PretrainedModels, the
copies in the CaraNet and MEGANet repositories, files `res2net50_v1b_26w_4s-3cf99910.pth` and
`res2net101_v1b_26w_4s-0812c246.pth`), so the mapping is the identity except for the rows marked:

=====================================================  =============================================
official key                                           ours (inside `Res2NetV1b`)
=====================================================  =============================================
conv1.{0,1,3,4,6}.*  (stem conv 3→32 s2, BN, conv       conv1.{0,1,3,4,6}.*
32→32, BN, conv 32→64)
bn1.*                                                  bn1.*
layer{1-4}.{b}.conv1 / bn1 / conv3 / bn3 .*            same
layer{1-4}.{b}.convs.{i} / bns.{i} .*  (i = 0..2)      same
layer{1-4}.0.downsample.{1,2}.*  (index 0 is the       same
parameter-free AvgPool2d)
fc.weight, fc.bias                                     dropped (no classifier built)
``module.`` prefix (DataParallel saves)                stripped
conv1.0.weight (32×3×3×3) with in_channels != 3       adapt_input_conv (1: summed over RGB)
BN ``num_batches_tracked`` absent in old saves         kept at our value
=====================================================  =============================================

Anything else that does not match, by name or shape, raises `BackboneCheckpointError`.
Nothing is ever downloaded: the user supplies the file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from model.blocks.common import adapt_input_conv, scale_channels

logger = logging.getLogger(__name__)

#: Blocks per stage.
RES2NET50_LAYERS: tuple[int, int, int, int] = (3, 4, 6, 3)
RES2NET101_LAYERS: tuple[int, int, int, int] = (3, 4, 23, 3)

#: Bottleneck output channels = planes × EXPANSION.
EXPANSION = 4
_STAGE_PLANES = (64, 128, 256, 512)
_STAGE_STRIDES = (1, 2, 2, 2)
_CLASSIFIER_PREFIX = "fc."
_STEM_CONV_KEY = "conv1.0.weight"


class BackboneCheckpointError(ValueError):
    """The supplied checkpoint does not fit the backbone (names or shapes)."""


class Bottle2neck(nn.Module):
    """The Res2Net bottleneck: 1×1 expand, hierarchical 3×3 convs over `scale` groups, 1×1 project."""

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        first: bool = False,
        base_width: int = 26,
        scale: int = 4,
    ) -> None:
        super().__init__()
        if scale < 2:
            raise ValueError(f"Res2Net scale must be >= 2, got {scale}")
        width = int(math.floor(planes * (base_width / 64.0)))
        if width < 1:
            raise ValueError(f"Res2Net group width is 0 for planes={planes}, base_width={base_width}")
        out_channels = planes * EXPANSION
        self.width = width
        self.conv1 = nn.Conv2d(in_channels, width * scale, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False) for _ in range(scale - 1)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale - 1))
        # "stage" blocks pool the last, unconvolved group so that it matches the strided ones.
        self.pool = nn.AvgPool2d(kernel_size=3, stride=stride, padding=1) if first else None
        self.conv3 = nn.Conv2d(width * scale, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if first and (stride != 1 or in_channels != out_channels):
            self.downsample = nn.Sequential(
                nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        groups = torch.split(out, self.width, dim=1)
        outs: list[Tensor] = []
        sp = groups[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            if i > 0:
                sp = groups[i] if self.pool is not None else sp + groups[i]
            sp = self.relu(bn(conv(sp)))
            outs.append(sp)
        outs.append(self.pool(groups[-1]) if self.pool is not None else groups[-1])
        out = self.bn3(self.conv3(torch.cat(outs, dim=1)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Res2NetV1b(nn.Module):
    """Res2Net v1b feature extractor returning the stem and the four stage outputs.

    `forward` returns (stem /2, layer1 /4, layer2 /8, layer3 /16, layer4 /32); the stem output is
    taken after its BN + ReLU and before the max pool (MEGANet uses it). `width` scales the stem
    and the stage planes; 1.0 is the original.
    """

    def __init__(
        self,
        layers: Sequence[int] = RES2NET101_LAYERS,
        in_channels: int = 3,
        width: float = 1.0,
        base_width: int = 26,
        scale: int = 4,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {tuple(layers)}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        stem_mid = scale_channels(32, width)
        stem_out = scale_channels(64, width)
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, stem_mid, 3, 2, 1, bias=False),
            nn.BatchNorm2d(stem_mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_mid, stem_mid, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_mid, stem_out, 3, 1, 1, bias=False),
        )
        self.bn1 = nn.BatchNorm2d(stem_out)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = [stem_out]
        in_ch = stem_out
        stages = []
        for planes, blocks, stride in zip(_STAGE_PLANES, layers, _STAGE_STRIDES, strict=True):
            p = scale_channels(planes, width)
            stage = [Bottle2neck(in_ch, p, stride, first=True, base_width=base_width, scale=scale)]
            in_ch = p * EXPANSION
            stage += [Bottle2neck(in_ch, p, base_width=base_width, scale=scale) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            channels.append(in_ch)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        #: Channels of the five returned feature maps.
        self.out_channels: tuple[int, ...] = tuple(channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation: He (fan-out) for convs, BN at identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        c1 = self.layer1(self.maxpool(stem))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return stem, c1, c2, c3, c4


def official_to_ours(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official Res2Net v1b keys → ours: strip `module.`, drop the classifier (see the table above)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if key.startswith(_CLASSIFIER_PREFIX):
            continue
        out[key] = value
    return out


def ours_to_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our backbone keys → the official names (the identity: we kept them), without BN counters.

    Exists so that a round trip can be tested and so that the table above has one place in code.
    """
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _read_state_dict(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint {path} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise BackboneCheckpointError(f"backbone checkpoint {path}: expected a state dict of tensors")
    return obj


def load_official_res2net(backbone: Res2NetV1b, path: str | Path) -> None:
    """Load an official ImageNet Res2Net v1b checkpoint file into `backbone` (strict, see the table)."""
    path = Path(path)
    theirs = official_to_ours(_read_state_dict(path))
    ours = backbone.state_dict()
    missing = [k for k in ours if k not in theirs and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in theirs if k not in ours]
    if missing or unexpected:
        raise BackboneCheckpointError(
            f"backbone checkpoint {path} does not fit Res2Net v1b with {len(backbone.layer3)} layer3 blocks: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    stem = theirs.get(_STEM_CONV_KEY)
    want = ours[_STEM_CONV_KEY]
    if stem is not None and stem.shape[1] == 3 and want.shape[1] != 3 and stem.shape[0] == want.shape[0]:
        logger.info("backbone checkpoint %s: RGB stem filters fitted to %d input channels", path.name, want.shape[1])
        theirs[_STEM_CONV_KEY] = adapt_input_conv(stem, want.shape[1])
    for key, value in theirs.items():
        if value.shape != ours[key].shape:
            raise BackboneCheckpointError(
                f"backbone checkpoint {path}: {key} has shape {tuple(value.shape)}, "
                f"the backbone needs {tuple(ours[key].shape)} (was it built at width 1.0?)"
            )
    backbone.load_state_dict(theirs, strict=False)
    logger.info("loaded backbone checkpoint %s (%d tensors)", path.name, len(theirs))
