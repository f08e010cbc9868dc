"""The registry: every name builds its network at a small width; bad names and channels fail (the output
contract of every network: test_network_contract.py)."""

from __future__ import annotations

import pytest

from model.networks.base import SegmentationNetwork
from model.registry import NETWORKS, PAPER_NETWORK, build, network_class

WIDTH = 0.1
ALL_NAMES = sorted(NETWORKS)


def test_registry_holds_the_paper_network_and_its_six_comparators() -> None:
    assert ALL_NAMES == sorted(
        ["ian_net", "caranet", "ds_transunet", "ducknet", "deeplabv3plus", "hardnet_mseg", "meganet"]
    )
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
    with pytest.raises(ValueError, match="unknown network 'unet'") as caught:
        build("unet")
    for name in NETWORKS:
        assert name in str(caught.value)


@pytest.mark.parametrize("in_channels", [0, 2, 4])
def test_input_channels_other_than_one_or_three_are_refused(in_channels: int) -> None:
    with pytest.raises(ValueError, match=f"in_channels must be 1 or 3, got {in_channels}"):
        build(PAPER_NETWORK, in_channels=in_channels, width=WIDTH)
