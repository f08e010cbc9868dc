"""`ian-node predict --crop/--roi/--localiser/--report`: every crop mode, the no-region exit, and option errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ian_node.app.cli import main
from ian_node.phantom.study import PhantomFiles
from ian_node.segment.crop import NO_REGION
from tests.crop_tools import constant_localiser, crop_checkpoint
from tests.integration.node_harness import small_phantom, untrained_checkpoint

BOXES = {"right": [[-18.0, -1.0], [-50.0, -20.0], [-110.0, -95.0]], "left": [[1.0, 15.0], [-50.0, -20.0],
                                                                              [-110.0, -95.0]]}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"checkpoint": crop_checkpoint(root / "landmarks.pt"),
            "legacy": untrained_checkpoint(root / "legacy.pt", size=32, attention=False),
            "found": constant_localiser(root / "found.pt", 20.0),
            "empty": constant_localiser(root / "empty.pt", -20.0)}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomFiles:
    return small_phantom(tmp_path_factory.mktemp("study"), 0)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _predict(study: PhantomFiles, models: dict[str, Path], out: Path, *args: str, checkpoint: str = "checkpoint"
             ) -> list[str]:
    return ["predict", str(study.series_dir), "--out", str(out), "--device", "cpu",
            "--checkpoint", str(models[checkpoint]), *args]


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def test_auto_crop_reports_each_side_box_and_confidence_and_writes_the_seg(
    study: PhantomFiles, models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = tmp_path / "seg.dcm", tmp_path / "report.json"
    assert main(_predict(study, models, out, "--localiser", str(models["found"]), "--report", str(report))) == 0
    assert out.exists() and "crop: right auto [[" in capsys.readouterr().out
    data = _report(report)
    assert (data["series_uid"], data["outcome"], data["flag"], data["out"]) == (study.series_uid, "segmented", None,
                                                                                 str(out))
    for side in ("right", "left"):
        assert data["roi"][side]["mode"] == "auto" and data["roi"][side]["confidence"] > 0.9
        assert len(data["roi"][side]["box_mm"]) == 3
    assert set(data["voxels"]) == {"right", "left"} and "localise" in data["timings"]


def test_no_region_found_exits_3_with_a_clear_message_writes_the_report_and_no_seg(
    study: PhantomFiles, models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = tmp_path / "seg.dcm", tmp_path / "report.json"
    assert main(_predict(study, models, out, "--localiser", str(models["empty"]), "--report", str(report))) == 3
    err = capsys.readouterr().err
    assert f"series {study.series_uid}: {NO_REGION}" in err and "not segmented" in err
    assert not out.exists()
    data = _report(report)
    assert data["outcome"] == "no_region" and data["flag"].startswith(NO_REGION) and data["voxels"] is None
    assert data["roi"]["left"] == {"mode": "auto", "box_mm": None, "confidence": 0.0}
    assert set(data["timings"]) == {"load", "localise"}


def test_segment_when_not_found_segments_in_the_halves_and_flags_the_report(
    study: PhantomFiles, models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = tmp_path / "seg.dcm", tmp_path / "report.json"
    args = _predict(study, models, out, "--localiser", str(models["empty"]), "--segment-when-not-found",
                    "--report", str(report))
    assert main(args) == 0 and out.exists()
    assert "segmented anyway" in capsys.readouterr().err
    data = _report(report)
    assert data["outcome"] == "segmented_no_region" and data["flag"].startswith(NO_REGION)
    assert {data["roi"][s]["mode"] for s in ("right", "left")} == {"half"}


@pytest.mark.parametrize("mode", ["box", "oracle"])
def test_box_and_oracle_crops_use_the_roi_file_boxes(
    study: PhantomFiles, models: dict[str, Path], tmp_path: Path, mode: str
) -> None:
    roi, report = tmp_path / "roi.json", tmp_path / "report.json"
    roi.write_text(json.dumps(BOXES))
    assert main(_predict(study, models, tmp_path / "seg.dcm", "--crop", mode, "--roi", str(roi),
                         "--report", str(report))) == 0
    data = _report(report)
    for side in ("right", "left"):
        assert data["roi"][side] == {"mode": mode, "box_mm": BOXES[side], "confidence": None}


def test_a_phantom_summary_json_is_a_roi_file_through_its_crop_boxes(
    study: PhantomFiles, models: dict[str, Path], tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    args = _predict(study, models, tmp_path / "seg.dcm", "--crop", "oracle", "--roi", str(study.summary),
                    "--report", str(report))
    assert main(args) == 0
    boxes = json.loads(study.summary.read_text())["crop_boxes"]
    assert {side: _report(report)["roi"][side]["box_mm"] for side in ("right", "left")} == boxes


def test_half_crop_runs_a_checkpoint_trained_on_halves_that_auto_refuses_with_the_fix(
    study: PhantomFiles, models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "seg.dcm"
    auto = _predict(study, models, out, "--localiser", str(models["found"]), checkpoint="legacy")
    assert main(auto) == 2
    assert "left-right halves" in capsys.readouterr().err and not out.exists()
    assert main(_predict(study, models, out, "--crop", "half", checkpoint="legacy")) == 0


@pytest.mark.parametrize(
    ("args", "roi_text", "message"),
    [
        (["--crop", "box"], None, "--crop box needs --roi"),
        (["--crop", "half", "--roi", "ROI"], json.dumps(BOXES), "--roi is used only with --crop box or oracle"),
        (["--crop", "box", "--roi", "ROI"], "{not json", "not JSON"),
        (["--crop", "box", "--roi", "ROI"], json.dumps({"right": BOXES["right"]}), '"crop_boxes" key'),
        (["--crop", "oracle", "--roi", "ROI"], json.dumps({**BOXES, "left": [[1, 15], [-50, -20]]}),
         "left: must be [[x_min, x_max]"),
        (["--crop", "box", "--roi", "ROI"], json.dumps({"right": BOXES["left"], "left": BOXES["right"]}), "lower x"),
        (["--localiser", "/nonexistent/localiser.pt"], None, "--localiser: file"),
        (["--min-confidence", "2"], None, "--min-confidence: must be from 0 to 1"),
    ],
)
def test_bad_crop_options_exit_2_naming_the_option(
    study: PhantomFiles, models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    args: list[str], roi_text: str | None, message: str,
) -> None:
    roi = tmp_path / "roi.json"
    if roi_text is not None:
        roi.write_text(roi_text)
    args = [str(roi) if a == "ROI" else a for a in args]
    assert main(_predict(study, models, tmp_path / "seg.dcm", *args)) == 2
    assert message in capsys.readouterr().err
