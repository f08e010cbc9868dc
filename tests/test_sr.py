"""The TID 1500 measurement report (ian_node.segment.sr): valid, readable, faithful to the phantom truth."""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from ian_node.phantom.study import (
    Phantom,
    generate_phantom,
    ground_truth_segmentation,
    phantom_datasets,
    phantom_preset,
)
from ian_node.segment.measure import TractMeasurements, measure_labels
from ian_node.segment.qa import SideQA, Verdict
from ian_node.segment.seg import build_segmentation
from ian_node.segment.sr import REGION_MODIFIERS, MeasurementReportError, build_measurement_report
from ian_node.segment.volume import SeriesVolume, load_series
from tests.tools import dciodvfy_errors


@dataclass(frozen=True)
class Study:
    phantom: Phantom
    datasets: list[pydicom.Dataset]
    series: SeriesVolume
    seg: pydicom.Dataset
    measured: dict[str, TractMeasurements | None]


@pytest.fixture(scope="module")
def study() -> Study:
    phantom = generate_phantom(0, 3, phantom_preset("demo"))
    datasets = phantom_datasets(phantom)
    series = load_series(datasets)
    seg = ground_truth_segmentation(phantom, datasets)
    return Study(phantom, datasets, series, seg, measure_labels(phantom.labels, series.volume.affine))


def _qa(side: str, verdict: Verdict, *reasons: str) -> SideQA:
    return SideQA(side=side, verdict=verdict, reasons=reasons, gaps=0, longest_gap_mm=0.0, components=1,
                  length_mm=60.0, mean_probability=0.8, localiser_confidence=None)


QA = (_qa("right", Verdict.PASS), _qa("left", Verdict.WARN, "gap of 6.2 mm in the body", "2 components"))


def _write(sr: pydicom.Dataset, tmp_path: Path) -> Path:
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def _groups(path: Path) -> dict[str, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    sr = hd.sr.srread(path)
    return {g.tracking_identifier.split(", ")[-1]: g for g in sr.content.get_volumetric_roi_measurement_groups()}


def _value(group, name, site_modifier=None, derivation=None) -> float:
    """The one measurement of `name` with that region modifier (None: the whole tract) and derivation."""
    found = []
    for m in group.get_measurements(name=name):
        modifier = m.finding_sites[0].topographical_modifier if m.finding_sites else None
        if (modifier.value if modifier else None) != (site_modifier.value if site_modifier else None):
            continue
        if (m.derivation.value if m.derivation else None) != (derivation.value if derivation else None):
            continue
        found.append(m.value)
    assert len(found) == 1, (name, site_modifier, derivation, found)
    return float(found[0])


def test_report_passes_dciodvfy_and_reads_back_every_figure_with_its_segment(study: Study, tmp_path: Path):
    sr = build_measurement_report(study.seg, study.series, study.measured, qa=QA)
    path = _write(sr, tmp_path)
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert back.StudyInstanceUID == study.seg.StudyInstanceUID and back.PatientID == study.seg.PatientID
    assert back.SeriesInstanceUID not in (study.seg.SeriesInstanceUID, study.datasets[0].SeriesInstanceUID)
    groups = _groups(path)
    assert set(groups) == {"right", "left"}
    for side, number in (("right", 1), ("left", 2)):
        group, m = groups[side], study.measured[side]
        assert group.referenced_segment.referenced_sop_instance_uid == study.seg.SOPInstanceUID
        assert group.referenced_segment.referenced_segment_numbers == [number]
        assert _value(group, codes.SCT.Length) == pytest.approx(m.length_mm, abs=0.006)
        assert _value(group, codes.SCT.Volume) == pytest.approx(m.volume_mm3, abs=0.006)
        assert _value(group, codes.SCT.Diameter, derivation=codes.SCT.Mean) == pytest.approx(m.mean_diameter_mm,
                                                                                              abs=0.006)
        assert _value(group, codes.SCT.Diameter, derivation=codes.SCT.Minimum) == pytest.approx(m.min_diameter_mm,
                                                                                                 abs=0.006)
        for region in m.regions:
            modifier = REGION_MODIFIERS[region.region]
            assert _value(group, codes.SCT.Length, modifier) == pytest.approx(region.length_mm, abs=0.006)
            assert _value(group, codes.SCT.Volume, modifier) == pytest.approx(region.volume_mm3, abs=0.006)
        units = {m.unit.value for m in group.get_measurements()}
        assert units == {"mm", "mm3"}


def test_report_carries_each_sides_qa_verdict_and_reasons(study: Study, tmp_path: Path):
    groups = _groups(_write(build_measurement_report(study.seg, study.series, study.measured, qa=QA), tmp_path))
    verdicts = {side: [(q.name.value, q.value.value) for q in g.get_qualitative_evaluations()]
                for side, g in groups.items()}
    assert verdicts == {"right": [("111050", "111237")], "left": [("111050", "111236")]}
    def reasons(side: str) -> list[str]:
        return [str(item.TextValue) for item in groups[side][0].ContentSequence
                if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "113010"]

    assert reasons("left") == list(QA[1].reasons) and reasons("right") == []


@pytest.mark.parametrize("side", ["right", "left"])
def test_report_lengths_and_volumes_are_within_5_percent_of_the_phantom_truth(study: Study, tmp_path: Path,
                                                                               side: str):
    group = _groups(_write(build_measurement_report(study.seg, study.series, study.measured), tmp_path))[side]
    truth_length = study.phantom.params["nerve_length_in_fov_mm"][side]
    truth_volume = np.count_nonzero(study.phantom.labels == {"right": 1, "left": 2}[side]) \
        * study.phantom.volume.voxel_volume
    assert _value(group, codes.SCT.Length) == pytest.approx(truth_length, rel=0.05)
    assert _value(group, codes.SCT.Volume) == pytest.approx(truth_volume, rel=0.05)


def test_a_side_without_voxels_gets_a_group_with_its_qa_and_no_measurements(study: Study, tmp_path: Path):
    labels = np.where(study.phantom.labels == 2, 0, study.phantom.labels).astype(np.uint8)
    seg = build_segmentation(study.datasets, labels, algorithm=None, series_number=700, series_description="right only")
    measured = measure_labels(labels, study.series.volume.affine)
    qa = (QA[0], _qa("left", Verdict.FAIL, "no nerve found"))
    path = _write(build_measurement_report(seg, study.datasets, measured, qa=qa), tmp_path)
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    assert [g.tracking_identifier for g in sr.content.get_volumetric_roi_measurement_groups()] == [
        "Inferior alveolar nerve, right"]
    left, = sr.content.get_image_measurement_groups()  # TID 1501: no ROI
    assert left.tracking_identifier == "Inferior alveolar nerve, left" and left.get_measurements() == []
    assert [(q.value.value) for q in left.get_qualitative_evaluations()] == ["111235"]


def test_measurements_for_a_side_the_seg_has_no_segment_for_are_refused(study: Study):
    seg = copy.deepcopy(study.seg)
    seg.SegmentSequence = [item for item in seg.SegmentSequence if item.SegmentNumber != 2]
    with pytest.raises(MeasurementReportError, match="left side has measurements"):
        build_measurement_report(seg, study.series, study.measured)


def test_a_seg_of_another_series_is_refused(study: Study):
    other = generate_phantom(1, 3, phantom_preset("demo"))
    with pytest.raises(MeasurementReportError, match="references none"):
        build_measurement_report(study.seg, phantom_datasets(other), study.measured)


def test_rebuilding_gives_the_same_uids_and_a_series_number_beside_the_segs(study: Study):
    a = build_measurement_report(study.seg, study.series, study.measured)
    b = build_measurement_report(study.seg, study.series, study.measured)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert a.SeriesNumber == study.seg.SeriesNumber + 500


def test_a_one_component_patient_name_reaches_the_report_but_no_log_or_warning(study: Study, tmp_path: Path,
                                                                               caplog: pytest.LogCaptureFixture):
    seg = copy.deepcopy(study.seg)
    seg.PatientName = "Zebediah"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        sr = build_measurement_report(seg, study.series, study.measured)
    assert str(sr.PatientName) == "Zebediah"
    assert not any("Zebediah" in str(w.message) for w in caught)
    assert "Zebediah" not in caplog.text
    assert dciodvfy_errors(_write(sr, tmp_path)) == []


@pytest.mark.parametrize("empty", ["right", "left"])
def test_a_seg_that_left_out_an_empty_side_is_referenced_by_laterality_and_passes_dciodvfy(
        study: Study, tmp_path: Path, empty: str):
    kept = {"right": "left", "left": "right"}[empty]
    labels = np.where(study.phantom.labels == {"right": 1, "left": 2}[empty], 0, study.phantom.labels).astype(np.uint8)
    seg = build_segmentation(study.datasets, labels, algorithm=None, series_number=700, series_description="one side",
                             empty_segments="omit")
    assert [s.value for s in seg.omitted_sides] == [empty] and len(seg.SegmentSequence) == 1
    qa = {"right": QA[0], "left": _qa("left", Verdict.PASS)}
    qa[empty] = _qa(empty, Verdict.FAIL, "no nerve found")
    path = _write(build_measurement_report(seg, study.datasets, measure_labels(labels, study.series.volume.affine),
                                           qa=(qa["right"], qa["left"])), tmp_path)
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    group, = sr.content.get_volumetric_roi_measurement_groups()
    assert group.tracking_identifier == f"Inferior alveolar nerve, {kept}"
    assert group.referenced_segment.referenced_segment_numbers == [1]  # the only segment, whichever side it is
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    missing, = sr.content.get_image_measurement_groups()  # the left-out side: its QA, no segment reference
    assert missing.tracking_identifier == f"Inferior alveolar nerve, {empty}" and missing.get_measurements() == []
    assert _segment_numbers(missing[0]) == [] and _segment_numbers(group[0]) == [1]
    assert [q.value.value for q in missing.get_qualitative_evaluations()] == ["111235"]


def _segment_numbers(item: pydicom.Dataset) -> list[int]:
    """Every segment number an SR content tree references."""
    out = [int(ref.ReferencedSegmentNumber) for ref in item.get("ReferencedSOPSequence", [])
           if "ReferencedSegmentNumber" in ref]
    for child in item.get("ContentSequence", []):
        out += _segment_numbers(child)
    return out
