"""The registry: every name builds its network at a small width; bad names and channels fail (the output
contract of every network: test_network_contract.py)."""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import BUNDLED_CHECKPOINT, CheckpointMeta, load_checkpoint, save_checkpoint
from model.networks.base import SegmentationNetwork
from model.registry import NETWORKS, PAPER_NETWORK, build, network_class

WIDTH = 0.1
ALL_NAMES = sorted(NETWORKS)


def test_registry_holds_both_variants_of_the_paper_network_its_six_comparators_and_unet() -> None:
    assert ALL_NAMES == sorted(["ian_net", "ian_net_released", "caranet", "ds_transunet", "ducknet", "deeplabv3plus",
                                "hardnet_mseg", "meganet", "unet"])
    assert PAPER_NETWORK == "ian_net"


@pytest.mark.parametrize("name", ALL_NAMES)
def test_registered_class_carries_its_registry_name_and_a_weight_per_output(name: str) -> None:
    cls = network_class(name)
    assert issubclass(cls, SegmentationNetwork)
    assert cls.name == name
    assert cls.size_multiple >= 1
    assert len(cls.loss_weights) >= 1 and all(w > 0 for w in cls.loss_weights)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_one_channel_network_has_fewer_parameters_than_the_three_channel_one(name: str) -> None:
    one = sum(p.numel() for p in build(name, in_channels=1, width=WIDTH).parameters())
    three = sum(p.numel() for p in build(name, in_channels=3, width=WIDTH).parameters())
    assert 0 < one < three


def test_unknown_name_is_refused_with_every_valid_name() -> None:
    with pytest.raises(ValueError, match="unknown network 'unet3d'") as caught:
        build("unet3d")
    for name in NETWORKS:
        assert name in str(caught.value)


@pytest.mark.parametrize("in_channels", [0, -1, 1.0, True])
def test_input_channels_that_are_not_a_positive_integer_are_refused(in_channels: object) -> None:
    with pytest.raises(ValueError, match="in_channels must be a positive integer"):
        build(PAPER_NETWORK, in_channels=in_channels, width=WIDTH)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_network_takes_five_channels_adjacent_slices_as_channels(name: str) -> None:
    net = build(name, in_channels=5, width=WIDTH).eval()
    side = max(64, net.size_multiple)
    with torch.no_grad():
        assert net(torch.rand(1, 5, side, side)).logits.shape == (1, 1, side, side)


def test_the_two_ian_net_rows_are_the_paper_and_the_released_variant_with_one_weight_layout() -> None:
    paper, released = build("ian_net", width=WIDTH), build("ian_net_released", width=WIDTH)
    assert (paper.variant, released.variant) == ("paper-attention", "released-no-attention")
    plain = build("ian_net", width=WIDTH, attention=False)
    assert plain.state_dict().keys() == released.state_dict().keys()
    plain.load_state_dict(released.state_dict(), strict=True)
    with pytest.raises(ValueError, match="without attention"):
        build("ian_net_released", width=WIDTH, attention=True)


def test_the_bundled_checkpoint_still_loads_as_the_ian_net_row_it_records() -> None:
    loaded = load_checkpoint(BUNDLED_CHECKPOINT)
    assert loaded.meta.architecture == PAPER_NETWORK and type(loaded.model) is network_class(PAPER_NETWORK)
    assert loaded.meta.variant == loaded.model.variant


@pytest.mark.parametrize("row", ["ian_net_released", "unet"])
def test_a_checkpoint_of_a_new_row_records_its_name_and_variant_and_loads(row: str, tmp_path) -> None:
    net = build(row, width=WIDTH)
    meta = CheckpointMeta(architecture=row, width=WIDTH, variant=getattr(net, "variant", ""))
    save_checkpoint(tmp_path / "net.pt", net, meta)
    loaded = load_checkpoint(tmp_path / "net.pt")
    assert type(loaded.model) is network_class(row) and loaded.meta.variant == meta.variant
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.model.state_dict().values(),
                                                    strict=True))
