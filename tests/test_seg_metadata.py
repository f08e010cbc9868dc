"""Real-world source headers: the SEG still builds, stays valid and reads back; what cannot be repaired
is refused before inference; no log line carries a patient's values."""

from __future__ import annotations

import copy
import io
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config, dcmwrite
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from ian_node.phantom.study import Phantom, PhantomConfig, generate_phantom, phantom_datasets
from ian_node.segment.metadata import SourceMetadataError, check_source_metadata, sanitised_source
from ian_node.segment.pipeline import failure_message
from ian_node.segment.seg import AlgorithmInfo, build_segmentation, read_segmentation_labels
from ian_node.segment.volume import load_series
from tests.tools import dciodvfy_errors

#: The smallest phantom the generator makes: 4 slices of 32 x 32, both nerves drawn.
CONFIG = PhantomConfig(shape=(4, 32, 32), oblique_probability=0.0, metal_probability=0.0, motion_probability=0.0)
AI = AlgorithmInfo(name="IANNet", version="0.1.0", checkpoint_hash="sha256:" + "cd" * 32)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return generate_phantom(0, 5, CONFIG)


@pytest.fixture(scope="module")
def clean_source(phantom: Phantom) -> list[Dataset]:
    return phantom_datasets(phantom)


@dataclass(frozen=True)
class Study:
    """The phantom's labels and instances, with a short repr for hypothesis' falsifying examples."""

    labels: np.ndarray = field(repr=False)
    source: list[Dataset] = field(repr=False)


@pytest.fixture(scope="module")
def study(phantom: Phantom, clean_source) -> Study:
    return Study(phantom.labels, clean_source)


def _set(ds: Dataset, keyword: str, value: Any) -> None:
    """Set a value as a real file may carry it: no pydicom validation (and so no warning with the value)."""
    tag, vr = tag_for_keyword(keyword), dictionary_VR(tag_for_keyword(keyword))
    if value is None:
        ds.pop(tag, None)
        return
    try:
        ds[tag] = DataElement(tag, vr, value, validation_mode=config.IGNORE)
    except ValueError:  # e.g. DS "abc": pydicom decodes it only when read, so keep it raw as in a file
        raw = value.encode("utf-8")
        ds[tag] = RawDataElement(BaseTag(tag), vr, len(raw), raw, 0, False, True)


def _code(value: str, flag: str | None, meaning: str = "MR mandible") -> Dataset:
    item = Dataset()
    _set(item, "CodeValue", value)
    _set(item, "CodingSchemeDesignator", "99LOCAL\x00")
    _set(item, "CodeMeaning", meaning)
    _set(item, "ContextGroupExtensionFlag", flag)
    return item


def _reference(uid: str) -> Dataset:
    item = Dataset()
    _set(item, "ReferencedSOPClassUID", "1.2.840.10008.3.1.2.3.1")
    _set(item, "ReferencedSOPInstanceUID", uid)
    return item


def _with_header(source: list[Dataset], header: dict[str, Any]) -> list[Dataset]:
    datasets = copy.deepcopy(source)
    for ds in datasets:
        for keyword, value in header.items():
            _set(ds, keyword, value)
    return datasets


def _reread(ds: Dataset) -> Dataset:
    """`ds` written and read back; as it is when pydicom cannot write it (no file could carry it)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # pydicom warns (with the value) about what it cannot encode
        warnings.simplefilter("ignore")
        try:
            dcmwrite(buffer, ds, enforce_file_format=True)
        except (TypeError, ValueError, UnicodeError):
            return ds
        return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _snapshot(datasets: list[Dataset]) -> list[str]:
    with warnings.catch_warnings():  # decoding a raw over-long value warns
        warnings.simplefilter("ignore")
        return [repr([(e.tag, e.VR, e.value) for e in ds if e.tag != 0x7FE00010]) for ds in datasets]


def _write(seg: Dataset, folder: Path) -> Path:
    path = folder / "seg.dcm"
    dcmwrite(path, seg, enforce_file_format=True)
    return path


# ---------------------------------------------------------------- the property
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=70)
_PADDED = st.builds(lambda s, pad: s + pad, st.text("ABCDEFXYZ0123 _^=-", max_size=20),
                    st.sampled_from(["", "\x00", " ", " \x00"]))
HEADERS = st.fixed_dictionaries({
    "PatientSex": st.sampled_from(["M", "F", "O", "m", "f", "0000", "X ", "", "M\x00", " F", "MALE", "M\\F"]) | _TEXT,
    "PatientName": st.sampled_from(["BRAINIX", "^^^^", "Doe^John", "Müller^Jürgen", "李^雷", "=^", "A" * 70,
                                    "Doe^John^A^B^C^D", "Doe\\Roe", "", "Doe^John=ドウ^ジョン"]) | _TEXT,
    "PatientID": _TEXT | _PADDED,
    "PatientBirthDate": st.sampled_from(["2024-01-01", "00000000", "20240231", "19700101", "1970.01.01", "",
                                         "19700101\x00", " 19700101", "1970"]) | _TEXT,
    "PatientAge": st.sampled_from(["45", "045Y", "45Y", "45 y", "abc", "", "1000Y", None]),
    "PatientWeight": st.sampled_from(["70", "70.5", "abc", "1.23456789012345678", "", "nan", None]),
    "StudyDate": st.sampled_from(["20240101", "2024-01-01", "00000000", "", "2024010", "20240101-"]),
    "StudyTime": st.sampled_from(["120000", "12:00:00", "25:00", "120000.123456", "", "1200", "12"]),
    "AccessionNumber": _TEXT | _PADDED,
    "StudyID": _TEXT | _PADDED,
    "StudyDescription": _TEXT,
    "ReferringPhysicianName": st.sampled_from(["^^^^", "", "Who^Doctor", "X" * 65]) | _TEXT,
    "Manufacturer": _TEXT | _PADDED,
    "InstitutionName": _TEXT,
    "InstitutionAddress": st.sampled_from(["Street 1\\City", "Street 1\r\nCity", None]),
    "StationName": _TEXT | _PADDED,
    "SpecificCharacterSet": st.sampled_from([None, "ISO_IR 100", "ISO_IR 6", "ISO_IR 192", "ISO 2022 IR 100",
                                             "GARBAGE", ["ISO 2022 IR 6", "ISO 2022 IR 100"]]),
    "ProcedureCodeSequence": st.lists(st.builds(
        _code, _PADDED, st.sampled_from(["N\x00", "Y", "y", "N", "X", "", None]), _TEXT), max_size=2),
    "ReferencedStudySequence": st.lists(st.builds(_reference, st.sampled_from(["1.2.3", "1.2.3\x00", "1.02.x", ""])),
                                        max_size=2),
    "PatientComments": _TEXT,
    "SoftwareVersions": st.lists(_PADDED, max_size=3),
    "PregnancyStatus": st.sampled_from([None, 1, 4, 0, 7]),
    "AcquisitionDateTime": st.sampled_from([None, "20240101120000", "2024-01-01T12:00", "20241301"]),
    "LossyImageCompression": st.sampled_from([None, "00", "01", "1", "YES"]),
    "ClinicalTrialSponsorName": st.sampled_from([None, "Sponsor", "Sponsor\x01", ""]),
})


@pytest.mark.integration
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=HEADERS, from_file=st.booleans())
def test_any_source_header_gives_a_valid_seg_that_reads_back(study: Study, header, from_file):
    source = _with_header(study.source, header)
    if from_file:  # as the node reads its spool: raw elements, decoded on access with the file's charset
        source = [_reread(ds) for ds in source]
    before = _snapshot(source)
    seg = build_segmentation(source, study.labels, algorithm=AI, series_number=300, series_description="AI")
    assert _snapshot(source) == before  # the caller's datasets are left as they were
    with tempfile.TemporaryDirectory() as folder:
        path = _write(seg, Path(folder))
        assert dciodvfy_errors(path) == []
        stored = pydicom.dcmread(path)
    hd.seg.Segmentation.from_dataset(stored)
    assert np.array_equal(read_segmentation_labels(stored, source), study.labels)


# ---------------------------------------------------------------- examples
def test_patient_sex_0000_is_emptied_and_the_seg_builds(phantom: Phantom, clean_source):
    source = _with_header(clean_source, {"PatientSex": "0000"})
    seg = build_segmentation(source, phantom.labels, algorithm=AI, series_number=300, series_description="AI")
    assert "PatientSex" in seg and not seg.PatientSex  # type 2: present, empty
    assert source[0].PatientSex == "0000"


def test_a_lower_case_patient_sex_is_upper_cased(phantom: Phantom, clean_source):
    source = _with_header(clean_source, {"PatientSex": "f "})
    seg = build_segmentation(source, phantom.labels, algorithm=AI, series_number=300, series_description="AI")
    assert seg.PatientSex == "F"


def test_one_component_patient_name_is_kept(phantom: Phantom, clean_source):
    source = _with_header(clean_source, {"PatientName": "BRAINIX"})
    seg = build_segmentation(source, phantom.labels, algorithm=AI, series_number=300, series_description="AI")
    assert str(seg.PatientName) == "BRAINIX"


@pytest.mark.integration
def test_nul_padded_procedure_code_gives_a_dciodvfy_clean_seg(phantom: Phantom, clean_source, tmp_path):
    source = _with_header(clean_source, {"ProcedureCodeSequence": [_code("MRMAND\x00", "N\x00")]})
    seg = build_segmentation(source, phantom.labels, algorithm=AI, series_number=300, series_description="AI")
    item = seg.ProcedureCodeSequence[0]
    assert (item.CodeValue, item.CodingSchemeDesignator, item.ContextGroupExtensionFlag) == ("MRMAND", "99LOCAL", "N")
    assert source[0].ProcedureCodeSequence[0].CodeValue == "MRMAND\x00"
    assert dciodvfy_errors(_write(seg, tmp_path)) == []


def test_an_enhanced_multiframe_source_with_bad_values_builds(phantom: Phantom, clean_source):
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        clean_source, series_instance_uid="1.2.3.4", series_number=7, sop_instance_uid="1.2.3.5", instance_number=1)
    _set(enhanced, "PatientSex", "0000")
    _set(enhanced, "ProcedureCodeSequence", [_code("MRMAND\x00", "N\x00")])
    seg = build_segmentation([enhanced], phantom.labels, algorithm=AI, series_number=300, series_description="AI")
    assert not seg.PatientSex and seg.ProcedureCodeSequence[0].CodeValue == "MRMAND"
    assert np.array_equal(read_segmentation_labels(seg, [enhanced]), phantom.labels)


def test_iso_dates_are_reformatted_and_impossible_ones_emptied(phantom: Phantom, clean_source):
    source = _with_header(clean_source, {"PatientBirthDate": "1970-02-03", "StudyDate": "00000000",
                                         "PatientAge": "45", "StudyTime": "12:30:00"})
    seg = build_segmentation(source, phantom.labels, algorithm=AI, series_number=300, series_description="AI")
    assert (seg.PatientBirthDate, seg.StudyDate or "", seg.StudyTime) == ("19700203", "", "123000")
    assert "PatientAge" not in seg  # type 3, no unit: no safe answer, so dropped


def test_non_ascii_values_switch_the_seg_to_utf8(phantom: Phantom, clean_source, tmp_path):
    source = _with_header(clean_source, {"SpecificCharacterSet": None, "PatientName": "李^雷"})
    seg = build_segmentation(source, phantom.labels, algorithm=AI, series_number=300, series_description="AI")
    assert seg.SpecificCharacterSet == "ISO_IR 192"
    assert str(pydicom.dcmread(_write(seg, tmp_path)).PatientName) == "李^雷"


def test_missing_study_instance_uid_is_refused_before_inference_naming_the_tag(clean_source):
    source = _with_header(clean_source, {"StudyInstanceUID": None})
    with pytest.raises(SourceMetadataError, match=rf"instance {source[0].SOPInstanceUID}: StudyInstanceUID is missing"):
        check_source_metadata(source)


def test_a_refusal_reads_as_a_malformed_dataset_in_the_job_error(clean_source):
    source = _with_header(clean_source, {"FrameOfReferenceUID": None})
    with pytest.raises(SourceMetadataError) as caught:
        check_source_metadata(source)
    assert failure_message(caught.value) == (
        f"malformed dataset: instance {source[0].SOPInstanceUID}: FrameOfReferenceUID is missing "
        f"(series {source[0].SeriesInstanceUID})")


def test_check_takes_a_loaded_series_and_repairs_its_first_slice_in_volume_order(clean_source):
    source = _with_header(clean_source, {"PatientSex": "m"})
    series = load_series(list(reversed(source)))
    repairs = check_source_metadata(series)
    assert [(r.instance, r.keyword, r.action) for r in repairs] == [
        (series.frames[0].sop_instance_uid, "PatientSex", "normalised")]


@pytest.mark.parametrize("keyword", ["FrameOfReferenceUID", "SOPInstanceUID", "SeriesInstanceUID"])
def test_invalid_uids_are_refused_before_inference(clean_source, keyword):
    source = _with_header(clean_source, {keyword: "1.2.03.x"})
    with pytest.raises(SourceMetadataError, match=f"{keyword} is not a valid DICOM UID"):
        check_source_metadata(source)


def test_check_lists_the_repairs_the_seg_will_get(phantom: Phantom, clean_source):
    assert check_source_metadata(clean_source) == ()
    source = _with_header(clean_source, {"PatientSex": "0000", "PatientAge": "45"})
    repairs = {(r.keyword, r.action) for r in check_source_metadata(source)}
    assert repairs == {("PatientSex", "emptied"), ("PatientAge", "dropped")}


def test_an_optional_module_with_an_unrepairable_required_value_is_dropped_whole(clean_source):
    source = _with_header(clean_source, {"ClinicalTrialSponsorName": "Sponsor\x01", "ClinicalTrialProtocolID": "P1"})
    view = sanitised_source(source[0]).dataset
    assert "ClinicalTrialSponsorName" not in view and "ClinicalTrialProtocolID" not in view


def test_no_log_record_carries_patient_values(phantom: Phantom, clean_source, caplog):
    secrets = {"PatientName": "Verysecret^Person", "PatientID": "ID-QX-SECRET", "PatientBirthDate": "1961-07-13",
               "OtherPatientNames": "BRAINIX", "PatientSex": "0000"}
    source = _with_header(clean_source, secrets)
    source[0].PatientName = "Secretsurname"  # one component: highdicom itself would log it
    caplog.set_level(logging.DEBUG)
    check_source_metadata(source)
    build_segmentation(source, phantom.labels, algorithm=AI, series_number=300, series_description="AI",
                       series_instance_uid="1.2.3.1", sop_instance_uid="1.2.3.2", dimension_organization_uid="1.2.3.3")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "PatientSex emptied" in text and "PatientBirthDate normalised" in text
    for value in ("Verysecret", "Secretsurname", "ID-QX-SECRET", "BRAINIX", "1961-07-13", "19610713"):
        assert value not in text
