"""Batched inference on prepared 2D slices: GPU with autocast when present, CPU otherwise."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from model.checkpoint import LoadedCheckpoint

log = logging.getLogger(__name__)


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` ("cpu", "cuda", "cuda:1") or, when None, CUDA if present else the CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class PredictorOptions:
    device: str | None = None
    batch_size: int = 16
    #: Mixed precision on CUDA (bf16 where supported, else fp16). Ignored on the CPU.
    amp: bool = True


class Predictor:
    """Turns uint8 model-space slices (N, S, S) into nerve probabilities (N, S, S)."""

    def __init__(self, checkpoint: LoadedCheckpoint, options: PredictorOptions | None = None) -> None:
        self.options = options or PredictorOptions()
        if self.options.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.options.batch_size}")
        self.checkpoint = checkpoint
        self.device = pick_device(self.options.device)
        self.model = checkpoint.model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.size = checkpoint.meta.input.size
        self.in_channels = checkpoint.meta.input.in_channels

    def _autocast(self):  # type: ignore[no-untyped-def]
        if self.device.type != "cuda" or not self.options.amp:
            return nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def _batches(self, images: np.ndarray) -> Iterator[torch.Tensor]:
        for start in range(0, len(images), self.options.batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + self.options.batch_size]))
            x = chunk.to(self.device, non_blocking=True).float().div_(255.0).unsqueeze(1)
            if self.in_channels == 3:
                x = x.expand(-1, 3, -1, -1)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield x

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities in [0, 1], float32, same shape as `images` (uint8, (N, S, S))."""
        if images.ndim != 3 or images.shape[1:] != (self.size, self.size):
            raise ValueError(f"expected uint8 slices (N, {self.size}, {self.size}), got shape {images.shape}")
        if images.dtype != np.uint8:
            raise TypeError(f"expected uint8 slices, got {images.dtype}")
        out = np.empty(images.shape, dtype=np.float32)
        if len(images) == 0:
            return out
        start = 0
        for x in self._batches(images):
            with self._autocast():
                logits = self.model(x).logits
            probs = torch.sigmoid(logits.float())[:, 0]
            out[start : start + len(probs)] = probs.cpu().numpy()
            start += len(probs)
        return out
