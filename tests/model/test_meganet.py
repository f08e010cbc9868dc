"""MEGANet: faithful size at full width, input channels and minimum size, its edge operators, backbone
loading (the output contract, gradients and training: test_network_contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.blocks.cbam import CBAM
from model.blocks.laplacian import laplacian, laplacian_pyramid_level, pyramid_up
from model.blocks.res2net import RES2NET101_LAYERS, BackboneCheckpointError, Res2NetV1b, ours_to_official
from model.networks.base import InputSizeError
from model.networks.meganet import MEGANet
from tests.model.gradients import conv_biases_feeding_batch_norm

#: REFERENCE.md "MEGANet": 44.19 M in all, of which the Res2Net-50 backbone is 23.67 M.
REFERENCE_PARAMS = 44.19e6
REFERENCE_BACKBONE_PARAMS = 23.67e6
SMALL_WIDTH = 0.125


@pytest.fixture(scope="module")
def full_width() -> MEGANet:
    return MEGANet(in_channels=3)


def test_full_width_parameter_count_is_within_one_percent_of_reference(full_width: MEGANet) -> None:
    count = sum(p.numel() for p in full_width.parameters())
    assert abs(count - REFERENCE_PARAMS) / REFERENCE_PARAMS < 0.01, count


def test_full_width_backbone_is_res2net50_size_without_classifier(full_width: MEGANet) -> None:
    count = sum(p.numel() for p in full_width.backbone.parameters())
    assert abs(count - REFERENCE_BACKBONE_PARAMS) / REFERENCE_BACKBONE_PARAMS < 0.01, count
    assert not any(k.startswith("backbone.fc.") for k in full_width.state_dict())


def test_conv_biases_cancelled_by_batch_norm_are_found_in_edge_attention_and_reduction() -> None:
    """The contract test lets exactly these parameters have an all-zero gradient."""
    cancelled = conv_biases_feeding_batch_norm(MEGANet(in_channels=1, width=SMALL_WIDTH))
    assert "ega1.attention.0.bias" in cancelled and "reduce5.0.bias" in cancelled


def test_rgb_input_runs_through_the_luminance_edge_path() -> None:
    model = MEGANet(in_channels=3, width=SMALL_WIDTH).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 96))
    assert out.logits.shape == (1, 1, 64, 96)


def test_zero_channel_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        MEGANet(in_channels=0, width=SMALL_WIDTH)


def test_input_edges_of_a_slice_stack_come_from_its_centre_slice() -> None:
    model = MEGANet(in_channels=5, width=SMALL_WIDTH)
    x = torch.rand(2, 5, 64, 64)
    assert torch.equal(model._grayscale(x), x[:, 2:3])


def test_input_below_64_raises_naming_the_minimum() -> None:
    model = MEGANet(in_channels=1, width=SMALL_WIDTH)
    with pytest.raises(InputSizeError, match="at least 64"):
        model(torch.zeros(1, 1, 32, 64))


def test_laplacian_of_a_constant_image_is_zero() -> None:
    assert torch.allclose(laplacian(torch.full((1, 1, 16, 12), 0.6)), torch.zeros(1, 1, 16, 12), atol=1e-6)


def test_laplacian_pyramid_level_one_is_half_size_and_keeps_edges() -> None:
    image = torch.zeros(1, 1, 32, 32)
    image[..., :, 16:] = 1.0  # one vertical edge
    level = laplacian_pyramid_level(image, 1)
    assert level.shape == (1, 1, 16, 16)
    column_energy = level.abs().sum(dim=(0, 1, 2))
    assert column_energy.argmax() in (7, 8)
    assert column_energy[:4].max() < 1e-6


def test_pyramid_up_of_a_constant_is_the_same_constant_at_twice_the_size() -> None:
    up = pyramid_up(torch.full((1, 2, 5, 7), 2.0))
    assert up.shape == (1, 2, 10, 14)
    assert torch.allclose(up, torch.full_like(up, 2.0), atol=1e-6)


def test_cbam_keeps_shape_when_channels_are_below_the_reduction() -> None:
    x = torch.randn(2, 8, 5, 5)
    assert CBAM(8).eval()(x).shape == x.shape


def test_backbone_round_trips_through_official_key_names(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = MEGANet(in_channels=3, width=SMALL_WIDTH)
    state = ours_to_official(source.backbone.state_dict())
    state["fc.weight"] = torch.zeros(1000, source.backbone.out_channels[-1])  # the official classifier
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "res2net50_v1b_26w_4s.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # as a DataParallel save

    torch.manual_seed(2)
    target = MEGANet(in_channels=3, width=SMALL_WIDTH)
    target.load_backbone(path)
    loaded = target.backbone.state_dict()
    for key, value in source.backbone.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value), key


def test_res2net101_checkpoint_is_rejected_by_the_res2net50_backbone(tmp_path: Path) -> None:
    path = tmp_path / "res2net101.pth"
    deeper = Res2NetV1b(RES2NET101_LAYERS, in_channels=3, width=SMALL_WIDTH)
    torch.save(ours_to_official(deeper.state_dict()), path)
    with pytest.raises(BackboneCheckpointError, match="unexpected"):
        MEGANet(in_channels=3, width=SMALL_WIDTH).load_backbone(path)
