"""Focal Tversky loss, and deep supervision applied the same way for every network.

Tversky index of one image, from soft counts over its pixels (p = sigmoid(logits), g = mask):

    TP = Σ p·g,  FN = Σ (1 − p)·g,  FP = Σ p·(1 − g)
    TI = (TP + s) / (TP + α·FN + β·FP + s)

**α weighs false negatives and β false positives**, as in Salehi et al. (2017) and Abraham & Khan
(2019). The default α = 0.7, β = 0.3 penalises missed nerve pixels more than extra ones, which
favours recall on a tiny structure (the paper does not state α and β; see REFERENCE.md).

Focal form: loss = (1 − TI)^γ per image, then the mean over the batch ("mean-reduction mode").
The paper gives γ = 2.0 but not the formula. Abraham & Khan write (1 − TI)^(1/γ) with γ = 4/3; we use
the exponent γ directly, as Lin et al.'s focal loss and common PyTorch implementations do, because
γ = 2.0 is the focal loss's customary exponent and, read as 1/γ, would give a square root whose
gradient diverges as TI → 1. Abraham & Khan's form is available as `gamma = 1 / 1.333`.

The smoothing term s = 1 keeps TI defined on images without nerve: an empty prediction on an empty
mask scores TI = 1 (loss 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model.networks.base import SegOutput

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class FocalTverskyLoss:
    """Callable (logits, target) → scalar loss; `alpha` weighs FN, `beta` weighs FP, exponent `gamma`."""

    alpha: float = 0.7
    beta: float = 0.3
    gamma: float = 2.0
    smooth: float = 1.0

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta <= 0:
            raise ValueError(f"alpha and beta must be >= 0 and not both 0, got alpha={self.alpha}, beta={self.beta}")
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {self.smooth}")

    def per_image(self, logits: Tensor, target: Tensor) -> Tensor:
        """(N,) losses, one per image, computed in float32 even under autocast."""
        if logits.shape != target.shape:
            raise ValueError(f"logits shape {tuple(logits.shape)} differs from target shape {tuple(target.shape)}")
        p = torch.sigmoid(logits.float()).flatten(1)
        g = target.float().flatten(1)
        tp = (p * g).sum(1)
        fn = ((1 - p) * g).sum(1)
        fp = (p * (1 - g)).sum(1)
        ti = (tp + self.smooth) / (tp + self.alpha * fn + self.beta * fp + self.smooth)
        # clamp: rounding can push TI a hair above 1, and a negative base breaks a fractional power.
        return (1 - ti).clamp_min(0).pow(self.gamma)

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.per_image(logits, target).mean()


def deep_supervision_loss(
    output: SegOutput, target: Tensor, weights: Sequence[float], loss_fn: LossFn
) -> Tensor:
    """Σ wᵢ·loss(outputᵢ) over the main and auxiliary logits, weights as the network declares them.

    The sum is not renormalised: a network whose original recipe sums its heads keeps that scale.
    When `output.aux` is empty (eval mode, or a network without deep supervision) the result is the
    plain main-output loss, so validation losses compare across networks.
    """
    if not output.aux:
        return loss_fn(output.logits, target)
    heads = (output.logits, *output.aux)
    if len(weights) != len(heads):
        raise ValueError(f"{len(heads)} outputs (main + aux) but {len(weights)} loss weights")
    total = output.logits.new_zeros((), dtype=torch.float32)
    for i, (w, logits) in enumerate(zip(weights, heads, strict=True)):
        if logits.shape != target.shape:
            raise ValueError(
                f"output {i} has shape {tuple(logits.shape)}, target {tuple(target.shape)}: "
                "auxiliary logits must come at input resolution"
            )
        total = total + float(w) * loss_fn(logits, target)
    return total
