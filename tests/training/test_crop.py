"""The training crop (oracle from landmarks or nerve margins, auto, half) and the sample policy (all or nerve-only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from ian_node.phantom.study import PhantomConfig, generate_phantom, write_phantom
from ian_node.segment.pipeline import prepare, to_model_space
from ian_node.segment.reformat import PatientBox
from ian_node.segment.seg import read_segmentation_labels
from ian_node.segment.volume import Side, load_series
from model.localiser import LocaliserMeta, LocaliserNet, load_localiser, save_localiser
from training.benchmark import _protocol, parser
from training.data import (
    NERVE_MARGINS_MM,
    DatasetError,
    LoadOptions,
    find_crop_boxes,
    load_dataset,
    nerve_margin_boxes,
)

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
    """One small phantom study whose summary.json holds hand-written landmark boxes around each nerve."""
    root = tmp_path_factory.mktemp("boxes")
    phantom = generate_phantom(0, 5, PhantomConfig(shape=(24, 96, 96)))
    files = write_phantom(phantom, root / "patient")
    summary = json.loads(files.summary.read_text())
    summary["crop_boxes"] = {"right": _nerve_box(phantom, 1), "left": _nerve_box(phantom, 2)}
    files.summary.write_text(json.dumps(summary))
    return root


def _summary(study: Path) -> Path:
    return study / "patient" / "summary.json"


def _with_summary(study: Path, tmp_path: Path, edit, name: str = "study") -> Path:  # type: ignore[no-untyped-def]
    copy = tmp_path / name
    shutil.copytree(study, copy)
    data = json.loads(_summary(copy).read_text())
    edit(data)
    _summary(copy).write_text(json.dumps(data))
    return copy


def _series_and_labels(study: Path):  # type: ignore[no-untyped-def]
    series = load_series(sorted((study / "patient" / "series").iterdir()))
    return series, read_segmentation_labels(pydicom.dcmread(study / "patient" / "seg.dcm"), series)


# ---------------------------------------------------------------- the nerve-margin rule, known answers
def _identity_labels() -> np.ndarray:
    """A 1 mm grid whose index is its LPS position: right nerve x 10-12, left x 30-31; y 40-49; z 5-7."""
    labels = np.zeros((50, 60, 20), np.uint8)
    labels[10:13, 40:50, 5:8] = Side.RIGHT.label
    labels[30:32, 42:46, 6:7] = Side.LEFT.label
    return labels


def test_nerve_margin_boxes_grow_each_sides_nerve_box_laterally_medially_and_along_y_and_z():
    boxes = nerve_margin_boxes(_identity_labels(), np.eye(4))
    m = NERVE_MARGINS_MM
    # right side (lower x): lateral is x_min, medial x_max; the boxes overlap in x and meet in the middle
    right_x1 = 12 + m["medial"]
    left_x0 = 30 - m["medial"]
    middle = (right_x1 + left_x0) / 2
    assert boxes[Side.RIGHT] == PatientBox(10 - m["lateral"], middle, 40 - m["anterior"], 49 + m["posterior"],
                                           5 - m["inferior"], 7 + m["superior"])
    assert boxes[Side.LEFT] == PatientBox(middle, 31 + m["lateral"], 42 - m["anterior"], 45 + m["posterior"],
                                          6 - m["inferior"], 6 + m["superior"])
    assert middle == pytest.approx(21.0)


def test_nerve_margin_boxes_that_do_not_overlap_are_not_cut_and_follow_the_affine():
    labels = np.zeros((40, 10, 10), np.uint8)
    labels[2, 5, 5] = Side.RIGHT.label
    labels[38, 5, 5] = Side.LEFT.label
    affine = np.diag([2.0, 1.0, 3.0, 1.0])
    affine[:3, 3] = (-40.0, 0.0, 100.0)  # x = 2 i - 40, z = 3 k + 100
    boxes = nerve_margin_boxes(labels, affine)
    m = NERVE_MARGINS_MM
    assert boxes[Side.RIGHT].x_min == -36 - m["lateral"] and boxes[Side.RIGHT].x_max == -36 + m["medial"]
    assert boxes[Side.LEFT].x_min == 36 - m["medial"] and boxes[Side.LEFT].x_max == 36 + m["lateral"]
    assert (boxes[Side.LEFT].z_min, boxes[Side.LEFT].z_max) == (115 - m["inferior"], 115 + m["superior"])


def test_nerve_margin_boxes_leave_out_a_side_without_nerve():
    labels = _identity_labels()
    labels[labels == Side.LEFT.label] = 0
    assert set(nerve_margin_boxes(labels, np.eye(4))) == {Side.RIGHT}


# ---------------------------------------------------------------- oracle: landmarks or nerve margins
def test_landmark_boxes_are_read_per_side_in_patient_mm(study):
    written = json.loads(_summary(study).read_text())["crop_boxes"]
    boxes = find_crop_boxes(_summary(study))
    assert set(boxes) == {Side.RIGHT, Side.LEFT}
    for side, box in boxes.items():
        (x0, x1), (y0, y1), (z0, z1) = written[side.value]
        assert box == PatientBox(x0, x1, y0, y1, z0, z1)


def test_oracle_crop_uses_the_landmark_boxes_and_gives_every_slice_of_each_box(study):
    boxed = load_dataset(study, "dicom", LoadOptions(size=SIZE))
    assert boxed.report.crop == {"region": "landmarks", "trained_with": "oracle", "samples": "all"}
    series, labels = _series_and_labels(study)
    prepared = prepare(series, SIZE, find_crop_boxes(_summary(study)))
    masks = to_model_space(prepared, labels).astype(bool)
    offset = 0
    for side in prepared.sides:
        ours = [i for i, m in enumerate(boxed.metas) if m.side == side.stack.side.value]
        assert [boxed.metas[i].slice for i in ours] == list(range(len(side.images)))  # every slice of the crop
        np.testing.assert_array_equal(boxed.images[ours], side.images)
        np.testing.assert_array_equal(boxed.masks[ours], masks[offset:offset + len(side.images)])
        offset += len(side.images)
    assert all("oracle crop from the landmarks" in s.detail for s in boxed.report.sources)


def test_oracle_crop_without_landmarks_crops_by_the_nerve_margins(study, tmp_path):
    root = _with_summary(study, tmp_path, lambda d: d.pop("crop_boxes"))
    grown = load_dataset(root, "dicom", LoadOptions(size=SIZE))
    assert grown.report.crop["region"] == "nerve-margins"
    series, labels = _series_and_labels(root)
    expected = prepare(series, SIZE, nerve_margin_boxes(labels, np.asarray(series.volume.affine)))
    right = [i for i, m in enumerate(grown.metas) if m.side == "right"]
    np.testing.assert_array_equal(grown.images[right], expected.sides[0].images)


def test_a_dataset_mixing_studies_with_and_without_landmarks_is_cropped_by_nerve_margins_throughout(
        study, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(study, mixed / "a")
    other = write_phantom(generate_phantom(1, 5, PhantomConfig(shape=(24, 96, 96))), mixed / "b")
    other.summary.write_text(json.dumps({k: v for k, v in json.loads(other.summary.read_text()).items()
                                         if k != "crop_boxes"}))
    slices = load_dataset(mixed, "dicom", LoadOptions(size=SIZE))
    assert slices.report.crop["region"] == "nerve-margins"
    assert all("nerve margins" in s.detail for s in slices.report.sources)
    assert len({m.patient for m in slices.metas}) == 2


@pytest.mark.parametrize("boxes", [
    {"right": [[0, 1], [0, 1], [0, 1]]},
    {"right": [[0, 1], [0, 1], [0, 1]], "left": [[0, 1], [0, 1]]},
    {"right": [[0, 1], [0, 1], [0, 1]], "left": [[1, 0], [0, 1], [0, 1]]},
    {"right": "here", "left": [[0, 1], [0, 1], [0, 1]]},
])
def test_malformed_landmark_boxes_are_refused_naming_the_file(study, tmp_path, boxes):
    root = _with_summary(study, tmp_path, lambda d: d.update(crop_boxes=boxes))
    with pytest.raises(DatasetError, match=r"summary\.json: crop_boxes"):
        find_crop_boxes(_summary(root))
    with pytest.raises(DatasetError, match=r"summary\.json: crop_boxes"):
        load_dataset(root, "dicom", LoadOptions(size=SIZE))
    assert len(load_dataset(root, "dicom", LoadOptions(size=SIZE, crop="half"))) > 0  # the halves need no boxes


# ---------------------------------------------------------------- the sample policy
def test_nerve_slices_only_keeps_the_slices_with_nerve_and_all_slices_keeps_every_slice(study):
    every = load_dataset(study, "dicom", LoadOptions(size=SIZE, crop="half"))
    nerve = load_dataset(study, "dicom", LoadOptions(size=SIZE, crop="half", nerve_slices_only=True))
    has_nerve = every.masks.any(axis=(1, 2))
    series, _ = _series_and_labels(study)
    assert len(every) == sum(len(s.images) for s in prepare(series, SIZE).sides)
    assert 0 < has_nerve.sum() < len(every)
    assert len(nerve) == has_nerve.sum() and nerve.masks.any(axis=(1, 2)).all()
    kept = {(m.patient, m.side, m.slice) for m in nerve.metas}
    assert kept == {(m.patient, m.side, m.slice) for m, n in zip(every.metas, has_nerve, strict=True) if n}
    assert (every.report.crop["samples"], nerve.report.crop["samples"]) == ("all", "nerve-only")
    assert every.report.crop["region"] == "half"
    thinned = load_dataset(study, "dicom", LoadOptions(size=SIZE, crop="half", slice_step=3))
    assert len(thinned) == sum(-(-len(s.images) // 3) for s in prepare(series, SIZE).sides)


# ---------------------------------------------------------------- refusals
def test_crop_auto_is_refused_for_the_2d_form(tmp_path):
    with pytest.raises(DatasetError, match="crop 'auto'"):
        load_dataset(tmp_path, "2d", LoadOptions(size=SIZE, crop="auto"))


@pytest.mark.parametrize("crop", ["manual", "box", "halves"])
def test_unknown_crops_and_the_user_box_mode_are_refused(crop):
    with pytest.raises(ValueError, match="LoadOptions.crop must be one of"):
        LoadOptions(crop=crop)  # type: ignore[arg-type]


# ---------------------------------------------------------------- auto: the node's localiser
def _constant_localiser(path: Path, logit: float) -> str:
    """A localiser whose every voxel has the same logit: +: everything is crop (a box per side), -: nothing."""
    net = LocaliserNet()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(logit)
    save_localiser(path, net, LocaliserMeta(region="nerve-margins", label="test"))
    return str(path)


def test_auto_crop_uses_the_localisers_boxes_and_records_its_region_and_hash(study, tmp_path):
    path = _constant_localiser(tmp_path / "everywhere.pt", 10.0)
    slices = load_dataset(study, "dicom", LoadOptions(size=SIZE, crop="auto", localiser=path))
    assert slices.report.crop == {"region": "nerve-margins", "trained_with": "auto", "samples": "all",
                                  "localiser_sha256": load_localiser(path).sha256}
    assert slices.report.checkpoint_crop() == {"region": "nerve-margins", "trained_with": "auto", "samples": "all"}
    assert all("auto crop (confidence" in s.detail for s in slices.report.sources)


def test_auto_crop_that_finds_no_mandible_is_an_error_naming_the_study(study, tmp_path):
    path = _constant_localiser(tmp_path / "blind.pt", -10.0)
    with pytest.raises(DatasetError, match=r"seg\.dcm: crop 'auto': no mandible region found"):
        load_dataset(study, "dicom", LoadOptions(size=SIZE, crop="auto", localiser=path))


def test_the_crop_and_sample_flags_override_the_presets_values():
    args = parser().parse_args(["run", "--out", "x", "--preset", "paper", "--all-slices", "--crop", "half"])
    assert (_protocol(args).crop, _protocol(args).nerve_slices_only) == ("half", False)
    args = parser().parse_args(["run", "--out", "x", "--preset", "smoke", "--nerve-slices-only"])
    assert (_protocol(args).crop, _protocol(args).nerve_slices_only) == ("oracle", True)
