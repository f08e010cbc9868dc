"""IAN-Net: parameter counts against the released code, variants, split attention (the output contract,
gradients and training of both variants: test_network_contract.py)."""

from __future__ import annotations

import pytest
import torch

from model.blocks.split_attention import SplitAttention, radix_softmax
from model.networks.ian_net import IANNet
from model.registry import build

#: Parameters of the released ObsNet_Remove_att_r_v7 (in_channels=3), all modules it builds.
RELEASED_PARAMS = 15_316_097
#: Of those, built but never used in its forward pass: split-attention fc1/bn1/fc2 and the MPA gate.
RELEASED_UNUSED = 230_144


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def full_width_counts() -> dict[tuple[bool, int], int]:
    return {
        (attention, channels): n_params(IANNet(in_channels=channels, attention=attention))
        for attention in (True, False)
        for channels in (3, 1)
    }


def small(attention: bool = True) -> IANNet:
    torch.manual_seed(0)
    return IANNet(in_channels=1, width=0.125, attention=attention)


def test_paper_variant_uses_every_module_the_released_code_builds(full_width_counts) -> None:
    assert full_width_counts[(True, 3)] == RELEASED_PARAMS
    assert full_width_counts[(True, 1)] == 15_314_945


def test_released_variant_omits_exactly_the_unused_modules(full_width_counts) -> None:
    assert full_width_counts[(False, 3)] == RELEASED_PARAMS - RELEASED_UNUSED == 15_085_953


def test_registry_builds_the_paper_variant_by_default() -> None:
    model = build("ian_net", in_channels=1, width=0.125)
    assert isinstance(model, IANNet)
    assert model.variant == "paper-attention"


@pytest.mark.parametrize("variant", ["paper-attention", "released-no-attention"])
def test_variant_name_rebuilds_the_same_architecture(variant: str) -> None:
    model = IANNet.from_variant(variant, width=0.125)
    assert model.variant == variant
    assert IANNet.from_variant(model.variant, width=0.125).state_dict().keys() == model.state_dict().keys()


def test_unknown_variant_is_rejected_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match="released-no-attention"):
        IANNet.from_variant("no-such-variant")


def test_attention_changes_the_output_given_the_same_shared_weights() -> None:
    with_att, without = small(True).eval(), small(False).eval()
    without.load_state_dict(with_att.state_dict(), strict=False)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(with_att(x).logits, without(x).logits)


def test_split_attention_weights_sum_to_one_over_the_radix() -> None:
    attention = SplitAttention(channels=8, radix=4).train()
    splits = [torch.randn(2, 8, 5, 5) for _ in range(4)]
    weights = attention.weights(splits)
    assert weights.shape == (2, 4, 8, 1, 1)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, 8, 1, 1))
    manual = sum(weights[:, i] * s for i, s in enumerate(splits))
    torch.testing.assert_close(attention(splits), manual)


def test_radix_one_attention_is_a_sigmoid_gate() -> None:
    logits = torch.randn(2, 6, 1, 1)
    torch.testing.assert_close(radix_softmax(logits, radix=1), torch.sigmoid(logits).reshape(2, 1, 6, 1, 1))


def test_radix_softmax_follows_resnest_channel_layout_with_cardinality() -> None:
    # fc2 channels: cardinal group, then radix, then channel; softmax pairs channel c of each split.
    logits = torch.randn(1, 2 * 3 * 4, 1, 1)  # cardinality 2, radix 3, 4 channels per group
    weights = radix_softmax(logits, radix=3, cardinality=2)
    grouped = logits.reshape(2, 3, 4)  # (group, radix, channel)
    expected = torch.softmax(grouped, dim=1).permute(1, 0, 2).reshape(1, 3, 8, 1, 1)
    torch.testing.assert_close(weights, expected)
