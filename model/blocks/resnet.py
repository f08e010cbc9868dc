"""ResNet backbones (He et al.) whose state-dict keys are torchvision's, so official weights load as is.

Supports BasicBlock (ResNet-18/34) and Bottleneck (ResNet-50/101/152, ResNeXt through `groups` and
`width_per_group`), any number of blocks per stage, `replace_stride_with_dilation` for output
stride 16 or 8 (semantic segmentation), any number of input channels and a `width` multiplier for
small test models. `num_classes=None` (the default) builds no classifier, so a segmentation model
has no unused parameters.

Key mapping from a torchvision ImageNet checkpoint (e.g. `resnet50-0676ba61.pth`) to ours is the
identity for every key, which is why the modules carry torchvision's names:

| torchvision key                                   | ours                         |
|---------------------------------------------------|------------------------------|
| `conv1.weight`, `bn1.*`                           | same                         |
| `layer{1-4}.{i}.conv{1-3}.weight`, `.bn{1-3}.*`   | same                         |
| `layer{1-4}.0.downsample.0.weight`, `.1.*`        | same                         |
| `fc.weight`, `fc.bias`                            | same if `num_classes` is set, else skipped |

`load_torchvision_weights` also accepts checkpoints wrapped as {"state_dict": ...} or {"model": ...}
and keys prefixed "module." (DataParallel). For another input channel count than 3 the RGB `conv1` filters are fitted by
`model.blocks.common.adapt_input_conv` (1 channel: summed over RGB, the usual way to reuse ImageNet
weights on grayscale images).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from model.blocks.common import adapt_input_conv, scale_channels

logger = logging.getLogger(__name__)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride, padding=dilation, dilation=dilation, groups=groups, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual add (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation=dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (stride and dilation here, as torchvision's "ResNet v1.5"), 1×1 expand ×4."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """torchvision-compatible ResNet; `forward_features` gives the five feature maps a decoder taps."""

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        in_channels: int = 3,
        width: float = 1.0,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Sequence[bool] = (False, False, False),
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {list(layers)}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation must have 3 entries (stages 2-4), "
                f"got {list(replace_stride_with_dilation)}"
            )
        self.groups = groups
        self.base_width = width_per_group
        self.inplanes = scale_channels(64, width)
        self.dilation = 1
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stem_channels = self.inplanes
        planes = [scale_channels(p, width) for p in (64, 128, 256, 512)]
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        self.layer2 = self._make_layer(block, planes[1], layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, planes[2], layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, planes[3], layers[3], 2, replace_stride_with_dilation[2])
        #: Channels of the five `forward_features` outputs (stem, layer1..layer4).
        self.feature_channels: tuple[int, ...] = (stem_channels, *(p * block.expansion for p in planes))
        strides, s = [2, 4], 4
        for dilate in replace_stride_with_dilation:
            s = s if dilate else s * 2
            strides.append(s)
        #: Strides of the five `forward_features` outputs relative to the input.
        self.feature_strides: tuple[int, ...] = tuple(strides)
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(self.feature_channels[-1], num_classes)
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self, block: Block, planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        first = block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation)
        layers = [first]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                      dilation=self.dilation)
            )
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """[stem (stride 2, before the max-pool), layer1, layer2, layer3, layer4]."""
        stem = self.relu(self.bn1(self.conv1(x)))
        c1 = self.layer1(self.maxpool(stem))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [stem, c1, c2, c3, c4]

    def forward(self, x: Tensor) -> Tensor:
        """Class logits when built with `num_classes`, else the deepest feature map."""
        c4 = self.forward_features(x)[-1]
        if self.num_classes is None:
            return c4
        return self.fc(torch.flatten(self.avgpool(c4), 1))


def resnet18(**kwargs: object) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)  # type: ignore[arg-type]


def resnet34(**kwargs: object) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)  # type: ignore[arg-type]


def resnet50(**kwargs: object) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)  # type: ignore[arg-type]


def resnet101(**kwargs: object) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)  # type: ignore[arg-type]


def _unwrap(checkpoint: object, path: Path) -> dict[str, Tensor]:
    """The plain state dict inside a checkpoint file, whatever common wrapper it came in."""
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            inner = checkpoint.get(key)
            if isinstance(inner, Mapping):
                checkpoint = inner
                break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path}: not a ResNet state dict (expected a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def load_torchvision_weights(model: ResNet, path: str | Path) -> None:
    """Load an official torchvision ResNet checkpoint the user supplies into `model` (nothing is downloaded).

    Every key of `model` (BN counters aside) must be present with the same shape (except `conv1.weight` when
    `model` does not take 3 channels: fitted by `adapt_input_conv`); extra keys such as `fc.*` are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint {path} does not exist")
    source = _unwrap(torch.load(path, map_location="cpu", weights_only=True), path)
    target = model.state_dict()
    # BN counters are absent from files saved before torch 0.4.1 (e.g. resnet50-19c8e357.pth): ours are kept
    source = {**{k: v for k, v in target.items() if k.endswith("num_batches_tracked")}, **source}
    missing = sorted(set(target) - set(source))
    if missing:
        raise ValueError(f"{path}: missing {len(missing)} ResNet keys, e.g. {missing[:3]}")
    conv1, channels = source["conv1.weight"], target["conv1.weight"].shape[1]
    if conv1.shape[1] == 3 and channels != 3:
        source = {**source, "conv1.weight": adapt_input_conv(conv1, channels)}
    wrong = [
        f"{k}: {tuple(source[k].shape)} vs {tuple(v.shape)}" for k, v in target.items() if source[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"{path}: shapes differ from this ResNet (width or depth mismatch?): {wrong[:3]}")
    skipped = sorted(set(source) - set(target))
    model.load_state_dict({k: source[k] for k in target})
    logger.info(
        "loaded ResNet weights from %s: %d tensors, %d skipped %s", path, len(target), len(skipped), skipped[:4]
    )
