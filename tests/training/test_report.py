import csv
import re

import numpy as np
import pytest
from PIL import Image

from training.figures import (
    BLUE,
    RED,
    YELLOW,
    GridRow,
    OverlayCase,
    overlay,
    plot_fig5,
    plot_fig6,
    select_fig5_cases,
    select_fig6_keys,
)
from training.metrics import METRICS, ImageMetrics, ImageScore
from training.report import (
    RunTiming,
    read_per_image_csv,
    write_metric_reports,
    write_per_image_csv,
    write_ranking,
    write_timing,
)
from training.stats import compare_to_reference, ranking_stability

MODELS = ("meganet", "ian_net", "caranet")  # deliberately not in the paper's order


def _scores(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for repeat in range(2):
        for p in range(5):
            for side in ("L", "R"):
                for sl in range(3):
                    base = rng.uniform(0.2, 1.0)
                    for m, shift in zip(MODELS, (0.05, 0.0, 0.15), strict=True):
                        d = 0.0 if (p == 0 and side == "L") else float(np.clip(base - shift, 0, 1))
                        out.append(ImageScore(m, repeat, f"P{p}", side, sl, d, d / (2 - d), min(1.0, d + 0.1), d))
    return out


def test_table1_numbers_equal_the_per_image_csv_summaries(tmp_path):
    paths = write_metric_reports(_scores(), tmp_path)
    rows = read_per_image_csv(paths["per_image_csv"])
    with open(paths["table1_csv"], newline="") as f:
        table = {r["model"]: r for r in csv.DictReader(f)}
    assert set(table) == set(MODELS)
    for model in MODELS:
        for metric in METRICS:
            v = np.array([getattr(r, metric) for r in rows if r.model == model])
            assert float(table[model][f"{metric}_mean"]) == pytest.approx(v.mean(), rel=1e-12)
            assert float(table[model][f"{metric}_sd"]) == pytest.approx(v.std(ddof=1), rel=1e-12)
            assert float(table[model][f"{metric}_median"]) == pytest.approx(np.median(v), rel=1e-12)
        assert int(table[model]["n"]) == 60


def test_per_image_csv_round_trips_exactly(tmp_path):
    scores = _scores()
    assert read_per_image_csv(write_per_image_csv(scores, tmp_path / "x.csv")) == scores


def test_table1_markdown_is_laid_out_like_the_paper(tmp_path):
    md = write_metric_reports(_scores(), tmp_path)["table1_md"].read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert lines[0] == "| Model | DSC | IoU | Precision | Recall |"
    assert lines[2] == "| | " + " | ".join(["Mean ± SD (median)"] * 4) + " |"
    assert [ln.split("|")[1].strip() for ln in lines[3:]] == ["Our model", "CaraNet", "MEGANet"]
    cell = re.compile(r"^(\*\*)?\d\.\d{3} ± \d\.\d{3} \(\d\.\d{4}\)(\*\*)?$")
    for ln in lines[3:]:
        assert all(cell.match(c.strip()) for c in ln.strip("|").split("|")[1:]), ln
    assert lines[3].count("**") == 8  # our model has the best mean on every metric here
    assert "SD, standard deviation" in md


def test_table2_reports_cumulative_failure_percentages(tmp_path):
    scores = [ImageScore("ian_net", 0, "P", "R", i, d, d, d, d) for i, d in enumerate([0, 0.1, 0.25, 0.5, 0.9])]
    scores += [ImageScore("caranet", 0, "P", "R", i, d, d, d, d) for i, d in enumerate([0, 0, 0.19, 0.29, 0.3])]
    paths = write_metric_reports(scores, tmp_path)
    with open(paths["table2_csv"], newline="") as f:
        table = {r["model"]: r for r in csv.DictReader(f)}
    assert [float(table["ian_net"][k]) for k in ("complete_pct", "tracking_pct", "boundary_pct")] == [20, 40, 60]
    assert [float(table["caranet"][k]) for k in ("complete_pct", "tracking_pct", "boundary_pct")] == [40, 60, 80]
    md = paths["table2_md"].read_text()
    assert "| Our model | **20.0** | **40.0** | **60.0** |" in md
    assert "| CaraNet | 40.0 | 60.0 | 80.0 |" in md


def _counted(model, counts):
    return [ImageScore.of(model, 0, f"P{i % 2}", "R", i, ImageMetrics.from_counts(*c)) for i, c in enumerate(counts)]


def test_per_image_csv_keeps_pixel_counts_and_gt_empty(tmp_path):
    scores = _counted("ian_net", [(3, 1, 1), (0, 2, 0), (0, 0, 0)])
    path = write_per_image_csv(scores, tmp_path / "x.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["tp"], r["fp"], r["fn"], r["gt_empty"]) for r in rows] == [
        ("3", "1", "1", "0"), ("0", "2", "0", "1"), ("0", "0", "0", "1")]
    assert read_per_image_csv(path) == scores


def test_per_image_csv_without_counts_still_reads(tmp_path):
    legacy = tmp_path / "old.csv"
    legacy.write_text("model,repeat,patient,side,slice,dsc,iou,precision,recall\nian_net,0,P0,R,3,0.5,0.4,0.6,0.5\n")
    (score,) = read_per_image_csv(legacy)
    assert score.dsc == 0.5 and not score.has_counts and score.gt_empty is None


def test_table2_splits_complete_failures_beside_the_papers_numbers(tmp_path):
    # ian_net: one no-prediction, one misplaced, one FP on a nerve-free slice, one hit, one true negative.
    scores = _counted("ian_net", [(0, 0, 5), (0, 3, 5), (0, 2, 0), (4, 0, 0), (0, 0, 0)])
    scores += _counted("caranet", [(0, 0, 5), (0, 0, 5), (5, 0, 0), (4, 0, 0), (0, 0, 0)])
    paths = write_metric_reports(scores, tmp_path)
    with open(paths["table2_csv"], newline="") as f:
        table = {r["model"]: r for r in csv.DictReader(f)}
    causes = ("complete_no_prediction_pct", "complete_misplaced_pct", "complete_fp_nerve_free_pct")
    assert float(table["ian_net"]["complete_pct"]) == 60
    assert [float(table["ian_net"][k]) for k in causes] == [20, 20, 20]
    assert [float(table["caranet"][k]) for k in causes] == [40, 0, 0]
    md = paths["table2_md"].read_text()
    assert "| Our model | 60.0 | 60.0 | 60.0 |" in md  # the paper's table, unchanged
    assert "| Our model | 20.0 | 20.0 | 20.0 |" in md and "| CaraNet | 40.0 | 0.0 | 0.0 |" in md


def test_false_positive_table_gives_rate_and_mean_pixels_on_nerve_free_slices(tmp_path):
    scores = _counted("ian_net", [(0, 4, 0), (0, 0, 0), (0, 0, 0), (0, 2, 0), (3, 9, 1)])
    scores += _counted("caranet", [(0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (3, 0, 1)])
    paths = write_metric_reports(scores, tmp_path)
    with open(paths["fp_nerve_free_csv"], newline="") as f:
        table = {r["model"]: r for r in csv.DictReader(f)}
    assert (int(table["ian_net"]["n_nerve_free"]), float(table["ian_net"]["any_prediction_pct"]),
            float(table["ian_net"]["mean_fp_pixels"])) == (4, 50.0, 1.5)
    assert float(table["caranet"]["any_prediction_pct"]) == 0.0
    md = paths["fp_nerve_free_md"].read_text()
    assert "| Our model | 4 | 50.0 | 1.5 |" in md and "| CaraNet | 4 | 0.0 | 0.0 |" in md


def test_pvalue_table_lists_each_comparator_and_metric(tmp_path):
    scores = _scores()
    rows = compare_to_reference(scores, "ian_net")
    paths = write_metric_reports(scores, tmp_path, pvalues=rows)
    with open(paths["pvalues_csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and {r["comparator"] for r in table} == {"caranet", "meganet"}
    md = paths["pvalues_md"].read_text().splitlines()
    assert md[2] == "| Comparator | DSC | IoU | Precision | Recall |"
    assert md[4].startswith("| CaraNet | ") and md[4].count("*") == 4  # clearly worse on every metric
    assert md[0].startswith("**p-values, as in the paper.**") and "Pseudo-replication" in md[-1]


def test_timing_table_averages_and_sums_runs(tmp_path):
    timings = [RunTiming("ian_net", 0, 1800.0, 0.02), RunTiming("ian_net", 1, 3600.0, 0.04),
               RunTiming("caranet", 0, 7200.0, 0.05)]
    csv_path, md_path = write_timing(timings, tmp_path)
    with open(csv_path, newline="") as f:
        table = {r["model"]: r for r in csv.DictReader(f)}
    assert float(table["ian_net"]["seconds_per_slice"]) == pytest.approx(0.03)
    assert float(table["ian_net"]["training_hours_per_run"]) == pytest.approx(0.75)
    assert float(table["ian_net"]["training_hours_total"]) == pytest.approx(1.5)
    assert "| Our model | 2 | 0.0300 | 0.750 | 1.500 |" in md_path.read_text()


def test_fig5_cases_are_failure_below_and_above_average():
    scores = _scores()
    cases = select_fig5_cases(scores)
    mean = np.mean([s.dsc for s in scores if s.model == "ian_net"])
    assert [label for label, _ in cases] == ["complete failure", "below average", "above average"]
    assert cases[0][1].dsc == 0 and cases[0][1].model == "ian_net"
    assert 0 < cases[1][1].dsc < mean < cases[2][1].dsc


def test_fig6_keys_are_common_and_spread_over_the_reference_dsc():
    scores = _scores()
    keys = select_fig6_keys(scores, n=3)
    ref = {s.key: s.dsc for s in scores if s.model == "ian_net"}
    assert len(keys) == 3 and ref[keys[0]] <= ref[keys[1]] <= ref[keys[2]]
    assert ref[keys[0]] < ref[keys[2]]


def test_overlay_colours_prediction_truth_and_overlap():
    gray = np.zeros((2, 2))
    pred = np.array([[1, 1], [0, 0]], bool)
    gt = np.array([[0, 1], [1, 0]], bool)
    rgb = overlay(gray, [(pred & ~gt, RED), (gt & ~pred, BLUE), (pred & gt, YELLOW)], alpha=1.0)
    assert tuple(rgb[0, 0]) == pytest.approx(RED) and tuple(rgb[0, 1]) == pytest.approx(YELLOW)
    assert tuple(rgb[1, 0]) == pytest.approx(BLUE) and tuple(rgb[1, 1]) == (0, 0, 0)


def _disk(cy, cx, r, size=48):
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_figures_are_written_as_non_empty_pngs(tmp_path):
    scores = _scores()
    fig4 = write_metric_reports(scores, tmp_path)["fig4"]
    rng = np.random.default_rng(0)
    gt = _disk(24, 24, 6)
    image = np.clip(0.4 * rng.random((48, 48)) + 0.5 * gt, 0, 1)
    cases = [OverlayCase(image, gt, np.zeros_like(gt), "DSC 0.00"),
             OverlayCase(image, gt, _disk(27, 27, 6), "DSC 0.55"),
             OverlayCase(image[None], gt, _disk(24, 25, 6), "DSC 0.92")]
    fig5 = plot_fig5(cases, tmp_path / "fig5.png")
    rows = [GridRow(image, gt, {"ian_net": _disk(24, 25, 6), "caranet": _disk(27, 27, 5), "meganet": gt})
            for _ in range(3)]
    fig6 = plot_fig6(rows, tmp_path / "fig6.png")
    for path in (fig4, fig5, fig6):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
            assert np.asarray(im.convert("L")).std() > 10  # not a blank canvas


def test_ranking_report_gives_each_repeats_ranks_and_kendalls_tau(tmp_path):
    scores = _scores()
    stability = ranking_stability(scores)
    csv_path, tau_path, md_path = write_ranking(stability, tmp_path)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(MODELS)
    for r in rows:
        own = [s.dsc for s in scores if s.model == r["model"] and s.repeat == int(r["repeat"])]
        assert float(r["mean_dsc"]) == pytest.approx(np.mean(own), rel=1e-12)
    # ian_net is best and caranet worst in both repeats: ranks 1, 2, 3 and tau 1
    assert {(r["model"], r["rank"]) for r in rows} == {("ian_net", "1.0"), ("meganet", "2.0"), ("caranet", "3.0")}
    with open(tau_path, newline="") as f:
        assert [(t["repeat_a"], t["repeat_b"], float(t["kendall_tau"])) for t in csv.DictReader(f)] == [
            ("0", "1", pytest.approx(1.0))]
    md = md_path.read_text()
    assert "| Model | Repeat 0 | Repeat 1 | Mean rank |" in md and "| 0 vs 1 | 1.000 |" in md
    assert "Mean τ over 1 pair(s) of repeats: 1.000" in md
    assert re.search(r"\| Our model \| \d\.\d{3} \(1\) \| \d\.\d{3} \(1\) \| 1\.00 \|", md)
    assert stability.mean_ranks == {"caranet": 3.0, "ian_net": 1.0, "meganet": 2.0}
