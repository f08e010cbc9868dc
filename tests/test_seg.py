"""The IAN DICOM Segmentation: coding, references, empty frames, alignment with the source, read-back."""

from __future__ import annotations

import random

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from scipy.spatial import cKDTree

from ian_node.phantom.study import Phantom, PhantomConfig, generate_phantom, phantom_datasets, write_phantom
from ian_node.segment.pipeline import PipelineResult
from ian_node.segment.result import result_segmentation
from ian_node.segment.seg import (
    AlgorithmInfo,
    EmptySegments,
    NoSegmentsError,
    SegmentationSourceError,
    build_segmentation,
    read_segmentation_labels,
)
from ian_node.segment.volume import Side, load_series
from model.checkpoint import BUNDLED_CHECKPOINT, load_checkpoint
from tests.tools import dciodvfy_errors

CONFIG = PhantomConfig(shape=(24, 96, 96), oblique_probability=1.0, max_oblique_deg=10.0)
AI = AlgorithmInfo(name="IANNet", version="0.1.0", checkpoint_hash="sha256:" + "ab" * 32)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return generate_phantom(1, 77, CONFIG)


@pytest.fixture(scope="module")
def source(phantom: Phantom) -> list[pydicom.Dataset]:
    return phantom_datasets(phantom)


def _lps_of_labels(volume: hd.Volume, labels: np.ndarray, value: int) -> np.ndarray:
    idx = np.argwhere(labels == value).astype(np.float64)
    affine = np.asarray(volume.affine)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def test_ground_truth_seg_file_reads_back_voxel_for_voxel(phantom: Phantom, tmp_path):
    files = write_phantom(phantom, tmp_path)
    source = [pydicom.dcmread(p) for p in files.instances]
    labels = read_segmentation_labels(pydicom.dcmread(files.seg), source)
    assert labels.dtype == np.uint8
    assert np.array_equal(labels, phantom.labels)


def test_seg_voxels_land_on_the_phantom_label_positions_in_patient_space(phantom: Phantom, source):
    """Independent of our reader: highdicom's own SEG volume, compared in LPS millimetres."""
    seg = build_segmentation(source, phantom.labels, algorithm=None, series_number=99, series_description="GT")
    for value in (1, 2):
        seg_vol = seg.get_volume(segment_numbers=[value], combine_segments=True, relabel=False)
        got = _lps_of_labels(seg_vol, np.asarray(seg_vol.array), value)
        want = _lps_of_labels(phantom.volume, phantom.labels, value)
        assert got.shape == want.shape and len(got) > 100
        distance, nearest = cKDTree(want).query(got)
        assert distance.max() < 0.01  # mm
        assert len(set(nearest.tolist())) == len(want)  # one to one


def test_segments_are_coded_as_right_and_left_peripheral_nerve(phantom: Phantom, source):
    seg = build_segmentation(source, phantom.labels, algorithm=None, series_number=99, series_description="GT")
    by_number = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert set(by_number) == {1, 2}
    for number, label, laterality in ((1, "right", "24028007"), (2, "left", "7771000")):
        item = by_number[number]
        assert item.SegmentLabel == f"Inferior alveolar nerve, {label}"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("84782009", "SCT")
        assert prop.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == laterality
        assert item.SegmentAlgorithmType == "MANUAL"
    assert seg.SegmentationType == "BINARY"


def test_automatic_seg_identifies_the_ai_algorithm_and_its_checkpoint(phantom: Phantom, source):
    seg = build_segmentation(source, phantom.labels, algorithm=AI, series_number=300,
                             series_description="IAN AI")
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        ident = item.SegmentationAlgorithmIdentificationSequence[0]
        assert ident.AlgorithmName == "IANNet" and ident.AlgorithmVersion == "0.1.0"
        family = ident.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
        assert AI.checkpoint_hash in ident.AlgorithmParameters


def test_seg_references_every_source_instance_in_its_own_series(phantom: Phantom, source):
    seg = build_segmentation(source, phantom.labels, algorithm=AI, series_number=300,
                             series_description="IAN AI")
    referenced = {item.ReferencedSOPInstanceUID
                  for series in seg.ReferencedSeriesSequence for item in series.ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in source}
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.SeriesInstanceUID != source[0].SeriesInstanceUID
    assert (seg.SeriesNumber, seg.SeriesDescription) == (300, "IAN AI")
    assert seg.SeriesInstanceUID.startswith("2.25.") and seg.SOPInstanceUID.startswith("2.25.")
    assert seg.DimensionOrganizationSequence[0].DimensionOrganizationUID.startswith("2.25.")


def test_organisation_uid_root_is_used_when_given(phantom: Phantom, source):
    seg = build_segmentation(source, phantom.labels, algorithm=None, series_number=99,
                             series_description="GT", uid_prefix="1.2.826.0.1.99.")
    assert seg.SeriesInstanceUID.startswith("1.2.826.0.1.99.")
    assert seg.SOPInstanceUID.startswith("1.2.826.0.1.99.")


def test_empty_frames_are_omitted(phantom: Phantom, source):
    seg = build_segmentation(source, phantom.labels, algorithm=None, series_number=99, series_description="GT")
    occupied = sum(int(np.any(phantom.labels[k] == v)) for k in range(phantom.labels.shape[0]) for v in (1, 2))
    assert int(seg.NumberOfFrames) == occupied < 2 * phantom.labels.shape[0]


def test_one_empty_side_keeps_both_segments_and_reads_back(phantom: Phantom, source):
    right_only = np.where(phantom.labels == 1, 1, 0).astype(np.uint8)
    seg = build_segmentation(source, right_only, algorithm=AI, series_number=300, series_description="AI")
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2]
    assert np.array_equal(read_segmentation_labels(seg, source), right_only)


def test_all_empty_labels_still_make_a_seg_that_reads_back_empty(phantom: Phantom, source):
    empty = np.zeros_like(phantom.labels)
    seg = build_segmentation(source, empty, algorithm=AI, series_number=300, series_description="AI")
    assert int(seg.NumberOfFrames) > 0
    assert not read_segmentation_labels(seg, source).any()


def test_source_order_does_not_matter(phantom: Phantom, source):
    shuffled = list(source)
    random.Random(4).shuffle(shuffled)
    seg = build_segmentation(shuffled, phantom.labels, algorithm=None, series_number=99, series_description="GT")
    assert np.array_equal(read_segmentation_labels(seg, list(reversed(source))), phantom.labels)


def test_multiframe_source_round_trips_in_highdicom_volume_order(phantom: Phantom, source):
    shuffled = list(source)
    random.Random(5).shuffle(shuffled)
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        shuffled, series_instance_uid=generate_uid(prefix=None), series_number=7,
        sop_instance_uid=generate_uid(prefix=None), instance_number=1)
    volume = hd.Image.from_dataset(enhanced).get_volume()
    assert np.array_equal(volume.array, phantom.volume.array)  # same voxel order as the phantom's labels
    seg = build_segmentation([enhanced], phantom.labels, algorithm=AI, series_number=300,
                             series_description="AI")
    assert np.array_equal(read_segmentation_labels(seg, [enhanced]), phantom.labels)


def test_rejects_labels_of_the_wrong_shape(phantom: Phantom, source):
    with pytest.raises(SegmentationSourceError, match="shape"):
        build_segmentation(source, phantom.labels[1:], algorithm=None, series_number=99, series_description="GT")


def test_rejects_label_values_other_than_right_and_left(phantom: Phantom, source):
    bad = phantom.labels.copy()
    bad[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"\[3\]"):
        build_segmentation(source, bad, algorithm=None, series_number=99, series_description="GT")


def test_rejects_float_labels(phantom: Phantom, source):
    with pytest.raises(TypeError, match="integer"):
        build_segmentation(source, phantom.labels.astype(np.float32), algorithm=None, series_number=99,
                           series_description="GT")


def test_rejects_sources_from_two_series(phantom: Phantom, source):
    other = generate_phantom(2, 77, CONFIG)
    mixed = source[:-1] + phantom_datasets(other)[-1:]
    with pytest.raises(SegmentationSourceError, match="2 series"):
        build_segmentation(mixed, phantom.labels, algorithm=None, series_number=99, series_description="GT")


def test_reading_a_seg_against_another_series_is_refused(phantom: Phantom, source):
    seg = build_segmentation(source, phantom.labels, algorithm=None, series_number=99, series_description="GT")
    other = phantom_datasets(phantom)
    for ds in other:  # same geometry and frame of reference, but other instances
        ds.SOPInstanceUID = generate_uid(prefix=None)
    with pytest.raises(SegmentationSourceError, match="references none"):
        read_segmentation_labels(seg, other)


def test_algorithm_info_requires_a_checkpoint_hash():
    with pytest.raises(ValueError, match="checkpoint_hash"):
        AlgorithmInfo(name="IANNet", version="1", checkpoint_hash="")


def test_the_result_seg_of_a_series_version_has_the_same_uids_every_time_it_is_rebuilt(phantom: Phantom, source):
    checkpoint = load_checkpoint(BUNDLED_CHECKPOINT)
    result = PipelineResult(series=load_series(source), labels=phantom.labels)
    first, again = (result_segmentation(result, 1, checkpoint) for _ in range(2))
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    other_version = result_segmentation(result, 2, checkpoint)
    assert other_version.SOPInstanceUID != first.SOPInstanceUID
    assert other_version.SeriesInstanceUID != first.SeriesInstanceUID
    assert str(first.SOPInstanceUID).startswith("2.25.")


# ------------------------------------------------------------ viewer compatibility (issue 18)
def _enhanced(source: list[pydicom.Dataset]) -> pydicom.Dataset:
    return hd.legacy.LegacyConvertedEnhancedMRImage(
        source, series_instance_uid=generate_uid(prefix=None), series_number=7,
        sop_instance_uid=generate_uid(prefix=None), instance_number=1)


def _frames_of(seg: pydicom.Dataset, number: int) -> list[int]:
    return [i for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence)
            if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == number]


def _written(seg: pydicom.Dataset, folder) -> pydicom.Dataset:
    path = folder / "seg.dcm"
    pydicom.dcmwrite(path, seg, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    return pydicom.dcmread(path)


@pytest.mark.parametrize("form", ["single-frame", "enhanced"])
def test_referenced_series_sequence_names_the_source_series_and_every_instance(phantom: Phantom, source, form):
    images = source if form == "single-frame" else [_enhanced(source)]
    seg = build_segmentation(images, phantom.labels, algorithm=AI, series_number=300, series_description="AI")
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == images[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in images}


def test_an_empty_side_keeps_its_segment_with_one_all_zero_frame(phantom: Phantom, source, tmp_path):
    right_only = np.where(phantom.labels == 1, 1, 0).astype(np.uint8)
    seg = build_segmentation(source, right_only, algorithm=AI, series_number=300, series_description="AI")
    assert (seg.empty_sides, seg.omitted_sides) == ((Side.LEFT,), ())
    assert seg.SegmentsOverlap == "NO"
    back = _written(seg, tmp_path)
    (frame,) = _frames_of(back, 2)
    pixels = hd.seg.Segmentation.from_dataset(back).pixel_array
    assert not pixels[frame].any()
    assert len(_frames_of(back, 1)) == sum(int(k.any()) for k in right_only)
    assert np.array_equal(read_segmentation_labels(back, source), right_only)


def test_both_sides_empty_give_one_all_zero_frame_each(phantom: Phantom, source, tmp_path):
    seg = build_segmentation(source, np.zeros_like(phantom.labels), algorithm=AI, series_number=300,
                             series_description="AI")
    assert seg.empty_sides == (Side.RIGHT, Side.LEFT)
    back = _written(seg, tmp_path)
    assert (len(_frames_of(back, 1)), len(_frames_of(back, 2))) == (1, 1)
    assert not read_segmentation_labels(back, source).any()


def test_an_omitted_empty_side_is_reported_and_the_other_side_reads_back_as_itself(phantom: Phantom, source,
                                                                                   tmp_path):
    left_only = np.where(phantom.labels == 2, 2, 0).astype(np.uint8)
    seg = build_segmentation(source, left_only, algorithm=AI, series_number=300, series_description="AI",
                             empty_segments="omit")
    assert (seg.empty_sides, seg.omitted_sides) == ((Side.RIGHT,), (Side.RIGHT,))
    back = _written(seg, tmp_path)
    (segment,) = back.SegmentSequence
    assert (int(segment.SegmentNumber), segment.SegmentLabel) == (1, "Inferior alveolar nerve, left")
    assert np.array_equal(read_segmentation_labels(back, source), left_only)


def test_omitting_both_empty_sides_leaves_no_seg_to_make(phantom: Phantom, source):
    with pytest.raises(NoSegmentsError, match="every segment is empty"):
        build_segmentation(source, np.zeros_like(phantom.labels), algorithm=AI, series_number=300,
                           series_description="AI", empty_segments=EmptySegments.OMIT)


def test_an_unknown_empty_segment_policy_is_refused(phantom: Phantom, source):
    with pytest.raises(ValueError, match="drop"):
        build_segmentation(source, phantom.labels, algorithm=AI, series_number=300, series_description="AI",
                           empty_segments="drop")


@pytest.mark.parametrize("form", ["single-frame", "enhanced"])
def test_empty_frames_can_be_kept_for_every_segment(phantom: Phantom, source, tmp_path, form):
    images = source if form == "single-frame" else [_enhanced(source)]
    right_only = np.where(phantom.labels == 1, 1, 0).astype(np.uint8)
    seg = build_segmentation(images, right_only, algorithm=AI, series_number=300, series_description="AI",
                             omit_empty_frames=False)
    back = _written(seg, tmp_path)
    assert int(back.NumberOfFrames) == 2 * phantom.labels.shape[0]
    assert len(_frames_of(back, 2)) == phantom.labels.shape[0]
    assert np.array_equal(read_segmentation_labels(back, images), right_only)


def test_an_enhanced_source_with_an_empty_side_passes_dciodvfy_and_reads_back(phantom: Phantom, source, tmp_path):
    enhanced = _enhanced(source)
    left_only = np.where(phantom.labels == 2, 2, 0).astype(np.uint8)
    seg = build_segmentation([enhanced], left_only, algorithm=AI, series_number=300, series_description="AI")
    back = _written(seg, tmp_path)
    assert len(_frames_of(back, 1)) == 1
    assert np.array_equal(read_segmentation_labels(back, [enhanced]), left_only)
