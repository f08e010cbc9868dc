"""Test models for the crop modes: localisers with a fixed answer, and checkpoints that record their crop.

A `LocaliserNet` whose head has zero weights answers the same logit for every voxel: +20 means "the
whole field of view is each side's crop" (both boxes found with confidence 1, cut at the midline),
-20 means "nothing here" (no box, confidence 0: no mandible region found).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model import registry
from model.checkpoint import CheckpointMeta, InputContract, save_checkpoint
from model.localiser import LocaliserMeta, LocaliserNet, save_localiser

#: The crop of a checkpoint trained as issue 14 trains them (what mode auto reproduces).
LANDMARK_CROP = {"region": "landmarks", "trained_with": "oracle", "samples": "all"}


def constant_localiser(path: Path, logit: float, region: str = "landmarks") -> Path:
    """A tiny localiser answering `logit` everywhere (+20: found everywhere, -20: nothing found)."""
    net = LocaliserNet((2, 2, 2, 2))
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(logit)
    save_localiser(path, net, LocaliserMeta(channels=(2, 2, 2, 2), region=region, label=f"constant {logit:+g}"))
    return path


def crop_checkpoint(path: Path, crop: dict[str, str] | None = None, size: int = 32) -> Path:
    """An untrained narrow IAN-Net (no attention, 32 px: fast) that records `crop` (default: landmark crops)."""
    torch.manual_seed(0)
    net = registry.build("ian_net", width=0.125, attention=False)
    meta = CheckpointMeta(architecture="ian_net", width=0.125, options={"attention": False}, variant=net.variant,
                          input=InputContract(size=size, in_channels=1), label="untrained test model",
                          crop=dict(LANDMARK_CROP if crop is None else crop))
    save_checkpoint(path, net, meta)
    return path
