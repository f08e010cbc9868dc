"""Weights plus everything needed to use them: architecture, variant, input contract, training summary.

A checkpoint file is self-describing (nnU-Net style: the plan travels with the weights), so the node
and `train_benchmark --evaluate-only` need nothing else. Files are loaded with `weights_only=True`,
so the metadata holds plain types only. The SHA-256 of the file identifies the model in every SEG.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import registry
from model.networks.base import SegmentationNetwork
from model.preprocess import check_context

FORMAT = "ian-node-checkpoint/1"


@dataclass(frozen=True)
class InputContract:
    """How slices must be prepared for this model (see model/preprocess.py).

    `context` is how many adjacent coronal slices each input holds (`model.preprocess.context_windows`:
    the predicted slice in the middle, the edge slice repeated past a stack's ends); 1, the paper's 2D
    input, for checkpoints written before it was recorded. With context K > 1 the network has K input
    channels; with context 1 a single grey slice is replicated to `in_channels` (1 or 3).
    """

    size: int = 256
    in_channels: int = 1
    intensity: str = "per-slice min-max to uint8, then /255"
    aspect: str = "physical aspect kept, LANCZOS, centred zero padding"
    orientation: str = "coronal; left side flipped to right-side orientation"
    context: int = 1

    def __post_init__(self) -> None:
        check_context(self.context)
        if self.context > 1 and self.in_channels != self.context:
            raise ValueError(f"context {self.context} feeds {self.context} input channels, got in_channels "
                             f"{self.in_channels}")


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint is: enough to rebuild the network and feed it correctly."""

    architecture: str
    width: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    variant: str = ""
    input: InputContract = field(default_factory=InputContract)
    threshold: float = 0.5
    label: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    #: The crop the network was trained on: {"region": "landmarks" | "nerve-margins" | "half",
    #: "trained_with": "oracle" | "auto" | "half" | "box", "samples": "all" | "nerve-only"}. Empty for
    #: checkpoints written before crops were recorded; those were trained on the volume's halves.
    crop: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointMeta:
        data = dict(data)
        data["input"] = InputContract(**data.get("input", {}))
        return cls(**data)


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: SegmentationNetwork
    meta: CheckpointMeta
    sha256: str
    path: Path


class CheckpointError(ValueError):
    """A file that is not an ian-node checkpoint, or one whose weights do not fit its architecture."""


def write_weights(path: str | Path, fmt: str, model: torch.nn.Module, meta: dict[str, Any]) -> str:
    """Write {format, meta, state_dict} atomically (temporary file, fsync, rename); return its SHA-256."""
    path = Path(path)
    buffer = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": fmt, "meta": meta, "state_dict": state}, buffer)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def read_weights(path: Path, fmt: str, what: str, error: type[ValueError],
                 map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], str]:
    """The {meta, state_dict} payload of a file written by `write_weights` in format `fmt`, and its SHA-256;
    `error` (naming the file and `what` it should be) for an unreadable, corrupt or foreign file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise error(f"{path}: not a readable torch file ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise error(f"{path}: not an ian-node {what} (expected format {fmt!r})")
    return payload, hashlib.sha256(data).hexdigest()


def save_checkpoint(path: str | Path, model: SegmentationNetwork, meta: CheckpointMeta) -> str:
    """Write weights and metadata atomically; return the file's SHA-256."""
    if meta.architecture not in registry.NETWORKS:
        raise CheckpointError(f"{path}: unknown architecture {meta.architecture!r}")
    return write_weights(path, FORMAT, model, asdict(meta))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the network named in the metadata and load its weights (strictly)."""
    path = Path(path)
    payload, sha256 = read_weights(path, FORMAT, "checkpoint", CheckpointError, map_location)
    try:
        meta = CheckpointMeta.from_dict(payload["meta"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed checkpoint metadata: {exc}") from exc
    model = registry.build(meta.architecture, in_channels=meta.input.in_channels, width=meta.width, **meta.options)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {meta.architecture} (width {meta.width}): {exc}") from exc
    model.eval()
    return LoadedCheckpoint(model=model, meta=meta, sha256=sha256, path=path)


#: The phantom-trained demonstration model shipped with the package (training/default_model.py).
BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "ian_net_phantom.pt"
