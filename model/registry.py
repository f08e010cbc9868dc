"""Network name → constructor. The one place that knows every network."""

from __future__ import annotations

import importlib

from model.networks.base import SegmentationNetwork

#: Registry name → "module:class". Imported on first use so that building one network
#: does not import the other six.
NETWORKS: dict[str, str] = {
    "ian_net": "model.networks.ian_net:IANNet",
    "caranet": "model.networks.caranet:CaraNet",
    "ds_transunet": "model.networks.ds_transunet:DSTransUNet",
    "ducknet": "model.networks.ducknet:DUCKNet",
    "deeplabv3plus": "model.networks.deeplabv3plus:DeepLabV3Plus",
    "hardnet_mseg": "model.networks.hardnet_mseg:HarDNetMSEG",
    "meganet": "model.networks.meganet:MEGANet",
}

#: The paper's network; the others are its comparators.
PAPER_NETWORK = "ian_net"


def network_class(name: str) -> type[SegmentationNetwork]:
    """The class registered under `name`; the error lists the valid names."""
    try:
        target = NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; valid names: {', '.join(NETWORKS)}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build(name: str, in_channels: int = 1, width: float = 1.0, **options: object) -> SegmentationNetwork:
    """Build network `name` for 1 output class. `width` scales channel counts (1.0 = the original)."""
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    return network_class(name)(in_channels=in_channels, width=width, **options)
