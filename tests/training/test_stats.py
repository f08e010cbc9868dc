import numpy as np
import pytest
from scipy import stats as scipy_stats

from training.metrics import ImageScore
from training.stats import (
    ALL_ZERO_NOTE,
    bonferroni,
    compare_to_reference,
    holm,
    patient_bootstrap_ci,
    rank_agreement,
    ranking_stability,
    wilcoxon_paired,
)

# scipy's documented example (Cushny & Peebles via Conover): exact two-sided p = 0.041259765625.
DIFFS = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]


def test_matches_scipy_documented_exact_result():
    t = wilcoxon_paired(np.array(DIFFS, float), np.zeros(len(DIFFS)))
    assert t.statistic == 24.0
    assert t.p_value == pytest.approx(0.041259765625, rel=1e-12)
    assert t.n == 15 and t.n_nonzero == 15


def test_matches_scipy_on_tied_data_with_zero_differences():
    rng = np.random.default_rng(3)
    a = np.round(rng.uniform(size=80), 1)
    b = np.round(np.clip(a - rng.normal(0.05, 0.1, size=80), 0, 1), 1)
    expected = scipy_stats.wilcoxon(a, b)
    t = wilcoxon_paired(a, b)
    assert t.statistic == pytest.approx(expected.statistic)
    assert t.p_value == pytest.approx(expected.pvalue)
    assert t.n_nonzero < t.n


def test_all_zero_differences_give_p_one_with_note():
    t = wilcoxon_paired([0.5, 0.7, 0.0], [0.5, 0.7, 0.0])
    assert (t.statistic, t.p_value, t.n_nonzero, t.note) == (0.0, 1.0, 0, ALL_ZERO_NOTE)


def test_invalid_pairs_are_rejected():
    with pytest.raises(ValueError, match="equal length"):
        wilcoxon_paired([1, 2], [1])
    with pytest.raises(ValueError, match="finite"):
        wilcoxon_paired([1, float("nan")], [1, 2])


def test_bonferroni_multiplies_and_caps_at_one():
    assert bonferroni([0.01, 0.2, 0.5]) == pytest.approx([0.03, 0.6, 1.0])
    assert bonferroni([0.01], m=6) == pytest.approx([0.06])


def _scores(model, values):
    return [
        ImageScore(model, 0, f"P{i // 4}", "R", i % 4, v, v * 0.8, min(1.0, v + 0.05), v) for i, v in enumerate(values)
    ]


def test_table_pairs_by_image_and_corrects_per_metric():
    rng = np.random.default_rng(0)
    ours = rng.uniform(0.5, 1.0, 40)
    worse = np.clip(ours - rng.uniform(0.0, 0.3, 40), 0, 1)
    same = ours.copy()
    scores = _scores("ian_net", ours) + _scores("caranet", worse)[::-1] + _scores("meganet", same)
    rows = compare_to_reference(scores, "ian_net")
    assert len(rows) == 4 * 2
    dsc_cara = next(r for r in rows if r.metric == "dsc" and r.comparator == "caranet")
    expected = scipy_stats.wilcoxon(ours, worse)
    assert dsc_cara.p_value == pytest.approx(expected.pvalue)
    assert dsc_cara.p_adjusted == pytest.approx(min(1.0, 2 * expected.pvalue))
    assert dsc_cara.significant and dsc_cara.mean_difference > 0
    dsc_mega = next(r for r in rows if r.metric == "dsc" and r.comparator == "meganet")
    assert dsc_mega.p_adjusted == 1.0 and not dsc_mega.significant and dsc_mega.note == ALL_ZERO_NOTE
    all_rows = compare_to_reference(scores, "ian_net", family="all")
    assert all_rows[0].p_adjusted == pytest.approx(min(1.0, 8 * all_rows[0].p_value))


def test_models_scored_on_different_images_are_an_error():
    scores = _scores("ian_net", [0.5] * 8) + _scores("caranet", [0.4] * 7)
    with pytest.raises(ValueError, match="different images"):
        compare_to_reference(scores, "ian_net")


def _repeat_scores(means_by_repeat):
    """Two images per (repeat, model) whose mean DSC is the given value."""
    return [ImageScore(m, r, "P0", "R", k, v + d, v, v, v)
            for r, means in enumerate(means_by_repeat) for m, v in means.items() for k, d in enumerate((-0.1, 0.1))]


def test_ranking_stability_is_kendalls_tau_between_every_pair_of_repeats_rankings():
    repeats = [{"ian_net": 0.8, "caranet": 0.6, "meganet": 0.4, "ducknet": 0.2},
               {"ian_net": 0.7, "caranet": 0.5, "meganet": 0.6, "ducknet": 0.1},   # one swap
               {"ian_net": 0.1, "caranet": 0.3, "meganet": 0.5, "ducknet": 0.7}]   # reversed
    result = ranking_stability(_repeat_scores(repeats))
    assert result.means[1] == pytest.approx({"caranet": 0.5, "ducknet": 0.1, "ian_net": 0.7, "meganet": 0.6})
    taus = {(p.repeat_a, p.repeat_b): p.tau for p in result.pairs}
    assert taus == pytest.approx({(0, 1): 4 / 6, (0, 2): -1.0, (1, 2): -4 / 6})
    models = sorted(repeats[0])
    expected = scipy_stats.kendalltau([repeats[0][m] for m in models], [repeats[1][m] for m in models])
    assert result.pairs[0].p_value == pytest.approx(expected.pvalue)
    assert result.mean_tau == pytest.approx((4 / 6 - 1 - 4 / 6) / 3)


def test_ranking_stability_of_one_repeat_has_no_pairs_and_a_tie_only_ranking_no_tau():
    assert ranking_stability(_repeat_scores([{"ian_net": 0.8, "caranet": 0.6}])).pairs == ()
    flat = ranking_stability(_repeat_scores([{"ian_net": 0.8, "caranet": 0.6}, {"ian_net": 0.5, "caranet": 0.5}]))
    assert np.isnan(flat.pairs[0].tau) and np.isnan(flat.mean_tau)


def test_ranking_stability_refuses_repeats_that_scored_other_models():
    scores = _repeat_scores([{"ian_net": 0.8, "caranet": 0.6}, {"ian_net": 0.5, "meganet": 0.4}])
    with pytest.raises(ValueError, match="repeat 1 scored models"):
        ranking_stability(scores)


def test_holm_adjusts_known_p_values_step_down():
    # sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([0.02]) == [0.02]
    with pytest.raises(ValueError, match="p-values"):
        holm([0.1, 1.5])


def test_bootstrap_ci_of_a_constant_is_that_constant():
    lo, hi = patient_bootstrap_ci([0.7] * 6, ["A", "A", "B", "B", "C", "D"])
    assert lo == pytest.approx(0.7, abs=1e-12) and hi == pytest.approx(0.7, abs=1e-12)


def test_bootstrap_resamples_patients_not_nerves():
    rng = np.random.default_rng(5)
    per_patient = rng.uniform(0.3, 0.9, size=8)
    patients = [f"P{i}" for i in range(8)]
    both_sides = patient_bootstrap_ci(np.repeat(per_patient, 2), np.repeat(patients, 2).tolist())
    one_side = patient_bootstrap_ci(per_patient, patients)
    assert both_sides == pytest.approx(one_side, abs=1e-12)  # a second identical side adds no information
    as_if_independent = patient_bootstrap_ci(np.repeat(per_patient, 2), [f"N{i}" for i in range(16)])
    assert as_if_independent[1] - as_if_independent[0] < 0.85 * (both_sides[1] - both_sides[0])


def test_bootstrap_is_seeded_and_undefined_for_one_patient():
    values, patients = [0.1, 0.5, 0.9, 0.4], ["A", "B", "C", "D"]
    assert patient_bootstrap_ci(values, patients, seed=3) == patient_bootstrap_ci(values, patients, seed=3)
    assert all(np.isnan(patient_bootstrap_ci([0.2, 0.4], ["A", "A"])))


def test_kendalls_tau_of_identical_rankings_is_one_and_mean_ranks_average():
    means = {0: {"a": 0.9, "b": 0.5, "c": 0.1}, 1: {"a": 0.8, "b": 0.7, "c": 0.2}, 2: {"a": 0.6, "b": 0.3, "c": 0.0}}
    result = rank_agreement(means, "dsc")
    assert [p.tau for p in result.pairs] == pytest.approx([1.0, 1.0, 1.0]) and result.mean_tau == pytest.approx(1.0)
    assert result.mean_ranks == {"a": 1.0, "b": 2.0, "c": 3.0}
    swapped = rank_agreement({0: {"a": 0.9, "b": 0.5}, 1: {"a": 0.4, "b": 0.5}}, "dsc")
    assert swapped.mean_ranks == {"a": 1.5, "b": 1.5} and swapped.pairs[0].tau == pytest.approx(-1.0)
