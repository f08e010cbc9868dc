"""HarDNet-MSEG: faithful size at full width and HarDNet-68 weight loading (the output contract,
gradients and training: test_network_contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.blocks.hardnet import HarDNet68, harmonic_links, load_hardnet68_checkpoint
from model.networks.hardnet_mseg import HarDNetMSEG

#: Parameters of the official HarDMSEG that its forward pass uses (3 input channels, 1 class).
REFERENCE_PARAMS = 17.42e6


@pytest.fixture(scope="module")
def full_width() -> HarDNetMSEG:
    return HarDNetMSEG(in_channels=3)


@pytest.fixture(scope="module")
def official_checkpoint(full_width: HarDNetMSEG, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our full-width backbone saved under the official hardnet68.pth keys, classifier included."""
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in full_width.hardnet.state_dict().items()}
    state["base.16.3.weight"] = torch.randn(1000, 1024)
    state["base.16.3.bias"] = torch.randn(1000)
    path = tmp_path_factory.mktemp("hardnet") / "hardnet68.pth"
    torch.save(state, path)
    return path


def test_full_width_parameter_count_is_within_one_percent_of_official_used_count(full_width: HarDNetMSEG) -> None:
    count = sum(p.numel() for p in full_width.parameters())
    assert abs(count - REFERENCE_PARAMS) / REFERENCE_PARAMS < 0.01, count


def test_full_width_backbone_taps_have_hardnet68_channels_and_strides(full_width: HarDNetMSEG) -> None:
    with torch.no_grad():
        taps = full_width.hardnet.eval()(torch.zeros(1, 3, 32, 32))
    assert [tuple(t.shape[1:]) for t in taps] == [(128, 8, 8), (320, 4, 4), (640, 2, 2), (1024, 1, 1)]


def test_harmonic_layer_links_to_every_power_of_two_back() -> None:
    assert harmonic_links(1) == [0]
    assert harmonic_links(6) == [5, 4]
    assert harmonic_links(12) == [11, 10, 8]
    assert harmonic_links(16) == [15, 14, 12, 8, 0]


def test_official_checkpoint_round_trips_into_backbone_dropping_classifier(
    full_width: HarDNetMSEG, official_checkpoint: Path
) -> None:
    full_width.load_backbone(official_checkpoint)
    saved = torch.load(official_checkpoint, weights_only=True)
    loaded = full_width.hardnet.state_dict()
    assert set(saved) - set(loaded) == {"base.16.3.weight", "base.16.3.bias"}
    assert all(torch.equal(loaded[k], saved[k]) for k in loaded)


def test_official_checkpoint_loads_into_one_channel_backbone_by_summing_rgb(official_checkpoint: Path) -> None:
    backbone = HarDNet68(in_channels=1)
    load_hardnet68_checkpoint(backbone, official_checkpoint)
    rgb = torch.load(official_checkpoint, weights_only=True)["base.0.conv.weight"]
    assert torch.allclose(backbone.base[0].conv.weight, rgb.sum(dim=1, keepdim=True))


def test_official_checkpoint_is_refused_at_reduced_width(official_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="width 1.0"):
        load_hardnet68_checkpoint(HarDNet68(in_channels=3, width=0.5), official_checkpoint)
