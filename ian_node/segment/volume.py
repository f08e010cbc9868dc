"""Series → volume with geometry checks: the one place that orders a series' frames.

Loading: every frame of every instance (classic single-frame or enhanced multi-frame) is one slice;
slice order and spacing come from ImagePositionPatient along the slice normal (highdicom's
`get_volume_positions`), never from SliceThickness. Bad series are refused with a `SeriesError`
subclass whose message names the series.

The SEG builder takes its frame order from here too (:func:`source_frames`), so a result is
written frame for frame in the order the volume was read. The side crops and the coronal reformat:
:mod:`ian_node.segment.reformat`.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom import uid as dcm_uid
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, get_decoder

logger = logging.getLogger(__name__)

#: Cross-sectional grey-scale image classes we can stack into a volume.
IMAGE_SOP_CLASSES = frozenset({
    dcm_uid.MRImageStorage, dcm_uid.EnhancedMRImageStorage, dcm_uid.LegacyConvertedEnhancedMRImageStorage,
    dcm_uid.CTImageStorage, dcm_uid.EnhancedCTImageStorage, dcm_uid.LegacyConvertedEnhancedCTImageStorage,
})
_ORIENTATION_ATOL = 1e-4  # direction cosines
_SPACING_ATOL = 1e-4  # mm
_PERPENDICULAR_TOL = 1e-3  # 1 - |cos| between stacking direction and slice normal
_SPACING_RTOL = 0.01  # as highdicom's default


# ---------------------------------------------------------------- errors
class SeriesError(ValueError):
    """A series that cannot be loaded as a volume; the message starts with the series UID."""

    def __init__(self, series_uid: str, problem: str) -> None:
        self.series_uid = series_uid
        self.problem = problem
        super().__init__(f"series {series_uid}: {problem}")


class MalformedDatasetError(SeriesError):
    """An instance whose data set is broken (a required attribute missing or wrong): `problem` names it.

    Job errors built from these start with "malformed dataset" so an operator tells a broken file
    from a series that is merely not what the node segments.
    """


class EmptySeriesError(SeriesError):
    """No instances were given."""


class UnreadableInstanceError(MalformedDatasetError):
    """A source file that is not DICOM."""


class NonImageSOPClassError(SeriesError):
    """An instance of a class that is not a cross-sectional image (SEG, SR, presentation state...)."""


class MixedSeriesError(SeriesError):
    """Instances of more than one series."""


class NoPixelDataError(MalformedDatasetError):
    """An image instance without pixel data."""


class PixelDataError(MalformedDatasetError):
    """Pixel data that cannot be decoded here or is not grey-scale."""


class UnsupportedImageError(SeriesError):
    """A valid image the network cannot take: colour, palette or 1-bit pixels."""


class SeriesGeometryError(SeriesError):
    """The frames do not form one regularly spaced 3D volume."""


class MissingGeometryError(SeriesGeometryError, MalformedDatasetError):
    """A frame without position, orientation or pixel spacing."""


class FrameOfReferenceError(SeriesGeometryError):
    """Frames in different frames of reference."""


class MissingAttributeError(MalformedDatasetError):
    """An instance without an attribute every image needs (Rows, Columns, Frame of Reference UID)."""


class MixedOrientationError(SeriesGeometryError):
    """Frames with different ImageOrientationPatient."""


class MixedSizeError(SeriesGeometryError):
    """Frames with different Rows/Columns or PixelSpacing."""


class SingleSliceError(SeriesGeometryError):
    """Fewer than two slices: not a volume."""


class DuplicatePositionError(SeriesGeometryError):
    """Two or more frames at the same position along the slice normal."""


class MissingPositionError(SeriesGeometryError):
    """A gap of whole slices in otherwise regular spacing."""


class IrregularSpacingError(SeriesGeometryError):
    """Slice spacing that varies and is not a gap of whole slices."""


class SkewedStackError(SeriesGeometryError):
    """Slices not stacked along their normal (e.g. gantry tilt): the voxel grid would be sheared."""


# ---------------------------------------------------------------- records
class Side(Enum):
    """Patient side of a crop; `label` is the value in label volumes."""

    RIGHT = "right"
    LEFT = "left"

    @property
    def label(self) -> int:
        return 1 if self is Side.RIGHT else 2


@dataclass(frozen=True)
class SourceFrame:
    """The instance and 1-based frame number that a volume slice came from."""

    dataset: Dataset
    frame_number: int

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


@dataclass(frozen=True)
class SeriesVolume:
    """A loaded series: float32 (slices, rows, columns) volume and the source frame of each slice."""

    series_uid: str
    volume: hd.Volume
    frames: tuple[SourceFrame, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.volume.spatial_shape


# ---------------------------------------------------------------- loading
def _read(source: Dataset | Path | str) -> Dataset:
    if isinstance(source, Dataset):
        return source
    try:
        return pydicom.dcmread(os.fspath(source))
    except (pydicom.errors.InvalidDicomError, OSError) as exc:
        raise UnreadableInstanceError("unknown", f"{source}: cannot read as DICOM: {exc}") from exc
    except (RecursionError, EOFError, ValueError, TypeError, KeyError, struct.error) as exc:
        # pydicom's reader fails in these ways on truncated, over-nested or inconsistent files.
        raise UnreadableInstanceError("unknown", f"{source}: cannot be parsed: {_parse_problem(exc)}") from exc


def _parse_problem(exc: BaseException) -> str:
    """What a pydicom parse failure means for the file, in words rather than an exception name."""
    if isinstance(exc, RecursionError):
        return "sequences nested too deep"
    if isinstance(exc, (EOFError, struct.error)):
        return "the file ends before its declared lengths"
    return f"inconsistent header ({exc})"


def _group_item(ds: Dataset, index: int, name: str) -> Dataset | None:
    """First item of functional group `name` for frame `index` (per-frame first, then shared)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    candidates = (per_frame[index] if per_frame and index < len(per_frame) else None, shared[0] if shared else None)
    for item in candidates:
        if item is not None and item.get(name):
            return item.get(name)[0]
    return None


def _is_enhanced(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds


@dataclass(frozen=True)
class _Frame:
    """One frame's source and geometry, before sorting."""

    source: SourceFrame
    position: np.ndarray  # (3,) ImagePositionPatient
    orientation: np.ndarray  # (6,) ImageOrientationPatient
    spacing: np.ndarray  # (2,) PixelSpacing
    size: tuple[int, int]  # (Rows, Columns)

    @property
    def name(self) -> str:
        return f"instance {self.source.sop_instance_uid} frame {self.source.frame_number}"


_GEOMETRY = (("PlanePositionSequence", "ImagePositionPatient", 3),
             ("PlaneOrientationSequence", "ImageOrientationPatient", 6),
             ("PixelMeasuresSequence", "PixelSpacing", 2))


def _frames_of(ds: Dataset, uid: str) -> list[_Frame]:
    """Every frame of one instance with its geometry (functional groups for enhanced images)."""
    frames = []
    for i in range(int(ds.get("NumberOfFrames", 1) or 1)):
        values = []
        for group, keyword, n in _GEOMETRY:
            holder = _group_item(ds, i, group) if _is_enhanced(ds) else ds
            value = holder.get(keyword) if holder is not None else None
            if value is None or len(value) != n:
                raise MissingGeometryError(uid, f"instance {ds.get('SOPInstanceUID', '?')} frame {i + 1} "
                                                f"has no valid {keyword}")
            values.append(np.array([float(v) for v in value]))
        frames.append(_Frame(SourceFrame(ds, i + 1), *values, size=(int(ds.Rows), int(ds.Columns))))
    return frames


def _decode(ds: Dataset, uid: str) -> np.ndarray:
    """Stored values with the modality rescale applied, float32 (frames, rows, columns)."""
    sop = ds.get("SOPInstanceUID", "?")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        if syntax is not None:
            arr, _ = get_decoder(syntax).as_array(ds)
        else:
            arr = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError, AttributeError) as exc:
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise PixelDataError(uid, f"instance {sop}: cannot decode pixel data ({name}): {exc}") from exc
    arr = arr.reshape(-1, int(ds.Rows), int(ds.Columns))
    if _is_enhanced(ds):
        out = arr.astype(np.float32)
        for i in range(out.shape[0]):
            item = _group_item(ds, i, "PixelValueTransformationSequence")
            if item is not None and "RescaleSlope" in item:
                out[i] = out[i] * float(item.RescaleSlope) + float(item.get("RescaleIntercept", 0.0))
    else:
        out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        out = -out  # so that brighter is always larger
    return out


def _diagnose_positions(uid: str, positions: np.ndarray, normal: np.ndarray, names: list[str]) -> SeriesGeometryError:
    """Why highdicom found no regular volume: the most specific geometry error we can name."""
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    d, p = dist[order], positions[order]
    steps = np.diff(d)
    scale = float(np.max(np.abs(steps))) if steps.size else 0.0
    dup = np.flatnonzero(steps <= max(1e-3, 1e-3 * scale))
    if dup.size:
        k = int(dup[0])
        return DuplicatePositionError(uid, f"{names[order[k]]} and {names[order[k + 1]]} are both at "
                                           f"{d[k]:.3f} mm along the slice normal ({dup.size} duplicate(s))")
    vectors = np.diff(p, axis=0)
    cosines = np.abs(vectors @ normal) / np.linalg.norm(vectors, axis=1)
    if np.any(cosines < 1 - _PERPENDICULAR_TOL):
        k = int(np.argmin(cosines))
        angle = float(np.degrees(np.arccos(min(1.0, cosines[k]))))
        return SkewedStackError(uid, f"slices are not stacked along their normal ({angle:.2f} degrees off between "
                                     f"{names[order[k]]} and {names[order[k + 1]]}), e.g. gantry tilt")
    base = float(steps.min())
    ratios = steps / base
    whole = np.rint(ratios)
    if np.all(np.abs(ratios - whole) <= 0.05) and np.any(whole > 1):
        k = int(np.argmax(whole))
        return MissingPositionError(uid, f"{int(whole.sum() - steps.size)} slice position(s) missing at "
                                         f"{base:.3f} mm spacing; first gap of {steps[k]:.3f} mm between "
                                         f"{d[k]:.3f} and {d[k + 1]:.3f} mm along the slice normal")
    if steps.max() - steps.min() > _SPACING_RTOL * base:
        return IrregularSpacingError(uid, f"slice spacing varies from {steps.min():.3f} to {steps.max():.3f} mm")
    return SeriesGeometryError(uid, "positions do not form a regularly spaced volume")


_ENHANCED_CLASSES = frozenset({dcm_uid.EnhancedMRImageStorage, dcm_uid.LegacyConvertedEnhancedMRImageStorage,
                               dcm_uid.EnhancedCTImageStorage, dcm_uid.LegacyConvertedEnhancedCTImageStorage})


def _check_pixel_format(ds: Dataset, uid: str) -> None:
    """Grey-scale pixels of 8, 16 or 32 bits: what an MR or CT image holds and the network reads."""
    sop = ds.get("SOPInstanceUID", "?")
    samples = ds.get("SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedImageError(uid, f"instance {sop} is {photometric or 'unlabelled'} with {samples} samples per "
                                         "pixel, not a grey-scale image")
    bits = ds.get("BitsAllocated", 16)
    if bits not in (8, 16, 32):
        raise UnsupportedImageError(uid, f"instance {sop} has {bits}-bit pixels; grey-scale images use 8, 16 or 32")


def _check_frame_count(ds: Dataset, uid: str) -> None:
    """A declared frame count that the instance's geometry backs (never trusted to size work alone)."""
    sop = ds.get("SOPInstanceUID", "?")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise MissingAttributeError(uid, f"instance {sop} has an unreadable NumberOfFrames") from None
    if ds.get("SOPClassUID") in _ENHANCED_CLASSES and not _is_enhanced(ds):
        raise MissingAttributeError(uid, f"instance {sop} is an enhanced image without its functional groups")
    if _is_enhanced(ds):
        groups = len(ds.PerFrameFunctionalGroupsSequence)
        if groups != frames:
            raise MissingAttributeError(uid, f"instance {sop} declares {frames} frames but has {groups} "
                                             "per-frame functional groups")
    elif frames != 1:
        raise MissingAttributeError(uid, f"instance {sop} declares {frames} frames without per-frame geometry")


@dataclass(frozen=True)
class _Order:
    """A series' frames sorted along the slice normal, with what the volume needs of their geometry."""

    series_uid: str
    frames: tuple[_Frame, ...]
    spacing: float
    frame_of_reference_uid: str


def _order(datasets: Sequence[Dataset], min_slices: int, pixels: bool = True) -> _Order:
    """Check one series' instances and sort their frames, without decoding any pixel data.

    With ``pixels`` False the data sets may have been read without their pixel data.
    """
    if not datasets:
        raise EmptySeriesError("unknown", "no instances given")
    images = [ds for ds in datasets if ds.get("SOPClassUID") in IMAGE_SOP_CLASSES]
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for ds in images or datasets)
    uid = series.most_common(1)[0][0] or "unknown"
    for ds in datasets:
        if ds.get("SOPClassUID") not in IMAGE_SOP_CLASSES:
            cls = ds.get("SOPClassUID")
            raise NonImageSOPClassError(
                uid,
                f"instance {ds.get('SOPInstanceUID', '?')} (series {ds.get('SeriesInstanceUID', '?')}) is "
                f"{getattr(cls, 'name', cls)}, not an MR or CT image storage class",
            )
    if len(series) > 1:
        listing = ", ".join(f"{u or '<no UID>'} ({n})" for u, n in series.most_common())
        raise MixedSeriesError(uid, f"instances of {len(series)} series given: {listing}")
    for ds in datasets:
        sop = ds.get("SOPInstanceUID", "?")
        if pixels and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise NoPixelDataError(uid, f"instance {sop} has no pixel data")
        for keyword in ("Rows", "Columns"):
            value = ds.get(keyword)
            if not isinstance(value, int) or value < 1:
                raise MissingAttributeError(uid, f"instance {sop} has no valid {keyword}")
        if not str(ds.get("FrameOfReferenceUID", "")).strip():
            raise MissingAttributeError(uid, f"instance {sop} has no Frame of Reference UID")
        _check_pixel_format(ds, uid)
        _check_frame_count(ds, uid)
    refs = {str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}
    if len(refs) > 1:
        raise FrameOfReferenceError(uid, f"frames must share one FrameOfReferenceUID, found {sorted(refs)}")

    frames = [frame for ds in datasets for frame in _frames_of(ds, uid)]
    first = frames[0]
    for frame in frames:
        if not np.allclose(frame.orientation, first.orientation, atol=_ORIENTATION_ATOL):
            raise MixedOrientationError(uid, f"{frame.name} orientation {frame.orientation.tolist()} differs "
                                             f"from {first.orientation.tolist()} of {first.name}")
        if frame.size != first.size:
            raise MixedSizeError(uid, f"{frame.name} is {frame.size[0]}x{frame.size[1]}, "
                                      f"{first.name} is {first.size[0]}x{first.size[1]}")
        if not np.allclose(frame.spacing, first.spacing, atol=_SPACING_ATOL):
            raise MixedSizeError(uid, f"{frame.name} pixel spacing {frame.spacing.tolist()} differs "
                                      f"from {first.spacing.tolist()} of {first.name}")
    row, col = first.orientation[:3], first.orientation[3:]
    if not np.allclose([row @ row, col @ col, row @ col], [1, 1, 0], atol=1e-3):
        raise SeriesGeometryError(uid, f"ImageOrientationPatient {first.orientation.tolist()} is not two "
                                       "orthogonal unit vectors")
    if len(frames) < min_slices:
        raise SingleSliceError(uid, f"{len(frames)} slice(s); a volume needs at least {min_slices}")
    if len(frames) == 1:
        return _Order(uid, tuple(frames), 0.0, refs.pop())

    positions = np.stack([f.position for f in frames])
    spacing, indices = hd.spatial.get_volume_positions(
        positions, first.orientation, rtol=_SPACING_RTOL, perpendicular_tol=_PERPENDICULAR_TOL
    )
    if spacing is None or indices is None:
        normal = np.cross(row, col)
        raise _diagnose_positions(uid, positions, normal / np.linalg.norm(normal), [f.name for f in frames])
    return _Order(uid, tuple(frames[i] for i in np.argsort(indices)), float(spacing), refs.pop())



def check_geometry(headers: Sequence[Dataset], *, min_slices: int = 2) -> None:
    """The checks :func:`load_series` makes before decoding, on headers read without pixel data.

    Lets series completion skip a series that can never become a volume before any work starts.
    """
    _order(headers, max(2, min_slices), pixels=False)


def source_frames(sources: Sequence[Dataset | Path | str]) -> tuple[SourceFrame, ...]:
    """The frames of one series in volume order (along the increasing slice normal), pixels unread.

    The order :func:`load_series` stacks, for a SEG over datasets that were not loaded as a volume.
    """
    return tuple(f.source for f in _order([_read(s) for s in sources], min_slices=1).frames)


def load_series(sources: Sequence[Dataset | Path | str], *, min_slices: int = 2) -> SeriesVolume:
    """Load the instances of one series (any order, any supported transfer syntax) into a volume."""
    datasets = [_read(s) for s in sources]
    order = _order(datasets, max(2, min_slices))
    uid, ordered, first = order.series_uid, order.frames, order.frames[0]
    decoded = {id(ds): _decode(ds, uid) for ds in datasets}
    array = np.stack([decoded[id(f.source.dataset)][f.source.frame_number - 1] for f in ordered])
    volume = hd.Volume.from_attributes(
        array=array,
        image_position=first.position.tolist(),
        image_orientation=first.orientation.tolist(),
        pixel_spacing=first.spacing.tolist(),
        spacing_between_slices=order.spacing,
        coordinate_system="PATIENT",
        frame_of_reference_uid=order.frame_of_reference_uid,
    )
    logger.info("series %s: %d slices of %dx%d, spacing %.3f mm between slices",
                uid, array.shape[0], array.shape[1], array.shape[2], order.spacing)
    return SeriesVolume(series_uid=uid, volume=volume, frames=tuple(f.source for f in ordered))
