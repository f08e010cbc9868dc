"""A hostile corpus, generated here: broken, odd and unsupported DICOM that a real PACS may send.

Every case is one small series (its own study, series and SOP UIDs) derived from a phantom, with
the outcome the node must give: a DICOM status at receive time, a refusal at association
negotiation, a skip reason when the series completes, a clear job error, or a SEG (the node repairs
or tolerates the header). Byte-level cases (truncation, lengths, nesting) are built as raw bytes and
sent with pynetdicom without decoding; the rest are sent by dcmtk's storescu.
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

#: Outcome kinds.
STATUS, REFUSED, SKIP, JOB_ERROR, SEG = "status", "refused", "skip", "job error", "SEG"


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    #: What the outcome must contain: a status code for STATUS, a phrase of the reason or error otherwise.
    expect: int | str | None
    #: Edits the series (a list of data sets, volume order); may return new data sets.
    edit: Callable[[list[Dataset]], list[Dataset] | None] | None = None
    #: Turns the written bytes of the first instance into raw bytes to send (byte-level cases).
    raw: Callable[[bytes], bytes] | None = None


def fresh_series(base: list[Dataset], key: str) -> list[Dataset]:
    """Deep copies of ``base`` with their own study, series and SOP instance UIDs."""
    study = generate_uid(prefix=None, entropy_srcs=[key, "study"])
    series = generate_uid(prefix=None, entropy_srcs=[key, "series"])
    out = []
    for i, ds in enumerate(base):
        copy_ = copy.deepcopy(ds)
        copy_.StudyInstanceUID, copy_.SeriesInstanceUID = study, series
        copy_.SOPInstanceUID = generate_uid(prefix=None, entropy_srcs=[key, str(i)])
        copy_.file_meta.MediaStorageSOPInstanceUID = copy_.SOPInstanceUID
        out.append(copy_)
    return out


def write_series(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.file_meta.MediaStorageSOPInstanceUID}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


# -- edits ----------------------------------------------------------------------------------------

def _on(index: int, **changes: object) -> Callable[[list[Dataset]], None]:
    """Set (or, with None, delete) attributes of one instance."""
    def edit(series: list[Dataset]) -> None:
        for keyword, value in changes.items():
            if value is None:
                delattr(series[index], keyword)
            else:
                setattr(series[index], keyword, value)
    return edit


def _all(**changes: object) -> Callable[[list[Dataset]], None]:
    def edit(series: list[Dataset]) -> None:
        for i in range(len(series)):
            _on(i, **changes)(series)
    return edit


def _tilt(series: list[Dataset]) -> None:
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    series[3].ImageOrientationPatient = [float(c), float(s), 0.0, float(-s), float(c), 0.0]


def _duplicate(series: list[Dataset]) -> None:
    series[3].ImagePositionPatient = series[2].ImagePositionPatient


def _irregular(series: list[Dataset]) -> None:
    series[3].ImagePositionPatient = [float(v) + 0.4 * n for v, n in
                                      zip(series[3].ImagePositionPatient, _normal(series[3]), strict=True)]


def _normal(ds: Dataset) -> np.ndarray:
    iop = [float(v) for v in ds.ImageOrientationPatient]
    return np.cross(iop[:3], iop[3:])


def _smaller_matrix(series: list[Dataset]) -> None:
    ds = series[3]
    ds.PixelData = ds.pixel_array[:-8, :].tobytes()
    ds.Rows = int(ds.Rows) - 8


def _rgb(series: list[Dataset]) -> None:
    for ds in series:
        grey = ds.pixel_array.astype(np.uint8)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.PixelData = np.repeat(grey[..., None], 3, axis=-1).tobytes()


def _palette(series: list[Dataset]) -> None:
    for ds in series:
        ds.PhotometricInterpretation = "PALETTE COLOR"
        for colour in ("Red", "Green", "Blue"):
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
            setattr(ds, f"{colour}PaletteColorLookupTableData", np.arange(256, dtype="<u2").tobytes())


def _one_bit(series: list[Dataset]) -> None:
    for ds in series:
        bits = (ds.pixel_array > ds.pixel_array.mean()).astype(np.uint8)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
        ds.PixelData = np.packbits(bits.ravel(), bitorder="little").tobytes()


def _signed(series: list[Dataset]) -> None:
    for ds in series:
        values = ds.pixel_array.astype(np.int32) - 500
        ds.PixelRepresentation = 1
        ds.PixelData = values.astype("<i2").tobytes()


def _short_pixels(series: list[Dataset]) -> None:
    series[2].PixelData = series[2].PixelData[: len(series[2].PixelData) // 2]


def _enhanced_without_groups(series: list[Dataset]) -> None:
    for ds in series:
        ds.SOPClassUID = EnhancedMRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage


def _nul_padded_codes(series: list[Dataset]) -> None:
    for ds in series:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "MRMAND\x00", "99LOCAL", "MR mandible"
        item.ContextGroupExtensionFlag = "N\x00"
        ds.ProcedureCodeSequence = DicomSequence([item])


def _single(series: list[Dataset]) -> list[Dataset]:
    return series[:1]


# -- byte-level edits (explicit VR little endian, after the 132-byte preamble and the file meta) --

def _dataset_offset(data: bytes) -> int:
    """Where the data set starts: after the preamble, 'DICM' and the group 2 elements."""
    (meta_length,) = struct.unpack_from("<I", data, 132 + 8)
    return 132 + 12 + meta_length


def _element(data: bytes, group: int, element: int) -> int:
    """Byte offset of a top-level short-VR element's tag in the data set (explicit VR LE)."""
    offset = data.index(struct.pack("<HH", group, element), _dataset_offset(data))
    return offset


def _cut_in_header(data: bytes) -> bytes:
    return data[: _element(data, 0x0020, 0x000D) + 20]


def _cut_in_pixels(data: bytes) -> bytes:
    return data[: len(data) - len(data) // 3]


def _length_past_end(data: bytes) -> bytes:
    at = _element(data, 0x0008, 0x103E)  # SeriesDescription, LO: 2-byte length after the VR
    return data[: at + 6] + struct.pack("<H", 0xFFF0) + data[at + 8:]


def _wrong_vr(data: bytes) -> bytes:
    at = _element(data, 0x0008, 0x103E)
    return data[: at + 4] + b"ZZ" + data[at + 6:]


def _deep_nesting(data: bytes, depth: int = 10_000) -> bytes:
    """A sequence nested ``depth`` levels deep (undefined lengths), inserted before (0008,103E)."""
    at = _element(data, 0x0008, 0x103E)
    opening = struct.pack("<HH", 0x0008, 0x1110) + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    nested_sq = struct.pack("<HH", 0x0008, 0x1115) + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    body = opening + (item + nested_sq) * depth + seq_end + (item_end + seq_end) * depth
    return data[:at] + body + data[at:]


CASES: tuple[Case, ...] = (
    # refused when received: a DICOM status (0xC210 cannot understand)
    Case("truncated file (cut inside the header)", STATUS, 0xC210, raw=_cut_in_header),
    Case("truncated file (cut inside the pixel data)", STATUS, 0xC210, raw=_cut_in_pixels),
    Case("declared length past the end of the data", STATUS, 0xC210, raw=_length_past_end),
    Case("sequence nested 10,000 levels deep", STATUS, 0xC210, raw=_deep_nesting),
    Case("no SOP Instance UID", STATUS, 0xC210, edit=_on(0, SOPInstanceUID=None)),
    Case("no Study Instance UID", STATUS, 0xC210, edit=_on(0, StudyInstanceUID=None)),
    Case("Series Instance UID with ../", STATUS, 0xC210, edit=_on(0, SeriesInstanceUID="1.2.3/../../etc")),
    Case("non-image SOP class (Basic Text SR)", REFUSED, "Basic Text SR"),
    # skipped when the series completes, with the reason
    Case("a one-slice series", SKIP, "fewer than the minimum", edit=_single),
    Case("duplicate slice positions", SKIP, "not one volume", edit=_duplicate),
    Case("mixed orientations", SKIP, "not one volume", edit=_tilt),
    Case("irregular slice spacing", SKIP, "not one volume", edit=_irregular),
    Case("mixed matrix sizes", SKIP, "not one volume", edit=_smaller_matrix),
    Case("a localizer (ImageType LOCALIZER)", SKIP, "LOCALIZER", edit=_all(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])),
    Case("a scout (ImageType SCOUT)", SKIP, "SCOUT", edit=_all(ImageType=["DERIVED", "SECONDARY", "SCOUT"])),
    Case("wrong modality (CT)", SKIP, "modality 'CT'", edit=_all(Modality="CT")),
    Case("RGB photometric", SKIP, "not a grey-scale image", edit=_rgb),
    Case("palette colour photometric", SKIP, "not a grey-scale image", edit=_palette),
    Case("1-bit pixels", SKIP, "1-bit pixels", edit=_one_bit),
    # a job error that starts with "malformed dataset" and names the instance
    Case("no Rows", JOB_ERROR, "no valid Rows", edit=_on(2, Rows=None)),
    Case("no Columns", JOB_ERROR, "no valid Columns", edit=_on(2, Columns=None)),
    Case("no pixel data", JOB_ERROR, "no pixel data", edit=_on(2, PixelData=None)),
    Case("pixel data shorter than declared", JOB_ERROR, "cannot decode pixel data", edit=_short_pixels),
    Case("no Frame of Reference UID", JOB_ERROR, "no Frame of Reference UID", edit=_on(2, FrameOfReferenceUID=None)),
    Case("Enhanced MR without its functional groups", JOB_ERROR, "without its functional groups",
         edit=_enhanced_without_groups),
    Case("huge declared frame count", JOB_ERROR, "declares 100000 frames", edit=_on(2, NumberOfFrames=100_000)),
    # odd but usable: the node repairs or tolerates the header and delivers a valid SEG
    Case("PatientSex 0000", SEG, None, edit=_all(PatientSex="0000")),
    Case("NUL-padded procedure codes", SEG, None, edit=_nul_padded_codes),
    Case("person name without components (BRAINIX)", SEG, None, edit=_all(PatientName="BRAINIX")),
    Case("birth date in the wrong format", SEG, None, edit=_all(PatientBirthDate="1970-01-01")),
    Case("age without a unit", SEG, None, edit=_all(PatientAge="45")),
    Case("over-long Study ID", SEG, None, edit=_all(StudyID="THIS-STUDY-ID-IS-MUCH-TOO-LONG")),
    Case("lower-case patient sex", SEG, None, edit=_all(PatientSex="f")),
    Case("signed pixels", SEG, None, edit=_signed),
    Case("a wrong VR in the header", SEG, None, raw=_wrong_vr),
)

TRANSFER_SYNTAX = ExplicitVRLittleEndian
