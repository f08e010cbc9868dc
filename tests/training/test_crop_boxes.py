"""Cropping each side by the crop boxes of the study's summary.json (the paper's manual crop) instead of the halves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ian_node.phantom.study import PhantomConfig, generate_phantom, write_phantom
from ian_node.segment.pipeline import prepare, to_model_space
from ian_node.segment.reformat import PatientBox
from ian_node.segment.seg import read_segmentation_labels
from ian_node.segment.volume import Side, load_series
from training.data import DatasetError, LoadOptions, load_dataset, read_crop_boxes

SIZE = 64
MARGIN_MM = 4.0


def _nerve_box(phantom, label: int) -> list[list[float]]:
    """The LPS bounding box of one nerve's voxel centres, MARGIN_MM wider on every face."""
    index = np.argwhere(phantom.labels == label).astype(np.float64)
    affine = np.asarray(phantom.volume.affine)
    points = index @ affine[:3, :3].T + affine[:3, 3]
    return [[float(lo - MARGIN_MM), float(hi + MARGIN_MM)] for lo, hi in zip(points.min(0), points.max(0), strict=True)]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """One small phantom study whose summary.json holds hand-written boxes around each nerve."""
    root = tmp_path_factory.mktemp("boxes")
    phantom = generate_phantom(0, 5, PhantomConfig(shape=(24, 96, 96)))
    files = write_phantom(phantom, root / "patient")
    summary = json.loads(files.summary.read_text())
    summary["crop_boxes"] = {"right": _nerve_box(phantom, 1), "left": _nerve_box(phantom, 2)}
    files.summary.write_text(json.dumps(summary))
    return root


def _summary(study: Path) -> Path:
    return study / "patient" / "summary.json"


def _with_summary(study: Path, tmp_path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    data = json.loads(_summary(copy).read_text())
    edit(data)
    _summary(copy).write_text(json.dumps(data))
    return copy


def test_crop_boxes_are_read_per_side_in_patient_mm(study):
    written = json.loads(_summary(study).read_text())["crop_boxes"]
    boxes = read_crop_boxes(_summary(study))
    assert set(boxes) == {Side.RIGHT, Side.LEFT}
    for side, box in boxes.items():
        (x0, x1), (y0, y1), (z0, z1) = written[side.value]
        assert box == PatientBox(x0, x1, y0, y1, z0, z1)


def test_boxes_crop_gives_the_nodes_slices_of_each_box_not_of_the_halves(study):
    boxed = load_dataset(study, "dicom", LoadOptions(size=SIZE, crop="boxes"))
    halves = load_dataset(study, "dicom", LoadOptions(size=SIZE))
    series = load_series(sorted((study / "patient" / "series").iterdir()))
    labels = read_segmentation_labels(pydicom.dcmread(study / "patient" / "seg.dcm"), series)
    prepared = prepare(series, SIZE, read_crop_boxes(_summary(study)))
    masks = to_model_space(prepared, labels).astype(bool)
    offset = 0
    for side in prepared.sides:
        ours = [i for i, m in enumerate(boxed.metas) if m.side == side.stack.side.value]
        slices = [boxed.metas[i].slice for i in ours]
        assert slices and len(side.images) < len(prepare(series, SIZE).sides[0].images)
        np.testing.assert_array_equal(boxed.images[ours], side.images[slices])
        np.testing.assert_array_equal(boxed.masks[ours], masks[offset:offset + len(side.images)][slices])
        offset += len(side.images)
    assert not np.array_equal(boxed.images[:5], halves.images[:5])
    assert all("cropped by the boxes of summary.json" in s.detail for s in boxed.report.sources)


def test_boxes_crop_without_crop_boxes_in_the_summary_is_refused_naming_the_file(study, tmp_path):
    root = _with_summary(study, tmp_path, lambda d: d.pop("crop_boxes"))
    with pytest.raises(DatasetError, match=r"summary\.json: no 'crop_boxes'"):
        load_dataset(root, "dicom", LoadOptions(size=SIZE, crop="boxes"))
    assert len(load_dataset(root, "dicom", LoadOptions(size=SIZE))) > 0  # the halves need no boxes


def test_boxes_crop_without_a_summary_is_refused_naming_the_missing_file(study, tmp_path):
    root = _with_summary(study, tmp_path, lambda d: None)
    _summary(root).unlink()
    with pytest.raises(DatasetError, match=r"summary\.json: crop boxes were asked for"):
        load_dataset(root, "dicom", LoadOptions(size=SIZE, crop="boxes"))


@pytest.mark.parametrize("boxes", [
    {"right": [[0, 1], [0, 1], [0, 1]]},
    {"right": [[0, 1], [0, 1], [0, 1]], "left": [[0, 1], [0, 1]]},
    {"right": [[0, 1], [0, 1], [0, 1]], "left": [[1, 0], [0, 1], [0, 1]]},
    {"right": "here", "left": [[0, 1], [0, 1], [0, 1]]},
])
def test_malformed_crop_boxes_are_refused_naming_the_file(study, tmp_path, boxes):
    root = _with_summary(study, tmp_path, lambda d: d.update(crop_boxes=boxes))
    with pytest.raises(DatasetError, match=r"summary\.json: crop_boxes"):
        read_crop_boxes(_summary(root))


def test_boxes_crop_is_refused_for_forms_without_a_seg(tmp_path):
    with pytest.raises(DatasetError, match="needs the dicom form, not nifti"):
        load_dataset(tmp_path, "nifti", LoadOptions(size=SIZE, crop="boxes"))


def test_unknown_crop_is_refused():
    with pytest.raises(ValueError, match="LoadOptions.crop must be one of"):
        LoadOptions(crop="manual")  # type: ignore[arg-type]
