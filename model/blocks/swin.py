"""Swin Transformer backbone (Liu et al., 2021) in plain PyTorch, for DS-TransUNet and any other user.

Windows of `window_size`² tokens attend within themselves with a learned relative position bias;
every second block shifts the windows by half a window so that information crosses window borders.
Feature maps that are not a multiple of the window are zero-padded on the right and bottom after
the block's first LayerNorm, as in the detection/segmentation form of Swin: padded tokens take part
in plain-window attention, and the shifted-window mask is computed on the padded map. This lets a
fixed window of 7 run on any input size (e.g. 64×64 tokens → padded to 70×70).

The backbone returns the four stage outputs, each through its own LayerNorm (`norm0`..`norm3`),
as NCHW maps at strides patch·1, ·2, ·4, ·8.

Official checkpoint mapping (microsoft/Swin-Transformer release files such as
`swin_base_patch4_window7_224.pth` / `swin_tiny_patch4_window7_224.pth`; the state dict sits under
the "model" key, or "state_dict", or at the top level):

==============================================================  ================================
official key                                                     ours
==============================================================  ================================
patch_embed.proj.{weight,bias}, patch_embed.norm.{weight,bias}   same
layers.{i}.blocks.{j}.norm1 / norm2 .{weight,bias}               same
layers.{i}.blocks.{j}.attn.qkv / attn.proj .{weight,bias}        same
layers.{i}.blocks.{j}.attn.relative_position_bias_table          same
layers.{i}.blocks.{j}.mlp.fc1 / mlp.fc2 .{weight,bias}           same
layers.{i}.downsample.norm.{weight,bias}                         same
layers.{i}.downsample.reduction.weight                           same
norm.{weight,bias} (classifier's norm of the last stage)         norm3.{weight,bias}
head.*, absolute_pos_embed                                       ignored (no counterpart)
*.relative_position_index, *.attn_mask (buffers)                 ignored (we compute them)
(none)                                                           norm0..norm2 keep their init
==============================================================  ================================

A 3-channel patch-embedding kernel is fitted by `model.blocks.common.adapt_input_conv` when our
backbone takes another channel count (1 channel: summed over RGB). Tensors whose shape still differs (e.g. a patch-4 kernel for a patch-8 backbone) are
skipped with a warning and reported, as the DS-TransUNet authors' loader did.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.blocks.common import adapt_input_conv, scale_channels

logger = logging.getLogger(__name__)

#: Value added to attention logits between tokens from different regions of a shifted window.
MASK_VALUE = -100.0


@dataclass(frozen=True)
class SwinConfig:
    """Hyper-parameters of one Swin backbone."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    patch_size: int = 4
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2

    def scaled(self, width: float) -> SwinConfig:
        """Same topology (depths and heads) with the embedding scaled; heads always divide every stage width."""
        return replace(self, embed_dim=scale_channels(self.embed_dim, width, divisor=self.num_heads[0]))


SWIN_T = SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)
SWIN_B = SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5)


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability `p` while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) → (B·nW, window², C), windows in row-major order per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of `window_partition`: (B·nW, window², C) → (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(window: int) -> Tensor:
    """(window², window²) index into the (2·window−1)² bias table, laid out as in the official code."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def shifted_window_mask(hp: int, wp: int, window: int, shift: int, device: torch.device) -> Tensor:
    """(nW, window², window²) additive mask that stops tokens rolled in from the far edge mixing with the rest."""
    regions = torch.zeros(1, hp, wp, 1, device=device)
    label = 0
    for h0, h1 in ((0, hp - window), (hp - window, hp - shift), (hp - shift, hp)):
        for w0, w1 in ((0, wp - window), (wp - window, wp - shift), (wp - shift, wp)):
            regions[:, h0:h1, w0:w1] = label
            label += 1
    labels = window_partition(regions, window).squeeze(-1)
    differs = labels[:, None, :] != labels[:, :, None]
    return torch.zeros_like(differs, dtype=regions.dtype).masked_fill(differs, MASK_VALUE)


class Mlp(nn.Module):
    """Linear, GELU, linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"window attention: {num_heads} heads do not divide width {dim}")
        self.num_heads = num_heads
        self.window = window
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B·nW, N, C); mask: (nW, N, N) of 0 / MASK_VALUE, or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, self.num_heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]).view(bw, self.num_heads, n, n)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """(Shifted-)window attention then MLP, each pre-normed and residual. Works on (B, H, W, C)."""

    def __init__(
        self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float = 4.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift must be in [0, {window}), got {shift}")
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """`mask` is the shifted-window mask for the padded map; plain-window blocks ignore it."""
        b, h, w, c = x.shape
        ws = self.window
        y = F.pad(self.norm1(x), (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
        hp, wp = y.shape[1], y.shape[2]
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, ws), mask if self.shift else None)
        y = window_reverse(y, ws, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w, :])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2×2 neighbours concatenated (official order), LayerNorm, then a linear map 4C → 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1], x.shape[2]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """`depth` blocks alternating plain and half-shifted windows, optionally followed by patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int = 7,
        mlp_ratio: float = 4.0,
        drop_paths: Sequence[float] = (),
        downsample: bool = False,
    ) -> None:
        super().__init__()
        rates = list(drop_paths) or [0.0] * depth
        if len(rates) != depth:
            raise ValueError(f"swin stage: {len(rates)} drop-path rates for {depth} blocks")
        self.window = window
        self.shift = window // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else self.shift, mlp_ratio, rates[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H, W, C) → (stage output, input of the next stage: merged if this stage downsamples)."""
        h, w = x.shape[1], x.shape[2]
        ws = self.window
        mask = None
        if len(self.blocks) > 1:
            mask = shifted_window_mask(-(-h // ws) * ws, -(-w // ws) * ws, ws, self.shift, x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class PatchEmbed(nn.Module):
    """Non-overlapping patch×patch conv (input zero-padded to a multiple) then LayerNorm; returns (B, H, W, C)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        x = F.pad(x, (0, (p - x.shape[-1] % p) % p, 0, (p - x.shape[-2] % p) % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinTransformer(nn.Module):
    """Four-stage Swin backbone returning each stage's normed output as NCHW (strides patch·1/2/4/8)."""

    def __init__(self, config: SwinConfig, in_channels: int = 3, stochastic_depth: bool = True) -> None:
        super().__init__()
        self.config = config
        c = config
        n = len(c.depths)
        if len(c.num_heads) != n:
            raise ValueError(f"swin: {len(c.num_heads)} head counts for {n} stages")
        self.num_features = [c.embed_dim * 2**i for i in range(n)]
        total = sum(c.depths)
        rate = c.drop_path_rate if stochastic_depth else 0.0
        rates = [rate * i / (total - 1) for i in range(total)] if total > 1 else [0.0]
        self.patch_embed = PatchEmbed(in_channels, c.embed_dim, c.patch_size)
        self.layers = nn.ModuleList(
            SwinStage(
                self.num_features[i],
                c.depths[i],
                c.num_heads[i],
                c.window_size,
                c.mlp_ratio,
                rates[sum(c.depths[:i]) : sum(c.depths[: i + 1])],
                downsample=i < n - 1,
            )
            for i in range(n)
        )
        for i, f in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(f))
        self.apply(_init_swin_weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.layers):
            out, x = stage(x)
            outs.append(getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous())
        return outs


def _init_swin_weights(m: nn.Module) -> None:
    """The official init: truncated-normal linears (std 0.02) with zero bias, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _last_norm_name(num_stages: int) -> str:
    return f"norm{num_stages - 1}."


def official_to_ours(state: Mapping[str, Tensor], num_stages: int = 4) -> dict[str, Tensor]:
    """Rename an official Swin state dict to our keys (see the module table); drops what has no counterpart."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("backbone.")
        if key.startswith(("head.", "absolute_pos_embed")) or key.endswith(("relative_position_index", "attn_mask")):
            continue
        if key.startswith("norm."):
            key = _last_norm_name(num_stages) + key.removeprefix("norm.")
        out[key] = value
    return out


def ours_to_official(state: Mapping[str, Tensor], num_stages: int = 4) -> dict[str, Tensor]:
    """Our backbone state dict under official key names (norm0..norm2 have none and are left out)."""
    last = _last_norm_name(num_stages)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(last):
            out["norm." + key.removeprefix(last)] = value
        elif not (key.startswith("norm") and key[4:5].isdigit()):
            out[key] = value
    return out


def load_official_checkpoint(model: SwinTransformer, path: str | Path) -> list[str]:
    """Load a user-supplied official Swin checkpoint into `model`; nothing is downloaded.

    Raises ValueError if the file lacks backbone weights we need; returns keys skipped for shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"swin checkpoint {path} does not exist")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, Mapping):
        raise ValueError(f"swin checkpoint {path}: expected a dict of tensors, got {type(raw).__name__}")
    state = raw.get("model", raw.get("state_dict", raw))
    num_stages = len(model.layers)
    theirs = official_to_ours(state, num_stages)
    ours = model.state_dict()
    last = _last_norm_name(num_stages)
    optional = {k for k in ours if k.startswith("norm") and k[4:5].isdigit() and not k.startswith(last)}
    missing = sorted(k for k in ours if k not in theirs and k not in optional)
    if missing:
        raise ValueError(f"swin checkpoint {path}: {len(missing)} backbone weights missing, e.g. {missing[:3]}")
    load: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in theirs.items():
        if key not in ours:
            continue
        target = ours[key]
        if key == "patch_embed.proj.weight" and value.shape[1] == 3 and target.shape[1] != 3:
            value = adapt_input_conv(value, target.shape[1])
        if value.shape != target.shape:
            shapes = tuple(value.shape), tuple(target.shape)
            logger.warning("swin checkpoint %s: %s has shape %s, ours %s; kept ours", path, key, *shapes)
            skipped.append(key)
            continue
        load[key] = value
    model.load_state_dict(load, strict=False)
    logger.info("swin checkpoint %s: loaded %d tensors, skipped %d", path, len(load), len(skipped))
    return skipped
