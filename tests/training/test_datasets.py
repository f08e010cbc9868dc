"""Training samples from DICOM studies, NIfTI pairs and the paper's 2D form, on small phantoms."""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.sr.codedict import codes

from ian_node.phantom.study import PhantomConfig, write_phantoms
from ian_node.segment.pipeline import prepare, to_model_space
from ian_node.segment.reformat import side_stacks
from ian_node.segment.seg import build_segmentation, read_segmentation_labels
from ian_node.segment.volume import Side, load_series
from model.preprocess import image_to_model, plan_slice_transform
from training.benchmark import main
from training.data import (
    DatasetError,
    EmptyMaskError,
    LoadOptions,
    MissingSeriesError,
    UnmatchedSegmentError,
    export_2d,
    load_dataset,
    load_slice_set,
    save_slice_set,
)

SIZE = 64
#: The format readers are tested on the halves and the paper's nerve slices (test_crop.py tests the crops
#: and the sample policy).
OPTIONS = LoadOptions(size=SIZE, crop="half", nerve_slices_only=True)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    """Two phantom studies (MR series + ground-truth SEG each)."""
    root = tmp_path_factory.mktemp("studies")
    write_phantoms(root, 2, seed=3, config=PhantomConfig(shape=(24, 96, 96)))
    return root


@pytest.fixture(scope="module")
def dicom_set(studies):
    return load_dataset(studies, "dicom", OPTIONS)


def _patient_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def _copy_study(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_segments(seg_path: Path, labels: dict[int, str], drop_codes: bool, bone: int | None = None) -> None:
    """Relabel segments, optionally drop their laterality codes and make segment `bone` a bone."""
    ds = pydicom.dcmread(seg_path)
    for item in ds.SegmentSequence:
        item.SegmentLabel = labels[int(item.SegmentNumber)]
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        if drop_codes:
            del prop.SegmentedPropertyTypeModifierCodeSequence
        if int(item.SegmentNumber) == bone:
            prop.CodeValue, prop.CodeMeaning = codes.SCT.Bone.value, codes.SCT.Bone.meaning
    ds.save_as(seg_path)


def test_dicom_studies_give_nerve_slices_of_both_sides_and_report_the_matched_segments(dicom_set):
    assert len(dicom_set) > 50
    assert dicom_set.images.shape[1:] == (SIZE, SIZE) and dicom_set.images.dtype == np.uint8
    assert dicom_set.masks.reshape(len(dicom_set), -1).any(axis=1).all()
    assert {(m.patient, m.side) for m in dicom_set.metas} == {
        (p, s) for p in set(dicom_set.patients) for s in ("right", "left")}
    keys = [(m.patient, m.side, m.slice) for m in dicom_set.metas]
    assert keys == sorted(keys)
    used = [s for s in dicom_set.report.sources if s.status == "used"]
    assert len(used) == 2 and all("-> right (laterality code SCT 24028007)" in s.detail and
                                  "-> left (laterality code SCT 7771000)" in s.detail for s in used)


def test_samples_are_the_nodes_coronal_side_slices_through_the_slice_transform(studies, dicom_set):
    study = _patient_dirs(studies)[0]
    files = sorted((study / "series").glob("*.dcm"))
    series = load_series(files)
    labels = read_segmentation_labels(pydicom.dcmread(study / "seg.dcm"), [pydicom.dcmread(f) for f in files])
    patient = str(series.frames[0].dataset.PatientID)
    stack = side_stacks(series)[Side.LEFT]
    nerve = (labels.reshape(-1)[stack.source_index] == Side.LEFT.label).reshape(len(stack.slices), -1).any(axis=1)
    k = int(np.flatnonzero(nerve)[len(np.flatnonzero(nerve)) // 2])
    expected = image_to_model(stack.slices[k], plan_slice_transform(stack.slices.shape[1:], stack.pixel_spacing, SIZE))
    index = dicom_set.index_of()[(patient, "left", k)]
    np.testing.assert_array_equal(dicom_set.images[index], expected)


def test_masks_are_the_nodes_to_model_space_of_the_ground_truth(studies, dicom_set):
    study = _patient_dirs(studies)[0]
    files = sorted((study / "series").glob("*.dcm"))
    series = load_series(files)
    labels = read_segmentation_labels(pydicom.dcmread(study / "seg.dcm"), [pydicom.dcmread(f) for f in files])
    prepared = prepare(series, SIZE)
    gt = to_model_space(prepared, labels).astype(bool)
    patient = str(series.frames[0].dataset.PatientID)
    index, start = dicom_set.index_of(), 0
    for side in prepared.sides:
        n = len(side.images)
        for k in np.flatnonzero(gt[start : start + n].reshape(n, -1).any(axis=1)):
            np.testing.assert_array_equal(dicom_set.masks[index[(patient, side.stack.side.value, int(k))]], gt[start + k])
        start += n


def test_nifti_pairs_converted_from_the_series_give_identical_samples(studies, dicom_set, tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for study in _patient_dirs(studies):
        files = sorted((study / "series").glob("*.dcm"))
        series = load_series(files)
        labels = read_segmentation_labels(pydicom.dcmread(study / "seg.dcm"), [pydicom.dcmread(f) for f in files])
        case = str(series.frames[0].dataset.PatientID)
        nib.save(series.volume.to_nibabel(), tmp_path / "imagesTr" / f"{case}_0000.nii.gz")
        nib.save(series.volume.with_array(labels).to_nibabel(), tmp_path / "labelsTr" / f"{case}.nii.gz")
    nifti = load_dataset(tmp_path, "nifti", OPTIONS)
    assert nifti.metas == dicom_set.metas
    np.testing.assert_array_equal(nifti.images, dicom_set.images)
    np.testing.assert_array_equal(nifti.masks, dicom_set.masks)
    assert len(nifti.report.geometry) == len(dicom_set.report.geometry) == 4
    for a, b in zip(nifti.report.geometry, dicom_set.report.geometry, strict=True):
        assert (a.patient, a.side, a.slice_step) == (b.patient, b.side, b.slice_step)
        np.testing.assert_allclose([a.slice_mm, a.row_mm, a.col_mm], [b.slice_mm, b.row_mm, b.col_mm], rtol=1e-5)


def test_export_2d_command_writes_the_paper_form_that_reads_back_identically(studies, dicom_set, tmp_path):
    out = tmp_path / "paper2d"
    assert main(["export-2d", str(studies), str(out), "--format", "dicom", "--size", str(SIZE), "--crop", "half",
                 "--nerve-slices-only"]) == 0
    with (out / "samples.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(dicom_set) and set(rows[0]) == {"image", "mask", "patient", "side", "slice"}
    back = load_dataset(out, "2d", OPTIONS)
    assert back.metas == dicom_set.metas
    np.testing.assert_array_equal(back.images, dicom_set.images)
    np.testing.assert_array_equal(back.masks, dicom_set.masks)


def test_2d_images_of_another_size_go_through_the_slice_transform(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, (40, 80), dtype=np.uint8)
    mask = np.zeros((40, 80), np.uint8)
    mask[18:22, 30:36] = 255
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    (tmp_path / "samples.csv").write_text("image,mask,patient,side,slice\na.png,a_mask.png,P1,R,7\n")
    loaded = load_dataset(tmp_path, "2d", OPTIONS)
    t = plan_slice_transform((40, 80), (1.0, 1.0), SIZE)
    np.testing.assert_array_equal(loaded.images[0], image_to_model(image, t))
    assert loaded.metas[0].side == "right" and loaded.metas[0].slice == 7 and loaded.masks[0].sum() > 0


def test_slice_step_thins_the_nerve_slices(dicom_set, studies):
    thinned = load_dataset(studies, "dicom", replace(OPTIONS, slice_step=2))
    assert len(dicom_set) / 2 <= len(thinned) <= len(dicom_set) / 2 + 4
    assert {g.slice_step for g in thinned.report.geometry} == {2}
    assert [g.sample_mm for g in thinned.report.geometry] == [2 * g.slice_mm for g in dicom_set.report.geometry]


def test_each_side_records_its_slice_spacing_and_model_pixel_in_mm(studies, dicom_set, tmp_path):
    """The axial phantoms' coronal slices are one image row apart; a model pixel is the side crop's
    physically square extent over the model size."""
    geometry = dicom_set.report.geometry_of()
    assert set(geometry) == {(m.patient, m.side) for m in dicom_set.metas}
    for study in _patient_dirs(studies):
        series = load_series(sorted((study / "series").glob("*.dcm")))
        patient = str(series.frames[0].dataset.PatientID)
        row_spacing = float(series.frames[0].dataset.PixelSpacing[0])  # axial rows run A→P
        for side, stack in side_stacks(series).items():
            g = geometry[(patient, side.value)]
            (h, w), (r, c) = stack.slices.shape[1:], stack.pixel_spacing
            assert g.slice_mm == pytest.approx(row_spacing) and g.slice_step == 1
            assert g.row_mm == pytest.approx(max(h * r, w * c) / SIZE, rel=0.03)
            assert g.col_mm == pytest.approx(g.row_mm, rel=0.03)
    path = save_slice_set(dicom_set, tmp_path / "samples.npz")
    assert load_slice_set(path)[0].report.geometry == dicom_set.report.geometry


def test_the_paper_2d_form_records_no_geometry(dicom_set, tmp_path):
    export_2d(dicom_set, tmp_path / "paper2d")
    assert load_dataset(tmp_path / "paper2d", "2d", OPTIONS).report.geometry == ()


def test_nifti_pairs_have_no_landmarks_so_the_oracle_crop_is_the_nerve_margins(studies, tmp_path):
    study = _patient_dirs(studies)[0]
    files = sorted((study / "series").glob("*.dcm"))
    series = load_series(files)
    labels = read_segmentation_labels(pydicom.dcmread(study / "seg.dcm"), [pydicom.dcmread(f) for f in files])
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    nib.save(series.volume.to_nibabel(), tmp_path / "imagesTr" / "P1_0000.nii.gz")
    nib.save(series.volume.with_array(labels).to_nibabel(), tmp_path / "labelsTr" / "P1.nii.gz")
    loaded = load_dataset(tmp_path, "nifti", LoadOptions(size=SIZE))
    assert loaded.report.crop == {"region": "nerve-margins", "trained_with": "oracle", "samples": "all"}
    assert "oracle crop from the nerve margins" in loaded.report.sources[0].detail


def test_seg_referencing_a_missing_series_is_refused_naming_the_seg(studies, tmp_path):
    first, second = _patient_dirs(studies)
    _copy_study(first, tmp_path / "a")
    (tmp_path / "b").mkdir()
    shutil.copy(second / "seg.dcm", tmp_path / "b" / "seg.dcm")
    with pytest.raises(MissingSeriesError, match=r"b/seg\.dcm: references series .* not among the 1 image series"):
        load_dataset(tmp_path, "dicom", OPTIONS)


def test_bad_study_is_skipped_and_reported_only_with_skip_bad(studies, tmp_path):
    first, second = _patient_dirs(studies)
    _copy_study(first, tmp_path / "a")
    (tmp_path / "b").mkdir()
    shutil.copy(second / "seg.dcm", tmp_path / "b" / "seg.dcm")
    loaded = load_dataset(tmp_path, "dicom", replace(OPTIONS, skip_bad=True))
    assert len(set(loaded.patients)) == 1
    (skipped,) = loaded.report.skipped
    assert skipped.source.endswith("b/seg.dcm") and "not among" in skipped.detail
    assert loaded.report.to_dict()["n_skipped"] == 1


def test_segment_without_side_is_refused_unless_split_by_position(studies, tmp_path):
    study = _copy_study(_patient_dirs(studies)[0], tmp_path / "a")
    _edit_segments(study / "seg.dcm", {1: "Segment_1", 2: "Segment_2"}, drop_codes=True)
    with pytest.raises(UnmatchedSegmentError, match=r"a/seg\.dcm: segment 1 \('Segment_1'\) has no single side"):
        load_dataset(tmp_path, "dicom", OPTIONS)
    split = load_dataset(tmp_path, "dicom", replace(OPTIONS, unsided="split"))
    assert {m.side for m in split.metas} == {"right", "left"}
    assert "both sides by position" in split.report.sources[0].detail


def test_label_text_tells_the_sides_apart_when_codes_are_absent(studies, dicom_set, tmp_path):
    study = _copy_study(_patient_dirs(studies)[0], tmp_path / "a")
    _edit_segments(study / "seg.dcm", {1: "IAN_R", 2: "left IAN"}, drop_codes=True)
    loaded = load_dataset(tmp_path, "dicom", OPTIONS)
    detail = loaded.report.sources[0].detail
    assert "'IAN_R' -> right (label text)" in detail and "'left IAN' -> left (label text)" in detail
    patient = loaded.metas[0].patient
    reference = [i for i, m in enumerate(dicom_set.metas) if m.patient == patient]
    np.testing.assert_array_equal(loaded.masks, dicom_set.masks[reference])


def test_non_nerve_segment_is_ignored_and_reported(studies, tmp_path):
    study = _copy_study(_patient_dirs(studies)[0], tmp_path / "a")
    _edit_segments(study / "seg.dcm", {1: "Inferior alveolar nerve, right", 2: "Mandible"}, drop_codes=True, bone=2)
    loaded = load_dataset(tmp_path, "dicom", OPTIONS)
    assert {m.side for m in loaded.metas} == {"right"}
    assert "'Mandible' -> ignored (not a nerve label)" in loaded.report.sources[0].detail


def test_empty_nifti_label_is_refused_naming_the_file(studies, tmp_path):
    study = _patient_dirs(studies)[0]
    series = load_series(sorted((study / "series").glob("*.dcm")))
    (tmp_path / "v").mkdir()
    nib.save(series.volume.to_nibabel(), tmp_path / "v" / "img.nii.gz")
    nib.save(series.volume.with_array(np.zeros(series.shape, np.uint8)).to_nibabel(), tmp_path / "v" / "lab.nii.gz")
    (tmp_path / "pairs.csv").write_text("image,label,patient\nv/img.nii.gz,v/lab.nii.gz,P7\n")
    with pytest.raises(EmptyMaskError, match=r"v/lab\.nii\.gz: the label volume is empty"):
        load_dataset(tmp_path, "nifti", OPTIONS)


def test_empty_2d_mask_is_refused_naming_the_file_when_only_nerve_slices_are_asked_for(tmp_path):
    Image.fromarray(np.full((SIZE, SIZE), 90, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "m.png")
    (tmp_path / "samples.csv").write_text("image,mask,patient,side,slice\na.png,m.png,P1,left,0\n")
    with pytest.raises(EmptyMaskError, match=r"m\.png: mask is empty"):
        load_dataset(tmp_path, "2d", OPTIONS)


def test_empty_2d_mask_is_kept_when_every_slice_is_a_sample(tmp_path):
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "m.png")
    Image.fromarray(np.full((SIZE, SIZE), 9, np.uint8)).save(tmp_path / "i.png")
    (tmp_path / "samples.csv").write_text("image,mask,patient,side,slice\ni.png,m.png,P1,L,3\n")
    loaded = load_dataset(tmp_path, "2d", LoadOptions(size=SIZE))
    assert len(loaded) == 1 and not loaded.masks.any()
    assert loaded.report.crop == {"region": "landmarks", "trained_with": "oracle", "samples": "all"}


def test_export_2d_refuses_a_non_empty_folder(dicom_set, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        export_2d(dicom_set, tmp_path)


def test_empty_dicom_segment_is_refused_naming_the_file_and_segment(studies, tmp_path):
    study = _copy_study(_patient_dirs(studies)[0], tmp_path / "a")
    sources = [pydicom.dcmread(f) for f in sorted((study / "series").glob("*.dcm"))]
    labels = read_segmentation_labels(pydicom.dcmread(study / "seg.dcm"), sources)
    labels[labels == 2] = 0
    build_segmentation(sources, labels, algorithm=None, series_number=99,
                       series_description="right only").save_as(study / "seg.dcm")
    with pytest.raises(EmptyMaskError, match=r"a/seg\.dcm: segment 2 \('Inferior alveolar nerve, left'\) has no voxel"):
        load_dataset(tmp_path, "dicom", OPTIONS)
