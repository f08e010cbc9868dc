"""The contract every registry network keeps, checked once for all of them on small CPU versions.

Output shapes (main and deep-supervision logits at input resolution in training, main only in eval),
gradient to every parameter, a few train steps that lower the loss, and the refusal of an input off
the size multiple. What is particular to one network is a field of its `Case`; the rest of what is
particular to it lives in its own test file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from model.blocks.axial_attention import AxialSelfAttention
from model.networks.base import InputSizeError, SegmentationNetwork, SegOutput
from model.registry import NETWORKS, build, network_class
from tests.model.gradients import conv_biases_feeding_batch_norm, parameters_without_gradient

BATCH = 2
#: Train input side: a multiple of every network's size multiple, and MEGANet's minimum.
SIDE = 64
#: Adam steps on one fixed batch; one step alone does not reliably lower the loss of these tiny
#: networks with batch-2 BatchNorm (the loss surface is too sharp for any one learning rate).
TRAIN_STEPS = 3
LR = 1e-3
#: Width of the three-channel check (an uneven scale, as in `test_registry`).
THREE_CHANNEL_WIDTH = 0.1


def _open_axial_attention_gates(model: SegmentationNetwork) -> None:
    """CaraNet's axial attentions start with `gamma` = 0, which gives their projections exactly zero
    gradient on the first step; 0.5 lets the test see every path carry gradient."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AxialSelfAttention):
                module.gamma.fill_(0.5)


@dataclass(frozen=True)
class Case:
    """One network as the contract tests build it, with what is particular to it."""

    name: str
    #: Channel scale of the small version.
    width: float
    #: H and W must be multiples of this: the literal value, so that a changed multiple fails here.
    multiple: int
    #: Number of deep-supervision outputs in training mode.
    aux: int
    options: tuple[tuple[str, object], ...] = ()
    #: Applied to the built network before training.
    prepare: Callable[[SegmentationNetwork], None] | None = None
    #: Parameters whose exact gradient is zero by construction (they must still get a gradient).
    zero_gradient_allowed: Callable[[SegmentationNetwork], set[str]] | None = None


CASES = (
    Case("caranet", 0.125, 32, aux=3, prepare=_open_axial_attention_gates),
    Case("deeplabv3plus", 0.125, 16, aux=0),
    # Drop-path and the original's ReLU on the aux logits are off: either can leave a parameter with
    # an all-zero gradient on one step (a dropped branch, a head whose ReLU is dead at init).
    Case("ds_transunet", 0.125, 64, aux=2, options=(("aux_relu", False), ("stochastic_depth", False))),
    Case("ducknet", 0.25, 32, aux=0),
    Case("hardnet_mseg", 0.25, 32, aux=0),
    Case("ian_net", 0.125, 16, aux=0),
    Case("ian_net", 0.125, 16, aux=0, options=(("attention", False),)),
    Case("ian_net_released", 0.125, 16, aux=0),
    # Seed 0: with another seed a CBAM channel-gate MLP can start with every hidden ReLU dead (as it
    # can in the original), which the gradient test would then report.
    Case("meganet", 0.125, 32, aux=4, zero_gradient_allowed=conv_biases_feeding_batch_norm),
    Case("unet", 0.125, 16, aux=0),
)


def _case_id(case: Case) -> str:
    return "-".join([case.name, *(f"{k}={v}" for k, v in case.options)])


@dataclass(frozen=True)
class TrainRun:
    """What one small network did: a train-mode forward and backward, then steps, then an eval forward."""

    case: Case
    model: SegmentationNetwork
    #: Shapes of the first train-mode forward's logits, main first.
    train_shapes: list[tuple[int, ...]]
    #: Parameters left without gradient by the first backward pass.
    without_gradient: list[str]
    #: Training loss before each step, then after the last.
    losses: list[float]
    eval_input_shape: tuple[int, ...]
    eval_output: SegOutput


def _train_forward(model: SegmentationNetwork, x: torch.Tensor, target: torch.Tensor) -> tuple[SegOutput, torch.Tensor]:
    """A train-mode forward and its deep-supervision loss: each output's BCE, weighted by `loss_weights`."""
    torch.manual_seed(1)  # the same dropout masks in every step: the losses differ by the weights only
    out = model(x)
    loss = sum(
        w * F.binary_cross_entropy_with_logits(o, target)
        for w, o in zip(model.loss_weights, (out.logits, *out.aux), strict=True)
    )
    return out, loss


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine OpenMP's barriers make
    two threads many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=CASES, ids=_case_id)
def run(request: pytest.FixtureRequest, one_thread: None) -> TrainRun:
    case: Case = request.param
    torch.manual_seed(0)
    model = build(case.name, in_channels=1, width=case.width, **dict(case.options))
    if case.prepare is not None:
        case.prepare(model)
    model.train()
    x = torch.randn(BATCH, 1, SIDE, SIDE)
    target = (torch.rand(BATCH, 1, SIDE, SIDE) > 0.5).float()
    out, loss = _train_forward(model, x, target)
    train_shapes = [tuple(o.shape) for o in (out.logits, *out.aux)]
    loss.backward()
    allowed = case.zero_gradient_allowed(model) if case.zero_gradient_allowed is not None else set()
    without_gradient = parameters_without_gradient(model, allowed)
    losses = [loss.item()]
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for step in range(1, TRAIN_STEPS + 1):
        optimizer.step()
        optimizer.zero_grad()
        _, loss = _train_forward(model, x, target)
        losses.append(loss.item())
        if step < TRAIN_STEPS:
            loss.backward()
    model.eval()
    # Non-square: one size multiple wider than high.
    eval_input = torch.randn(BATCH, 1, SIDE, SIDE + case.multiple)
    with torch.no_grad():
        eval_output = model(eval_input)
    return TrainRun(case, model, train_shapes, without_gradient, losses, tuple(eval_input.shape), eval_output)


def test_train_forward_gives_main_and_declared_aux_logits_at_input_resolution(run: TrainRun) -> None:
    assert run.train_shapes == [(BATCH, 1, SIDE, SIDE)] * (1 + run.case.aux)
    assert len(run.model.loss_weights) == 1 + run.case.aux


def test_eval_forward_gives_only_main_logits_at_non_square_input_resolution(run: TrainRun) -> None:
    n, _, h, w = run.eval_input_shape
    assert run.eval_output.logits.shape == (n, 1, h, w)
    assert run.eval_output.aux == ()


def test_gradients_reach_every_parameter(run: TrainRun) -> None:
    assert run.without_gradient == []


def test_train_steps_lower_the_loss(run: TrainRun) -> None:
    assert run.losses[-1] < run.losses[0], run.losses


@pytest.mark.parametrize("axis", ["H", "W"])
def test_input_off_the_size_multiple_is_refused_naming_the_multiple(run: TrainRun, axis: str) -> None:
    m = run.case.multiple
    assert run.model.size_multiple == m
    off = SIDE + m // 2
    shape = (1, 1, off, SIDE) if axis == "H" else (1, 1, SIDE, off)
    with pytest.raises(InputSizeError, match=f"multiples of {m}"):
        run.model(torch.zeros(shape))


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_three_channel_network_gives_input_sized_logits_in_eval_and_declared_aux_in_training(name: str) -> None:
    torch.manual_seed(0)
    model = build(name, in_channels=3, width=THREE_CHANNEL_WIDTH)
    assert isinstance(model, network_class(name))
    x = torch.randn(BATCH, 3, SIDE, SIDE)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.logits.shape == (BATCH, 1, SIDE, SIDE) and out.aux == ()
    model.train()
    with torch.no_grad():
        out = model(x)
    assert out.logits.shape == (BATCH, 1, SIDE, SIDE)
    assert len(out.aux) == len(model.loss_weights) - 1
    assert all(a.shape == (BATCH, 1, SIDE, SIDE) for a in out.aux)


def test_every_registered_network_has_a_contract_case() -> None:
    assert sorted({case.name for case in CASES}) == sorted(NETWORKS)
