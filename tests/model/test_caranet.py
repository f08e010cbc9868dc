"""CaraNet: faithful size at full width, axial attention, backbone loading (the output contract,
gradients and training: test_network_contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.blocks.axial_attention import AxialSelfAttention
from model.blocks.res2net import BackboneCheckpointError, ours_to_official
from model.networks.caranet import CaraNet

#: REFERENCE.md "CaraNet": official model without its unused Res2Net classifier, 3 in, 1 class.
REFERENCE_PARAMS = 44.59e6
SMALL_WIDTH = 0.125


@pytest.fixture(scope="module")
def full_width() -> CaraNet:
    """Built on the meta device: the tests read its structure, not its values."""
    with torch.device("meta"):
        return CaraNet(in_channels=3)


def test_full_width_parameter_count_is_within_one_percent_of_reference(full_width: CaraNet) -> None:
    count = sum(p.numel() for p in full_width.parameters())
    assert abs(count - REFERENCE_PARAMS) / REFERENCE_PARAMS < 0.01, count


def test_full_width_backbone_is_res2net101_without_classifier(full_width: CaraNet) -> None:
    b = full_width.backbone
    assert [len(b.layer1), len(b.layer2), len(b.layer3), len(b.layer4)] == [3, 4, 23, 3]
    assert not any(k.startswith("backbone.fc.") for k in full_width.state_dict())


@pytest.mark.parametrize("axis", ["h", "w"])
def test_axial_attention_attends_along_its_own_axis_on_non_square_input(axis: str) -> None:
    torch.manual_seed(0)
    attn = AxialSelfAttention(16, axis)
    with torch.no_grad():
        attn.gamma.fill_(0.7)
        x = torch.randn(2, 16, 6, 5)
        q, k, v = attn.query_conv(x), attn.key_conv(x), attn.value_conv(x)
        if axis == "h":  # tokens are rows: weights between rows i and j, values mixed within columns
            weights = torch.sigmoid(torch.einsum("bciw,bcjw->bij", q, k))
            expected = x + 0.7 * torch.einsum("bij,bcjw->bciw", weights, v)
        else:  # tokens are columns
            weights = torch.sigmoid(torch.einsum("bchi,bchj->bij", q, k))
            expected = x + 0.7 * torch.einsum("bij,bchj->bchi", weights, v)
        assert torch.allclose(attn(x), expected, atol=1e-5)


def test_backbone_round_trips_through_official_key_names(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = CaraNet(in_channels=3, width=SMALL_WIDTH)
    state = ours_to_official(source.backbone.state_dict())
    state["fc.weight"] = torch.zeros(1000, source.backbone.out_channels[-1])  # the official classifier
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "res2net101_v1b_26w_4s.pth"
    torch.save(state, path)

    torch.manual_seed(2)
    target = CaraNet(in_channels=3, width=SMALL_WIDTH)
    target.load_backbone(path)
    loaded = target.backbone.state_dict()
    for key, value in source.backbone.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value), key


def test_rgb_backbone_checkpoint_loads_into_grayscale_stem_by_summing_filters(tmp_path: Path) -> None:
    source = CaraNet(in_channels=3, width=SMALL_WIDTH)
    path = tmp_path / "rgb.pth"
    torch.save(ours_to_official(source.backbone.state_dict()), path)
    target = CaraNet(in_channels=1, width=SMALL_WIDTH)
    target.load_backbone(path)
    expected = source.backbone.conv1[0].weight.sum(dim=1, keepdim=True)
    assert torch.allclose(target.backbone.conv1[0].weight, expected)


def test_backbone_checkpoint_of_another_width_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "narrow.pth"
    torch.save(ours_to_official(CaraNet(in_channels=3, width=SMALL_WIDTH).backbone.state_dict()), path)
    with pytest.raises(BackboneCheckpointError, match="shape"):
        CaraNet(in_channels=3, width=0.25).load_backbone(path)
