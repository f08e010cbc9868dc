"""DS-TransUNet (Lin et al., IEEE TIM 2022): a dual Swin Transformer U-Net.

Two Swin encoders look at the image at two patch sizes: Swin-B with 4×4 patches (strides 4..32)
and Swin-T with 8×8 patches (strides 8..64). At each of the four scales a Transformer Interactive
Fusion (TIF) module lets the branches talk: each branch's average-pooled token, projected to the
other branch's width, is prepended to the other branch's tokens and one global transformer layer
runs per branch. The coarse branch is then upsampled ×2 (nearest), concatenated with the fine one and
reduced by two conv–GroupNorm–ReLU layers. The decoder has three stages that upsample and run two
Swin blocks each, then two CNN stages that take skips from a full-resolution path (1×1 conv, then
max-pool + two convs at H/2). Two auxiliary heads (on the deepest fused map and after the third
decoder stage) have a ReLU and nearest upsampling, as in the original; the training loss is
0.6·main + 0.2·aux1 + 0.2·aux2.

Facts read from TianBaoGe/DS-TransUNet (lib/DS_TransUNet.py, class UNet(128, 1)); code written here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.blocks.common import scale_channels
from model.blocks.swin import SWIN_B, SWIN_T, SwinStage, SwinTransformer, load_official_checkpoint
from model.networks.base import SegmentationNetwork

#: GroupNorm groups of the original's conv blocks (fewer at small widths, where channels < 32).
GROUPS = 32
#: Drop-path rates of the two Swin blocks in each decoder stage (linspace(0, 0.2, 2) in the original).
DECODER_DROP_PATHS = (0.0, 0.2)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(GROUPS, channels), channels)


class ConvGNReLU(nn.Sequential):
    """3×3 conv with bias, GroupNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), _group_norm(out_channels), nn.ReLU(inplace=True)
        )


class DoubleConvGN(nn.Sequential):
    """Two ConvGNReLU: the original's fusion reduction and full-resolution path block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvGNReLU(in_channels, out_channels), ConvGNReLU(out_channels, out_channels))


class UpConvGN(nn.Sequential):
    """Nearest ×2 upsampling, then ConvGNReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), *ConvGNReLU(in_channels, out_channels))


class ConvReLU(nn.Sequential):
    """Conv with bias then ReLU (no norm), as in the original's decoder fusions."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2), nn.ReLU(inplace=True)
        )


class FusionTransformerLayer(nn.Module):
    """One pre-norm transformer layer with global multi-head attention over all tokens."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.attn_norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(self.attn_norm(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        x = x + self.to_out(y.transpose(1, 2).reshape(b, n, -1))
        return x + self.ff(self.ff_norm(x))


class TIF(nn.Module):
    """Transformer Interactive Fusion at one scale: swap pooled global tokens, one transformer layer each."""

    def __init__(self, dim_fine: int, dim_coarse: int, width: float) -> None:
        super().__init__()
        self.norm_fine = nn.LayerNorm(dim_fine)
        self.norm_coarse = nn.LayerNorm(dim_coarse)
        self.fine_to_coarse = nn.Linear(dim_fine, dim_coarse)
        self.coarse_to_fine = nn.Linear(dim_coarse, dim_fine)
        # Fixed inner widths in the original at every scale: 3 heads × 32, MLP 128 (Swin-T side);
        # 1 head × 64, MLP 256 (Swin-B side).
        s = scale_channels
        self.coarse_layer = FusionTransformerLayer(dim_coarse, 3, s(32, width), s(128, width))
        self.fine_layer = FusionTransformerLayer(dim_fine, 1, s(64, width), s(256, width))

    def forward(self, fine: Tensor, coarse: Tensor) -> tuple[Tensor, Tensor]:
        """fine: Swin-B map (B, Cf, H, W); coarse: Swin-T map (B, Cc, H/2, W/2); both returned fused."""
        b, cf, hf, wf = fine.shape
        _, cc, hc, wc = coarse.shape
        f = fine.flatten(2).transpose(1, 2)
        c = coarse.flatten(2).transpose(1, 2)
        f_token = self.fine_to_coarse(self.norm_fine(f).mean(dim=1, keepdim=True))
        c_token = self.coarse_to_fine(self.norm_coarse(c).mean(dim=1, keepdim=True))
        c = self.coarse_layer(torch.cat([f_token, c], dim=1))[:, 1:]
        f = self.fine_layer(torch.cat([c_token, f], dim=1))[:, 1:]
        return f.transpose(1, 2).reshape(b, cf, hf, wf), c.transpose(1, 2).reshape(b, cc, hc, wc)


class SwinDecoderStage(nn.Module):
    """Upsample C → C/2, two Swin blocks, 1×1 to C/4; concatenate the 1×1-reduced skip (C/2 → C/4); 3×3 conv."""

    def __init__(self, channels: int, num_heads: int, window: int, stochastic_depth: bool) -> None:
        super().__init__()
        half, quarter = channels // 2, channels // 4
        rates = DECODER_DROP_PATHS if stochastic_depth else ()
        self.up = UpConvGN(channels, half)
        self.swin = SwinStage(half, len(DECODER_DROP_PATHS), num_heads, window, drop_paths=rates)
        self.reduce = ConvReLU(half, quarter, 1)
        self.skip = ConvReLU(half, quarter, 1)
        self.fuse = ConvReLU(half, half, 3)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x).permute(0, 2, 3, 1)
        x = self.reduce(self.swin(x)[0].permute(0, 3, 1, 2))
        return self.fuse(torch.cat([self.skip(skip), x], dim=1))


class ConvDecoderStage(nn.Module):
    """Upsample-conv, concatenate the full-resolution-path skip, then 3×3 conv + ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = UpConvGN(in_channels, out_channels)
        self.fuse = ConvReLU(skip_channels + out_channels, out_channels, 3)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.fuse(torch.cat([skip, self.up(x)], dim=1))


class AuxHead(nn.Sequential):
    """1×1 conv to one map, ReLU (the original's, optional), nearest upsampling to input resolution."""

    def __init__(self, in_channels: int, scale: int, relu: bool) -> None:
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 1, 1)]
        if relu:
            layers.append(nn.ReLU())
        layers.append(nn.Upsample(scale_factor=scale, mode="nearest"))
        super().__init__(*layers)


class DSTransUNet(SegmentationNetwork):
    """DS-TransUNet-B: Swin-B (patch 4) + Swin-T (patch 8) encoders, TIF fusion, Swin/CNN decoder."""

    name: ClassVar[str] = "ds_transunet"
    #: Swin-T with 8×8 patches reaches stride 64, and its maps must be exactly half the Swin-B ones.
    size_multiple: ClassVar[int] = 64
    loss_weights: ClassVar[tuple[float, ...]] = (0.6, 0.2, 0.2)

    def __init__(
        self,
        in_channels: int = 1,
        width: float = 1.0,
        aux_relu: bool = True,
        stochastic_depth: bool = True,
    ) -> None:
        """`aux_relu=False` drops the original's ReLU on the auxiliary logits (which keeps them ≥ 0);
        `stochastic_depth=False` turns off drop-path everywhere (deterministic training steps)."""
        super().__init__()
        fine_cfg = SWIN_B.scaled(width)
        coarse_cfg = replace(SWIN_T, patch_size=8).scaled(width)
        self.swin_b = SwinTransformer(fine_cfg, in_channels, stochastic_depth)
        self.swin_t = SwinTransformer(coarse_cfg, in_channels, stochastic_depth)
        dim, dim_c = fine_cfg.embed_dim, coarse_cfg.embed_dim
        fine_dims = [dim * 2**i for i in range(4)]
        coarse_dims = [dim_c * 2**i for i in range(4)]
        self.fusions = nn.ModuleList(TIF(f, c, width) for f, c in zip(fine_dims, coarse_dims, strict=True))
        self.reductions = nn.ModuleList(DoubleConvGN(f + c, f) for f, c in zip(fine_dims, coarse_dims, strict=True))
        window = fine_cfg.window_size
        self.decoder1 = SwinDecoderStage(8 * dim, 8, window, stochastic_depth)
        self.decoder2 = SwinDecoderStage(4 * dim, 4, window, stochastic_depth)
        self.decoder3 = SwinDecoderStage(2 * dim, 2, window, stochastic_depth)
        self.full_res = nn.Conv2d(in_channels, dim // 4, 1)
        self.half_res = nn.Sequential(nn.MaxPool2d(2), DoubleConvGN(dim // 4, dim // 2))
        self.decoder4 = ConvDecoderStage(dim, dim // 2, dim // 2)
        self.decoder5 = ConvDecoderStage(dim // 2, dim // 4, dim // 4)
        self.head = nn.Conv2d(dim // 4, 1, 1)
        self.aux_deep = AuxHead(8 * dim, 32, aux_relu)
        self.aux_mid = AuxHead(dim, 4, aux_relu)

    def _forward(self, x: Tensor) -> tuple[Tensor, Sequence[Tensor]]:
        fused = []
        for fine, coarse, tif, reduce in zip(self.swin_b(x), self.swin_t(x), self.fusions, self.reductions, strict=True):
            fine, coarse = tif(fine, coarse)
            fused.append(reduce(torch.cat([fine, F.interpolate(coarse, scale_factor=2.0, mode="nearest")], dim=1)))
        e1, e2, e3, e4 = fused
        full = self.full_res(x)
        half = self.half_res(full)
        d3 = self.decoder3(self.decoder2(self.decoder1(e4, e3), e2), e1)
        d5 = self.decoder5(self.decoder4(d3, half), full)
        return self.head(d5), (self.aux_deep(e4), self.aux_mid(d3))

    def load_backbone(self, path: str | Path, tiny_path: str | Path | None = None) -> dict[str, list[str]]:
        """Load official Swin ImageNet checkpoints the user supplies: `path` → Swin-B, `tiny_path` → Swin-T.

        Returns the keys skipped per branch for a shape mismatch (e.g. the patch-4 Swin-T kernel,
        which the original also could not load into its patch-8 branch).
        """
        skipped = {"swin_b": load_official_checkpoint(self.swin_b, path)}
        if tiny_path is not None:
            skipped["swin_t"] = load_official_checkpoint(self.swin_t, tiny_path)
        return skipped
