import pytest
import torch

from model.networks.base import SegOutput
from training.losses import FocalTverskyLoss, deep_supervision_loss


def _one_pixel_target():
    t = torch.zeros(1, 1, 2, 2)
    t[0, 0, 0, 0] = 1.0
    return t


def test_perfect_prediction_has_near_zero_loss():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:5, 2:6] = 1
    logits = (target * 2 - 1) * 30
    assert FocalTverskyLoss()(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_hand_computed_case_alpha_weighs_false_negatives():
    # p = 0.5 everywhere: TP = 0.5, FN = 0.5, FP = 1.5.
    logits = torch.zeros(1, 1, 2, 2)
    loss = FocalTverskyLoss(alpha=0.7, beta=0.3, gamma=2.0, smooth=0.0)(logits, _one_pixel_target())
    ti = 0.5 / (0.5 + 0.7 * 0.5 + 0.3 * 1.5)
    assert loss.item() == pytest.approx((1 - ti) ** 2, rel=1e-6)
    smoothed = FocalTverskyLoss(smooth=1.0)(logits, _one_pixel_target())
    assert smoothed.item() == pytest.approx((1 - 1.5 / 2.3) ** 2, rel=1e-6)


def test_a_missed_pixel_costs_more_than_an_extra_pixel_with_default_alpha():
    two = torch.tensor([[[[1.0, 1.0]]]])
    one = torch.tensor([[[[1.0, 0.0]]]])
    ftl = FocalTverskyLoss(smooth=0.0)
    missed = ftl((one * 2 - 1) * 30, two)  # TP 1, FN 1
    extra = ftl((two * 2 - 1) * 30, one)  # TP 1, FP 1
    assert missed.item() == pytest.approx((1 - 1 / 1.7) ** 2, rel=1e-5)
    assert extra.item() == pytest.approx((1 - 1 / 1.3) ** 2, rel=1e-5)


def test_mean_reduction_averages_per_image_losses():
    ftl = FocalTverskyLoss()
    target = torch.cat([_one_pixel_target(), torch.ones(1, 1, 2, 2)])
    logits = torch.tensor([[[[1.0, -2.0], [0.3, 0.0]]], [[[2.0, 0.5], [-1.0, 0.2]]]])
    per = ftl.per_image(logits, target)
    assert per.shape == (2,)
    assert ftl(logits, target).item() == pytest.approx(per.mean().item())
    assert ftl(logits[1:], target[1:]).item() == pytest.approx(per[1].item())


def test_gradient_flows_to_logits():
    logits = torch.randn(3, 1, 8, 8, requires_grad=True)
    target = (torch.rand(3, 1, 8, 8) > 0.7).float()
    FocalTverskyLoss()(logits, target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="gamma"):
        FocalTverskyLoss(gamma=0)
    with pytest.raises(ValueError, match="alpha"):
        FocalTverskyLoss(alpha=-1)


def test_deep_supervision_applies_declared_weights():
    ftl = FocalTverskyLoss()
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    main, a1, a2 = (torch.randn(2, 1, 8, 8) for _ in range(3))
    total = deep_supervision_loss(SegOutput(main, (a1, a2)), target, (0.6, 0.2, 0.2), ftl)
    expected = 0.6 * ftl(main, target) + 0.2 * ftl(a1, target) + 0.2 * ftl(a2, target)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_deep_supervision_without_aux_is_the_main_loss():
    ftl = FocalTverskyLoss()
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    main = torch.randn(2, 1, 8, 8)
    assert deep_supervision_loss(SegOutput(main), target, (0.6, 0.2, 0.2), ftl).item() == pytest.approx(
        ftl(main, target).item()
    )


def test_deep_supervision_rejects_mismatched_weights_or_sizes():
    ftl = FocalTverskyLoss()
    target = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="loss weights"):
        deep_supervision_loss(SegOutput(target, (target,)), target, (1.0,), ftl)
    with pytest.raises(ValueError, match="input resolution"):
        deep_supervision_loss(SegOutput(target, (torch.zeros(1, 1, 4, 4),)), target, (1.0, 1.0), ftl)
