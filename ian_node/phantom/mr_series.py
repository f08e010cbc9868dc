"""Build MR Image Storage instances from a voxel volume and its geometry.

The phantom generator and the geometry tests both need real, standard-conformant MR series with a
known affine; this module is the one place that turns a `highdicom.Volume` into such a series.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

#: The implementation class UID written into file meta: pydicom's, since pydicom encodes the files.
IMPLEMENTATION_UID = PYDICOM_IMPLEMENTATION_UID


@dataclass(frozen=True)
class StudyInfo:
    """Patient and study attributes shared by every series of one synthetic study."""

    patient_id: str
    patient_name: str
    patient_sex: str = "O"
    patient_birth_date: str = "19700101"
    study_uid: str = field(default_factory=lambda: generate_uid(prefix=None))
    frame_of_reference_uid: str = field(default_factory=lambda: generate_uid(prefix=None))
    study_date: str = "20260101"
    study_time: str = "090000"
    study_id: str = "1"
    accession_number: str = ""
    study_description: str = "MR neurography mandible"


@dataclass(frozen=True)
class SeriesInfo:
    """Series-level attributes and the MENSE-like acquisition parameters recorded in each instance."""

    series_uid: str = field(default_factory=lambda: generate_uid(prefix=None))
    series_number: int = 1
    series_description: str = "MENSE 3D cor nerve"
    body_part: str = "JAW"
    repetition_time_ms: float = 20.0
    echo_time_ms: float = 10.0
    flip_angle_deg: float = 30.0
    magnetic_field_t: float = 3.0
    manufacturer: str = "ian-node phantom"
    patient_position: str = "HFS"


def _geometry(volume: hd.Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float], float]:
    """Slice step vector, row cosine, column cosine, (row, column) spacing and slice spacing."""
    affine = np.asarray(volume.affine, dtype=np.float64)
    slice_step = affine[:3, 0]
    down_rows = affine[:3, 1]  # moving to the next row: the column direction cosine times row spacing
    across_cols = affine[:3, 2]  # moving to the next column: the row direction cosine times column spacing
    row_spacing = float(np.linalg.norm(down_rows))
    col_spacing = float(np.linalg.norm(across_cols))
    return slice_step, across_cols / col_spacing, down_rows / row_spacing, (row_spacing, col_spacing), float(
        np.linalg.norm(slice_step)
    )


def _ds(value: float) -> str:
    """A DS string of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def build_mr_series(
    volume: hd.Volume,
    study: StudyInfo,
    series: SeriesInfo | None = None,
    acquisition_time: dt.datetime | None = None,
) -> list[Dataset]:
    """One MR Image Storage dataset per slice of `volume` (array axis 0), uint16 pixel data.

    `volume.array` must be a 3D unsigned integer array (slices, rows, columns); the affine gives the
    patient-space (LPS) position of each voxel, as highdicom defines it.
    """
    series = series or SeriesInfo()
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise ValueError(f"volume.array must be 3D (slices, rows, columns), got shape {array.shape}")
    if array.dtype != np.uint16:
        raise TypeError(f"volume.array must be uint16, got {array.dtype}")
    slice_step, row_cosine, col_cosine, (row_sp, col_sp), slice_sp = _geometry(volume)
    orientation = [float(v) for v in (*row_cosine, *col_cosine)]
    normal = np.cross(row_cosine, col_cosine)
    when = acquisition_time or dt.datetime(2026, 1, 1, 9, 0, 0)
    max_value = int(array.max()) if array.size else 0
    bits_stored = max(12, int(max_value).bit_length())

    datasets: list[Dataset] = []
    for k in range(array.shape[0]):
        position = np.asarray(volume.affine, dtype=np.float64)[:3, 3] + k * slice_step
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid(prefix=None)
        ds.StudyDate = study.study_date
        ds.SeriesDate = study.study_date
        ds.AcquisitionDate = when.strftime("%Y%m%d")
        ds.ContentDate = when.strftime("%Y%m%d")
        ds.StudyTime = study.study_time
        ds.SeriesTime = when.strftime("%H%M%S")
        ds.AcquisitionTime = when.strftime("%H%M%S")
        ds.ContentTime = when.strftime("%H%M%S")
        ds.AccessionNumber = study.accession_number
        ds.Modality = "MR"
        ds.Manufacturer = series.manufacturer
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study.study_description
        ds.SeriesDescription = series.series_description
        ds.PatientName = study.patient_name
        ds.PatientID = study.patient_id
        ds.PatientBirthDate = study.patient_birth_date
        ds.PatientSex = study.patient_sex
        ds.BodyPartExamined = series.body_part
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SS"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.SliceThickness = _ds(slice_sp)
        ds.RepetitionTime = _ds(series.repetition_time_ms)
        ds.EchoTime = _ds(series.echo_time_ms)
        ds.EchoTrainLength = 1
        ds.ImagingFrequency = _ds(42.577478 * series.magnetic_field_t)
        ds.MagneticFieldStrength = _ds(series.magnetic_field_t)
        ds.SpacingBetweenSlices = _ds(slice_sp)
        ds.FlipAngle = _ds(series.flip_angle_deg)
        ds.PatientPosition = series.patient_position
        ds.StudyInstanceUID = study.study_uid
        ds.SeriesInstanceUID = series.series_uid
        ds.StudyID = study.study_id
        ds.SeriesNumber = series.series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.FrameOfReferenceUID = study.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(np.dot(position, normal)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[2])
        ds.PixelSpacing = [_ds(row_sp), _ds(col_sp)]
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(array[k]).tobytes()

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = IMPLEMENTATION_UID
        ds.file_meta = meta
        datasets.append(ds)
    return datasets


def in_loaded_order(labels: np.ndarray, phantom_affine: np.ndarray, loaded_affine: np.ndarray) -> np.ndarray:
    """The phantom's `labels` in the voxel order of its series as loaded (a loader may reverse an axis).

    Benchmarks score the node's output, which is in the loaded series' order, against the phantom's truth.
    """
    mapping = np.linalg.inv(np.asarray(loaded_affine)) @ np.asarray(phantom_affine)
    if not np.allclose(mapping[:3, :3], np.diag(np.sign(np.diag(mapping[:3, :3]))), atol=1e-4):
        raise ValueError("the loaded volume is not the phantom's up to reversed axes")
    for axis in np.flatnonzero(np.diag(mapping)[:3] < 0):
        labels = np.flip(labels, int(axis))
    return np.ascontiguousarray(labels)
