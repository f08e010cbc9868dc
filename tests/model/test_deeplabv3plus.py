"""DeepLabV3+ / ResNet-50: size and torchvision-compatible backbone weights (the output contract,
gradients and training: test_network_contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.blocks.resnet import load_torchvision_weights, resnet18, resnet50
from model.networks.deeplabv3plus import DeepLabV3Plus

#: REFERENCE.md: ResNet-50, output stride 16, one decoder conv, 3 input channels, 1 class.
REFERENCE_PARAMS = 39.76e6


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def full_width() -> DeepLabV3Plus:
    """Built on the meta device: the tests read its structure, not its values."""
    with torch.device("meta"):
        return DeepLabV3Plus(in_channels=3)


def small(in_channels: int = 1) -> DeepLabV3Plus:
    torch.manual_seed(0)
    return DeepLabV3Plus(in_channels=in_channels, width=0.125)


def test_full_width_parameter_count_is_within_one_percent_of_reference(full_width) -> None:
    assert n_params(full_width) == 39_756_705
    assert abs(n_params(full_width) / REFERENCE_PARAMS - 1) < 0.01


def test_backbone_is_dilated_to_output_stride_16(full_width) -> None:
    assert full_width.backbone.feature_strides == (2, 4, 8, 16, 16)
    assert full_width.backbone.layer4[1].conv2.dilation == (2, 2)


def test_resnet_classifier_sizes_match_torchvision() -> None:
    assert n_params(resnet50(num_classes=1000)) == 25_557_032
    assert n_params(resnet18(num_classes=1000)) == 11_689_512


def _save_as_torchvision_checkpoint(backbone: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Our backbone's weights under torchvision's names, plus the ImageNet classifier an official file has."""
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    for v in state.values():
        if v.is_floating_point():
            v.uniform_()
    width = backbone.feature_channels[-1]
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, width), torch.randn(1000)
    torch.save(state, path)
    return state


def test_torchvision_checkpoint_round_trips_into_the_backbone(tmp_path: Path) -> None:
    path = tmp_path / "resnet50.pth"
    saved = _save_as_torchvision_checkpoint(small(in_channels=3).backbone, path)
    model = small(in_channels=3)
    model.load_backbone(path)
    loaded = model.backbone.state_dict()
    assert set(saved) - set(loaded) == {"fc.weight", "fc.bias"}
    for key, value in loaded.items():
        torch.testing.assert_close(value, saved[key], msg=key)


def test_rgb_checkpoint_loads_into_grayscale_backbone_by_summing_conv1(tmp_path: Path) -> None:
    path = tmp_path / "resnet50.pth"
    saved = _save_as_torchvision_checkpoint(small(in_channels=3).backbone, path)
    model = small(in_channels=1)
    model.load_backbone(path)
    torch.testing.assert_close(model.backbone.conv1.weight, saved["conv1.weight"].sum(1, keepdim=True))


def test_checkpoint_of_another_width_is_rejected_naming_the_shapes(tmp_path: Path) -> None:
    path = tmp_path / "resnet50.pth"
    torch.save(resnet50(width=0.25).state_dict(), path)
    with pytest.raises(ValueError, match="shapes differ"):
        load_torchvision_weights(small(in_channels=3).backbone, path)
