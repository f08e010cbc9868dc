"""One DICOM value made valid for its VR, VM and enumerated values, or refused with a reason.

The value-level half of :mod:`ian_node.segment.metadata`: padding that the standard calls
insignificant is stripped, a code string upper-cased, an ISO date or a colon time reformatted, an
age given its leading zeros; anything else the standard (or highdicom) refuses raises
:class:`InvalidValue`, whose message never contains the value. Lengths are counted in encoded
bytes, as dciodvfy counts them.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import highdicom as hd
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, STR_VR_REGEXES, format_number_as_ds

from ian_node.uids import is_dicom_uid

#: Defined by the standard as enumerated values (PS3.3); anything else is invalid.
_ENUMERATED: dict[str, frozenset[Any]] = {
    "PatientSex": frozenset(v.value for v in hd.PatientSexValues), "PregnancyStatus": frozenset({1, 2, 3, 4}),
    "PatientSexNeutered": frozenset({"ALTERED", "UNALTERED"}), "SmokingStatus": frozenset({"YES", "NO", "UNKNOWN"}),
    "QualityControlSubject": frozenset({"YES", "NO"}), "PatientIdentityRemoved": frozenset({"YES", "NO"}),
    "TypeOfPatientID": frozenset({"TEXT", "RFID", "BARCODE"}), "ContextGroupExtensionFlag": frozenset({"Y", "N"}),
    "LossyImageCompression": frozenset({"00", "01"}),
}
#: highdicom's own checks refuse a backslash in these ST values (the standard allows it).
_NO_BACKSLASH_ST = frozenset({"InstitutionAddress"})

_LEADING_INSIGNIFICANT = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI"})
_MAX_CHARS = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64, "LT": 10240,
              "SH": 16, "ST": 1024, "TM": 14, "UI": 64}
_CONTROLS_ALLOWED = {"LT": "\n\f\r\x1b", "ST": "\n\f\r\x1b", "UT": "\n\f\r\x1b",
                     "LO": "\x1b", "SH": "\x1b", "PN": "\x1b", "UC": "\x1b"}
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                      "UI", "UR", "UT"})
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
_ISO_DATE = re.compile(r"(\d{4})[-./](\d{2})[-./](\d{2})")
_COLON_TIME = re.compile(r"(\d{2}):(\d{2})(?::(\d{2}(?:\.\d{1,6})?))?")
_TM = re.compile(r"([01]\d|2[0-3])([0-5]\d((60|[0-5]\d)(\.\d{1,6})?)?)?")
_DT = re.compile(STR_VR_REGEXES["DT"].pattern.split("$|")[0].lstrip("^"))
_AGE = re.compile(r"(\d{1,3}) ?([DWMY])")
_INT32 = (-(2**31), 2**31 - 1)


class InvalidValue(ValueError):
    """A value with no safe repair; the message is a reason without the value."""


def _characters_ok(vr: str, text: str) -> bool:
    allowed = _CONTROLS_ALLOWED.get(vr, "")
    for ch in text:
        category = unicodedata.category(ch)
        if (category == "Cc" and ch not in allowed) or category == "Cs" or ch in "\ufffe\uffff":
            return False
    return True


def _length(text: str) -> int:
    """Length as validators such as dciodvfy count it: encoded bytes (UTF-8, the widest we write)."""
    return len(text.encode("utf-8", "surrogatepass"))


def _clean_person_name(text: str) -> str:
    groups = text.split("=")
    if len(groups) > 3:
        raise InvalidValue("more than 3 component groups")
    cleaned = []
    for group in groups:
        components = group.split("^")
        if len(components) > 5 or _length(group) > 64:
            raise InvalidValue("more than 5 components or 64 bytes in a group")
        while components and not components[-1].strip(" "):
            components.pop()
        cleaned.append("^".join(c.rstrip(" ") for c in components))
    while cleaned and not cleaned[-1]:
        cleaned.pop()
    return "=".join(cleaned)


def _clean_text(vr: str, text: str, keyword: str) -> str:
    """One value of a text VR, normalised where that is safe; `InvalidValue` when it cannot be."""
    text = text.rstrip("\x00 ")
    if vr in _LEADING_INSIGNIFICANT:
        text = text.lstrip("\x00 ")
    if not _characters_ok(vr, text):
        raise InvalidValue("control or unencodable characters")
    if "\\" in text and (vr not in ("ST", "LT", "UT") or keyword in _NO_BACKSLASH_ST):
        raise InvalidValue("a backslash")
    if vr == "PN":
        return _clean_person_name(text)
    if not text:
        return text
    if vr in ("CS", "AS"):
        text = text.upper()
    if vr == "DA" and (m := _ISO_DATE.fullmatch(text)):
        text = "".join(m.groups())
    elif vr == "TM" and (m := _COLON_TIME.fullmatch(text)):
        text = "".join(g.replace(":", "") for g in m.groups() if g)
    elif vr == "AS" and (m := _AGE.fullmatch(text)):
        text = m.group(1).zfill(3) + m.group(2)
    elif vr == "DS" and len(text) > 16 and STR_VR_REGEXES["DS"].match(text):
        text = format_number_as_ds(float(text))
    limit = _MAX_CHARS.get(vr)
    if limit is not None and _length(text) > limit:
        raise InvalidValue(f"longer than {limit} bytes")
    if vr in ("AE", "AS", "CS", "DS", "IS", "UR") and not STR_VR_REGEXES[vr].match(text):
        raise InvalidValue(f"not a valid {vr}")
    if vr == "IS" and not _INT32[0] <= int(text) <= _INT32[1]:
        raise InvalidValue("outside the IS range")
    if vr == "UI" and not is_dicom_uid(text):
        raise InvalidValue("not a valid UID")
    if vr == "TM" and not _TM.fullmatch(text):
        raise InvalidValue("not a valid TM")
    if vr in ("DA", "DT"):
        pattern = r"\d{8}" if vr == "DA" else _DT.pattern
        try:
            ok = re.fullmatch(pattern, text) is not None and (DA(text) if vr == "DA" else DT(text)) is not None
        except (ValueError, OverflowError):
            ok = False
        if not ok:
            raise InvalidValue(f"not a valid {vr}")
    return text


def _vm_ok(vm: str, count: int) -> bool:
    """Whether `count` values fit the dictionary VM ("1", "1-n", "2-2n", "1-3")."""
    if count <= 1 or not vm:
        return True
    low, _, high = vm.partition("-")
    if not (low.isdigit() and (not high or high.rstrip("n").isdigit() or high == "n")):
        return True  # a VM this reading does not know: no check
    if not high.endswith("n"):
        return int(low) <= count <= int(high or low)
    return count >= int(low) and count % int(high[:-1] or 1) == 0


def text_of(value: Any) -> str:
    """A value as its DICOM string (PersonName, DSfloat and IS keep the string they were read from)."""
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def target_vr(elem: DataElement) -> str:
    """The dictionary VR (the element's own for private or ambiguous tags); `InvalidValue` on a clash."""
    try:
        expected = dictionary_VR(elem.tag)
    except KeyError:
        return elem.VR
    if " or " in expected or expected == elem.VR:
        return elem.VR if " or " in expected else expected
    if expected in TEXT_VRS and (elem.VR in TEXT_VRS or (elem.VR == "UN" and not elem.value)):
        return expected
    raise InvalidValue(f"VR {elem.VR} where the standard has {expected}")


def clean_value(elem: DataElement, vr: str, keyword: str) -> Any:
    """The element's value made valid for `vr` and the dictionary VM; `InvalidValue` when it cannot be."""
    value = elem.value
    if value is None or value == "" or vr == "SQ":
        return value
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        vm = dictionary_VM(elem.tag)
    except KeyError:
        vm = ""
    if not _vm_ok(vm, len(values)):
        raise InvalidValue(f"{len(values)} values where the standard allows {vm}")
    if vr in TEXT_VRS:
        values = [_clean_text(vr, text_of(v), keyword) for v in values]
    elif vr in _NUMBER_VRS:
        if any(not isinstance(v, int | float) or isinstance(v, bool) for v in values):
            raise InvalidValue(f"not a {vr} number")
    elif vr == "UN":
        raise InvalidValue("an undecoded value")
    allowed = _ENUMERATED.get(keyword)
    if allowed is not None and any(v not in allowed for v in values if v != ""):
        raise InvalidValue("not one of the standard's enumerated values")
    return values[0] if len(values) == 1 else values


def same_value(old: Any, new: Any) -> bool:
    """Whether cleaning left the value as it was (compared as DICOM strings)."""
    if isinstance(old, MultiValue | list | tuple):
        return isinstance(new, list) and [text_of(v) for v in old] == [text_of(v) for v in new]
    if old is None or new is None:
        return old is new
    return text_of(old) == text_of(new)
