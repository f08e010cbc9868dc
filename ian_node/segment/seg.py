"""DICOM Segmentation (SEG) of both inferior alveolar nerves, built and read back with highdicom.

One builder serves two producers: the phantom's ground truth (a stand-in for a manual annotation,
segment algorithm type MANUAL) and the node's predictions (AUTOMATIC, with the algorithm and its
checkpoint hash identified). `read_segmentation_labels` is the inverse used by the tests and by the
training data loader.

Label convention, shared with `ian_node.phantom.study`: 0 background, 1 the patient's right IAN, 2 the
patient's left IAN; the label array is indexed (slice, row, column) in the order highdicom stacks the
source into a volume (slices sorted along the increasing slice normal, :func:`source_frames`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from ian_node import __version__
from ian_node.segment.metadata import sanitised_source
from ian_node.segment.volume import SeriesError, SeriesVolume, SourceFrame, source_frames

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


def _segment_description(label: int, algorithm: AlgorithmInfo | None) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=label,
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
) -> hd.seg.Segmentation:
    """A BINARY SEG with segment 1 = right IAN and segment 2 = left IAN over `source`.

    `labels` (0/1/2) is indexed like the volume `source` is (or loads as, for datasets): single-frame
    instances, or the frames of one multi-frame instance, sorted along the increasing slice normal.
    Empty frames are omitted. A side with no voxels keeps its segment description but has no frames:
    highdicom accepts that, readers then see that segment as empty, and the SEG still says both sides
    were looked for. When both sides are empty highdicom encodes every frame (all empty) instead,
    since a SEG needs at least one frame.
    highdicom copies the patient and study header of the first source image; it gets a view made
    valid first (:func:`ian_node.segment.metadata.sanitised_source`), so a scanner's bad values are
    repaired or left out rather than failing here after inference. The caller's datasets are unchanged.
    `algorithm=None` marks the segments MANUAL (the phantom ground truth stands in for an annotator).
    UIDs not given come from `generate_uid(prefix=uid_prefix)`: the 2.25 root unless an organisation
    root is configured.
    """
    if not isinstance(series_number, int) or series_number < 0:
        raise ValueError(f"series_number must be a non-negative int, got {series_number!r}")
    frames = _frames(source)
    labels = _check_labels(labels, frames)
    for_uids = {str(f.dataset.get("FrameOfReferenceUID", "")) for f in frames}
    if len(for_uids) != 1 or "" in for_uids:
        raise SegmentationSourceError(f"source images need one FrameOfReferenceUID, found {sorted(for_uids)}")

    # highdicom copies the header of the first source image: it gets a view made valid for the SEG.
    header = sanitised_source(frames[0].dataset, extra_text=[
        t for t in (series_description, content_label, content_creator_name) if t])
    if _is_multiframe(frames[0].dataset):
        # highdicom pairs a multi-frame source's frames with pixel_array rows in frame-number order.
        pixel_array = np.zeros_like(labels)
        for vol_index, frame in enumerate(frames):
            pixel_array[frame.frame_number - 1] = labels[vol_index]
        source_images = [header.dataset]
    else:
        pixel_array = labels
        source_images = [header.dataset, *(f.dataset for f in frames[1:])]

    present = sorted(int(v) for v in np.unique(labels) if v != 0)
    missing = [SEGMENT_LABELS[v] for v in SEGMENT_LABELS if v not in present]
    if missing:
        logger.info("segmentation over series %s has no voxels for: %s",
                    frames[0].dataset.SeriesInstanceUID, ", ".join(missing))

    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment_description(v, algorithm) for v in SEGMENT_LABELS],
        series_instance_uid=series_instance_uid or generate_uid(prefix=uid_prefix),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(prefix=uid_prefix),
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
        device_serial_number=device_serial_number,
        content_label=content_label,
        content_description="Inferior alveolar nerves (right, left)",
        content_creator_name=content_creator_name,
        omit_empty_frames=True,
        specific_character_set=header.specific_character_set,
    )
    header.finish(seg)
    seg.SeriesDescription = series_description
    # highdicom draws this UID from its own root; the project's UIDs come from 2.25 or the user's root.
    dim_uid = dimension_organization_uid or generate_uid(prefix=uid_prefix)
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dim_uid
    logger.info("built SEG %s (series %s, %d frames) over series %s", seg.SOPInstanceUID,
                seg.SeriesInstanceUID, int(seg.NumberOfFrames), frames[0].dataset.SeriesInstanceUID)
    return seg


def read_segmentation_labels(seg_dataset: Dataset, source: SeriesVolume | Sequence[Dataset]) -> np.ndarray:
    """Label volume (uint8, 0/1/2) of a SEG over `source`, indexed like `build_segmentation`'s input.

    Frames the SEG omitted (empty) read as background. The SEG must reference the source instances
    and use segment numbers 1 (right) and 2 (left), as `build_segmentation` writes them.
    """
    seg = seg_dataset if isinstance(seg_dataset, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(
        seg_dataset, copy=False
    )
    frames = _frames(source)
    numbers = sorted(int(item.SegmentNumber) for item in seg.SegmentSequence)
    unknown = sorted(set(numbers) - set(SEGMENT_LABELS))
    if unknown:
        raise SegmentationSourceError(f"SEG {seg.SOPInstanceUID} has segment numbers {unknown} other than 1/2")
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
    return np.asarray(array, dtype=np.uint8)
