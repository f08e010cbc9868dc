"""The registry: every name builds a small network that keeps the output contract; bad names and channels fail."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from model.networks.base import InputSizeError, SegmentationNetwork
from model.registry import NETWORKS, PAPER_NETWORK, build, network_class

WIDTH = 0.1
ALL_NAMES = sorted(NETWORKS)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine OpenMP's barriers make
    two threads many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smallest_side(model: SegmentationNetwork) -> int:
    """The smallest input side the network takes: its size multiple, at least 64 (MEGANet's floor)."""
    return math.lcm(model.size_multiple, 64)


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
def test_small_network_gives_input_sized_logits_in_eval_and_declared_aux_in_training(name: str) -> None:
    torch.manual_seed(0)
    model = build(name, in_channels=3, width=WIDTH)
    assert isinstance(model, network_class(name))
    side = smallest_side(model)
    x = torch.randn(2, 3, side, side)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.logits.shape == (2, 1, side, side) and out.aux == ()
    model.train()
    with torch.no_grad():
        out = model(x)
    assert out.logits.shape == (2, 1, side, side)
    assert len(out.aux) == len(model.loss_weights) - 1
    assert all(a.shape == (2, 1, side, side) for a in out.aux)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_input_off_the_size_multiple_is_refused_naming_the_multiple(name: str) -> None:
    model = build(name, in_channels=1, width=WIDTH).eval()
    side = smallest_side(model)
    assert model.size_multiple > 8
    with pytest.raises(InputSizeError, match=f"multiples of {model.size_multiple}"):
        model(torch.zeros(1, 1, side + 8, side))


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
