"""DICOM studies as training samples: MR series plus the DICOM Segmentations (SEG) that annotate them.

The input is any folder tree. Every readable DICOM file is indexed by class: image instances are
grouped by SeriesInstanceUID, SEG instances are the annotations (3D Slicer / dcmqi SEGs, ours, any
writer that fills ReferencedSeriesSequence and per-frame source image references). One SEG gives one
patient's samples; its series must be in the tree, with every instance it references.

Which segment is which nerve (reported per file in `LoadReport`):

1. segments whose label, description or property type names a nerve ("nerve", "IAN", "alveolar",
   "canal") are the candidates, and any other segment is ignored and reported as such; when no
   segment names a nerve, every segment is a candidate (e.g. Slicer's default "Segment_1");
2. a candidate's side comes from a laterality code (SCT 24028007 Right, 7771000 Left, or the older
   SRT G-A100/G-A101) in its property type modifier or anatomic region modifier;
3. otherwise from its label and description as words (right/rt/r/dx, left/lt/l/sin; "IAN_R",
   "Right IAN", "leftNerve" all work);
4. a candidate with no side is an error (`UnmatchedSegmentError`) unless `unsided="split"`, which
   assigns its voxels by position: those in the right ROI half to the right nerve and so on.

Each side is cropped by `LoadOptions.crop` (`training.data.collect`): with ``oracle``, by the
landmark boxes of the `summary.json` next to the SEG file (`find_crop_boxes`; the phantom layout) when
every study has them, otherwise by every study's nerve margins. Two candidates of one side are merged. A side without a segment gives no samples (the paper
excluded pathological nerves this way). A used segment with no voxel is an `EmptyMaskError`.

`read_study` is the volume half of this (SEG + series → label volume), shared with the benchmark's
crop localiser (`training.localiser_run`), which needs the volumes rather than the slices.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import SegmentationStorage

from ian_node.segment.crop import CropMode
from ian_node.segment.reformat import PatientBox
from ian_node.segment.volume import IMAGE_SOP_CLASSES, SeriesVolume, Side, load_series
from training.data.collect import (
    CROP_SUMMARY,
    EITHER_SIDE,
    Collector,
    DatasetError,
    EmptyMaskError,
    MissingSeriesError,
    UnmatchedSegmentError,
    find_crop_boxes,
    volume_samples,
)

logger = logging.getLogger(__name__)

RIGHT_CODES = frozenset({("SCT", "24028007"), ("SRT", "G-A100"), ("SNM3", "G-A100")})
LEFT_CODES = frozenset({("SCT", "7771000"), ("SRT", "G-A101"), ("SNM3", "G-A101")})
_RIGHT_WORDS = frozenset({"right", "rt", "r", "dx", "dex", "dexter", "dextra", "rechts"})
_LEFT_WORDS = frozenset({"left", "lt", "l", "sin", "sinister", "sinistra", "links"})
_NERVE_WORDS = ("nerve", "nerv", "ian", "alveolar", "canal")
_INDEX_TAGS = ["SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"]


@dataclass(frozen=True)
class SegmentMatch:
    """What one segment of a SEG was taken for: `side` None means both sides, split by position."""

    number: int
    label: str
    used: bool
    side: Side | None
    how: str

    def describe(self) -> str:
        target = "ignored" if not self.used else (self.side.value if self.side else "both sides by position")
        return f"segment {self.number} {self.label!r} -> {target} ({self.how})"


def _words(text: str) -> list[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)
    return [w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w]


def _codes(item: Dataset) -> list[tuple[str, str, str]]:
    """(scheme, value, meaning) of every laterality-bearing modifier code of one segment item."""
    found = []
    holders = list(item.get("SegmentedPropertyTypeCodeSequence", [])) + list(item.get("AnatomicRegionSequence", []))
    for holder in holders:
        for key in ("SegmentedPropertyTypeModifierCodeSequence", "AnatomicRegionModifierSequence"):
            for code in holder.get(key, []):
                found.append((str(code.get("CodingSchemeDesignator", "")), str(code.get("CodeValue", "")),
                              str(code.get("CodeMeaning", ""))))
    for code in item.get("SegmentedPropertyTypeModifierCodeSequence", []):
        found.append((str(code.get("CodingSchemeDesignator", "")), str(code.get("CodeValue", "")),
                      str(code.get("CodeMeaning", ""))))
    return found


def _is_nerve(item: Dataset) -> bool:
    text = " ".join(str(item.get(k, "")) for k in ("SegmentLabel", "SegmentDescription"))
    types = item.get("SegmentedPropertyTypeCodeSequence", [])
    text += " " + " ".join(str(t.get("CodeMeaning", "")) for t in types)
    words = _words(text)
    return any(w.startswith(n) for w in words for n in _NERVE_WORDS)


def match_segments(seg: Dataset, unsided: str = "error", where: str = "SEG") -> list[SegmentMatch]:
    """Decide, for every segment of `seg`, whether it is the right or left IAN (rules in the module docstring)."""
    items = list(seg.get("SegmentSequence", []))
    if not items:
        raise UnmatchedSegmentError(f"{where}: the SEG has no segments")
    nerve_flags = [_is_nerve(item) for item in items]
    any_nerve = any(nerve_flags)
    matches = []
    for item, is_nerve in zip(items, nerve_flags, strict=True):
        number, label = int(item.SegmentNumber), str(item.get("SegmentLabel", ""))
        if any_nerve and not is_nerve:
            matches.append(SegmentMatch(number, label, False, None, "not a nerve label"))
            continue
        codes = _codes(item)
        sides = {Side.RIGHT for c in codes if c[:2] in RIGHT_CODES} | {Side.LEFT for c in codes if c[:2] in LEFT_CODES}
        if len(sides) == 1:
            code = next(c for c in codes if c[:2] in (RIGHT_CODES | LEFT_CODES))
            matches.append(SegmentMatch(number, label, True, sides.pop(), f"laterality code {code[0]} {code[1]}"))
            continue
        words = set(_words(label + " " + str(item.get("SegmentDescription", ""))))
        by_text = {Side.RIGHT for w in words if w in _RIGHT_WORDS} | {Side.LEFT for w in words if w in _LEFT_WORDS}
        if len(by_text) == 1 and not sides:
            matches.append(SegmentMatch(number, label, True, by_text.pop(), "label text"))
            continue
        if unsided == "split":
            matches.append(SegmentMatch(number, label, True, None, "no side in codes or label: split by position"))
            continue
        raise UnmatchedSegmentError(
            f"{where}: segment {number} ({label!r}) has no single side: no Right/Left laterality code and no "
            "right/left word in its label; label it (e.g. 'IAN right'), or pass --unsided-segments split to "
            "assign its voxels by side of the head")
    return matches


@dataclass(frozen=True)
class _Index:
    series: dict[str, list[Path]]
    instances: dict[str, set[str]]  # series UID → SOP instance UIDs present
    segs: list[Path]
    files: int


def index_tree(root: Path) -> _Index:
    """Every DICOM file under `root`, by kind; non-DICOM files are ignored."""
    series: dict[str, list[Path]] = defaultdict(list)
    instances: dict[str, set[str]] = defaultdict(set)
    segs: list[Path] = []
    files = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_INDEX_TAGS)
        except (InvalidDicomError, OSError, ValueError, TypeError, EOFError):
            continue
        files += 1
        cls = ds.get("SOPClassUID")
        if cls == SegmentationStorage:
            segs.append(path)
        elif cls in IMAGE_SOP_CLASSES:
            uid = str(ds.get("SeriesInstanceUID", ""))
            series[uid].append(path)
            instances[uid].add(str(ds.get("SOPInstanceUID", "")))
    return _Index(dict(series), dict(instances), segs, files)


def _segment_pixels(seg: hd.seg.Segmentation, series: SeriesVolume, numbers: list[int], where: str) -> np.ndarray:
    """Binary (slices, rows, columns, segments) of `numbers`, aligned with the SeriesVolume's array."""
    frames = series.frames
    kwargs = dict(segment_numbers=numbers, combine_segments=False, assert_missing_frames_are_empty=True,
                  dtype=np.float32)
    try:
        if all(f.frame_number == 1 and int(f.dataset.get("NumberOfFrames", 1) or 1) == 1 for f in frames):
            array = seg.get_pixels_by_source_instance([f.sop_instance_uid for f in frames], **kwargs)
        elif len({f.sop_instance_uid for f in frames}) == 1:
            array = seg.get_pixels_by_source_frame(frames[0].sop_instance_uid,
                                                   source_frame_numbers=[f.frame_number for f in frames], **kwargs)
        else:
            raise DatasetError(f"{where}: the source series mixes multi-frame instances; not supported")
    except DatasetError:
        raise
    except (ValueError, KeyError, AttributeError, RuntimeError, IndexError) as exc:
        raise DatasetError(f"{where}: cannot map the SEG's frames onto series {series.series_uid} "
                           f"through its source image references: {exc}") from exc
    array = np.asarray(array)
    if array.shape[:3] != series.shape:
        raise DatasetError(f"{where}: SEG pixels {array.shape[:3]} do not match series shape {series.shape}")
    return array >= 0.5


@dataclass(frozen=True)
class StudyVolumes:
    """One SEG's study as volumes: what the training samples and the benchmark's localiser are made from."""

    seg_path: Path
    patient: str
    series: SeriesVolume
    labels: np.ndarray  # uint8: `Side.label` per nerve voxel, `EITHER_SIDE` for a segment split by position
    matches: tuple[SegmentMatch, ...]

    @property
    def side_values(self) -> dict[Side, tuple[int, ...]]:
        """Label values that count as each annotated side's nerve."""
        used = [m for m in self.matches if m.used]
        return {side: (side.label, EITHER_SIDE) for side in Side if any(m.side in (side, None) for m in used)}


def _source_series(ds: Dataset, index: _Index, root: Path, where: str) -> str:
    """The UID of the one series a SEG annotates, checked to be in the tree with every referenced instance."""
    refs = list(ds.get("ReferencedSeriesSequence", []))
    uids = sorted({str(r.get("SeriesInstanceUID", "")) for r in refs} - {""})
    if not uids:
        raise MissingSeriesError(f"{where}: the SEG references no series (ReferencedSeriesSequence is empty)")
    if len(uids) > 1:
        raise DatasetError(f"{where}: the SEG references {len(uids)} series; one source series per SEG is supported")
    uid = uids[0]
    if uid not in index.series:
        raise MissingSeriesError(f"{where}: references series {uid}, which is not among the {len(index.series)} "
                                 f"image series under {root}")
    wanted = {str(i.ReferencedSOPInstanceUID) for r in refs for i in r.get("ReferencedInstanceSequence", [])}
    missing = wanted - index.instances[uid]
    if missing:
        raise MissingSeriesError(f"{where}: references {len(missing)} instance(s) of series {uid} that are not "
                                 f"under {root} (e.g. {sorted(missing)[0]})")
    return uid


def read_study(seg_path: Path, index: _Index, root: Path, unsided: str = "error",
               wanted: Callable[[str], bool] | None = None) -> StudyVolumes | None:
    """Read one SEG and its source series into a label volume aligned with the series.

    `wanted` filters by patient before any pixel data is read (the PatientID of the series' first
    file) and again on the loaded series: None is returned for a patient it rejects, so that a
    caller can keep some patients' volumes (a split's test patients) out of memory altogether.
    """
    where = str(seg_path)
    ds = pydicom.dcmread(seg_path)
    uid = _source_series(ds, index, root, where)
    if wanted is not None:
        header = pydicom.dcmread(index.series[uid][0], stop_before_pixels=True, specific_tags=["PatientID"])
        if not wanted(str(header.get("PatientID", "")).strip()):
            return None
    matches = match_segments(ds, unsided, where)
    used = [m for m in matches if m.used]
    series = load_series(index.series[uid])
    patient = str(series.frames[0].dataset.get("PatientID", "")).strip()
    if not patient:
        raise DatasetError(f"{where}: source series {uid} has no PatientID; patients are needed for the splits")
    if wanted is not None and not wanted(patient):
        return None
    seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    pixels = _segment_pixels(seg, series, [m.number for m in used], where)
    labels = np.zeros(series.shape, dtype=np.uint8)
    for j, m in enumerate(used):
        if not pixels[..., j].any():
            raise EmptyMaskError(f"{where}: segment {m.number} ({m.label!r}) has no voxel")
        labels[pixels[..., j]] = m.side.label if m.side else EITHER_SIDE
    return StudyVolumes(seg_path, patient, series, labels, tuple(matches))


def _study(seg_path: Path, index: _Index, collector: Collector, root: Path,
           landmarks: dict[Side, PatientBox] | None) -> None:
    where = str(seg_path)
    study = read_study(seg_path, index, root, collector.options.unsided)
    assert study is not None  # no patient filter: every study is read
    series, labels, matches = study.series, study.labels, study.matches
    used = [m for m in matches if m.used]
    uid = series.series_uid
    crop = collector.crop(series, labels, landmarks, where)
    sides = volume_samples(series, labels, study.side_values, collector.options, crop.rois)
    for side, samples in sides.items():
        if samples.nerve_slices == 0 and not any(m.side is None for m in used):
            raise EmptyMaskError(f"{where}: the {side.value} IAN segment has no voxel inside the {side.value} "
                                 f"crop of series {uid} ({crop.detail}; is its side right?)")
    sides = {s: v for s, v in sides.items() if v.nerve_slices > 0}
    detail = f"series {uid}: " + "; ".join(m.describe() for m in matches) + f"; {crop.detail}"
    collector.add_sides(where, study.patient, sides, detail, crop.region)
    logger.info("%s: %s", seg_path.name, detail)


def collect_dicom(root: Path, collector: Collector) -> None:
    """Add the samples of every SEG under `root` (one study each) to `collector`."""
    index = index_tree(root)
    if not index.segs:
        raise DatasetError(f"{root}: no DICOM Segmentation among {index.files} DICOM file(s); "
                           "the dicom form needs MR series plus SEGs that annotate them")
    logger.info("%s: %d image series, %d SEG file(s)", root, len(index.series), len(index.segs))
    landmarks = _landmarks(index.segs, collector)
    for seg_path, boxes in landmarks.items():
        collector.run(str(seg_path), lambda p=seg_path, b=boxes: _study(p, index, collector, root, b))


def _landmarks(segs: list[Path], collector: Collector) -> dict[Path, dict[Side, PatientBox] | None]:
    """Each SEG's landmark boxes for crop ``oracle`` (None everywhere when not every study has them).

    One dataset gets one crop region: if any study lacks landmarks, every study is cropped by its
    nerve margins, so that the region recorded in the checkpoint is true of every sample. A SEG whose
    summary cannot be read is skipped (`skip_bad`) or stops the load, like any bad input.
    """
    if collector.options.mode is not CropMode.ORACLE:
        return dict.fromkeys(segs)
    found: dict[Path, dict[Side, PatientBox] | None] = {}
    for seg_path in segs:
        collector.run(str(seg_path), lambda p=seg_path: found.__setitem__(p, find_crop_boxes(p.parent / CROP_SUMMARY)))
    with_landmarks = sum(boxes is not None for boxes in found.values())
    if with_landmarks == len(found):
        return found
    if with_landmarks:
        logger.warning("%d of %d studies have landmark crop boxes (%s); cropping every study by its nerve "
                       "margins instead, so that the dataset has one crop region", with_landmarks, len(found),
                       CROP_SUMMARY)
    return dict.fromkeys(found)
