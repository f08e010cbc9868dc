"""NIfTI pairs (image volume + label volume) as training samples, read with nibabel.

Layout, one of:

- `pairs.csv` at the root with columns image, label, patient (paths relative to the root): any
  names, and several pairs may share a patient only if they annotate different sides;
- otherwise the nnU-Net layout: `imagesTr/<case>_0000.nii[.gz]` with `labelsTr/<case>.nii[.gz]`;
  the patient ID is the case name (so name cases by patient, one case per patient).

Label values: `LoadOptions.right_label` (default 1) and `left_label` (default 2), the project's
convention (`ian_node.segment.seg`). Equal values mean "nerve, side by position": voxels in the right ROI
half become the right nerve. Any other non-zero value is an error naming the file.

Crop (`LoadOptions.crop`): a NIfTI pair has no landmarks, so ``oracle`` crops each side by its nerve
margins (`training.data.collect.nerve_margin_boxes`); ``auto`` and ``half`` work as for DICOM.

Geometry: `highdicom.Volume.from_nibabel` turns the NIfTI affine (RAS) into the patient LPS affine,
so the same side stacks and coronal reformat as for DICOM apply, and a NIfTI converted from a DICOM
series gives the very same samples. Image and label must share shape and affine. `read_pair` (a pair
as volumes) is shared with the benchmark's crop localiser (`training.localiser_run`).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np

from ian_node.segment.volume import SeriesVolume, Side
from training.data.collect import (
    EITHER_SIDE,
    Collector,
    DatasetError,
    EmptyMaskError,
    LoadOptions,
    volume_samples,
)

logger = logging.getLogger(__name__)

PAIRS_CSV = "pairs.csv"
PAIR_FIELDS = ("image", "label", "patient")


def _strip_nii(name: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def find_pairs(root: Path) -> list[tuple[Path, Path, str]]:
    """(image, label, patient) of every pair, from pairs.csv or the nnU-Net layout."""
    table = root / PAIRS_CSV
    if table.is_file():
        with table.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in PAIR_FIELDS if c not in (reader.fieldnames or ())]
            if missing:
                raise DatasetError(f"{table}: missing column(s) {missing}; expected {', '.join(PAIR_FIELDS)}")
            pairs = []
            for line, row in enumerate(reader, start=2):
                if not row["patient"].strip():
                    raise DatasetError(f"{table}:{line}: empty patient")
                pairs.append((root / row["image"], root / row["label"], row["patient"].strip()))
            return pairs
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise DatasetError(f"{root}: no {PAIRS_CSV} and no imagesTr/ + labelsTr/ folders (nnU-Net layout)")
    pairs = []
    for image in sorted(images_dir.glob("*_0000.nii*")):
        case = _strip_nii(image.name)[: -len("_0000")]
        label = next((p for p in (labels_dir / f"{case}.nii.gz", labels_dir / f"{case}.nii") if p.exists()),
                     labels_dir / f"{case}.nii.gz")
        pairs.append((image, label, case))
    if not pairs:
        raise DatasetError(f"{images_dir}: no <case>_0000.nii[.gz] images")
    return pairs


def read_volume(path: Path) -> hd.Volume:
    """A NIfTI file as a highdicom Volume in patient (LPS) coordinates."""
    if not path.is_file():
        raise DatasetError(f"{path}: file does not exist")
    try:
        image = nib.load(path)
        volume = hd.Volume.from_nibabel(image)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise DatasetError(f"{path}: cannot read as a 3D NIfTI volume: {exc}") from exc
    return volume


@dataclass(frozen=True)
class PairVolumes:
    """One NIfTI pair as volumes: what the training samples and the benchmark's localiser are made from."""

    label_path: Path
    series: SeriesVolume
    labels: np.ndarray  # uint8: `Side.label` per nerve voxel, `EITHER_SIDE` when the sides share a value
    side_values: dict[Side, tuple[int, ...]]
    how: str  # which label value was taken for which side, for the load report


def read_pair(image_path: Path, label_path: Path, options: LoadOptions) -> PairVolumes:
    """Read an image and its label volume, check they match, and map the label values onto sides."""
    where = str(label_path)
    image = read_volume(image_path)
    label = read_volume(label_path)
    if image.spatial_shape != label.spatial_shape or not image.geometry_equal(label, tol=1e-3):
        raise DatasetError(f"{where}: label geometry {label.spatial_shape} differs from image {image_path} "
                           f"{image.spatial_shape} (shape and affine must match)")
    raw = np.asarray(label.array)
    if not np.all(np.isfinite(raw)) or not np.array_equal(raw, np.rint(raw)):
        raise DatasetError(f"{where}: label values must be integers")
    values = set(np.unique(raw).astype(np.int64).tolist()) - {0}
    allowed = {options.right_label, options.left_label}
    if values - allowed:
        raise DatasetError(f"{where}: label values {sorted(values - allowed)} are neither right "
                           f"({options.right_label}) nor left ({options.left_label})")
    if not values:
        raise EmptyMaskError(f"{where}: the label volume is empty")
    labels = np.zeros(raw.shape, dtype=np.uint8)
    if options.right_label == options.left_label:
        labels[raw == options.right_label] = EITHER_SIDE
        side_values = {side: (EITHER_SIDE,) for side in Side}
        how = f"label {options.right_label}: side by position"
    else:
        labels[raw == options.right_label] = Side.RIGHT.label
        labels[raw == options.left_label] = Side.LEFT.label
        side_values = {side: (side.label,) for side, v in ((Side.RIGHT, options.right_label),
                                                           (Side.LEFT, options.left_label)) if v in values}
        how = f"labels right={options.right_label}, left={options.left_label}"
    series = SeriesVolume(series_uid=f"nifti:{image_path.name}",
                          volume=image.with_array(np.asarray(image.array, dtype=np.float32)), frames=())
    return PairVolumes(label_path, series, labels, side_values, how)


def _pair(image_path: Path, label_path: Path, patient: str, collector: Collector) -> None:
    where = str(label_path)
    options = collector.options
    pair = read_pair(image_path, label_path, options)
    series, labels = pair.series, pair.labels
    crop = collector.crop(series, labels, None, where)
    sides = volume_samples(series, labels, pair.side_values, options, crop.rois)
    if options.right_label != options.left_label:
        for side, samples in sides.items():
            if samples.nerve_slices == 0:
                raise EmptyMaskError(f"{where}: the {side.value} nerve label has no voxel inside the {side.value} "
                                     f"crop ({crop.detail}; are the label values swapped?)")
    sides = {s: v for s, v in sides.items() if v.nerve_slices > 0}
    collector.add_sides(where, patient, sides, f"image {image_path.name}, {pair.how}; {crop.detail}", crop.region)


def collect_nifti(root: Path, collector: Collector) -> None:
    """Add the samples of every NIfTI pair under `root` to `collector`."""
    pairs = find_pairs(root)
    logger.info("%s: %d NIfTI pair(s)", root, len(pairs))
    for image, label, patient in pairs:
        collector.run(str(label), lambda i=image, lab=label, p=patient: _pair(i, lab, p, collector))
