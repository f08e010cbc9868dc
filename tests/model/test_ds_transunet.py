"""DS-TransUNet and its Swin backbone: faithful size at full width, its loss weights and aux ReLU, odd
widths, window mechanics, and official-checkpoint key mapping (the output contract, gradients and
training: test_network_contract.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model.blocks.swin import (
    MASK_VALUE,
    SWIN_B,
    SWIN_T,
    SwinBlock,
    SwinTransformer,
    load_official_checkpoint,
    ours_to_official,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from model.networks.ds_transunet import DSTransUNet

#: Parameters of the official UNet(128, 1) with 3 input channels (REFERENCE.md).
REFERENCE_PARAMS = 171.44e6
SMALL_WIDTH = 0.125


@pytest.fixture(scope="module")
def full_width() -> DSTransUNet:
    """Built on the meta device: the tests read its structure, not its values."""
    with torch.device("meta"):
        return DSTransUNet(in_channels=3)


def test_full_width_parameter_count_is_within_one_percent_of_reference(full_width: DSTransUNet) -> None:
    count = sum(p.numel() for p in full_width.parameters())
    assert abs(count - REFERENCE_PARAMS) / REFERENCE_PARAMS < 0.01, count


def test_position_index_and_shift_mask_are_non_persistent_buffers_not_parameters(full_width: DSTransUNet) -> None:
    params = {n for n, _ in full_width.named_parameters()}
    buffers = {n for n, _ in full_width.named_buffers()}
    assert buffers and all(n.endswith("relative_position_index") for n in buffers)
    assert not params & buffers
    assert not buffers & set(full_width.state_dict())


def test_full_width_swin_b_keys_and_shapes_match_the_official_checkpoint_layout(full_width: DSTransUNet) -> None:
    official = ours_to_official(full_width.swin_b.state_dict())
    expected = {
        "patch_embed.proj.weight": (128, 3, 4, 4),
        "layers.0.blocks.1.attn.qkv.weight": (384, 128),
        "layers.2.blocks.17.attn.relative_position_bias_table": (169, 16),
        "layers.2.downsample.reduction.weight": (1024, 2048),
        "layers.3.blocks.1.mlp.fc2.weight": (1024, 4096),
        "norm.weight": (1024,),
    }
    assert {k: tuple(official[k].shape) for k in expected} == expected
    assert not any(k.startswith(("norm0", "norm1", "norm2", "norm3")) for k in official)


def test_loss_weighs_the_main_output_0_6_and_each_of_two_aux_outputs_0_2() -> None:
    assert DSTransUNet.loss_weights == (0.6, 0.2, 0.2)


def test_default_aux_logits_pass_through_the_original_relu_and_are_non_negative() -> None:
    torch.manual_seed(1)
    model = DSTransUNet(in_channels=1, width=SMALL_WIDTH).train()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 64))
    assert all(bool((a >= 0).all()) for a in out.aux)


@pytest.mark.parametrize("width", [0.1, 0.3])
def test_odd_widths_build_and_run_with_heads_dividing_every_width(width: float) -> None:
    model = DSTransUNet(in_channels=1, width=width).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 128)).logits.shape == (1, 1, 64, 128)


def test_window_partition_then_reverse_is_identity() -> None:
    x = torch.randn(2, 14, 21, 3)
    windows = window_partition(x, 7)
    assert windows.shape == (2 * 6, 49, 3)
    assert torch.equal(window_reverse(windows, 7, 14, 21), x)


def test_relative_position_index_depends_only_on_the_offset_and_covers_the_table() -> None:
    w = 3
    index = relative_position_index(w)
    coords = [(i // w, i % w) for i in range(w * w)]
    by_offset: dict[tuple[int, int], set[int]] = {}
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            by_offset.setdefault((yi - yj, xi - xj), set()).add(int(index[i, j]))
    assert all(len(v) == 1 for v in by_offset.values())
    assert sorted(v.pop() for v in by_offset.values()) == list(range((2 * w - 1) ** 2))


def test_shift_mask_blocks_exactly_the_pairs_from_different_regions() -> None:
    mask = shifted_window_mask(4, 4, window=4, shift=2, device=torch.device("cpu"))
    # One 4×4 window after the roll holds four 2×2 regions: each token may see the 4 of its own.
    assert mask.shape == (1, 16, 16)
    assert int((mask == 0).sum()) == 16 * 4
    assert set(mask.unique().tolist()) == {0.0, MASK_VALUE}


def test_swin_block_pads_a_map_smaller_than_its_window_and_keeps_its_shape() -> None:
    block = SwinBlock(dim=8, num_heads=2, window=7, shift=3)
    mask = shifted_window_mask(7, 7, 7, 3, torch.device("cpu"))
    assert block(torch.randn(2, 5, 3, 8), mask).shape == (2, 5, 3, 8)


def _official_file(backbone: SwinTransformer, path: Path) -> Path:
    """Our backbone saved the way the official release files are: official keys under "model", plus
    the keys the loader must ignore (classifier head, buffers)."""
    state = ours_to_official(backbone.state_dict())
    state["head.weight"] = torch.zeros(10, backbone.num_features[-1])
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    state["layers.0.blocks.0.attn.relative_position_index"] = relative_position_index(7)
    torch.save({"model": state}, path)
    return path


def test_official_checkpoint_round_trip_restores_every_mapped_weight(tmp_path: Path) -> None:
    cfg = SWIN_T.scaled(SMALL_WIDTH)
    torch.manual_seed(0)
    source = SwinTransformer(cfg, in_channels=3)
    with torch.no_grad():  # LayerNorms start at 1/0 in both: make every tensor distinct
        for p in source.parameters():
            p.normal_()
    target = SwinTransformer(cfg, in_channels=3)
    skipped = load_official_checkpoint(target, _official_file(source, tmp_path / "swin.pth"))
    assert skipped == []
    src, dst = source.state_dict(), target.state_dict()
    differing = [k for k in src if not torch.equal(src[k], dst[k])]
    assert differing == [f"norm{i}.{p}" for i in range(3) for p in ("weight", "bias")]


def test_network_load_backbone_sums_rgb_kernel_for_one_channel_and_skips_patch4_kernel_in_patch8_branch(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    swin_b = SwinTransformer(SWIN_B.scaled(SMALL_WIDTH), in_channels=3)
    swin_t = SwinTransformer(SWIN_T.scaled(SMALL_WIDTH), in_channels=3)
    model = DSTransUNet(in_channels=1, width=SMALL_WIDTH)
    skipped = model.load_backbone(
        _official_file(swin_b, tmp_path / "b.pth"), _official_file(swin_t, tmp_path / "t.pth")
    )
    assert skipped == {"swin_b": [], "swin_t": ["patch_embed.proj.weight"]}
    expected = swin_b.patch_embed.proj.weight.sum(dim=1, keepdim=True)
    assert torch.equal(model.swin_b.patch_embed.proj.weight, expected)
    assert torch.equal(model.swin_t.layers[2].blocks[5].mlp.fc1.weight, swin_t.layers[2].blocks[5].mlp.fc1.weight)


def test_loading_a_file_without_swin_weights_raises_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    backbone = SwinTransformer(replace(SWIN_T.scaled(SMALL_WIDTH), depths=(2, 2, 2, 2)))
    with pytest.raises(ValueError, match="other.pth.*missing"):
        load_official_checkpoint(backbone, path)
