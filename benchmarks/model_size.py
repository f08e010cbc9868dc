"""What the benchmark counts: the networks it runs, REFERENCE.md's figures, parameters and MACs.

Imported by `models.py`, which puts the repository root on `sys.path` first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from model.networks.base import SegmentationNetwork
from model.registry import build

logger = logging.getLogger("benchmarks.model_size")

SIZE = 256


@dataclass(frozen=True)
class Entry:
    """One benchmarked network: a table label, its registry name and build options."""

    label: str
    network: str
    options: tuple[tuple[str, object], ...] = ()

    def build(self, in_channels: int) -> SegmentationNetwork:
        return build(self.network, in_channels=in_channels, width=1.0, **dict(self.options))


@dataclass(frozen=True)
class Reference:
    """REFERENCE.md's figures for the official model (3 input channels, 1 class); None = not given."""

    params: int | None
    gmacs: float | None


#: The paper's network twice (the default paper variant and the released variant), then the comparators.
ENTRIES: tuple[Entry, ...] = (
    Entry("ian_net", "ian_net"),
    Entry("ian_net_released", "ian_net", (("attention", False),)),
    Entry("caranet", "caranet"),
    Entry("ds_transunet", "ds_transunet"),
    Entry("ducknet", "ducknet"),
    Entry("deeplabv3plus", "deeplabv3plus"),
    Entry("hardnet_mseg", "hardnet_mseg"),
    Entry("meganet", "meganet"),
)

#: ian_net (attention on) uses every module the released code builds, so it is compared with the
#: released build count; the released forward skips 230,144 of them. 82.9 GFLOPs = 2 × 41.45 GMACs
#: is the released forward's figure.
REFERENCES: dict[str, Reference] = {
    "ian_net": Reference(15_316_097, None),
    "ian_net_released": Reference(15_316_097 - 230_144, 41.45),
    "caranet": Reference(44_590_000, 11.40),
    "ds_transunet": Reference(171_440_000, 54.5),
    "ducknet": Reference(38_870_000, 24.15),
    "deeplabv3plus": Reference(39_760_000, None),
    "hardnet_mseg": Reference(17_420_000, 6.00),
    "meganet": Reference(44_190_000, 15.10),
}


def _cpu_fused_attention_flops(query_shape, key_shape, value_shape, *_: Any, out_shape=None, **__: Any) -> int:
    """The counter's own SDPA formula, for the CPU fused kernel it has no entry for (torch 2.13)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_fused_attention_flops}


def count_params(entry: Entry, in_channels: int) -> int:
    """Parameters of the full-width network, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = entry.build(in_channels)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class MacCount:
    macs: int
    #: FLOPs / 2 per aten op, so a reader can see what was counted.
    by_op: dict[str, int]
    device: str


def count_macs(entry: Entry, in_channels: int = 3, size: int = SIZE) -> MacCount:
    """MACs of one eval forward at size×size: FlopCounterMode FLOPs / 2 (convolutions and matmuls).

    Counted on the meta device, where no arithmetic runs and `scaled_dot_product_attention`
    decomposes into matmuls the counter sees; if a network cannot run on meta, a real CPU forward
    is counted, with the CPU fused-attention kernel given the counter's SDPA formula.
    """
    try:
        return _count_macs_on("meta", entry, in_channels, size)
    except (NotImplementedError, RuntimeError) as exc:  # an op without a meta kernel, or a data-dependent one
        logger.info("%s: cannot count on the meta device (%s); counting a CPU forward", entry.label, exc)
        return _count_macs_on("cpu", entry, in_channels, size)


def _count_macs_on(device: str, entry: Entry, in_channels: int, size: int) -> MacCount:
    with torch.device(device):
        model = entry.build(in_channels).eval()
        x = torch.zeros(1, in_channels, size, size)
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter, torch.no_grad():
        model(x)
    by_op = {str(op): flops // 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    return MacCount(counter.get_total_flops() // 2, by_op, device)
