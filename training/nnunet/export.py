"""The benchmark's samples as nnU-Net raw datasets, one per repeat, and fold 0 as the repeat's split.

Each (patient, side) of the benchmark's `SliceSet` is one nnU-Net case: its model-space coronal slices
(the node's crop and the paper's slice transform, exactly what every other network trains and is scored
on), stacked in slice order along the first array axis, with the side's millimetres as spacing: the
samples' step along the stack (`SideGeometry.sample_mm`) and the size of a model pixel (`row_mm`,
`col_mm`); nominal 1 mm for inputs that record none (the paper's 2D folders). The coronal axis is the
coarsest one in such a stack, so nnU-Net's ``2d`` configuration trains on the same coronal slices as the
other networks (`training.nnunet.run` checks its plans say so).

One raw dataset per repeat keeps the test patients out of everything nnU-Net learns, its intensity
fingerprint included: ``imagesTr``/``labelsTr`` hold the repeat's training and validation patients,
``imagesTs`` its test patients, and ``splits_final.json`` (written into the preprocessed folder) makes
fold 0 the repeat's own training/validation split. Cases are named ``ian_NNNN`` by their order in the
samples, so no file name carries a patient ID; ``ian_cases.json`` maps each case back to its samples.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.data import SliceSet
from training.splits import Split

logger = logging.getLogger(__name__)

#: nnU-Net dataset ID of repeat 0; repeat k is BASE_DATASET_ID + k (IDs have three digits).
BASE_DATASET_ID = 100
FILE_ENDING = ".nii.gz"
CASES_FILE = "ian_cases.json"
#: The one input channel: a name other than "CT" gives nnU-Net's per-case z-score normalisation.
CHANNEL_NAME = "MR"
LABELS = {"background": 0, "nerve": 1}


@dataclass(frozen=True)
class Case:
    """One patient side as an nnU-Net case: its sample indices in the `SliceSet`, in slice order."""

    name: str
    patient: str
    side: str
    indices: tuple[int, ...]
    spacing: tuple[float, float, float]  # mm along (slices, rows, columns)


@dataclass(frozen=True)
class RawDataset:
    """A repeat's raw dataset: `train` cases (its training and validation patients) and `test` cases."""

    dataset_id: int
    name: str
    folder: Path
    repeat: int
    train: tuple[Case, ...]
    val: tuple[Case, ...]
    test: tuple[Case, ...]

    @property
    def images_ts(self) -> Path:
        return self.folder / "imagesTs"

    def splits(self) -> list[dict[str, list[str]]]:
        """``splits_final.json``: one fold, the repeat's training cases and its validation cases."""
        return [{"train": [c.name for c in self.train], "val": [c.name for c in self.val]}]


def dataset_id(repeat: int) -> int:
    """The nnU-Net dataset ID of a repeat's dataset."""
    value = BASE_DATASET_ID + repeat
    if not 0 <= repeat or value > 999:
        raise ValueError(f"repeat {repeat} has no three-digit nnU-Net dataset ID (base {BASE_DATASET_ID})")
    return value


def side_cases(slices: SliceSet) -> list[Case]:
    """Every (patient, side) of the samples as a case, in the samples' order, with its spacing in mm."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, m in enumerate(slices.metas):
        groups[(m.patient, m.side)].append(i)
    geometry = slices.report.geometry_of()
    cases = []
    for n, ((patient, side), indices) in enumerate(groups.items()):
        indices.sort(key=lambda i: slices.metas[i].slice)
        g = geometry.get((patient, side))
        spacing = (g.sample_mm, g.row_mm, g.col_mm) if g is not None else (1.0, 1.0, 1.0)
        cases.append(Case(f"ian_{n:04d}", patient, side, tuple(indices), tuple(float(s) for s in spacing)))
    return cases


def export_raw(slices: SliceSet, split: Split, raw_root: Path) -> RawDataset:
    """Write (or reuse) the repeat's raw dataset under `raw_root` (nnU-Net's ``nnUNet_raw``)."""
    ident = dataset_id(split.repeat)
    name = f"Dataset{ident:03d}_IAN_repeat{split.repeat}"
    roles = {p: "train" for p in split.train} | {p: "val" for p in split.val} | {p: "test" for p in split.test}
    by_role: dict[str, list[Case]] = {"train": [], "val": [], "test": []}
    for case in side_cases(slices):
        by_role[roles[case.patient]].append(case)
    dataset = RawDataset(ident, name, raw_root / name, split.repeat, *(tuple(by_role[r]) for r in ("train", "val",
                                                                                                    "test")))
    record = _cases_record(dataset)
    marker = dataset.folder / CASES_FILE
    if marker.is_file():
        if json.loads(marker.read_text(encoding="utf-8")) != record:
            raise ValueError(f"{dataset.folder} holds another export; use a new benchmark folder")
        return dataset
    partial = dataset.folder.with_name(name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (partial / sub).mkdir(parents=True)
    for role, cases in by_role.items():
        images = "imagesTs" if role == "test" else "imagesTr"
        for case in cases:
            idx = np.asarray(case.indices)
            write_case(slices.images[idx], case.spacing, partial / images / f"{case.name}_0000{FILE_ENDING}")
            if role != "test":
                write_case(slices.masks[idx].astype(np.uint8), case.spacing,
                           partial / "labelsTr" / f"{case.name}{FILE_ENDING}")
    n_training = len(dataset.train) + len(dataset.val)
    (partial / "dataset.json").write_text(json.dumps({
        "name": name, "description": f"ian-node benchmark samples, repeat {split.repeat} (seed {split.seed})",
        "channel_names": {"0": CHANNEL_NAME}, "labels": LABELS, "numTraining": n_training,
        "file_ending": FILE_ENDING, "overwrite_image_reader_writer": "SimpleITKIO"}, indent=1), encoding="utf-8")
    (partial / CASES_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    if dataset.folder.exists():
        shutil.rmtree(dataset.folder)
    partial.rename(dataset.folder)
    logger.info("nnU-Net raw dataset %s: %d training, %d validation, %d test cases", name, len(dataset.train),
                len(dataset.val), len(dataset.test))
    return dataset


def write_splits(dataset: RawDataset, preprocessed_root: Path) -> Path:
    """``splits_final.json`` in the dataset's preprocessed folder: fold 0 is the repeat's own split."""
    path = preprocessed_root / dataset.name / "splits_final.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataset.splits(), indent=1), encoding="utf-8")
    return path


def _cases_record(dataset: RawDataset) -> dict[str, Any]:
    return {"repeat": dataset.repeat, **{role: [asdict(c) | {"indices": list(c.indices), "spacing": list(c.spacing)}
                                                for c in getattr(dataset, role)] for role in ("train", "val", "test")}}


def write_case(array: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    """A (slices, rows, columns) array with its spacing in mm as nnU-Net NIfTI (SimpleITK's spacing is in
    (x, y, z), the reversed array order)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(reversed(spacing)))
    sitk.WriteImage(image, str(path), True)
