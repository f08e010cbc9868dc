"""Fake ImageNet backbone files in the exact key layout of each official release, for the pretrained tests.

Random weights from a 3-channel (RGB) network of the given width, saved under the official key names
with what the release files carry beyond the backbone (classifier, buffers, the Swin-T release's patch-4
kernel), named as `model.registry.PRETRAINED_FILES` says. Returns what a loaded backbone must then hold.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from model.blocks import res2net, swin
from model.registry import PRETRAINED_FILES, build

#: Each network's backbone attributes, in the order of its files, and each backbone's first conv key.
BACKBONES: dict[str, tuple[str, ...]] = {
    "caranet": ("backbone",), "meganet": ("backbone",), "deeplabv3plus": ("backbone",),
    "hardnet_mseg": ("hardnet",), "ds_transunet": ("swin_b", "swin_t"),
}
FIRST_CONV: dict[str, str] = {
    "caranet": "conv1.0.weight", "meganet": "conv1.0.weight", "deeplabv3plus": "conv1.weight",
    "hardnet_mseg": "base.0.conv.weight", "ds_transunet": "patch_embed.proj.weight",
}


def _randomised(module: nn.Module, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


def write_official_files(name: str, directory: Path, width: float, seed: int = 1) -> dict[str, dict[str, Tensor]]:
    """Write `name`'s backbone files into `directory`; {backbone attribute: its expected state (our keys)}."""
    source = build(name, in_channels=3, width=width)
    expected: dict[str, dict[str, Tensor]] = {}
    for i, (attr, file) in enumerate(zip(BACKBONES[name], PRETRAINED_FILES[name], strict=True)):
        ours = _randomised(getattr(source, attr), seed + i)
        if name in ("caranet", "meganet"):
            official: object = {**res2net.ours_to_official(ours), "fc.weight": torch.rand(1000, 8),
                                "fc.bias": torch.rand(1000)}
        elif name == "deeplabv3plus":
            official = {**ours, "fc.weight": torch.rand(1000, 8), "fc.bias": torch.rand(1000)}
        elif name == "hardnet_mseg":
            official = {**ours, "base.16.3.weight": torch.rand(1000, 1024), "base.16.3.bias": torch.rand(1000)}
        else:
            state = {**swin.ours_to_official(ours), "head.weight": torch.rand(1000, 8),
                     "layers.0.blocks.0.attn.relative_position_index": swin.relative_position_index(7)}
            if attr == "swin_t":  # the release is patch 4; DS-TransUNet's Swin-T branch is patch 8 and skips it
                kernel = state["patch_embed.proj.weight"]
                state["patch_embed.proj.weight"] = torch.rand(*kernel.shape[:2], 4, 4)
            official = {"model": state}
            ours = swin.official_to_ours(swin.ours_to_official(ours))  # norm0-2 have no official counterpart
            if attr == "swin_t":
                del ours["patch_embed.proj.weight"]
        torch.save(official, directory / file)
        expected[attr] = ours
    return expected
