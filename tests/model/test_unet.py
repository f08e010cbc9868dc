"""The plain U-Net baseline: the 2015 topology (with BN) counted by hand, its skips and its input sizes
(the output contract, gradients and training steps: test_network_contract.py)."""

from __future__ import annotations

import pytest
import torch

from model.networks.base import InputSizeError
from model.networks.unet import LEVEL_CHANNELS, UNet
from model.registry import build


def _conv_bn(c_in: int, c_out: int) -> int:
    return 9 * c_in * c_out + 2 * c_out  # 3×3 conv without bias, BN weight and bias


def _double(c_in: int, c_out: int) -> int:
    return _conv_bn(c_in, c_out) + _conv_bn(c_out, c_out)


def _hand_count(in_channels: int) -> int:
    """Ronneberger's U-Net with BN after each 3×3 conv, 2×2 up-convs with bias, a 1×1 head: by hand."""
    c = LEVEL_CHANNELS
    total = _double(in_channels, c[0]) + sum(_double(a, b) for a, b in zip(c[:-1], c[1:], strict=True))
    for deep, shallow in zip(c[:0:-1], c[-2::-1], strict=True):  # 1024→512, ..., 128→64
        total += 4 * deep * shallow + shallow  # transposed conv, halving the channels
        total += _double(2 * shallow, shallow)  # after concatenating the skip
    return total + c[0] + 1


@pytest.mark.parametrize("in_channels", [1, 3])
def test_full_width_parameter_count_is_the_2015_topology_with_batch_norm(in_channels: int) -> None:
    net = build("unet", in_channels=in_channels)
    assert sum(p.numel() for p in net.parameters()) == _hand_count(in_channels)
    assert _hand_count(3) == 31_037_633  # the count the common PyTorch U-Net (bilinear=False) prints


def test_each_up_step_concatenates_the_encoder_map_of_its_resolution() -> None:
    net = UNet(in_channels=1, width=0.125)
    seen: list[tuple[int, int]] = []
    hooks = [step.conv.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[1:3])))
             for step in net.decoder]
    net.eval()
    with torch.no_grad():
        net(torch.rand(1, 1, 64, 32))
    for hook in hooks:
        hook.remove()
    # 2 × the level's channels (skip + up-conv) at the level's resolution: 64 / 2^k high
    assert seen == [(128, 8), (64, 16), (32, 32), (16, 64)]


def test_sides_off_a_multiple_of_sixteen_are_refused() -> None:
    with pytest.raises(InputSizeError, match="multiples of 16"):
        UNet(width=0.125)(torch.rand(1, 1, 64, 40))
