"""DUCK-Net: faithful size at full width, and a working small version on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.blocks.duck import KERAS_BN_EPS, KERAS_BN_MOMENTUM, ConvReLUBN, DUCKBlock
from model.networks.base import InputSizeError
from model.networks.ducknet import DUCKNet
from model.registry import build
from tests.model.gradients import parameters_without_gradient

#: Keras trainable parameters of the official model at f = 17, 3 input channels, 1 class.
REFERENCE_PARAMS = 38.87e6
SMALL_WIDTH = 0.25


@pytest.fixture(scope="module")
def full_width() -> DUCKNet:
    return DUCKNet(in_channels=3)


@pytest.fixture(scope="module")
def small_trained() -> tuple[DUCKNet, torch.Tensor, object]:
    """A small DUCK-Net after one train-mode forward and backward pass on 2×1×64×64."""
    torch.manual_seed(0)
    model = build("ducknet", in_channels=1, width=SMALL_WIDTH)
    model.train()
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    out.logits.float().mean().backward()
    return model, x, out


def test_full_width_parameter_count_is_within_one_percent_of_keras_trainable_count(full_width: DUCKNet) -> None:
    count = sum(p.numel() for p in full_width.parameters())
    assert abs(count - REFERENCE_PARAMS) / REFERENCE_PARAMS < 0.01, count


def test_batch_norms_use_keras_momentum_and_epsilon(full_width: DUCKNet) -> None:
    norms = [m for m in full_width.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    assert all(m.momentum == KERAS_BN_MOMENTUM and m.eps == KERAS_BN_EPS for m in norms)


def test_train_forward_returns_input_resolution_logits_and_no_aux(small_trained) -> None:
    model, x, out = small_trained
    assert out.logits.shape == (2, 1, 64, 64)
    assert out.aux == ()
    assert len(out.aux) + 1 == len(model.loss_weights)


def test_gradients_reach_every_parameter(small_trained) -> None:
    model, _, _ = small_trained
    missing = parameters_without_gradient(model)
    assert missing == []


def test_eval_forward_returns_no_aux(small_trained) -> None:
    model, x, _ = small_trained
    model.eval()
    out = model(x)
    assert out.aux == () and out.logits.shape == (2, 1, 64, 64)


def test_input_not_multiple_of_32_raises_input_size_error_naming_32(small_trained) -> None:
    model, _, _ = small_trained
    with pytest.raises(InputSizeError, match="multiples of 32"):
        model(torch.zeros(1, 1, 48, 64))


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
