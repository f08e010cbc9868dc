import csv
import math

import numpy as np
import pytest
from PIL import Image

from training.field_report import (
    common_rows,
    compare_nerves,
    main,
    metric_value,
    nerve_ranking,
    nerve_values,
    summarize_nerves,
    write_field_reports,
)
from training.nerve_metrics import NerveRow, write_per_nerve_csv
from training.stats import compare_to_reference, holm

MODELS = ("unet", "ian_net", "caranet")  # not in the paper's order
SHIFT = {"ian_net": 0.0, "unet": 0.05, "caranet": 0.25}


def _row(model, repeat, patient, side, dsc, *, gt_empty=False, pred_empty=False, hd95=2.0, length=40.0,
         detected=30.0, components=1):
    return NerveRow(model=model, repeat=repeat, patient=patient, side=side, gt_empty=gt_empty, pred_empty=pred_empty,
                    dsc=dsc, hd95_mm=math.nan if pred_empty else hd95, assd_mm=math.nan if pred_empty else hd95 / 3,
                    cldice=dsc, centreline_mean_mm=math.nan if pred_empty else hd95 / 2,
                    centreline_max_mm=math.nan if pred_empty else hd95 * 2, components_pred=components,
                    components_true=1, betti0_error=abs(components - 1), length_true_mm=length,
                    length_pred_mm=0.0 if pred_empty else length * 0.9, detected_length_mm=detected)


def _rows(repeats=3, patients=8, seed=0):
    """Each repeat tests 4 of the patients (so patients recur across repeats); ian_net is best."""
    rng = np.random.default_rng(seed)
    rows = []
    for repeat in range(repeats):
        for p in rng.choice(patients, size=4, replace=False):
            for side in ("right", "left"):
                base = rng.uniform(0.5, 0.9)
                for m in MODELS:
                    d = base - SHIFT[m] + rng.normal(0, 0.01)
                    rows.append(_row(m, repeat, f"P{p}", side, d, hd95=1 + 8 * (1 - d), detected=40 * d,
                                     components=1 + int(m == "caranet")))
    return rows


def test_repeats_of_one_nerve_are_averaged_into_one_value():
    rows = [_row("ian_net", 0, "P1", "right", 0.6), _row("ian_net", 2, "P1", "right", 0.8),
            _row("ian_net", 1, "P2", "left", 0.5)]
    assert nerve_values(rows, "dsc") == {"ian_net": {("P1", "right"): pytest.approx(0.7), ("P2", "left"): 0.5}}


def test_undefined_distances_are_left_out_of_the_repeat_mean_and_counted():
    rows = [_row("ian_net", 0, "P1", "right", 0.6, hd95=3.0), _row("ian_net", 1, "P1", "right", 0.0, pred_empty=True),
            _row("ian_net", 0, "P2", "left", 0.0, pred_empty=True)]
    values = nerve_values(rows, "hd95_mm")["ian_net"]
    assert values[("P1", "right")] == 3.0 and math.isnan(values[("P2", "left")])
    (summary,) = summarize_nerves(rows, ["hd95_mm"])
    assert (summary.n_nerves, summary.n_undefined, summary.mean) == (1, 2, 3.0)


def test_detected_length_fraction_is_over_the_true_length():
    assert metric_value(_row("ian_net", 0, "P", "right", 0.5, length=40.0, detected=30.0),
                        "detected_length_fraction") == 0.75


def test_nerves_not_scored_by_every_row_and_empty_truths_are_left_out():
    rows = [_row(m, 0, "P1", "right", 0.5) for m in ("ian_net", "unet")]
    rows += [_row("ian_net", 0, "P2", "right", 0.5)]  # unet never scored it
    rows += [_row(m, 0, "P3", "left", 1.0, gt_empty=True, pred_empty=True) for m in ("ian_net", "unet")]
    assert {(r.patient, r.model) for r in common_rows(rows)} == {("P1", "ian_net"), ("P1", "unet")}


def test_summary_mean_is_over_nerves_after_averaging_repeats():
    rows = common_rows(_rows())
    by_nerve = nerve_values(rows, "dsc")["ian_net"]
    s = next(x for x in summarize_nerves(rows, ["dsc"]) if x.model == "ian_net")
    assert s.mean == pytest.approx(np.mean(list(by_nerve.values())), rel=1e-12)
    assert s.n_nerves == len(by_nerve) < sum(r.model == "ian_net" for r in rows)  # patients recur across repeats
    assert s.n_patients == len({p for p, _ in by_nerve}) and s.ci_low < s.mean < s.ci_high


def test_paired_tests_are_per_nerve_and_holm_corrected_per_metric():
    rows = common_rows(_rows())
    tests = compare_nerves(rows, "ian_net", metrics=["dsc", "hd95_mm"])
    assert [(t.metric, t.comparator) for t in tests] == [("dsc", "caranet"), ("dsc", "unet"),
                                                         ("hd95_mm", "caranet"), ("hd95_mm", "unet")]
    n_nerves = len(nerve_values(rows, "dsc")["ian_net"])
    for metric in ("dsc", "hd95_mm"):
        pair = [t for t in tests if t.metric == metric]
        assert [t.p_holm for t in pair] == pytest.approx(holm([t.p_value for t in pair]))
        assert all(t.n_nerves == n_nerves for t in pair)
    dsc_caranet = tests[0]
    assert dsc_caranet.significant and dsc_caranet.mean_difference == pytest.approx(0.25, abs=0.02)
    assert 0 < dsc_caranet.ci_low < dsc_caranet.mean_difference < dsc_caranet.ci_high


def test_nerve_ranking_ranks_rows_within_each_repeat():
    ranking = nerve_ranking(common_rows(_rows()))
    assert sorted(ranking.means) == [0, 1, 2]
    assert ranking.mean_ranks == {"caranet": 3.0, "ian_net": 1.0, "unet": 2.0}
    assert ranking.mean_tau == pytest.approx(1.0)


def test_field_reports_are_written_with_cis_tests_ranking_and_the_papers_pooled_test(tmp_path):
    from training.metrics import ImageScore

    pooled_scores = [ImageScore(m, 0, f"P{p}", "R", k, v, v, v, v) for p in range(3) for k in range(4)
                     for m, v in (("ian_net", 0.8 - 0.01 * k), ("caranet", 0.5 + 0.02 * p), ("unet", 0.7))]
    pooled = compare_to_reference(pooled_scores, "ian_net")
    paths = write_field_reports(_rows(), tmp_path, pooled=pooled, n_resamples=500)
    with open(paths["per_nerve_summary_csv"], newline="") as f:
        summary = list(csv.DictReader(f))
    assert {(r["model"], r["metric"]) for r in summary} >= {(m, "dsc") for m in MODELS}
    with open(paths["per_nerve_tests_csv"], newline="") as f:
        assert {r["comparator"] for r in csv.DictReader(f)} == {"unet", "caranet"}
    md = paths["field_tables_md"].read_text()
    for needle in ("**Table F1.**", "**Table F2.**", "Holm-corrected", "bootstrap over patients",
                   "**Table F4.**", "**As in the paper.**", "Pseudo-replication"):
        assert needle in md, needle
    nerves = nerve_values(common_rows(_rows()), "dsc")["ian_net"]
    assert f"| Our model | {len(nerves)} ({len({p for p, _ in nerves})}) | " in md
    assert Image.open(paths["fig_per_nerve"]).size[0] > 500
    again = write_field_reports(_rows(), tmp_path / "again", pooled=pooled, n_resamples=500)
    assert again["per_nerve_summary_csv"].read_text() == paths["per_nerve_summary_csv"].read_text()  # seeded


def test_command_line_rebuilds_the_reports_from_the_csv(tmp_path, capsys):
    write_per_nerve_csv(_rows(), tmp_path / "per_nerve_metrics.csv")
    assert main([str(tmp_path), "--resamples", "200"]) == 0
    assert (tmp_path / "field_tables.md").exists() and (tmp_path / "per_nerve_ranking.md").exists()
    assert "field_tables.md" in capsys.readouterr().out
