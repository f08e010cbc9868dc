"""The few header facts the node files an instance by, read from its encoded data set.

Both ways in (the SCP's C-STORE and a pull from Orthanc or a DICOMweb server) need the same facts,
checked the same way: the SOP class and instance, the series and study (which name the spool path,
so each must be a real UID), the modality and series description (for the selection rules), the
instance number and the number of frames.

Why not decode with pydicom: at four parallel associations the SCP is CPU-bound under the GIL, and a
pydicom parse of the leading elements plus the value conversions cost about 0.14 ms per instance on
its own (a quarter of the node's bookkeeping). The common encodings (little endian, explicit or
implicit VR, which includes every compressed transfer syntax) are walked here element by element up
to (0028,0008), keeping only the raw values wanted (about 0.03 ms). Anything this walk does not
handle, an element of undefined length (a sequence), a deflated or big-endian data set, or a
truncated one, goes to pydicom's reader instead, so the facts never depend on the path taken.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from ian_node.storage.records import ReceivedInstance
from ian_node.uids import UnsafeUIDError, checked_uid


class HeaderError(ValueError):
    """The data set's header cannot be decoded (the SCP answers 0xC210 cannot understand)."""


@dataclass(frozen=True)
class HeaderFacts:
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    modality: str
    description: str
    instance_number: int | None
    frames: int

    def received(self, transfer_syntax_uid: str, calling_ae: str = "", peer_host: str = "", path: str = "",
                 size: int = 0, sha256: str = "") -> ReceivedInstance:
        """The state's record of the instance these facts describe (the SCP and the pull build it alike)."""
        return ReceivedInstance(
            sop_instance_uid=self.sop_instance_uid, sop_class_uid=self.sop_class_uid, series_uid=self.series_uid,
            study_uid=self.study_uid, transfer_syntax_uid=transfer_syntax_uid, path=path, size=size, sha256=sha256,
            frames=self.frames, instance_number=self.instance_number, modality=self.modality,
            description=self.description, calling_ae=calling_ae, peer_host=peer_host,
        )


#: HeaderFacts field -> (tag, keyword) of the four UIDs.
_UIDS = {
    "sop_class_uid": (0x00080016, "SOPClassUID"),
    "sop_instance_uid": (0x00080018, "SOPInstanceUID"),
    "study_uid": (0x0020000D, "StudyInstanceUID"),
    "series_uid": (0x0020000E, "SeriesInstanceUID"),
}
_CHARSET, _MODALITY, _DESCRIPTION, _NUMBER, _FRAMES = 0x00080005, 0x00080060, 0x0008103E, 0x00200013, 0x00280008
_WANTED = frozenset((_CHARSET, _MODALITY, _DESCRIPTION, _NUMBER, _FRAMES, *(tag for tag, _ in _UIDS.values())))
_LAST = max(_WANTED)
#: Explicit VRs whose length takes 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_UNDEFINED = 0xFFFFFFFF
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")


def read_header_facts(dataset: bytes, transfer_syntax: str) -> HeaderFacts:
    """The facts of an encoded data set (no file meta); HeaderError or UnsafeUIDError when unusable."""
    syntax = UID(transfer_syntax)
    if not syntax.is_transfer_syntax:
        raise HeaderError(f"{transfer_syntax} is not a transfer syntax")
    raw = None
    if syntax.is_little_endian and not syntax.is_deflated:
        raw = _walk(dataset, implicit=syntax.is_implicit_VR)
    if raw is None:
        raw = _read_with_pydicom(dataset, syntax)
    return _facts(raw)


def _walk(data: bytes, implicit: bool) -> dict[int, bytes] | None:
    """The raw values of the wanted elements, or None where the walk stops short (see the module)."""
    found: dict[int, bytes] = {}
    pos, end, previous = 0, len(data), -1
    while pos + 8 <= end:
        group, element = _TAG.unpack_from(data, pos)
        tag = group << 16 | element
        if tag <= previous:  # out of order: not a data set this walk can trust
            return None
        if tag > _LAST:
            return found
        previous = tag
        if implicit:
            length, start = _U32.unpack_from(data, pos + 4)[0], pos + 8
        elif not ((vr := data[pos + 4:pos + 6]).isalpha() and vr.isupper()):  # not a VR
            return None
        elif vr in _LONG_VRS:
            if pos + 12 > end:
                return None
            length, start = _U32.unpack_from(data, pos + 8)[0], pos + 12
        else:
            length, start = _U16.unpack_from(data, pos + 6)[0], pos + 8
        if length == _UNDEFINED or start + length > end:
            return None
        if tag in _WANTED:
            found[tag] = data[start:start + length]
        pos = start + length
    return found if pos == end else None


def _read_with_pydicom(data: bytes, syntax: UID) -> dict[int, bytes]:
    """The same raw values through pydicom's reader (sequences, deflate, big endian)."""
    if syntax.is_deflated:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise HeaderError(f"cannot inflate the data set ({exc})") from exc
    try:
        ds = read_dataset(
            BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian,
            stop_when=lambda tag, vr, length: tag > _LAST, specific_tags=[Tag(t) for t in _WANTED],
        )
        found = {}
        for tag in _WANTED:
            if tag in ds:
                elem = ds.get_item(tag)
                value = elem.value
                found[tag] = value if isinstance(value, bytes) else b""
    except Exception as exc:  # the trust boundary: any decoding error means we cannot understand it
        raise HeaderError(f"cannot decode the data set ({type(exc).__name__})") from exc
    return found  # every value wanted is text, which byte order does not touch


def _facts(raw: dict[int, bytes]) -> HeaderFacts:
    uids = {key: checked_uid(_uid(raw.get(tag)), keyword) for key, (tag, keyword) in _UIDS.items()}
    try:
        frames = _integer(_text(raw.get(_FRAMES)) or "1")
    except ValueError:
        raise HeaderError("NumberOfFrames is not an integer") from None
    if frames < 1:
        raise HeaderError(f"NumberOfFrames is {frames} in {uids['sop_instance_uid']}")
    try:
        number: int | None = _integer(_text(raw.get(_NUMBER)))
    except ValueError:
        number = None
    return HeaderFacts(
        **uids,
        modality=_text(raw.get(_MODALITY)).upper(),
        description=_decoded(raw.get(_DESCRIPTION), raw.get(_CHARSET)),
        instance_number=number,
        frames=frames,
    )


def _integer(text: str) -> int:
    """An IS value; like pydicom, "7.0" is 7 (ValueError for anything else that is not an integer)."""
    try:
        return int(text)
    except ValueError:
        number = float(text)
        if not number.is_integer():
            raise
        return int(number)


def _uid(value: bytes | None) -> str | None:
    if not value:
        return None
    try:
        return value.rstrip(b"\x00 ").decode("ascii")
    except UnicodeDecodeError:
        raise UnsafeUIDError("a UID holds non-ASCII bytes") from None


def _text(value: bytes | None) -> str:
    """A CS or IS value (ASCII by definition), without padding."""
    if not value:
        return ""
    try:
        return value.decode("ascii").strip(" \x00")
    except UnicodeDecodeError:
        raise HeaderError("a code string holds non-ASCII bytes") from None


def _decoded(value: bytes | None, charset: bytes | None) -> str:
    """A text value in the data set's character set (ASCII by default)."""
    if not value:
        return ""
    if value.isascii():
        return value.decode("ascii").rstrip(" \x00")
    terms = [t.strip() for t in _text(charset).split("\\")] if charset else None
    return decode_bytes(value, convert_encodings(terms), set()).rstrip(" \x00")
