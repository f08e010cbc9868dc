"""The source header a SEG copies, made valid before highdicom copies it, and checked before inference.

highdicom copies the patient, study (and specimen) modules of the first source image into the SEG
and reads its equipment for the Contributing Equipment Sequence. Real scanners write values that
highdicom refuses (PatientSex ``0000``) or that make the SEG invalid (NUL padding in a code
sequence), and a job would fail only after its inference. :func:`sanitised_source` gives highdicom
a view of that image whose values follow the standard: a value with one safe answer is normalised
(padding stripped, a code string upper-cased, ``2024-01-01`` → ``20240101``), otherwise emptied
(type 2) or dropped (type 3). The caller's dataset is never changed, pixel data never copied.
What cannot be repaired (the UIDs a SEG is built on) :func:`check_source_metadata` refuses before
inference. Repairs are logged by keyword, never by value (names, IDs, birth dates).

Attribute types (1, 1C, 2, 2C, 3), nested ones too, come from highdicom's copy of the standard's
module tables, so the rules follow exactly the modules highdicom copies.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import highdicom as hd
from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from ian_node.segment.values import InvalidValue, clean_value, same_value, target_vr
from ian_node.segment.volume import MalformedDatasetError, SeriesVolume
from ian_node.uids import is_dicom_uid

logger = logging.getLogger(__name__)

Action = Literal["normalised", "emptied", "dropped", "added empty"]


class SourceMetadataError(MalformedDatasetError):
    """A source header value that a SEG cannot be built without is missing or invalid.

    A malformed-dataset :class:`SeriesError`, so the worker and ``predict`` report it as one.
    """


@dataclass(frozen=True)
class MetadataRepair:
    """One change made to the source header the SEG copies; never holds the value itself."""

    instance: str
    keyword: str  # a path for nested attributes, e.g. "ProcedureCodeSequence[0].CodeValue"
    action: Action
    reason: str

    def __str__(self) -> str:
        return f"{self.keyword} {self.action} ({self.reason})"


@dataclass(frozen=True)
class SanitisedSource:
    """A view of one source image for highdicom, with what changed and what to finish on the SEG."""

    dataset: Dataset
    repairs: tuple[MetadataRepair, ...]
    specific_character_set: str | None
    deferred: tuple[DataElement, ...] = field(default=())

    def finish(self, seg: Dataset) -> None:
        """Set on the built SEG the values kept out of highdicom's constructor (see :data:`_DEFERRED`)."""
        for elem in self.deferred:
            seg[elem.tag] = elem


# ---------------------------------------------------------------- rules from the standard
#: IEs whose modules highdicom copies into the SEG (plus the Specimen module, from the Image IE).
_COPIED_IES = ("Patient", "Study")
#: Attributes highdicom reads but does not copy (contributing equipment, frame of reference,
#: lossy compression), with the type used to repair them; absent ones stay absent.
_READ_ONLY: dict[str, str] = {
    "Manufacturer": "2", "ManufacturerModelName": "3", "SoftwareVersions": "3", "DeviceSerialNumber": "3",
    "InstitutionName": "3", "InstitutionalDepartmentName": "3", "InstitutionAddress": "3", "StationName": "3",
    "AcquisitionDateTime": "3", "PositionReferenceIndicator": "2", "LossyImageCompression": "3",
    "LossyImageCompressionRatio": "3", "LossyImageCompressionMethod": "3",
}
#: highdicom warns with the value itself about a one-component PatientName; such a name (valid DICOM)
#: is kept out of its constructor and set on the SEG afterwards, so the name never reaches a log.
_DEFERRED = ("PatientName",)
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_UID_KEYWORDS = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


@dataclass(frozen=True)
class _Module:
    key: str
    mandatory: bool
    members: tuple[tuple[str, str], ...]  # (keyword, type) at the root


@dataclass(frozen=True)
class _Rules:
    modules: tuple[_Module, ...]
    nested: dict[tuple[str, ...], dict[str, str]]  # sequence path -> {keyword: type} of its items


@lru_cache(maxsize=16)
def _rules(sop_class_uid: str) -> _Rules:
    iod = get_sop_class_iod_map().get(sop_class_uid)
    if iod is None:
        raise SourceMetadataError("unknown", f"SOPClassUID {sop_class_uid} is not a SOP class highdicom knows")
    attributes = get_module_attribute_map()
    modules: list[_Module] = []
    nested: dict[tuple[str, ...], dict[str, str]] = {}
    for module in get_iod_module_map()[iod]:
        if module["ie"] not in _COPIED_IES and module["key"] != "specimen":
            continue
        items = attributes[module["key"]]
        members = tuple((str(a["keyword"]), str(a["type"])) for a in items if not a["path"])
        for a in items:
            if a["path"]:
                nested.setdefault(tuple(a["path"]), {})[str(a["keyword"])] = str(a["type"])
        modules.append(_Module(module["key"], module["usage"] == "M", members))
    return _Rules(tuple(modules), nested)


def _is_empty(elem: DataElement) -> bool:
    return elem.value is None or elem.value == "" or (elem.VR == "SQ" and len(elem.value) == 0)


def _empty_element(tag: int) -> DataElement:
    vr = dictionary_VR(tag)
    return DataElement(tag, vr, DicomSequence() if vr == "SQ" else None)


# ---------------------------------------------------------------- elements, items, sequences
@dataclass
class _Pass:
    """One sanitising pass over one dataset: the repairs made and the text kept (for the charset)."""

    instance: str
    rules: _Rules
    repairs: list[MetadataRepair] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def note(self, keyword: str, action: Action, reason: str) -> None:
        self.repairs.append(MetadataRepair(self.instance, keyword, action, reason))

    def element(self, elem: DataElement, path: tuple[str, ...], label: str) -> DataElement:
        """A valid new copy of `elem`; `InvalidValue` when its value has no safe repair."""
        if elem.tag.is_private:
            return copy.copy(elem)
        keyword = keyword_for_tag(elem.tag) or str(elem.tag)
        vr = target_vr(elem)
        if vr == "SQ":
            return DataElement(elem.tag, "SQ", DicomSequence(self.sequence(elem.value or [], (*path, keyword), label)))
        cleaned = clean_value(elem, vr, keyword)
        self.texts.extend(v for v in (cleaned if isinstance(cleaned, list) else [cleaned]) if isinstance(v, str))
        if not same_value(elem.value, cleaned):
            self.note(label, "normalised", f"made valid for VR {vr}")
        return DataElement(elem.tag, vr, cleaned)

    def typed(self, source: Dataset, tag: int, kind: str, path: tuple[str, ...], label: str) -> DataElement | None:
        """`source[tag]` repaired by its attribute type: emptied (2, 2C), dropped (1C, 3), `InvalidValue` (1)."""
        try:
            original = source[tag]
            cleaned = self.element(original, path, label)
            if kind == "1" and _is_empty(cleaned):
                raise InvalidValue("empty")
        except InvalidValue as exc:
            return self._invalid(tag, kind, label, str(exc))
        except (ValueError, TypeError, KeyError, OverflowError):  # pydicom could not decode the raw value
            return self._invalid(tag, kind, label, "not decodable")
        if cleaned.VR == "SQ" and _is_empty(cleaned) and kind in ("1C", "3"):  # present means 1-n items
            self.note(label, "dropped", "no valid items" if original.value else "no items")
            return None
        return cleaned

    def _invalid(self, tag: int, kind: str, label: str, reason: str) -> DataElement | None:
        if kind == "1":
            raise InvalidValue(reason)
        if kind in ("2", "2C"):
            self.note(label, "emptied", reason)
            return _empty_element(tag)
        self.note(label, "dropped", reason)
        return None

    def sequence(self, items: Iterable[Dataset], path: tuple[str, ...], label: str) -> list[Dataset]:
        kept = []
        for k, item in enumerate(items):
            try:
                kept.append(self.item(item, path, f"{label}[{k}]"))
            except InvalidValue as exc:
                self.note(f"{label}[{k}]", "dropped", f"item: {exc}")
        return kept

    def item(self, item: Dataset, path: tuple[str, ...], label: str) -> Dataset:
        types = self.rules.nested.get(path, {})
        out = Dataset()
        for tag in list(item.keys()):
            keyword = keyword_for_tag(tag) or str(tag)
            try:
                cleaned = self.typed(item, tag, types.get(keyword, "3"), path, f"{label}.{keyword}")
            except InvalidValue as exc:
                raise InvalidValue(f"its required {keyword} is {exc}") from None
            if cleaned is not None:
                out[tag] = cleaned
        for keyword, kind in types.items():
            if keyword in out or kind not in ("1", "2"):
                continue
            if kind == "1":
                raise InvalidValue(f"its required {keyword} is missing")
            out[tag_for_keyword(keyword)] = _empty_element(tag_for_keyword(keyword))
            self.note(f"{label}.{keyword}", "added empty", "type 2")
        if types.get("CodeMeaning") == "1":
            self._code_item(out, label)
        return out

    def _code_item(self, item: Dataset, label: str) -> None:
        """The Code Sequence Macro's conditions that the module tables cannot state as types."""
        values = {k for k in ("CodeValue", "LongCodeValue", "URNCodeValue") if item.get(k)}
        if not values:
            raise InvalidValue("no code value")
        if values & {"CodeValue", "LongCodeValue"} and not item.get("CodingSchemeDesignator"):
            raise InvalidValue("no coding scheme designator")
        if item.get("ContextGroupExtensionFlag") == "Y" and not (
                item.get("ContextGroupLocalVersion") and item.get("ContextGroupExtensionCreatorUID")):
            del item.ContextGroupExtensionFlag
            self.note(f"{label}.ContextGroupExtensionFlag", "dropped", "an extension without its version or creator")
        if item.get("ContextIdentifier") and not (item.get("MappingResource") and item.get("ContextGroupVersion")):
            del item.ContextIdentifier
            self.note(f"{label}.ContextIdentifier", "dropped", "no mapping resource or context group version")


# ---------------------------------------------------------------- the view and the checks
def _character_set(declared: Any, texts: Sequence[str]) -> str | None:
    """A Specific Character Set that highdicom accepts and that encodes every copied value."""
    if isinstance(declared, MultiValue | list | tuple):
        declared = declared[0] if len(declared) == 1 else None
    single = declared if isinstance(declared, str) and not declared.startswith("ISO 2022") else None
    valid = single in {v.value for v in hd.enum.SpecificCharacterSetValues}
    if all(t.isascii() for t in texts):
        return single if valid else None
    if valid:
        try:
            for text in texts:
                text.encode(python_encoding[single])
            return single
        except (UnicodeError, KeyError, LookupError):
            pass
    return "ISO_IR 192"


def _series_of(dataset: Dataset) -> str:
    uid = dataset.get("SeriesInstanceUID")
    return str(uid) if isinstance(uid, str) and is_dicom_uid(uid) else "unknown"


def _put(view: Dataset, tag: int, elem: DataElement | None) -> None:
    if elem is not None:
        view[tag] = elem
    elif tag in view:
        del view[tag]


def _sanitise_module(dataset: Dataset, view: Dataset, module: _Module, work: _Pass) -> None:
    """Repair one copied module; a required (type 1) value that cannot be repaired drops an optional
    module whole and refuses a mandatory one."""
    present = [(kw, kind) for kw, kind in module.members if tag_for_keyword(kw) in dataset]
    if not present and not module.mandatory:
        return
    cleaned: dict[int, DataElement | None] = {}
    added: list[str] = []
    for keyword, kind in module.members:
        tag = tag_for_keyword(keyword)
        try:
            if tag in dataset:
                cleaned[tag] = work.typed(dataset, tag, kind, (), keyword)
            elif kind == "1":
                raise InvalidValue("missing")
            elif kind == "2":
                cleaned[tag] = _empty_element(tag)
                added.append(keyword)
        except InvalidValue as exc:
            if module.mandatory:
                raise SourceMetadataError(_series_of(dataset), f"instance {work.instance}: {keyword} is {exc}") from None
            for kw, _ in present:
                _put(view, tag_for_keyword(kw), None)
                work.note(kw, "dropped", f"the {module.key} module's required {keyword} is {exc}")
            return
    for keyword in added:
        work.note(keyword, "added empty", "type 2")
    for tag, elem in cleaned.items():
        _put(view, tag, elem)


def _sanitise(dataset: Dataset, extra_text: Sequence[str]) -> SanitisedSource:
    instance = str(dataset.get("SOPInstanceUID", "unknown"))
    work = _Pass(instance, _rules(str(dataset.get("SOPClassUID", ""))))
    view = Dataset()
    for raw in dataset.elements():  # unconverted: nothing of the caller's is decoded or copied here
        if raw.tag not in _PIXEL_TAGS and not (raw.tag >> 24 == 0x60 and raw.tag & 0xFFFF == 0x3000):
            view[raw.tag] = raw
    for module in work.rules.modules:
        _sanitise_module(dataset, view, module, work)
    for keyword, kind in _READ_ONLY.items():
        tag = tag_for_keyword(keyword)
        if tag in dataset:
            _put(view, tag, work.typed(dataset, tag, kind, (), keyword))
    deferred = []
    for keyword in _DEFERRED:
        name = view.get(keyword)
        if name and "^" not in str(name):
            deferred.append(view[keyword])
            view[keyword] = _empty_element(tag_for_keyword(keyword))
    declared = dataset.get("SpecificCharacterSet")
    charset = _character_set(declared, [*work.texts, *extra_text])
    if charset != (declared or None):
        work.note("SpecificCharacterSet", "normalised", "one highdicom accepts that encodes the copied values")
    return SanitisedSource(view, tuple(work.repairs), charset, tuple(deferred))


def sanitised_source(dataset: Dataset, *, extra_text: Sequence[str] = ()) -> SanitisedSource:
    """A view of `dataset` whose copied header highdicom accepts and the standard allows.

    The view shares the caller's other elements, unconverted, and leaves pixel data out, so the
    caller's dataset stays as it was. `extra_text` (the SEG's own strings) takes part in choosing
    the character set. Each repair is logged by keyword, never by value.
    """
    sanitised = _sanitise(dataset, extra_text)
    for repair in sanitised.repairs:
        level = logging.INFO if repair.action in ("normalised", "added empty") else logging.WARNING
        logger.log(level, "SEG source %s: %s", repair.instance, repair)
    return sanitised


def check_source_metadata(source: SeriesVolume | Sequence[Dataset]) -> tuple[MetadataRepair, ...]:
    """Refuse, before inference, a series whose SEG could not be built; return the repairs it will get.

    Every instance needs valid SOP Instance, SOP Class, Study, Series and Frame of Reference UIDs,
    one study, series and frame of reference for all: a SEG references them and cannot change them.
    The repairs are those :func:`sanitised_source` will make to the image highdicom copies from:
    the first in volume order for a loaded series, else the first dataset given.
    """
    if isinstance(source, SeriesVolume):
        datasets = list({id(f.dataset): f.dataset for f in source.frames}.values())
    else:
        datasets = list(source)
    if not datasets:
        raise SourceMetadataError("unknown", "no source images given")
    series = source.series_uid if isinstance(source, SeriesVolume) else _series_of(datasets[0])
    seen: dict[str, set[str]] = {k: set() for k in _UID_KEYWORDS[2:]}
    for k, ds in enumerate(datasets):
        sop = ds.get("SOPInstanceUID")
        name = f"instance {sop}" if isinstance(sop, str) and is_dicom_uid(sop) else f"instance #{k + 1}"
        for keyword in _UID_KEYWORDS:
            value = ds.get(keyword)
            if value is None or value == "":
                raise SourceMetadataError(series, f"{name}: {keyword} is missing")
            if not isinstance(value, str) or not is_dicom_uid(value):
                raise SourceMetadataError(series, f"{name}: {keyword} is not a valid DICOM UID")
            seen.get(keyword, set()).add(str(value))
        if str(ds.SOPClassUID) not in get_sop_class_iod_map():
            raise SourceMetadataError(series, f"{name}: SOPClassUID {ds.SOPClassUID} is not a class highdicom knows")
    for keyword, values in seen.items():
        if len(values) > 1:
            raise SourceMetadataError(series, f"the source images have {len(values)} different {keyword}s")
    repairs = _sanitise(datasets[0], ()).repairs
    if repairs:
        logger.info("SEG source %s: %d header values will be repaired: %s", datasets[0].SOPInstanceUID,
                    len(repairs), ", ".join(sorted({r.keyword for r in repairs})))
    return repairs
