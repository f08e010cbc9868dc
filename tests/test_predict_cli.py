"""`ian-node predict`: DICOM files in, a SEG file out, no network."""

from __future__ import annotations

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
    status = main(["predict", str(study.root), "--out", str(out), "--checkpoint", str(checkpoint), "--device", "cpu"])
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
            "--checkpoint", str(checkpoint), "--device", "cpu"]
    assert main(args) == 2
    message = capsys.readouterr().err
    assert "--series" in message and study.series_uid in message and other.series_uid in message
    assert not out.exists()

    assert main([*args, "--series", other.series_uid]) == 0
    referenced = _referenced(hd.seg.segread(out))
    assert referenced == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in other.instances}
