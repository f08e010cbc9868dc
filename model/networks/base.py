"""The one output contract every network follows, written once.

`forward` always returns a `SegOutput`. In eval mode `aux` is empty and `logits` is (N, 1, H, W)
at input resolution. In training mode `aux` holds the network's deep-supervision outputs, each
also (N, 1, H, W) at input resolution, and `loss_weights` (main first, then aux in order)
says how the training loop weighs them, so the loop never special-cases a network by name.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class SegOutput:
    """Main logits plus the auxiliary (deep-supervision) logits, all (N, 1, H, W)."""

    logits: Tensor
    aux: tuple[Tensor, ...] = ()


class InputSizeError(ValueError):
    """Raised when H or W is not a size the network can take."""


class SegmentationNetwork(nn.Module, abc.ABC):
    """Base class: input-size check, the output contract and `predict`."""

    #: Registry name, e.g. "ian_net".
    name: ClassVar[str] = ""
    #: H and W must be multiples of this.
    size_multiple: ClassVar[int] = 1
    #: Loss weight of the main output followed by one weight per auxiliary output.
    loss_weights: ClassVar[tuple[float, ...]] = (1.0,)

    def check_input(self, x: Tensor) -> None:
        """Fail early, naming the allowed sizes, rather than deep inside an unpool or a window."""
        if x.ndim != 4:
            raise InputSizeError(f"{self.name}: expected input (N, C, H, W), got shape {tuple(x.shape)}")
        h, w = int(x.shape[-2]), int(x.shape[-1])
        m = self.size_multiple
        if h % m or w % m or h == 0 or w == 0:
            raise InputSizeError(
                f"{self.name}: input size {h}x{w} is not allowed; H and W must be positive multiples of {m}"
            )

    @abc.abstractmethod
    def _forward(self, x: Tensor) -> tuple[Tensor, Sequence[Tensor]]:
        """Return (main logits, auxiliary logits), all (N, 1, H, W) at input resolution."""

    def forward(self, x: Tensor) -> SegOutput:
        self.check_input(x)
        main, aux = self._forward(x)
        if not self.training:
            return SegOutput(main)
        aux = tuple(aux)
        if len(aux) + 1 != len(self.loss_weights):
            raise RuntimeError(
                f"{self.name}: produced {len(aux)} auxiliary outputs but declares "
                f"{len(self.loss_weights) - 1} auxiliary loss weights"
            )
        return SegOutput(main, aux)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits (N, 1, H, W) in eval mode, whatever mode the module was in."""
        was_training = self.training
        self.eval()
        try:
            return self.forward(x).logits
        finally:
            self.train(was_training)
