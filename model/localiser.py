"""The crop localiser's network and its checkpoint: a small 3D U-Net on a coarse LPS-aligned grid.

Stage one of the node. It reads the whole series resampled to a few millimetres per voxel (two
channels: intensity and "inside the field of view") and answers, per voxel, whether the voxel lies in
the right and in the left side's crop box (two logits). Boxes are fitted to those maps by
`ian_node.segment.localise`. A dense per-voxel answer learns from a few dozen studies where a direct
regression of twelve face positions would need far more, and it says "nothing here" by being empty.

The checkpoint (format below) carries what is needed to feed the network the same way again: the
grid spacing, the crop definition the boxes follow ("landmarks": the paper's manual crop; or
"nerve-margins": nerve bounding box grown by fixed margins), the safety margin added to each fitted
face and the confidence below which the node reports "no mandible region found".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.checkpoint import read_weights, write_weights

FORMAT = "ian-node-localiser/1"
#: The two output channels, in order (patient right = lower LPS x).
SIDES: tuple[str, str] = ("right", "left")
#: The input grid's side must be a multiple of this (three 2× poolings).
GRID_MULTIPLE = 8


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01, True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01, True),
    )


class LocaliserNet(nn.Module):
    """3D U-Net with three poolings: (N, 2, X, Y, Z) grid → (N, 2, X, Y, Z) crop-box logits.

    Three poolings at 3 mm give a receptive field that spans the head, which is what deciding
    "inside the crop box" needs: a face sits where a distant landmark (chin, cranial base) is.
    """

    def __init__(self, channels: tuple[int, ...] = (6, 12, 24, 48), in_channels: int = 2) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"LocaliserNet needs 4 channel counts, got {channels}")
        c = channels
        self.enc = nn.ModuleList([_block(in_channels, c[0]), _block(c[0], c[1]), _block(c[1], c[2]), _block(c[2], c[3])])
        self.up = nn.ModuleList([nn.ConvTranspose3d(c[k + 1], c[k], 2, stride=2) for k in range(3)])
        self.dec = nn.ModuleList([_block(2 * c[k], c[k]) for k in range(3)])
        self.head = nn.Conv3d(c[0], len(SIDES), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for k, block in enumerate(self.enc):
            x = block(x)
            if k < 3:
                skips.append(x)
                x = nn.functional.max_pool3d(x, 2)
        for k in reversed(range(3)):
            x = self.dec[k](torch.cat([self.up[k](x), skips[k]], dim=1))
        return self.head(x)


@dataclass(frozen=True)
class LocaliserMeta:
    """How to feed the localiser and read its answer."""

    spacing_mm: float = 3.0  # isotropic grid spacing of the input
    channels: tuple[int, ...] = (6, 12, 24, 48)
    #: Which crop the boxes follow: "landmarks" (the paper's) or "nerve-margins" (see training.localiser).
    region: str = "landmarks"
    #: Millimetres added to every fitted face (never across the midline), so that the nerve stays inside.
    safety_margin_mm: float = 4.0
    #: Below this per-side confidence the node reports "no mandible region found".
    min_confidence: float = 0.5
    label: str = ""
    training: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LocaliserMeta:
        data = dict(data)
        data["channels"] = tuple(data.get("channels", cls.channels))
        return cls(**data)


@dataclass(frozen=True)
class LoadedLocaliser:
    model: LocaliserNet
    meta: LocaliserMeta
    sha256: str
    path: Path


class LocaliserCheckpointError(ValueError):
    """A file that is not a localiser checkpoint, or one whose weights do not fit its network."""


def save_localiser(path: str | Path, model: LocaliserNet, meta: LocaliserMeta) -> str:
    """Write weights and metadata atomically; return the file's SHA-256."""
    return write_weights(path, FORMAT, model, asdict(meta))


def load_localiser(path: str | Path | None = None) -> LoadedLocaliser:
    """The localiser at `path` (None: the bundled phantom-trained one), in eval mode on the CPU."""
    path = Path(path) if path is not None else BUNDLED_LOCALISER
    payload, sha256 = read_weights(path, FORMAT, "localiser", LocaliserCheckpointError)
    meta = LocaliserMeta.from_dict(payload["meta"])
    model = LocaliserNet(meta.channels)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise LocaliserCheckpointError(f"{path}: weights do not fit LocaliserNet{meta.channels}: {exc}") from exc
    model.eval()
    return LoadedLocaliser(model=model, meta=meta, sha256=sha256, path=path)


#: The phantom-trained localiser shipped with the package (`python -m training.localiser`).
BUNDLED_LOCALISER = Path(__file__).resolve().parent / "weights" / "localiser_phantom.pt"
