"""Series → volume: geometry from positions, enhanced multi-frame, refusals, side crops, reformat."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from scipy.spatial.transform import Rotation

from ian_node.phantom.mr_series import SeriesInfo, StudyInfo, build_mr_series
from ian_node.segment.reformat import PatientBox, RoiError, coronal_stack, default_rois, side_stacks, stack_to_volume
from ian_node.segment.volume import (
    DuplicatePositionError,
    FrameOfReferenceError,
    IrregularSpacingError,
    MissingGeometryError,
    MissingPositionError,
    MixedOrientationError,
    MixedSeriesError,
    MixedSizeError,
    NonImageSOPClassError,
    NoPixelDataError,
    SeriesError,
    SeriesGeometryError,
    Side,
    SingleSliceError,
    SkewedStackError,
    UnreadableInstanceError,
    load_series,
)

STUDY = StudyInfo(patient_id="GEO-1", patient_name="Geometry^Test")
#: Axial acquisition: slices along +z (H), rows along +y (P), columns along +x (L).
AXIAL = np.array([[0, 0, 0.5, -10], [0, 0.6, 0, 5], [1.2, 0, 0, 20], [0, 0, 0, 1.0]])


def make_volume(shape: tuple[int, int, int], affine: np.ndarray, seed: int = 0) -> hd.Volume:
    array = np.random.default_rng(seed).integers(0, 4000, shape).astype(np.uint16)
    return hd.Volume(array, affine, coordinate_system="PATIENT", frame_of_reference_uid=STUDY.frame_of_reference_uid)


def make_series(shape=(5, 8, 6), affine=AXIAL, seed: int = 0, series_uid: str | None = None) -> list[Dataset]:
    info = SeriesInfo(series_uid=series_uid) if series_uid else SeriesInfo()
    return build_mr_series(make_volume(shape, affine, seed), STUDY, info)


def oblique_affine(angles=(20, 35, -50), spacing=(1.2, 0.6, 0.5), origin=(3, 4, 5), flip=False) -> np.ndarray:
    affine = np.eye(4)
    rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    affine[:3, :3] = rot @ np.diag(spacing) @ (np.diag([-1, 1, 1]) if flip else np.eye(3))
    affine[:3, 3] = origin
    return affine


def values_at_source_positions(loaded: hd.Volume, source: hd.Volume) -> np.ndarray:
    """The source volume's values resampled (exactly, by index) onto the loaded volume's voxels."""
    idx = np.indices(loaded.spatial_shape).reshape(3, -1).T
    src = source.map_reference_to_indices(loaded.map_indices_to_reference(idx), round_output=True)
    return source.array[tuple(src.T)].reshape(loaded.spatial_shape)


# ---------------------------------------------------------------- loading
@pytest.mark.parametrize("affine", [AXIAL, oblique_affine(), oblique_affine(flip=True)],
                         ids=["axial", "oblique", "oblique-left-handed"])
def test_shuffled_series_loads_every_voxel_at_its_source_position(affine: np.ndarray) -> None:
    vol = make_volume((6, 9, 7), affine)
    datasets = build_mr_series(vol, STUDY)
    shuffled = [datasets[i] for i in np.random.default_rng(1).permutation(len(datasets))]
    sv = load_series(shuffled)
    assert sv.volume.array.dtype == np.float32
    np.testing.assert_array_equal(sv.volume.array, values_at_source_positions(sv.volume, vol))


def test_each_slice_records_the_instance_it_came_from() -> None:
    sv = load_series(make_series()[::-1])
    for k, frame in enumerate(sv.frames):
        position = sv.volume.map_indices_to_reference(np.array([[k, 0, 0]]))[0]
        np.testing.assert_allclose(position, [float(v) for v in frame.dataset.ImagePositionPatient], atol=1e-4)
        assert frame.frame_number == 1


def test_slice_spacing_comes_from_positions_not_slice_thickness() -> None:
    datasets = make_series()
    for ds in datasets:
        ds.SliceThickness = "5"
        ds.SpacingBetweenSlices = "5"
    assert load_series(datasets).volume.spacing_between_slices == pytest.approx(1.2)


def test_files_on_disk_load_like_datasets(tmp_path: Path) -> None:
    datasets = make_series()
    paths = []
    for i, ds in enumerate(datasets):
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    np.testing.assert_array_equal(load_series(paths).volume.array, load_series(datasets).volume.array)


def test_enhanced_multiframe_mr_loads_with_the_same_geometry_and_frame_numbers() -> None:
    vol = make_volume((6, 9, 7), oblique_affine())
    datasets = build_mr_series(vol, STUDY)
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        datasets, series_instance_uid=generate_uid(prefix=None), series_number=2,
        sop_instance_uid=generate_uid(prefix=None), instance_number=1,
    )
    single, multi = load_series(datasets), load_series([enhanced])
    np.testing.assert_allclose(multi.volume.affine, single.volume.affine, atol=1e-5)
    np.testing.assert_array_equal(multi.volume.array, single.volume.array)
    assert all(f.dataset is enhanced for f in multi.frames)
    # frame k of the enhanced instance is the k-th source instance: check by position
    for k, frame in enumerate(multi.frames):
        group = enhanced.PerFrameFunctionalGroupsSequence[frame.frame_number - 1]
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, multi.volume.map_indices_to_reference(np.array([[k, 0, 0]]))[0], atol=1e-4)


# ---------------------------------------------------------------- refusals
def _segmentation(datasets: list[Dataset]) -> Dataset:
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Inferior alveolar nerve, right",
        segmented_property_category=codes.SCT.BodyStructure, segmented_property_type=codes.SCT.PeripheralNerve,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    mask = np.zeros((len(datasets), datasets[0].Rows, datasets[0].Columns), dtype=bool)
    mask[:, 2, 2] = True
    return hd.seg.Segmentation(
        source_images=datasets, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=generate_uid(prefix=None), series_number=9,
        sop_instance_uid=generate_uid(prefix=None), instance_number=1, manufacturer="test",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0",
    )


def _moved(ds: Dataset, delta) -> Dataset:
    out = copy.deepcopy(ds)
    out.SOPInstanceUID = generate_uid(prefix=None)
    out.ImagePositionPatient = [f"{float(v) + d:.6f}" for v, d in zip(ds.ImagePositionPatient, delta, strict=True)]
    return out


def _with(ds: Dataset, **changes) -> Dataset:
    out = copy.deepcopy(ds)
    for key, value in changes.items():
        if value is None:
            delattr(out, key)
        else:
            setattr(out, key, value)
    return out


def _other_shape(d: list[Dataset]) -> list[Dataset]:
    wider = make_series(shape=(5, 8, 7), series_uid=d[0].SeriesInstanceUID)
    return d[:3] + [wider[3]]


def _other_spacing(d: list[Dataset]) -> list[Dataset]:
    finer = AXIAL.copy()
    finer[0, 2] = 0.45
    return d[:3] + [make_series(affine=finer, series_uid=d[0].SeriesInstanceUID)[3]]


REFUSALS: dict[str, tuple[Callable[[list[Dataset]], list], type[SeriesError], str]] = {
    "mixed orientation": (lambda d: d[:3] + [_with(d[3], ImageOrientationPatient=[0, 1, 0, 1, 0, 0])],
                          MixedOrientationError, "orientation"),
    "mixed matrix size": (_other_shape, MixedSizeError, "8x7"),
    "mixed pixel spacing": (_other_spacing, MixedSizeError, "pixel spacing"),
    "duplicate position": (lambda d: d + [_moved(d[2], (0, 0, 0))], DuplicatePositionError, "both at"),
    "missing position": (lambda d: d[:2] + d[3:], MissingPositionError, "1 slice position"),
    "irregular spacing": (lambda d: d[:2] + [_moved(d[2], (0, 0, 0.4))] + d[3:], IrregularSpacingError, "varies"),
    "sheared stack": (lambda d: [_moved(ds, (0.3 * i, 0, 0)) for i, ds in enumerate(d)], SkewedStackError, "normal"),
    "single slice": (lambda d: d[:1], SingleSliceError, "1 slice"),
    "no pixel data": (lambda d: d[:2] + [_with(d[2], PixelData=None)] + d[3:], NoPixelDataError, "no pixel data"),
    "segmentation in the list": (lambda d: d + [_segmentation(d)], NonImageSOPClassError, "Segmentation Storage"),
    "two series": (lambda d: d + make_series(series_uid="1.2.826.0.1.3680043.2.1125.99"), MixedSeriesError, "2 series"),
    "frame of reference": (lambda d: d[:4] + [_with(d[4], FrameOfReferenceUID="1.2.3.4")],
                           FrameOfReferenceError, "FrameOfReferenceUID"),
    "skewed orientation": (lambda d: [_with(ds, ImageOrientationPatient=[1, 0, 0, 0.5, 0.5, 0]) for ds in d],
                           SeriesGeometryError, "orthogonal unit vectors"),
    "no position": (lambda d: d[:1] + [_with(d[1], ImagePositionPatient=None)] + d[2:],
                    MissingGeometryError, "ImagePositionPatient"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_series_is_refused_with_its_specific_error_naming_the_series(case: str) -> None:
    build, error, words = REFUSALS[case]
    datasets = make_series()
    with pytest.raises(error, match=words) as info:
        load_series(build(datasets))
    assert str(info.value).startswith(f"series {datasets[0].SeriesInstanceUID}:")
    assert isinstance(info.value, ValueError)


def test_geometry_refusals_share_one_base_class_and_content_refusals_do_not() -> None:
    geometric = [MixedOrientationError, MixedSizeError, DuplicatePositionError, MissingPositionError,
                 IrregularSpacingError, SkewedStackError, SingleSliceError, FrameOfReferenceError, MissingGeometryError]
    assert all(issubclass(e, SeriesGeometryError) for e in geometric)
    content = (NoPixelDataError, NonImageSOPClassError, MixedSeriesError)
    assert not any(issubclass(e, SeriesGeometryError) for e in content)


def test_a_file_that_is_not_dicom_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not dicom")
    with pytest.raises(UnreadableInstanceError, match="notes.txt"):
        load_series([path])


# ---------------------------------------------------------------- sides and the coronal reformat
def test_default_regions_split_the_extent_in_x_with_patient_right_at_lower_x() -> None:
    sv = load_series(make_series())  # columns: x from -10 to -7.5 mm at 0.5 mm
    rois = default_rois(sv)
    assert (rois[Side.RIGHT].x_min, rois[Side.RIGHT].x_max) == pytest.approx((-10.25, -8.75))
    assert (rois[Side.LEFT].x_min, rois[Side.LEFT].x_max) == pytest.approx((-8.75, -7.25))
    assert (rois[Side.LEFT].z_min, rois[Side.LEFT].z_max) == pytest.approx((19.4, 25.4))


def test_axial_series_gives_coronal_slices_with_slice_spacing_down_the_rows() -> None:
    sv = load_series(make_series(shape=(5, 8, 6)))
    stacks = side_stacks(sv)
    for stack in stacks.values():
        assert stack.slices.shape == (8, 5, 3)  # (y rows, z slices, half of x)
        assert stack.pixel_spacing == pytest.approx((1.2, 0.5))
        assert stack.slices.dtype == np.float32 and stack.source_index.dtype == np.int64
        np.testing.assert_array_equal(stack.slices, sv.volume.array.reshape(-1)[stack.source_index])


@pytest.mark.parametrize("affine", [AXIAL, oblique_affine(), oblique_affine((80, -10, 30), flip=True)],
                         ids=["axial", "oblique", "oblique-left-handed"])
def test_coronal_axes_run_posterior_inferior_and_lateral_to_medial_on_both_sides(affine: np.ndarray) -> None:
    sv = load_series(build_mr_series(make_volume((7, 10, 9), affine), STUDY))
    shape = sv.shape
    for side, stack in side_stacks(sv).items():
        idx = np.stack(np.unravel_index(stack.source_index, shape), axis=-1)
        lps = sv.volume.map_indices_to_reference(idx.reshape(-1, 3)).reshape(*idx.shape)
        along_slices = np.diff(lps, axis=0).mean(axis=(0, 1, 2))
        down_rows = np.diff(lps, axis=1).mean(axis=(0, 1, 2))
        across = np.diff(lps, axis=2).mean(axis=(0, 1, 2))
        assert np.argmax(np.abs(along_slices)) == 1 and along_slices[1] > 0  # +y: posterior
        assert np.argmax(np.abs(down_rows)) == 2 and down_rows[2] < 0  # -z: inferior
        medial = 1 if side is Side.RIGHT else -1  # right side: medial is +x; left side: medial is -x
        assert np.argmax(np.abs(across)) == 0 and across[0] * medial > 0


def test_custom_region_selects_exactly_the_voxels_whose_centres_are_inside() -> None:
    sv = load_series(make_series(shape=(5, 8, 6)))  # x = -10 + 0.5 c, y = 5 + 0.6 r, z = 20 + 1.2 s
    roi = PatientBox(x_min=-9.6, x_max=-8.4, y_min=6.0, y_max=7.5, z_min=21.0, z_max=24.0)
    stack = coronal_stack(sv, Side.RIGHT, roi)
    s, r, c = np.unravel_index(stack.source_index, sv.shape)
    assert sorted(set(c.ravel())) == [1, 2, 3] and sorted(set(r.ravel())) == [2, 3, 4]
    assert sorted(set(s.ravel())) == [1, 2, 3] and stack.inside.all()


def test_region_outside_the_volume_is_refused() -> None:
    sv = load_series(make_series())
    with pytest.raises(RoiError, match="left region of interest"):
        coronal_stack(sv, "left", PatientBox(x_min=100.0, x_max=200.0))


def test_overlapping_regions_cannot_both_write_back() -> None:
    sv = load_series(make_series())
    right = coronal_stack(sv, Side.RIGHT, PatientBox())
    left = coronal_stack(sv, Side.LEFT, PatientBox())
    with pytest.raises(RoiError, match="overlaps"):
        stack_to_volume([right, left], [np.ones(right.slices.shape), np.ones(left.slices.shape)], sv)


def test_masks_write_back_with_label_one_right_and_two_left() -> None:
    sv = load_series(make_series())
    stacks = side_stacks(sv)
    labels = stack_to_volume(list(stacks.values()), [np.ones(s.slices.shape, bool) for s in stacks.values()], sv)
    assert labels.dtype == np.uint8
    assert (labels[:, :, :3] == 1).all() and (labels[:, :, 3:] == 2).all()  # columns run R→L (+x)


def test_a_stack_cannot_go_back_into_another_series() -> None:
    sv, other = load_series(make_series()), load_series(make_series())
    stack = coronal_stack(sv, Side.RIGHT)
    with pytest.raises(ValueError, match="cannot go back"):
        stack_to_volume([stack], [np.zeros(stack.slices.shape, bool)], other)
