"""read_header_facts gives the facts pydicom gives, on every bundled file, and refuses what it cannot read."""

from __future__ import annotations

import struct
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


# -- malformed data sets: what the SCP answers 0xC210 to (check_structure=True) ----------------------------

_TRUNCATED = {"MR_truncated.dcm", "rtplan_truncated.dcm"}  # pydicom's own cut files: its reader accepts them


def _element(tag: int, vr: bytes, value: bytes, implicit: bool = False) -> bytes:
    """One element with a defined length, encoded by hand (little endian)."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<L", len(value)) + value
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return head + vr + b"\0\0" + struct.pack("<L", len(value)) + value
    return head + vr + struct.pack("<H", len(value)) + value


def _nested(depth: int, tag: int = 0x0040A730, implicit: bool = False, defined: bool = False) -> bytes:
    """``depth`` sequences, each the only element of its parent's one item (undefined or defined lengths)."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + (b"" if implicit else b"SQ\0\0")
    if defined:
        inner = b""
        for _ in range(depth):
            item = struct.pack("<HHL", 0xFFFE, 0xE000, len(inner)) + inner
            inner = head + struct.pack("<L", len(item)) + item
        return inner
    opening = head + struct.pack("<LHHL", 0xFFFFFFFF, 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHLHHL", 0xFFFE, 0xE00D, 0, 0xFFFE, 0xE0DD, 0)
    return opening * depth + closing * depth


def _with(extra: bytes, syntax: str = ExplicitVRLittleEndian, **attributes: object) -> bytes:
    """A minimal MR data set with ``extra`` (elements past the facts, in tag order) appended."""
    return _encode(_minimal(PatientName="Doe^Jane", PatientID="PID-4711", **attributes), syntax) + extra


@pytest.mark.parametrize(("implicit", "defined"), [(False, False), (True, False), (False, True), (True, True)],
                         ids=["explicit-undefined", "implicit-undefined", "explicit-defined", "implicit-defined"])
def test_a_sequence_nested_10000_levels_deep_is_refused_naming_the_element(implicit: bool, defined: bool) -> None:
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    raw = _with(_nested(10_000, implicit=implicit, defined=defined), syntax)
    with pytest.raises(HeaderError, match=r"nested deeper than 32 levels \(in \(0040,A730\) ContentSequence\)"):
        read_header_facts(raw, syntax, check_structure=True)


def test_32_levels_of_sequences_are_accepted_and_33_refused() -> None:
    facts = read_header_facts(_with(_nested(32)), ExplicitVRLittleEndian, check_structure=True)
    assert facts.sop_instance_uid == "1.2.3.4.5"
    with pytest.raises(HeaderError, match="nested deeper than 32"):
        read_header_facts(_with(_nested(33)), ExplicitVRLittleEndian, check_structure=True)


def test_nesting_among_the_facts_is_refused_even_without_the_structure_check() -> None:
    uids = _encode(_minimal())
    split = uids.index(b"\x20\x00\x0d\x00")  # (0020,000D): the nesting goes before the study and series UIDs
    raw = uids[:split] + _nested(10_000, tag=0x00081140) + uids[split:]
    with pytest.raises(HeaderError, match=r"nested deeper than 32 levels \(in \(0008,1140\)"):
        read_header_facts(raw, ExplicitVRLittleEndian)


@pytest.mark.filterwarnings("ignore:Expected implicit VR, but found explicit VR")
def test_pydicoms_reader_nested_10000_deep_gives_a_header_error_not_a_recursion_error() -> None:
    uids = _encode(_minimal())
    split = uids.index(b"\x20\x00\x0d\x00")
    raw = uids[:split] + _nested(10_000, tag=0x00081140) + uids[split:]
    # Explicit VR sent as implicit: the walk leaves it to pydicom's reader, which recurses per level.
    with pytest.raises(HeaderError, match="nested too deep") as caught:
        read_header_facts(raw, ImplicitVRLittleEndian)
    assert not isinstance(caught.value, RecursionError)


def test_a_length_past_the_end_of_the_data_is_refused_naming_the_element() -> None:
    raw = _with(_element(0x7FE00010, b"OW", bytes(64)))[:-40]  # PixelData says 64 bytes; 24 arrive
    with pytest.raises(HeaderError, match=r"\(7FE0,0010\) PixelData declares 64 bytes, only 24 remain"):
        read_header_facts(raw, ExplicitVRLittleEndian, check_structure=True)
    assert read_header_facts(raw, ExplicitVRLittleEndian).sop_instance_uid == "1.2.3.4.5"  # pydicom's leniency


def test_an_item_longer_than_its_sequence_is_refused() -> None:
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 100) + _element(0x00081150, b"UI", b"1.2.3\0")
    raw = _with(_element(0x0040A730, b"SQ", item))
    with pytest.raises(HeaderError, match=r"an item of \(0040,A730\) ContentSequence declares 100 bytes"):
        read_header_facts(raw, ExplicitVRLittleEndian, check_structure=True)


@pytest.mark.parametrize(("tail", "problem"), [
    (_element(0x7FE00010, b"OW", bytes(8))[:5], "cut short: 5 bytes where an element starts"),
    (_element(0x7FE00010, b"OW", bytes(8))[:10], r"cut short inside the header of \(7FE0,0010\) PixelData"),
    (_nested(1)[:-16], r"an item of \(0040,A730\) ContentSequence has no item delimiter"),
    (_nested(1)[:-8], r"the sequence \(0040,A730\) ContentSequence has no sequence delimiter"),
], ids=["in-a-header", "in-a-long-header", "no-item-delimiter", "no-sequence-delimiter"])
def test_a_truncated_data_set_is_refused(tail: bytes, problem: str) -> None:
    with pytest.raises(HeaderError, match=problem):
        read_header_facts(_with(tail), ExplicitVRLittleEndian, check_structure=True)


@pytest.mark.parametrize("name", sorted(_TRUNCATED))
def test_pydicoms_truncated_files_are_refused_when_the_structure_is_checked(name: str) -> None:
    path = _DATA / "test_files" / name
    syntax = pydicom.dcmread(path).file_meta.TransferSyntaxUID
    with pytest.raises(HeaderError, match=r"declares \d+ bytes, only \d+ remain"):
        read_header_facts(dataset_bytes(path.read_bytes()), syntax, check_structure=True)


@pytest.mark.parametrize("path", [p for p in _FILES if p.name not in _TRUNCATED], ids=lambda p: p.name)
def test_checking_the_structure_changes_nothing_for_a_well_formed_file(path: Path) -> None:
    syntax = pydicom.dcmread(path).file_meta.TransferSyntaxUID
    data = dataset_bytes(path.read_bytes())
    try:
        expected: object = read_header_facts(data, syntax)
    except (HeaderError, UnsafeUIDError) as exc:
        expected = type(exc)
    try:
        checked: object = read_header_facts(data, syntax, check_structure=True)
    except (HeaderError, UnsafeUIDError) as exc:
        checked = type(exc)
    assert checked == expected


def test_the_problem_names_elements_never_values() -> None:
    raw = _with(_element(0x7FE00010, b"OW", bytes(64)))[:-40]
    nested = _with(_nested(40))
    for data in (raw, nested):
        with pytest.raises(HeaderError) as caught:
            read_header_facts(data, ExplicitVRLittleEndian, check_structure=True)
        assert "Doe" not in str(caught.value) and "PID-4711" not in str(caught.value)
