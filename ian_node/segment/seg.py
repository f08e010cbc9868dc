"""DICOM Segmentation (SEG) of both inferior alveolar nerves, built and read back with highdicom.

One builder serves two producers: the phantom's ground truth (a stand-in for a manual annotation,
segment algorithm type MANUAL) and the node's predictions (AUTOMATIC, with the algorithm and its
checkpoint hash identified). `read_segmentation_labels` is the inverse used by the tests and by the
training data loader.

Label convention, shared with `ian_node.phantom.study`: 0 background, 1 the patient's right IAN, 2 the
patient's left IAN; the label array is indexed (slice, row, column) in the order highdicom stacks the
source into a volume (slices sorted along the increasing slice normal, :func:`source_frames`).

Viewer compatibility (docs/seg.md): highdicom always writes the ReferencedSeriesSequence; a side with no
voxels is either kept with exactly one empty frame or left out (`EmptySegments`), because some viewers
fail on a segment that has no frames at all; whether other empty frames are stored is `omit_empty_frames`.
`build_probability_segmentation` writes the network's per-side probabilities as a FRACTIONAL SEG.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from ian_node import __version__
from ian_node.segment.metadata import sanitised_source
from ian_node.segment.volume import SeriesError, SeriesVolume, Side, SourceFrame, source_frames

logger = logging.getLogger(__name__)

#: Label values in every label volume of the project.
RIGHT_LABEL = 1
LEFT_LABEL = 2

#: Segment numbers equal label values, so a SEG read back with `combine_segments` is the label map.
SEGMENT_LABELS: dict[int, str] = {
    RIGHT_LABEL: "Inferior alveolar nerve, right",
    LEFT_LABEL: "Inferior alveolar nerve, left",
}
_LATERALITY: dict[int, Code] = {RIGHT_LABEL: codes.SCT.Right, LEFT_LABEL: codes.SCT.Left}
#: Segmented property category and type (REFERENCE.md "DICOM facts"): SCT 123037004 and 84782009.
PROPERTY_CATEGORY: Code = codes.SCT.BodyStructure
PROPERTY_TYPE: Code = codes.SCT.PeripheralNerve
#: Display colours (CIELab from sRGB): right yellow, left cyan, as viewers commonly tell sides apart.
_COLOURS: dict[int, tuple[int, int, int]] = {RIGHT_LABEL: (255, 220, 0), LEFT_LABEL: (0, 200, 255)}


class SegmentationSourceError(ValueError):
    """The source images or the label array cannot make (or be matched to) a Segmentation."""


class NoSegmentsError(SegmentationSourceError):
    """Every segment is empty and `EmptySegments.OMIT` leaves them all out: there is no SEG to make."""


class EmptySegments(StrEnum):
    """What the SEG holds for a side with no voxels; values are the config strings."""

    #: Keep the segment description with exactly one all-zero frame: the SEG says the side was looked
    #: for, segment numbers stay equal to the labels, and no segment is frameless.
    EMPTY_FRAME = "empty_frame"
    #: Leave the segment out (the other side becomes segment 1); the caller flags it for QA
    #: (`Segmentation.omitted_sides`).
    OMIT = "omit"


@dataclass(frozen=True)
class AlgorithmInfo:
    """The algorithm that produced an automatic segmentation, as recorded in the SEG."""

    name: str
    version: str
    checkpoint_hash: str
    family: Code = codes.DCM.ArtificialIntelligence
    source: str | None = None
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr in ("name", "version", "checkpoint_hash"):
            value = getattr(self, attr)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"AlgorithmInfo.{attr} must be a non-empty string, got {value!r}")

    def to_identification(self) -> hd.AlgorithmIdentificationSequence:
        """The Algorithm Identification Sequence, with the checkpoint hash among its parameters."""
        params = {"checkpoint_hash": self.checkpoint_hash, **{str(k): str(v) for k, v in self.parameters.items()}}
        return hd.AlgorithmIdentificationSequence(
            name=self.name, family=self.family, version=self.version, source=self.source, parameters=params
        )


def _frames(source: SeriesVolume | Sequence[Dataset]) -> tuple[SourceFrame, ...]:
    """The source frames in volume order: the loaded volume's own, or :func:`source_frames`' order."""
    if isinstance(source, SeriesVolume):
        frames = source.frames
    else:
        if len(source) == 0:
            raise SegmentationSourceError("no source images given")
        try:
            frames = source_frames(source)
        except SeriesError as exc:
            raise SegmentationSourceError(str(exc)) from exc
    datasets = {id(f.dataset) for f in frames}
    if len(datasets) > 1 and any(_is_multiframe(f.dataset) for f in frames):
        raise SegmentationSourceError("give either one multi-frame instance or single-frame instances, not a mix")
    return frames


def _is_multiframe(ds: Dataset) -> bool:
    return int(ds.get("NumberOfFrames", 1) or 1) > 1


def _check_labels(labels: np.ndarray, frames: Sequence[SourceFrame]) -> np.ndarray:
    labels = np.asarray(labels)
    first = frames[0].dataset
    expected = (len(frames), int(first.Rows), int(first.Columns))
    if labels.shape != expected:
        raise SegmentationSourceError(f"labels have shape {labels.shape}; the source needs {expected}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    values = np.unique(labels)
    unknown = sorted(set(values.tolist()) - {0, *SEGMENT_LABELS})
    if unknown:
        raise ValueError(f"labels contain values {unknown}; allowed are 0, {RIGHT_LABEL} (right), {LEFT_LABEL} (left)")
    return labels.astype(np.uint8, copy=False)


def _segment_description(label: int, number: int, algorithm: AlgorithmInfo | None) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=SEGMENT_LABELS[label],
        segmented_property_category=PROPERTY_CATEGORY,
        segmented_property_type=PROPERTY_TYPE,
        algorithm_type=(
            hd.seg.SegmentAlgorithmTypeValues.MANUAL if algorithm is None
            else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        ),
        algorithm_identification=None if algorithm is None else algorithm.to_identification(),
        tracking_uid=None,
        display_color=hd.color.CIELabColor.from_rgb(*_COLOURS[label]),
    )
    # highdicom has no argument for laterality; DICOM nests it in the property type item (CID 244).
    description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = DicomSequence(
        [hd.sr.CodedConcept.from_code(_LATERALITY[label])]
    )
    return description


@dataclass(frozen=True)
class _Naming:
    """The SEG's series, instance and equipment attributes (shared by the binary and probability builders)."""

    series_number: int
    series_description: str
    series_instance_uid: str | None
    sop_instance_uid: str | None
    dimension_organization_uid: str | None
    instance_number: int
    uid_prefix: str | None
    content_label: str
    content_creator_name: str | None
    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str

    def __post_init__(self) -> None:
        if not isinstance(self.series_number, int) or self.series_number < 0:
            raise ValueError(f"series_number must be a non-negative int, got {self.series_number!r}")


def _pad_voxel(planes: np.ndarray) -> tuple[int, int, int]:
    """A voxel no segment covers (so the padding never makes segments overlap), in the middle plane if possible."""
    order = [planes.shape[0] // 2, *range(planes.shape[0])]
    for k in order:
        free = np.argwhere(~planes[k].any(axis=-1))
        if len(free):
            return (k, int(free[0][0]), int(free[0][1]))
    return (order[0], 0, 0)


def _clear_frames(seg: hd.seg.Segmentation, numbers: Sequence[int]) -> None:
    """Zero the one frame each of `numbers` has, once highdicom has written it with its functional groups."""
    frame_pixels = int(seg.Rows) * int(seg.Columns)
    frames = [i for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence)
              if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) in numbers]
    if len(frames) != len(numbers):
        raise RuntimeError(f"expected one padding frame per empty segment {list(numbers)}, found {len(frames)}")
    raw = np.frombuffer(seg.PixelData, dtype=np.uint8)
    if int(seg.BitsAllocated) == 1:  # BINARY: bits packed across frame boundaries, least significant first
        bits = np.unpackbits(raw, bitorder="little")
        for i in frames:
            bits[i * frame_pixels:(i + 1) * frame_pixels] = 0
        data = np.packbits(bits, bitorder="little")[: raw.size]
    else:  # FRACTIONAL: one byte per pixel
        data = raw.copy()
        for i in frames:
            data[i * frame_pixels:(i + 1) * frame_pixels] = 0
    seg.PixelData = data.tobytes()


def _encode(
    frames: Sequence[SourceFrame],
    channels: Mapping[int, np.ndarray],
    *,
    fractional: bool,
    algorithm: AlgorithmInfo | None,
    naming: _Naming,
    empty_segments: EmptySegments | str,
    omit_empty_frames: bool,
    content_description: str,
) -> hd.seg.Segmentation:
    """One SEG from per-label arrays (bool or probabilities in [0, 1]) indexed like the source volume."""
    empty_segments = EmptySegments(empty_segments)
    for_uids = {str(f.dataset.get("FrameOfReferenceUID", "")) for f in frames}
    if len(for_uids) != 1 or "" in for_uids:
        raise SegmentationSourceError(f"source images need one FrameOfReferenceUID, found {sorted(for_uids)}")
    series_uid = frames[0].dataset.SeriesInstanceUID
    empty = tuple(label for label in SEGMENT_LABELS if not channels[label].any())
    if empty:
        logger.info("segmentation over series %s has no voxels for: %s (%s)", series_uid,
                    ", ".join(SEGMENT_LABELS[v] for v in empty), empty_segments.value)
    kept = [v for v in SEGMENT_LABELS if not (empty_segments is EmptySegments.OMIT and v in empty)]
    if not kept:
        raise NoSegmentsError(f"series {series_uid}: every segment is empty and empty segments are omitted")

    # highdicom copies the header of the first source image: it gets a view made valid for the SEG.
    header = sanitised_source(frames[0].dataset, extra_text=[
        t for t in (naming.series_description, naming.content_label, naming.content_creator_name) if t])
    stacked = np.stack([channels[v] for v in kept], axis=-1).astype(np.float32 if fractional else np.bool_)
    if _is_multiframe(frames[0].dataset):
        # highdicom pairs a multi-frame source's frames with pixel_array rows in frame-number order.
        planes = np.zeros_like(stacked)
        for vol_index, frame in enumerate(frames):
            planes[frame.frame_number - 1] = stacked[vol_index]
        source_images = [header.dataset]
    else:
        planes = stacked
        source_images = [header.dataset, *(f.dataset for f in frames[1:])]

    # highdicom writes no frame for an empty segment when empty frames are omitted: one voxel makes it
    # write one frame (with the right functional groups), which is then zeroed.
    padded = [kept.index(v) + 1 for v in empty if v in kept] if omit_empty_frames else []
    if padded:
        k, row, col = _pad_voxel(planes)
        for number in padded:
            planes[k, row, col, number - 1] = 1

    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=planes,
        segmentation_type=(hd.seg.SegmentationTypeValues.FRACTIONAL if fractional
                           else hd.seg.SegmentationTypeValues.BINARY),
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY if fractional else None,
        segment_descriptions=[_segment_description(v, n, algorithm) for n, v in enumerate(kept, start=1)],
        series_instance_uid=naming.series_instance_uid or generate_uid(prefix=naming.uid_prefix),
        series_number=naming.series_number,
        sop_instance_uid=naming.sop_instance_uid or generate_uid(prefix=naming.uid_prefix),
        instance_number=naming.instance_number,
        manufacturer=naming.manufacturer,
        manufacturer_model_name=naming.manufacturer_model_name,
        software_versions=naming.software_versions,
        device_serial_number=naming.device_serial_number,
        content_label=naming.content_label,
        content_description=content_description,
        content_creator_name=naming.content_creator_name,
        omit_empty_frames=omit_empty_frames,
        specific_character_set=header.specific_character_set,
    )
    if padded:
        _clear_frames(seg, padded)
    header.finish(seg)
    seg.SeriesDescription = naming.series_description
    # highdicom draws this UID from its own root; the project's UIDs come from 2.25 or the user's root.
    dim_uid = naming.dimension_organization_uid or generate_uid(prefix=naming.uid_prefix)
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dim_uid
    # Plain Python attributes (as highdicom keeps its own state): what the caller flags for QA.
    seg.empty_sides = tuple(Side.RIGHT if v == RIGHT_LABEL else Side.LEFT for v in empty)
    seg.omitted_sides = tuple(Side.RIGHT if v == RIGHT_LABEL else Side.LEFT for v in SEGMENT_LABELS if v not in kept)
    logger.info("built %s SEG %s (series %s, %d frames) over series %s", seg.SegmentationType, seg.SOPInstanceUID,
                seg.SeriesInstanceUID, int(seg.NumberOfFrames), series_uid)
    return seg


def build_segmentation(
    source: SeriesVolume | Sequence[Dataset],
    labels: np.ndarray,
    *,
    algorithm: AlgorithmInfo | None,
    series_number: int,
    series_description: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    dimension_organization_uid: str | None = None,
    instance_number: int = 1,
    uid_prefix: str | None = None,
    content_label: str = "IAN",
    content_creator_name: str | None = None,
    manufacturer: str = "ian-node",
    manufacturer_model_name: str = "ian-node",
    software_versions: str = __version__,
    device_serial_number: str = "0",
    empty_segments: EmptySegments | str = EmptySegments.EMPTY_FRAME,
    omit_empty_frames: bool = True,
) -> hd.seg.Segmentation:
    """A BINARY SEG with segment 1 = right IAN and segment 2 = left IAN over `source`.

    `labels` (0/1/2) is indexed like the volume `source` is (or loads as, for datasets): single-frame
    instances, or the frames of one multi-frame instance, sorted along the increasing slice normal.
    `omit_empty_frames` (default) stores only frames where a segment has voxels.
    A side with no voxels (`empty_segments`): ``empty_frame`` (default) keeps its segment with exactly
    one all-zero frame, so the SEG says both sides were looked for and no segment is frameless (some
    viewers fail on one); ``omit`` leaves it out and the other side is segment 1. The returned object
    says which sides were empty and which left out (`seg.empty_sides`, `seg.omitted_sides`, tuples of
    `Side`); with ``omit`` and both sides empty there is no SEG (`NoSegmentsError`).
    highdicom copies the patient and study header of the first source image; it gets a view made
    valid first (:func:`ian_node.segment.metadata.sanitised_source`), so a scanner's bad values are
    repaired or left out rather than failing here after inference. The caller's datasets are unchanged.
    `algorithm=None` marks the segments MANUAL (the phantom ground truth stands in for an annotator).
    UIDs not given come from `generate_uid(prefix=uid_prefix)`: the 2.25 root unless an organisation
    root is configured.
    """
    naming = _Naming(series_number, series_description, series_instance_uid, sop_instance_uid,
                     dimension_organization_uid, instance_number, uid_prefix, content_label, content_creator_name,
                     manufacturer, manufacturer_model_name, software_versions, device_serial_number)
    frames = _frames(source)
    labels = _check_labels(labels, frames)
    return _encode(frames, {v: labels == v for v in SEGMENT_LABELS}, fractional=False, algorithm=algorithm,
                   naming=naming, empty_segments=empty_segments, omit_empty_frames=omit_empty_frames,
                   content_description="Inferior alveolar nerves (right, left)")


def _check_probabilities(probabilities: Mapping[Side | str, np.ndarray] | np.ndarray,
                         frames: Sequence[SourceFrame]) -> dict[int, np.ndarray]:
    first = frames[0].dataset
    expected = (len(frames), int(first.Rows), int(first.Columns))
    if isinstance(probabilities, Mapping):
        by_side = {Side(k): np.asarray(v) for k, v in probabilities.items()}
        if set(by_side) != set(Side):
            raise ValueError(f"probabilities need both sides (right, left), got {sorted(s.value for s in by_side)}")
        arrays = {side.label: by_side[side] for side in Side}
    else:
        stacked = np.asarray(probabilities)
        if stacked.ndim != 4 or stacked.shape[-1] != 2:
            raise SegmentationSourceError(f"probabilities have shape {stacked.shape}; expected (Z, Y, X, 2)")
        arrays = {RIGHT_LABEL: stacked[..., 0], LEFT_LABEL: stacked[..., 1]}
    out = {}
    for label, array in arrays.items():
        name = SEGMENT_LABELS[label]
        if array.shape != expected:
            raise SegmentationSourceError(f"{name} probabilities have shape {array.shape}; the source needs {expected}")
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"{name} probabilities must be a float array, got dtype {array.dtype}")
        if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(f"{name} probabilities must be finite and within [0, 1]")
        out[label] = array.astype(np.float32, copy=False)
    return out


def build_probability_segmentation(
    source: SeriesVolume | Sequence[Dataset],
    probabilities: Mapping[Side | str, np.ndarray] | np.ndarray,
    *,
    algorithm: AlgorithmInfo,
    series_number: int,
    series_description: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    dimension_organization_uid: str | None = None,
    instance_number: int = 1,
    uid_prefix: str | None = None,
    content_label: str = "IAN_PROB",
    manufacturer: str = "ian-node",
    manufacturer_model_name: str = "ian-node",
    software_versions: str = __version__,
    device_serial_number: str = "0",
    empty_segments: EmptySegments | str = EmptySegments.EMPTY_FRAME,
    omit_empty_frames: bool = True,
) -> hd.seg.Segmentation:
    """A FRACTIONAL (PROBABILITY) SEG of the network's per-side nerve probability, for research viewers.

    `probabilities`: {side: float (Z, Y, X) in [0, 1]} or one (Z, Y, X, 2) array (right, left),
    indexed like `build_segmentation`'s labels. Stored in 8 bits (MaximumFractionalValue 255), so a
    value reads back within 1/510. Segments, codes, empty-segment and empty-frame rules as in
    `build_segmentation` (a frame is empty where every probability rounds to 0).
    """
    naming = _Naming(series_number, series_description, series_instance_uid, sop_instance_uid,
                     dimension_organization_uid, instance_number, uid_prefix, content_label, None,
                     manufacturer, manufacturer_model_name, software_versions, device_serial_number)
    frames = _frames(source)
    channels = _check_probabilities(probabilities, frames)
    # What 8 bits store as 0 is empty: decide emptiness (and omitted frames) on the stored values.
    channels = {v: np.where(np.around(p * 255.0) == 0, np.float32(0.0), p) for v, p in channels.items()}
    return _encode(frames, channels, fractional=True, algorithm=algorithm, naming=naming,
                   empty_segments=empty_segments, omit_empty_frames=omit_empty_frames,
                   content_description="Inferior alveolar nerve probability (right, left)")


def segment_labels(seg: Dataset) -> dict[int, int]:
    """Segment number → label value (1 right, 2 left) by each segment's laterality, else by its number.

    With `EmptySegments.OMIT` a left-only SEG has the left nerve as segment 1, so numbers alone do not say.
    """
    by_code = {_LATERALITY[v].value: v for v in SEGMENT_LABELS}
    out = {}
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        modifiers = [m for p in item.get("SegmentedPropertyTypeCodeSequence", [])
                     for m in p.get("SegmentedPropertyTypeModifierCodeSequence", [])]
        lateral = [by_code[str(m.CodeValue)] for m in modifiers if str(m.CodeValue) in by_code]
        out[number] = lateral[0] if lateral else number
    unknown = sorted(n for n, v in out.items() if v not in SEGMENT_LABELS)
    if unknown:
        raise SegmentationSourceError(f"SEG {seg.SOPInstanceUID} has segment numbers {unknown} other than 1/2 "
                                      "and no right/left laterality")
    if len(set(out.values())) != len(out):
        raise SegmentationSourceError(f"SEG {seg.SOPInstanceUID} has two segments of the same side")
    return out


def read_segmentation_labels(seg_dataset: Dataset, source: SeriesVolume | Sequence[Dataset]) -> np.ndarray:
    """Label volume (uint8, 0/1/2) of a SEG over `source`, indexed like `build_segmentation`'s input.

    Frames the SEG omitted (empty) read as background, and so does a side the SEG left out. Segments
    are matched to sides by laterality (`segment_labels`). The SEG must reference the source instances.
    """
    seg = seg_dataset if isinstance(seg_dataset, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(
        seg_dataset, copy=False
    )
    frames = _frames(source)
    labels_of = segment_labels(seg)
    numbers = sorted(labels_of)
    if str(seg.FrameOfReferenceUID) != str(frames[0].dataset.FrameOfReferenceUID):
        raise SegmentationSourceError(
            f"SEG {seg.SOPInstanceUID} is in frame of reference {seg.FrameOfReferenceUID}, "
            f"the source in {frames[0].dataset.FrameOfReferenceUID}"
        )
    referenced = {str(item.ReferencedSOPInstanceUID) for series in seg.get("ReferencedSeriesSequence", [])
                  for item in series.get("ReferencedInstanceSequence", [])}
    given = {str(f.dataset.SOPInstanceUID) for f in frames}
    if not referenced & given:
        # Without this, highdicom would read a SEG of another series as all background.
        raise SegmentationSourceError(
            f"SEG {seg.SOPInstanceUID} references none of the {len(given)} source instances given"
        )
    kwargs = dict(segment_numbers=numbers, combine_segments=True, relabel=False,
                  assert_missing_frames_are_empty=True, dtype=np.uint8)
    if _is_multiframe(frames[0].dataset):
        array = seg.get_pixels_by_source_frame(
            str(frames[0].dataset.SOPInstanceUID), source_frame_numbers=[f.frame_number for f in frames], **kwargs
        )
    else:
        array = seg.get_pixels_by_source_instance([str(f.dataset.SOPInstanceUID) for f in frames], **kwargs)
    lookup = np.zeros(max(numbers) + 1, dtype=np.uint8)
    for number, label in labels_of.items():
        lookup[number] = label
    return lookup[np.asarray(array, dtype=np.uint8)]
