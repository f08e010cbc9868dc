"""Batched inference on prepared 2D slices: GPU with autocast when present, CPU otherwise.

The node feeds uint8 model-space slices to `Predictor.predict`: (N, S, S) for a 2D model (context 1),
or for a 2.5D model (context K) each slice's window of K adjacent coronal slices, (N, K, S, S), built
from its side's whole stack by `model.preprocess.context_windows` (`ian_node.segment.pipeline`
`PreparedSeries.inputs`); the predictor never builds windows itself, since it cannot see where one
stack ends. The benchmark feeds the same inputs, already scaled to [0, 1] by its data loader
(`training.data.SliceDataset`, windows by the same rule), to `Predictor.probabilities`, the one forward pass both
go through (device, memory format, autocast rule, sigmoid). `Predictor.from_model` wraps weights
that are still in memory (a run just trained) so that they are scored exactly as the node would run
them once saved.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model.checkpoint import InputContract, LoadedCheckpoint

#: The `device` value (like None) that means "CUDA if present, else the CPU".
AUTO_DEVICE = "auto"


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` ("cpu", "cuda", "cuda:1") or, when None or "auto", CUDA if present else the CPU."""
    if requested and requested != AUTO_DEVICE:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class PredictorOptions:
    device: str | None = None  # None or "auto": CUDA if present, else the CPU
    batch_size: int = 16
    #: Mixed precision on CUDA (bf16 where supported, else fp16). Ignored on the CPU.
    amp: bool = True


class Predictor:
    """Turns uint8 model-space slices (N, S, S), or context windows (N, K, S, S), into probabilities (N, S, S)."""

    checkpoint: LoadedCheckpoint | None  # None when built from an in-memory model

    def __init__(self, checkpoint: LoadedCheckpoint, options: PredictorOptions | None = None) -> None:
        self._setup(checkpoint.model, checkpoint.meta.input, options)
        self.checkpoint = checkpoint

    @classmethod
    def from_model(cls, model: nn.Module, contract: InputContract,
                   options: PredictorOptions | None = None) -> Predictor:
        """A predictor over weights in memory, fed as `contract` says (the model is moved to the device)."""
        predictor = cls.__new__(cls)
        predictor._setup(model, contract, options)
        predictor.checkpoint = None
        return predictor

    def _setup(self, model: nn.Module, contract: InputContract, options: PredictorOptions | None) -> None:
        self.options = options or PredictorOptions()
        if self.options.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.options.batch_size}")
        self.device = pick_device(self.options.device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.size = contract.size
        self.in_channels = contract.in_channels
        self.context = contract.context

    def _autocast(self):  # type: ignore[no-untyped-def]
        if self.device.type != "cuda" or not self.options.amp:
            return nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    @torch.inference_mode()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities float32 (N, S, S), on the device, of slices already scaled to [0, 1].

        `x` is (N, 1, S, S) (grey, replicated here to the model's input channels) or (N, C, S, S)
        with C the model's input channels; on any device.
        """
        if x.ndim != 4 or x.shape[1] not in (1, self.in_channels) or tuple(x.shape[2:]) != (self.size, self.size):
            raise ValueError(f"expected slices (N, 1 or {self.in_channels}, {self.size}, {self.size}), "
                             f"got shape {tuple(x.shape)}")
        x = x.to(self.device, torch.float32, non_blocking=True)
        if x.shape[1] != self.in_channels:
            x = x.expand(-1, self.in_channels, -1, -1)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            logits = self.model(x).logits
        return torch.sigmoid(logits.float())[:, 0]

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities in [0, 1], float32 (N, S, S), of uint8 slices (N, S, S) (context 1) or of each
        slice's window of K adjacent slices (N, K, S, S) (context K; the centre slice is predicted)."""
        size = (self.size, self.size)
        if self.context == 1:
            ok, expected = images.ndim == 3 and images.shape[1:] == size, f"slices (N, {self.size}, {self.size})"
        else:
            ok = images.ndim == 4 and images.shape[1:] == (self.context, *size)
            expected = (f"context-{self.context} windows (N, {self.context}, {self.size}, {self.size}) "
                        "(ian_node.segment.pipeline.PreparedSeries.inputs)")
        if not ok:
            raise ValueError(f"expected uint8 {expected}, got shape {images.shape}")
        if images.dtype != np.uint8:
            raise TypeError(f"expected uint8 slices, got {images.dtype}")
        out = np.empty((len(images), *size), dtype=np.float32)
        for start in range(0, len(images), self.options.batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + self.options.batch_size]))
            x = chunk.to(self.device, non_blocking=True).float().div_(255.0)
            out[start : start + len(chunk)] = self.probabilities(x if x.ndim == 4 else x.unsqueeze(1)).cpu().numpy()
        return out
