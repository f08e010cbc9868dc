"""nnU-Net's predicted volumes back to the benchmark's samples, so that they are scored like every network's.

nnU-Net writes each test case's segmentation in the geometry of the case it was given, which is the
side's stack of model-space slices (`training.nnunet.export`); slice k of the volume is therefore the
prediction for the case's k-th sample, in the same pixels as the other networks' predictions. The
result is the run's ``test_predictions.npz`` (`training.runner.save_predictions`), from which
`training.outputs` makes the per-slice and per-nerve rows of every table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data import SliceSet
from training.nnunet import NnunetError
from training.nnunet.export import FILE_ENDING, RawDataset


def read_predictions(dataset: RawDataset, folder: Path, slices: SliceSet) -> tuple[np.ndarray, np.ndarray]:
    """(sample indices ascending, boolean masks (N, S, S)) of the dataset's test cases, read from `folder`."""
    import SimpleITK as sitk

    indices: list[int] = []
    masks: list[np.ndarray] = []
    for case in dataset.test:
        path = folder / f"{case.name}{FILE_ENDING}"
        if not path.is_file():
            raise NnunetError(f"{path}: nnU-Net wrote no prediction for test case {case.name}")
        volume = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        expected = (len(case.indices), slices.size, slices.size)
        if volume.shape != expected:
            raise NnunetError(f"{path}: prediction of shape {volume.shape}, expected {expected} (slices, rows, "
                              "columns of the case)")
        indices += case.indices
        masks.append(volume == 1)
    if not indices:
        raise NnunetError(f"{dataset.name} has no test case to score")
    order = np.argsort(indices, kind="stable")
    return np.asarray(indices, dtype=np.int64)[order], np.concatenate(masks)[order]
