"""dciodvfy (dicom3tools) finds no errors in phantom MR instances, the ground-truth SEG and an AI SEG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmwrite

from ian_node.phantom.study import PhantomConfig, PhantomFiles, generate_phantom, write_phantom
from ian_node.segment.seg import AlgorithmInfo, build_segmentation, read_segmentation_labels
from tests.tools import dciodvfy_errors

pytestmark = pytest.mark.integration

#: Oblique, with metal reaching the canal and motion: the least regular geometry and content.
CONFIG = PhantomConfig(shape=(24, 96, 96), oblique_probability=1.0, metal_probability=1.0,
                       metal_reaches_canal_probability=1.0, motion_probability=1.0)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> PhantomFiles:
    return write_phantom(generate_phantom(0, 31, CONFIG), tmp_path_factory.mktemp("phantom"))


@pytest.mark.parametrize("which", [0, 11, -1])
def test_mr_instances_pass_dciodvfy(written: PhantomFiles, which: int):
    assert dciodvfy_errors(written.instances[which]) == []


def test_ground_truth_seg_passes_dciodvfy(written: PhantomFiles):
    assert dciodvfy_errors(written.seg) == []


def test_ai_seg_with_one_empty_side_passes_dciodvfy(written: PhantomFiles, tmp_path: Path):
    source = [pydicom.dcmread(p) for p in written.instances]
    gt = pydicom.dcmread(written.seg)
    assert gt.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
    labels = read_segmentation_labels(gt, source)
    left_only = np.where(labels == 2, 2, 0).astype(np.uint8)
    seg = build_segmentation(source, left_only, algorithm=AlgorithmInfo("IANNet", "0.1.0", "sha256:" + "0f" * 32),
                             series_number=300, series_description="IAN segmentation (AI)")
    path = tmp_path / "ai-seg.dcm"
    dcmwrite(path, seg, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
