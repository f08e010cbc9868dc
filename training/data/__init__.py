"""Training samples: 2D coronal slices of each side's crop, from DICOM studies, NIfTI pairs or the paper's 2D form.

Every input form ends as a `SliceSet` (`training.data.samples`): uint8 model-space images (N, S, S),
boolean masks (N, S, S) and one `SampleMeta` (patient, side, slice) per sample, ordered by
(patient, side, slice). 3D forms go through the node's own `ian_node.segment.pipeline` (`prepare`
for images, `to_model_space` for masks); how, and the shared options and errors, are in
`training.data.collect`. The readers: `training.data.dicom` (MR series + SEG), `training.data.nifti`
(image + label volumes), `training.data.paper2d` (the paper's PNG/JPEG folders, and `export_2d`) and
`training.data.phantoms` (generated phantoms, without writing them). The crop (``oracle``, ``auto``,
``half``) and the sample policy (every slice of the crop, or nerve slices only) are described in
`training.data.collect`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from training.data.collect import (
    CROP_SUMMARY,
    CROPS,
    EITHER_SIDE,
    NERVE_MARGINS_MM,
    SAMPLES_ALL,
    SAMPLES_NERVE_ONLY,
    Collector,
    DatasetError,
    DuplicateAnnotationError,
    EmptyMaskError,
    LoadOptions,
    MissingSeriesError,
    UnmatchedSegmentError,
    find_crop_boxes,
    nerve_margin_boxes,
)
from training.data.paper2d import export_2d
from training.data.samples import (
    LoadReport,
    SampleMeta,
    SideGeometry,
    SliceDataset,
    SliceSet,
    SourceReport,
    load_slice_set,
    sampling_step,
    save_slice_set,
    subset,
)

Format = Literal["dicom", "nifti", "2d"]
#: Format name → "module:collector". Imported on first use, so reading one form does not import
#: the others' libraries (nibabel for NIfTI, the SEG readers for DICOM).
READERS: dict[str, str] = {
    "dicom": "training.data.dicom:collect_dicom",
    "nifti": "training.data.nifti:collect_nifti",
    "2d": "training.data.paper2d:collect_2d",
}
FORMATS: tuple[str, ...] = tuple(READERS)

__all__ = [
    "CROPS", "CROP_SUMMARY", "EITHER_SIDE", "FORMATS", "NERVE_MARGINS_MM", "SAMPLES_ALL", "SAMPLES_NERVE_ONLY",
    "Collector", "DatasetError", "DuplicateAnnotationError", "EmptyMaskError", "Format", "LoadOptions", "LoadReport",
    "MissingSeriesError", "SampleMeta", "SideGeometry", "SliceDataset", "SliceSet", "SourceReport",
    "UnmatchedSegmentError", "export_2d", "find_crop_boxes", "load_dataset", "load_slice_set", "nerve_margin_boxes", "sampling_step",
    "save_slice_set", "subset",
]


def load_dataset(root: str | Path, fmt: str, options: LoadOptions | None = None) -> SliceSet:
    """Read a dataset of format dicom, nifti or 2d into model-space samples (default LoadOptions)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    try:
        module_name, function = READERS[fmt].split(":")
    except KeyError:
        raise ValueError(f"unknown dataset format {fmt!r}; valid: {', '.join(FORMATS)}") from None
    options = options or LoadOptions()
    if options.crop == "auto" and fmt == "2d":
        raise DatasetError(f"{root}: crop 'auto' runs the localiser on whole series, which the 2d form does not "
                           "hold; its slices are cropped already (use crop 'oracle' or 'half' to say by what)")
    collect: Callable[[Path, Collector], None] = getattr(importlib.import_module(module_name), function)
    collector = Collector(options)
    collect(root, collector)
    return collector.build(fmt, root)
