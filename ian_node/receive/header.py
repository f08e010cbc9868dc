"""The few header facts the node files an instance by, read from its encoded data set.

Both ways in (the SCP's C-STORE and a pull from Orthanc or a DICOMweb server) need the same facts,
checked the same way: the SOP class and instance, the series and study (which name the spool path,
so each must be a real UID), the modality and series description (for the selection rules), the
instance number and the number of frames.

Why not decode with pydicom: at four parallel associations the SCP is CPU-bound under the GIL, and a
pydicom parse of the leading elements plus the value conversions cost about 0.14 ms per instance on
its own (a quarter of the node's bookkeeping). Little- and big-endian data sets, explicit or implicit
VR (which includes every compressed transfer syntax, and a deflated one once inflated), are walked
here element by element, following sequences, items and pixel fragments, keeping only the raw
top-level values wanted. Anything this walk does not interpret (elements out of order, a VR that is
not one, explicit VR sent as implicit) goes to pydicom's more lenient reader instead, so the facts
never depend on the path taken.

With ``check_structure=True`` (the SCP) the walk goes on to the end of the data set, and a data set
the node could not decode later is a HeaderError naming the element, never a value: a length past
the end of the data or of its item, a data set cut short, or sequences nested deeper than
MAX_SEQUENCE_DEPTH (pydicom's reader dies in a RecursionError a few hundred levels down; where it
reads instead of the walk, that error is a HeaderError too). Without it (the default) only what the
facts need is read, as leniently as pydicom reads it: its reader accepts a truncated file, such as
its own ``MR_truncated.dcm``. What the walk leaves to pydicom is checked only as far as the facts.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import DicomDictionary, keyword_for_tag
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

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
#: The deepest sequence nesting accepted; real objects (SR content trees included) stay far below it.
MAX_SEQUENCE_DEPTH = 32
#: Explicit VRs whose length takes 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
#: Standard tags whose VR is SQ: an implicit VR data set does not say which values are sequences.
_SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _CannotWalk(Exception):
    """An encoding the walk does not interpret (pydicom's reader, more lenient, gets the data set)."""


class _Cut(HeaderError):
    """A length past the end of the data or of its item, or a data set cut short."""


class _Walk:
    """One walk over an encoded data set: the wanted top-level values, its structure checked on the way.

    Every sequence, item and fragment met is followed, so a value running past its container is a
    _Cut and sequences nested deeper than MAX_SEQUENCE_DEPTH a HeaderError. The recursion is bounded
    by that depth, which is checked before a level is entered.
    """

    def __init__(self, data: bytes, little: bool) -> None:
        self.data = data
        self.little = little
        order = "<" if little else ">"
        self.tag = struct.Struct(order + "HH").unpack_from
        self.u16 = struct.Struct(order + "H").unpack_from
        self.u32 = struct.Struct(order + "L").unpack_from

    def top(self, implicit: bool, whole: bool) -> dict[int, bytes]:
        """The wanted values; the walk ends at the first element past them unless ``whole``."""
        data, end = self.data, len(self.data)
        if implicit and end >= 6 and 0x40 < data[4] < 0x5B and 0x40 < data[5] < 0x5B:
            raise _CannotWalk  # explicit VR sent as implicit: pydicom's reader switches to it
        unpack_tag, u16, u32 = self.tag, self.u16, self.u32  # the hot loop: element headers inlined
        found: dict[int, bytes] = {}
        pos, previous = 0, -1
        while pos < end:
            if pos + 8 > end:
                raise _Cut(f"the data set is cut short: {end - pos} bytes where an element starts")
            group, element = unpack_tag(data, pos)
            tag = group << 16 | element
            if previous <= _LAST:
                if tag <= previous:  # out of order: not a data set this walk can trust
                    raise _CannotWalk
                if tag > _LAST and not whole:
                    return found
                previous = tag
            if group == 0xFFFE:
                raise _CannotWalk  # an item or a delimiter where an element belongs
            if implicit:
                vr, length, start = b"", u32(data, pos + 4)[0], pos + 8
            elif not ((vr := data[pos + 4:pos + 6]).isalpha() and vr.isupper()):  # not a VR
                raise _CannotWalk
            elif vr in _LONG_VRS:
                if pos + 12 > end:
                    raise _Cut(f"the data set is cut short inside the header of {_name(tag)}")
                length, start = u32(data, pos + 8)[0], pos + 12
            else:
                length, start = u16(data, pos + 6)[0], pos + 8
            if length == _UNDEFINED:
                pos = self.undefined(tag, vr, start, end, implicit, 1)
                continue
            if start + length > end:
                raise _Cut(f"{_name(tag)} declares {length} bytes, only {end - start} remain")
            if tag in _WANTED:
                found[tag] = data[start:start + length]
            elif vr == b"SQ" or (implicit and tag in _SQ_TAGS):
                self.items(tag, start, start + length, False, implicit, 1)
            pos = start + length
        return found

    def header(self, pos: int, limit: int, implicit: bool) -> tuple[int, bytes, int, int]:
        """(tag, VR or b"", length, where the value starts) of the element at ``pos``."""
        data = self.data
        if pos + 8 > limit:
            raise _Cut(f"the data set is cut short: {limit - pos} bytes where an element starts")
        group, element = self.tag(data, pos)
        tag = group << 16 | element
        if implicit or group == 0xFFFE:
            return tag, b"", self.u32(data, pos + 4)[0], pos + 8
        vr = data[pos + 4:pos + 6]
        if not (vr.isalpha() and vr.isupper()):  # not a VR
            raise _CannotWalk
        if vr in _LONG_VRS:
            if pos + 12 > limit:
                raise _Cut(f"the data set is cut short inside the header of {_name(tag)}")
            return tag, vr, self.u32(data, pos + 8)[0], pos + 12
        return tag, vr, self.u16(data, pos + 6)[0], pos + 8

    def undefined(self, tag: int, vr: bytes, start: int, limit: int, implicit: bool, depth: int) -> int:
        """Where an element of undefined length ends: a sequence (SQ, UN or implicit) or pixel fragments."""
        if vr in (b"SQ", b"") and not (implicit and tag == 0x7FE00010):
            return self.items(tag, start, limit, True, implicit, depth)
        if vr == b"UN":  # its items are implicit VR little endian (PS3.5 6.2.2)
            if not self.little:
                raise _CannotWalk
            return self.items(tag, start, limit, True, True, depth)
        return self.fragments(tag, start, limit)

    def items(self, tag: int, pos: int, limit: int, delimited: bool, implicit: bool, depth: int) -> int:
        """Walk a sequence's items from ``pos``; returns where the sequence ends."""
        if depth > MAX_SEQUENCE_DEPTH:
            raise HeaderError(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels (in {_name(tag)})")
        data = self.data
        while True:
            if not delimited and pos == limit:
                return pos
            if pos + 8 > limit:
                what = "has no sequence delimiter" if delimited and pos == limit else "is cut short"
                raise _Cut(f"the sequence {_name(tag)} {what}")
            group, element = self.tag(data, pos)
            length = self.u32(data, pos + 4)[0]
            item = group << 16 | element
            if item == _SEQUENCE_END and delimited:
                return pos + 8
            if item != _ITEM:
                raise _CannotWalk
            if length == _UNDEFINED:
                pos = self.dataset(tag, pos + 8, limit, True, implicit, depth)
                continue
            if pos + 8 + length > limit:
                raise _Cut(f"an item of {_name(tag)} declares {length} bytes, only {limit - pos - 8} remain")
            self.dataset(tag, pos + 8, pos + 8 + length, False, implicit, depth)
            pos += 8 + length

    def dataset(self, parent: int, pos: int, limit: int, delimited: bool, implicit: bool, depth: int) -> int:
        """Walk one item's data set from ``pos``; returns where the item ends."""
        while True:
            if pos == limit:
                if delimited:
                    raise _Cut(f"an item of {_name(parent)} has no item delimiter")
                return pos
            tag, vr, length, start = self.header(pos, limit, implicit)
            if tag == _ITEM_END and delimited:
                return start
            if tag >> 16 == 0xFFFE:
                raise _CannotWalk
            if length == _UNDEFINED:
                pos = self.undefined(tag, vr, start, limit, implicit, depth + 1)
                continue
            if start + length > limit:
                raise _Cut(f"{_name(tag)} in {_name(parent)} declares {length} bytes, only {limit - start} remain")
            if vr == b"SQ" or (implicit and tag in _SQ_TAGS):
                self.items(tag, start, start + length, False, implicit, depth + 1)
            pos = start + length

    def fragments(self, tag: int, pos: int, limit: int) -> int:
        """Skip the fragments of encapsulated pixel data; returns where they end."""
        data = self.data
        while True:
            if pos + 8 > limit:
                raise _Cut(f"the fragments of {_name(tag)} are cut short")
            group, element = self.tag(data, pos)
            length = self.u32(data, pos + 4)[0]
            item = group << 16 | element
            if item == _SEQUENCE_END:
                return pos + 8
            if item != _ITEM or length == _UNDEFINED:
                raise _CannotWalk
            if pos + 8 + length > limit:
                raise _Cut(f"a fragment of {_name(tag)} declares {length} bytes, only {limit - pos - 8} remain")
            pos += 8 + length


def _name(tag: int) -> str:
    """``(7FE0,0010) PixelData``: a tag as the log names it (the keyword when pydicom knows it)."""
    keyword = keyword_for_tag(tag) if tag >> 16 != 0xFFFE else ""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})" + (f" {keyword}" if keyword else "")


def read_header_facts(dataset: bytes, transfer_syntax: str, check_structure: bool = False) -> HeaderFacts:
    """The facts of an encoded data set (no file meta); HeaderError or UnsafeUIDError when unusable.

    ``check_structure``: walk the whole data set and refuse a malformed one (see the module).
    """
    syntax = UID(transfer_syntax)
    if not syntax.is_transfer_syntax:
        raise HeaderError(f"{transfer_syntax} is not a transfer syntax")
    if syntax.is_deflated:
        dataset, syntax = _inflate(dataset), UID(ExplicitVRLittleEndian)
    try:
        raw = _walk(dataset, syntax.is_implicit_VR, syntax.is_little_endian, whole=check_structure)
    except _Cut:
        if check_structure:
            raise
        raw = None  # pydicom's reader accepts what is cut short, so the facts do too
    if raw is None:
        raw = _read_with_pydicom(dataset, syntax)
    return _facts(raw)


def _walk(data: bytes, implicit: bool, little: bool = True, whole: bool = False) -> dict[int, bytes] | None:
    """The raw values of the wanted elements, or None where the walk cannot interpret the encoding."""
    try:
        return _Walk(data, little).top(implicit, whole)
    except _CannotWalk:
        return None


def _inflate(data: bytes) -> bytes:
    try:
        return zlib.decompress(data, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise HeaderError(f"cannot inflate the data set ({exc})") from exc


def _read_with_pydicom(data: bytes, syntax: UID) -> dict[int, bytes]:
    """The same raw values through pydicom's reader (what the walk does not interpret)."""
    if syntax.is_deflated:
        data = _inflate(data)
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
    except RecursionError:
        raise HeaderError("sequences nested too deep to decode") from None
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
