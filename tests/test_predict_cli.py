"""`ian-node predict`: DICOM files in, a SEG file out, no network."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import torch

from ian_node.app.cli import main
from ian_node.phantom.study import PhantomFiles
from tests.integration.node_harness import small_phantom, untrained_checkpoint
from tests.tools import dciodvfy_errors


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("model") / "small.pt", size=32, attention=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomFiles:
    """A phantom study folder: its MR series, its ground-truth SEG and a summary.json."""
    return small_phantom(tmp_path_factory.mktemp("study"), 0)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Two OpenMP threads spinning against other processes on a busy 2-core machine are much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _referenced(seg: pydicom.Dataset) -> set[str]:
    return {str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}


def test_predict_on_a_study_folder_writes_a_valid_seg_of_its_image_series(
    study: PhantomFiles, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "seg.dcm"
    # the folder also holds the ground-truth SEG and a JSON file: neither is an image series
    status = main(["predict", str(study.root), "--out", str(out), "--checkpoint", str(checkpoint), "--device", "cpu",
                   "--crop", "half"])
    assert status == 0
    assert study.series_uid in capsys.readouterr().out
    assert dciodvfy_errors(out) == []
    seg = hd.seg.segread(out)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.instances]
    assert _referenced(seg) == {str(ds.SOPInstanceUID) for ds in sources}
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID


def test_predict_on_two_series_exits_2_naming_both_until_series_picks_one(
    study: PhantomFiles, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = small_phantom(tmp_path / "other", 1)
    out = tmp_path / "seg.dcm"
    args = ["predict", str(study.series_dir), str(other.series_dir), "--out", str(out),
            "--checkpoint", str(checkpoint), "--device", "cpu", "--crop", "half"]
    assert main(args) == 2
    message = capsys.readouterr().err
    assert "--series" in message and study.series_uid in message and other.series_uid in message
    assert not out.exists()

    assert main([*args, "--series", other.series_uid]) == 0
    referenced = _referenced(hd.seg.segread(out))
    assert referenced == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in other.instances}


def _predict(*args: str) -> list[str]:
    """Halves: the test checkpoints (and the bundled model until it is retrained on landmark crops) record no crop."""
    return ["predict", *args, "--device", "cpu", "--crop", "half"]


def test_predict_names_a_missing_path_and_an_empty_folder_as_such(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "seg.dcm")
    assert main(_predict(str(tmp_path / "nowhere"), "--out", out, "--checkpoint", str(checkpoint))) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(_predict(str(tmp_path / "empty"), "--out", out, "--checkpoint", str(checkpoint))) == 2
    assert "empty folder" in capsys.readouterr().err


def test_predict_on_only_a_seg_and_other_files_says_what_it_ignored_and_suggests_no_missing_option(
    study: PhantomFiles, tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "only"
    folder.mkdir()
    (folder / "seg.dcm").write_bytes(study.seg.read_bytes())
    (folder / "notes.txt").write_text("not DICOM")
    (folder / "short.dcm").write_bytes(study.instances[0].read_bytes()[:100])
    status = main(_predict(str(folder), "--out", str(tmp_path / "seg.dcm"), "--checkpoint", str(checkpoint)))
    err = capsys.readouterr().err
    assert status == 2
    assert "no image series" in err and "1 SEG ignored" in err and "2 files are not DICOM" in err
    assert "force" not in err and "--series" not in err


def test_predict_applies_the_node_modality_rule_unless_any_modality_is_given(
    study: PhantomFiles, tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "ct"
    folder.mkdir()
    for path in study.instances:
        ds = pydicom.dcmread(path)
        ds.Modality = "CT"
        ds.save_as(folder / path.name, enforce_file_format=True)
    out = tmp_path / "seg.dcm"
    assert main(_predict(str(folder), "--out", str(out), "--checkpoint", str(checkpoint))) == 2
    assert "is CT, not MR" in capsys.readouterr().err and not out.exists()
    assert main(_predict(str(folder), "--out", str(out), "--checkpoint", str(checkpoint), "--any-modality")) == 0
    assert out.exists()


def test_predict_skips_a_localizer_as_the_node_does(
    study: PhantomFiles, tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "loc"
    folder.mkdir()
    for path in study.instances:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(folder / path.name, enforce_file_format=True)
    assert main(_predict(str(folder), "--out", str(tmp_path / "seg.dcm"), "--checkpoint", str(checkpoint))) == 2
    assert "ImageType LOCALIZER" in capsys.readouterr().err


def test_predict_with_the_bundled_model_prints_the_not_for_clinical_use_notice(
    study: PhantomFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_predict(str(study.series_dir), "--out", str(tmp_path / "seg.dcm"))) == 0
    assert "NOT FOR CLINICAL USE" in capsys.readouterr().err


def test_predict_with_sr_writes_a_valid_measurement_report_of_the_seg_it_wrote(
    study: PhantomFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pydicom.sr.codedict import codes

    from ian_node.segment.measure import measure_labels
    from ian_node.segment.seg import read_segmentation_labels
    from ian_node.segment.volume import load_series

    seg_path, sr_path, report = tmp_path / "seg.dcm", tmp_path / "sr" / "sr.dcm", tmp_path / "report.json"
    assert main(_predict(str(study.series_dir), "--out", str(seg_path), "--sr", str(sr_path),
                         "--report", str(report))) == 0
    assert f"measurements (TID 1500 SR) -> {sr_path}" in capsys.readouterr().out
    assert dciodvfy_errors(sr_path) == []
    seg = pydicom.dcmread(seg_path)
    sr = hd.sr.srread(sr_path)
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.SeriesInstanceUID != seg.SeriesInstanceUID
    # The figures are those of the SEG as written, side by side.
    series = load_series(study.instances)
    measured = measure_labels(read_segmentation_labels(seg, series), series.volume.affine)
    groups = {g.tracking_identifier.split(", ")[-1]: g for g in sr.content.get_volumetric_roi_measurement_groups()}
    assert set(groups) == {side for side, m in measured.items() if m is not None} != set()
    for side, group in groups.items():
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        whole = [m.value for m in group.get_measurements(name=codes.SCT.Length) if not m.finding_sites]
        assert whole == [pytest.approx(measured[side].length_mm, abs=0.006)]
    assert json.loads(report.read_text())["sr"] == str(sr_path)
