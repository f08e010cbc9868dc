import numpy as np
import pytest

from training.metrics import (
    ImageMetrics,
    ImageScore,
    binarize,
    complete_failures,
    failure_rates,
    false_positive_rate,
    image_metrics,
)


def _masks():
    gt = np.zeros((4, 4), bool)
    gt[0, 0:3] = True  # 3 GT pixels
    pred = np.zeros((4, 4), bool)
    pred[0, 1:3] = True  # 2 overlapping
    pred[3, 3] = True  # 1 false positive
    return pred, gt  # TP=2, FP=1, FN=1


def test_hand_computed_case():
    m = image_metrics(*_masks())
    assert (m.tp, m.fp, m.fn) == (2, 1, 1)
    assert m.dsc == pytest.approx(4 / 6)
    assert m.iou == pytest.approx(2 / 4)
    assert m.precision == pytest.approx(2 / 3)
    assert m.recall == pytest.approx(2 / 3)


def test_dsc_is_standard_dice_not_papers_typo():
    # The paper's printed 2TP/(TP+FP+FN) would give 1.0 here.
    m = ImageMetrics.from_counts(tp=2, fp=1, fn=1)
    assert m.dsc == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m.dsc == pytest.approx(2 * m.iou / (1 + m.iou))


def test_perfect_prediction_scores_one():
    _, gt = _masks()
    m = image_metrics(gt, gt)
    assert (m.dsc, m.iou, m.precision, m.recall) == (1.0, 1.0, 1.0, 1.0)


def test_both_empty_scores_one_on_every_metric():
    empty = np.zeros((5, 5), np.uint8)
    m = image_metrics(empty, empty)
    assert (m.dsc, m.iou, m.precision, m.recall) == (1.0, 1.0, 1.0, 1.0)
    assert m.gt_empty and m.prediction_empty


def test_missed_structure_scores_zero_on_every_metric():
    _, gt = _masks()
    m = image_metrics(np.zeros_like(gt), gt)
    assert (m.dsc, m.iou, m.precision, m.recall) == (0.0, 0.0, 0.0, 0.0)
    assert not m.gt_empty and m.prediction_empty


def test_prediction_on_empty_ground_truth_scores_zero_on_every_metric():
    pred, gt = _masks()
    m = image_metrics(pred, np.zeros_like(gt))
    assert (m.dsc, m.iou, m.precision, m.recall) == (0.0, 0.0, 0.0, 0.0)
    assert m.gt_empty and not m.prediction_empty


def test_disjoint_masks_score_zero():
    a = np.zeros((3, 3), bool)
    b = a.copy()
    a[0, 0] = True
    b[2, 2] = True
    m = image_metrics(a, b)
    assert (m.dsc, m.iou, m.precision, m.recall) == (0.0, 0.0, 0.0, 0.0)


def test_non_binary_or_mismatched_inputs_are_rejected():
    pred, gt = _masks()
    with pytest.raises(ValueError, match="threshold probabilities"):
        image_metrics(pred * 0.7, gt)
    with pytest.raises(ValueError, match="shape"):
        image_metrics(pred[:2], gt)


def test_binarize_thresholds_inclusively():
    assert binarize(np.array([0.2, 0.5, 0.9])).tolist() == [False, True, True]


def test_failure_rates_are_cumulative_thresholds():
    rates = failure_rates([0.0, 0.0, 0.1, 0.2, 0.25, 0.3, 0.9, 1.0, 0.5, 0.19])
    assert rates.n == 10
    assert rates.complete == pytest.approx(0.2)
    assert rates.tracking == pytest.approx(0.4)  # 0, 0, 0.1, 0.19
    assert rates.boundary == pytest.approx(0.6)  # + 0.2 and 0.25; 0.3 is not below 0.3
    with pytest.raises(ValueError):
        failure_rates([])


def test_image_score_of_copies_metrics_and_keys_by_image():
    s = ImageScore.of("ian_net", 2, "P1", "R", 14, ImageMetrics.from_counts(2, 1, 1))
    assert s.dsc == pytest.approx(2 / 3) and s.iou == pytest.approx(0.5)
    assert s.key == (2, "P1", "R", 14)


def _counted(*counts):
    return [ImageScore.of("ian_net", 0, "P0", "R", i, ImageMetrics.from_counts(*c)) for i, c in enumerate(counts)]


def test_complete_failures_split_into_no_prediction_misplaced_and_nerve_free():
    scores = _counted((0, 0, 5),   # nerve, nothing predicted: no prediction
                      (0, 3, 5),   # nerve, prediction elsewhere: misplaced
                      (0, 2, 0),   # nerve-free slice, prediction: false positive
                      (0, 0, 0),   # nerve-free slice, nothing predicted: correct (DSC 1)
                      (3, 1, 1))   # a hit
    split = complete_failures(scores)
    assert (split.n, split.no_prediction, split.misplaced, split.fp_nerve_free) == (5, 0.2, 0.2, 0.2)
    assert split.total == pytest.approx(failure_rates(s.dsc for s in scores).complete)


def test_false_positive_rate_counts_only_nerve_free_slices():
    scores = _counted((0, 0, 0), (0, 4, 0), (0, 0, 0), (0, 2, 0), (0, 10, 3), (5, 0, 0))
    rate = false_positive_rate(scores)
    assert (rate.n_nerve_free, rate.any_prediction, rate.mean_fp_pixels) == (4, 0.5, 1.5)
    none = false_positive_rate(_counted((1, 1, 1)))
    assert none.n_nerve_free == 0 and np.isnan(none.any_prediction)


def test_image_score_keeps_counts_and_gt_empty():
    s, empty = _counted((2, 1, 1), (0, 3, 0))
    assert (s.tp, s.fp, s.fn, s.gt_empty, empty.gt_empty) == (2, 1, 1, False, True)
    bare = ImageScore("ian_net", 0, "P0", "R", 0, 0.0, 0.0, 0.0, 0.0)
    assert bare.gt_empty is None and not bare.has_counts
    with pytest.raises(ValueError, match="no pixel counts"):
        complete_failures([bare])
