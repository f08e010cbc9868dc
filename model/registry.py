"""Network name → constructor. The one place that knows every network.

Each name is a row of the benchmark's tables: the paper's network in its two variants (`ian_net`, the
paper's text with attention; `ian_net_released`, the authors' released code without it), its six
comparators, and the plain U-Net baseline. `pretrained_files` names the ImageNet backbone files the
comparators' authors started from, and `load_pretrained` loads them from a folder the user supplies
(nothing is downloaded; docs/models.md says where each file comes from).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Sequence
from pathlib import Path

from model.networks.base import SegmentationNetwork

#: Registry name → "module:class". Imported on first use so that building one network
#: does not import the other six.
NETWORKS: dict[str, str] = {
    "ian_net": "model.networks.ian_net:IANNet",
    "ian_net_released": "model.networks.ian_net:IANNetReleased",
    "caranet": "model.networks.caranet:CaraNet",
    "ds_transunet": "model.networks.ds_transunet:DSTransUNet",
    "ducknet": "model.networks.ducknet:DUCKNet",
    "deeplabv3plus": "model.networks.deeplabv3plus:DeepLabV3Plus",
    "hardnet_mseg": "model.networks.hardnet_mseg:HarDNetMSEG",
    "meganet": "model.networks.meganet:MEGANet",
    "unet": "model.networks.unet:UNet",
}

#: Registry name → the ImageNet backbone files its authors started from, under the exact names a
#: `--pretrained` folder must hold them, in the order the network's `load_backbone` takes them.
#: They are the names of the authors' release files. Networks not listed train from scratch, as
#: their authors' did (DUCK-Net, U-Net) or as far as is known (IAN-Net).
PRETRAINED_FILES: dict[str, tuple[str, ...]] = {
    "caranet": ("res2net101_v1b_26w_4s-0812c246.pth",),
    "ds_transunet": ("swin_base_patch4_window7_224_22k.pth", "swin_tiny_patch4_window7_224.pth"),
    "deeplabv3plus": ("resnet50-0676ba61.pth",),
    "hardnet_mseg": ("hardnet68.pth",),
    "meganet": ("res2net50_v1b_26w_4s-3cf99910.pth",),
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
    """Build network `name` for 1 output class. `width` scales channel counts (1.0 = the original).

    `in_channels` may be any positive count (grey, grey replicated to 3, or adjacent slices as channels).
    """
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    return network_class(name)(in_channels=in_channels, width=width, **options)


class PretrainedError(ValueError):
    """A `--pretrained` folder that lacks a file a network needs, or a network that cannot take one."""


def pretrained_files(name: str) -> tuple[str, ...]:
    """The backbone files network `name` loads from a pretrained folder (empty: it trains from scratch)."""
    network_class(name)  # an unknown name fails here, listing the valid ones
    return PRETRAINED_FILES.get(name, ())


def check_pretrained(directory: str | Path, names: Sequence[str], width: float = 1.0) -> dict[str, str]:
    """Every backbone file `names` need from `directory`, as {file name: SHA-256}; fails before any training.

    The error lists every expected file name, per network, and which are missing. ImageNet weights fit
    full-width backbones only, so a width other than 1.0 is refused.
    """
    directory = Path(directory)
    wanted = {n: pretrained_files(n) for n in names if pretrained_files(n)}
    if not directory.is_dir():
        raise PretrainedError(f"pretrained folder {directory} does not exist")
    if wanted and width != 1.0:
        raise PretrainedError(f"pretrained backbones need width 1.0 (the ImageNet networks), got width {width}")
    missing = sorted({f for files in wanted.values() for f in files if not (directory / f).is_file()})
    if missing:
        expected = "; ".join(f"{n}: {', '.join(files)}" for n, files in wanted.items())
        raise PretrainedError(f"pretrained folder {directory} lacks {', '.join(missing)}. "
                              f"Expected files (see docs/models.md): {expected}")
    return {f: _sha256(directory / f) for files in wanted.values() for f in files}


def load_pretrained(model: SegmentationNetwork, directory: str | Path) -> dict[str, str]:
    """Load `model`'s backbone files from `directory` with its strict loader; {file name: SHA-256} loaded.

    A network that trains from scratch loads nothing and returns {}. The loaders check every tensor's
    shape; `check_pretrained` is where a run refuses a reduced width before it builds anything.
    """
    directory = Path(directory)
    files = check_pretrained(directory, [model.name])
    if files:
        model.load_backbone(*(directory / f for f in PRETRAINED_FILES[model.name]))  # type: ignore[operator]
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
