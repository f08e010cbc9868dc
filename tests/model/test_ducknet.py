"""DUCK-Net: faithful size at full width, Keras padding and batch norms, the DUCK block (the output
contract, gradients and training: test_network_contract.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.blocks.duck import KERAS_BN_EPS, KERAS_BN_MOMENTUM, ConvReLUBN, DUCKBlock
from model.networks.ducknet import DUCKNet

#: Keras trainable parameters of the official model at f = 17, 3 input channels, 1 class.
REFERENCE_PARAMS = 38.87e6


@pytest.fixture(scope="module")
def full_width() -> DUCKNet:
    """Built on the meta device: the tests read its structure, not its values."""
    with torch.device("meta"):
        return DUCKNet(in_channels=3)


def test_full_width_parameter_count_is_within_one_percent_of_keras_trainable_count(full_width: DUCKNet) -> None:
    count = sum(p.numel() for p in full_width.parameters())
    assert abs(count - REFERENCE_PARAMS) / REFERENCE_PARAMS < 0.01, count


def test_batch_norms_use_keras_momentum_and_epsilon(full_width: DUCKNet) -> None:
    norms = [m for m in full_width.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    assert all(m.momentum == KERAS_BN_MOMENTUM and m.eps == KERAS_BN_EPS for m in norms)


def test_even_kernel_conv_pads_like_keras_same_with_extra_column_after() -> None:
    torch.manual_seed(0)
    block = ConvReLUBN(2, 3, (1, 6))
    x = torch.randn(1, 2, 5, 9)
    conv = block[1]
    expected = F.conv2d(F.pad(x, (2, 3, 0, 0)), conv.weight, conv.bias)
    assert torch.allclose(conv(block[0](x)), expected, atol=1e-6)


def test_duck_block_sums_six_branches_between_batch_norms() -> None:
    torch.manual_seed(0)
    block = DUCKBlock(3, 4).eval()
    x = torch.randn(2, 3, 8, 8)
    y = block.bn_in(x)
    branches = [block.widescope, block.midscope, block.residual1, block.residual2, block.residual3, block.separated]
    expected = block.bn_out(sum(b(y) for b in branches))
    assert [len(block.residual1), len(block.residual2), len(block.residual3)] == [1, 2, 3]
    assert torch.allclose(block(x), expected, atol=1e-5)
