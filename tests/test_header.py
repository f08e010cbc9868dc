"""read_header_facts gives the facts pydicom gives, on every bundled file, and refuses what it cannot read."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage

from ian_node.receive.header import HeaderError, HeaderFacts, read_header_facts
from ian_node.receive.pull import dataset_bytes
from ian_node.uids import UnsafeUIDError

_DATA = Path(pydicom.data.__file__).parent
_BUNDLED = sorted([*(_DATA / "test_files").rglob("*.dcm"), *(_DATA / "charset_files").glob("*.dcm")])


def _reference(ds: Dataset) -> HeaderFacts:
    """The facts as a full pydicom decode states them."""
    number = ds.get("InstanceNumber")
    return HeaderFacts(
        sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, series_uid=ds.SeriesInstanceUID,
        study_uid=ds.StudyInstanceUID, modality=str(ds.get("Modality") or "").strip().upper(),
        description=str(ds.get("SeriesDescription") or ""), instance_number=None if number in (None, "") else int(number),
        frames=int(ds.get("NumberOfFrames") or 1),
    )


def _usable(path: Path) -> Dataset | None:
    """A bundled file with a file meta, a transfer syntax and the four UIDs (the others prove nothing)."""
    try:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID  # noqa: B018 (raises when missing)
    except Exception:
        return None
    keywords = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
    return ds if all(ds.get(k) for k in keywords) and len(ds.file_meta.TransferSyntaxUID) else None


def _encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _minimal(**extra: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Modality = "MR"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


_FILES = [p for p in _BUNDLED if _usable(p) is not None]


def test_the_bundled_files_cover_every_path_of_the_reader() -> None:
    syntaxes = {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in _FILES}
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"} <= syntaxes
    assert len(syntaxes) >= 8 and len(_FILES) >= 70


@pytest.mark.parametrize("path", _FILES, ids=[p.name for p in _FILES])
def test_facts_equal_a_full_pydicom_decode(path: Path) -> None:
    ds = pydicom.dcmread(path)
    data = dataset_bytes(path.read_bytes())
    try:
        expected = _reference(ds)
    except ValueError:  # e.g. badVR.dcm: NumberOfFrames "1A", which the SCP refuses (0xC210)
        with pytest.raises(HeaderError):
            read_header_facts(data, ds.file_meta.TransferSyntaxUID)
        return
    assert read_header_facts(data, ds.file_meta.TransferSyntaxUID) == expected


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_sequence_of_undefined_length_before_the_uids_is_read_through_pydicom(syntax: str) -> None:
    item = Dataset()
    item.ReferencedSOPInstanceUID = "9.9.9"
    ds = _minimal(ReferencedImageSequence=Sequence([item]), SeriesDescription="T2 STIR", InstanceNumber=7)
    ds.ReferencedImageSequence.is_undefined_length = True
    facts = read_header_facts(_encode(ds, syntax), syntax)
    assert (facts.series_uid, facts.description, facts.instance_number) == ("1.2.3.4", "T2 STIR", 7)


def test_a_description_in_another_character_set_is_decoded_with_it() -> None:
    ds = _minimal(SpecificCharacterSet="ISO_IR 100", SeriesDescription="Nerv rechts Länge")
    raw = _encode(ds)
    assert "Länge".encode("latin-1") in raw
    assert read_header_facts(raw, ExplicitVRLittleEndian).description == "Nerv rechts Länge"


@pytest.mark.parametrize("missing", ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"])
def test_a_missing_uid_is_refused_by_name(missing: str) -> None:
    ds = _minimal()
    delattr(ds, missing)
    with pytest.raises(UnsafeUIDError, match=missing):
        read_header_facts(_encode(ds), ExplicitVRLittleEndian)


def test_a_uid_that_would_leave_the_spool_is_refused() -> None:
    ds = _minimal()
    ds.SeriesInstanceUID = "../../etc"
    with pytest.raises(UnsafeUIDError, match="SeriesInstanceUID"):
        read_header_facts(_encode(ds), ExplicitVRLittleEndian)


@pytest.mark.parametrize("frames", ["0", "x"])
def test_an_unusable_number_of_frames_is_refused(frames: str) -> None:
    raw = _encode(_minimal(NumberOfFrames="1"))
    raw = raw.replace(b"IS\x02\x001 ", b"IS\x02\x00" + frames.encode() + b" ")
    with pytest.raises(HeaderError, match="NumberOfFrames"):
        read_header_facts(raw, ExplicitVRLittleEndian)


def test_garbage_is_refused_as_undecodable() -> None:
    with pytest.raises((HeaderError, UnsafeUIDError)):
        read_header_facts(bytes(range(256)) * 40, ExplicitVRLittleEndian)


def test_a_header_cut_short_before_the_uids_is_refused() -> None:
    raw = _encode(_minimal(SeriesDescription="cut"))
    with pytest.raises((HeaderError, UnsafeUIDError)):
        read_header_facts(raw[: raw.index(b"1.2.3.4.5") + 3], ExplicitVRLittleEndian)


def test_a_deflated_data_set_is_inflated_first() -> None:
    path = _DATA / "test_files" / "image_dfl.dcm"
    ds = pydicom.dcmread(path)
    assert read_header_facts(dataset_bytes(path.read_bytes()), ds.file_meta.TransferSyntaxUID) == _reference(ds)


def test_something_that_is_not_a_transfer_syntax_is_refused() -> None:
    with pytest.raises(HeaderError, match="not a transfer syntax"):
        read_header_facts(_encode(_minimal()), MRImageStorage)


def test_reading_with_the_fast_walk_and_with_pydicom_agree_on_a_real_mr_file() -> None:
    from ian_node.receive.header import _facts, _read_with_pydicom, _walk

    data = dataset_bytes((_DATA / "test_files" / "MR_small.dcm").read_bytes())
    walked = _walk(data, implicit=False)
    assert walked is not None
    assert _facts(walked) == _facts(_read_with_pydicom(data, pydicom.uid.UID(ExplicitVRLittleEndian)))
