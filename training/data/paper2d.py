"""The paper's own 2D form: coronal images and masks listed in `samples.csv`, read and written.

`samples.csv` at the root has columns image, mask, patient, side and slice (image and mask are
paths relative to the root, PNG or JPEG; side is right/left or R/L). An image already `size`×`size`
is used as stored (converted to 8-bit grey); any other size goes through the node's slice transform
(`model.preprocess`) with square pixels. Masks are grey values ≥ 128 (JPEG-safe). `export_2d`
writes that form losslessly (PNG), so it reads back to identical arrays at the same size.

The slices were cropped before they were written, so `LoadOptions.crop` only says by what: ``oracle``
(the default) takes them for the paper's landmark crop (region ``landmarks``), ``half`` for the
volume's halves; ``auto`` needs volumes and is refused. With `nerve_slices_only` an empty mask is an
error (the paper's form holds nerve slices); otherwise empty samples are kept.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ian_node.segment.crop import CropMode
from model.preprocess import image_to_model, mask_to_model, plan_slice_transform
from training.data.collect import Collector, DatasetError, EmptyMaskError
from training.data.samples import SampleMeta, SliceSet, SourceReport

logger = logging.getLogger(__name__)

SAMPLES_CSV = "samples.csv"
SAMPLE_FIELDS = ("image", "mask", "patient", "side", "slice")
#: The crop region the 2D form's slices are taken to have, per `LoadOptions.crop` (see the module docstring).
REGION_2D: dict[str, str] = {CropMode.ORACLE.value: "landmarks", CropMode.HALF.value: "half"}
_SIDE_NAMES = {"right": "right", "r": "right", "rt": "right", "left": "left", "l": "left", "lt": "left"}


def _read_grey(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)


def _side_name(text: str, where: str) -> str:
    side = _SIDE_NAMES.get(text.strip().lower())
    if side is None:
        raise DatasetError(f"{where}: side must be right/left (or R/L), got {text!r}")
    return side


def collect_2d(root: Path, collector: Collector) -> None:
    """Add every row of `root/samples.csv` to `collector`."""
    table = root / SAMPLES_CSV
    if not table.is_file():
        raise DatasetError(f"{table}: missing; the 2d form needs {SAMPLES_CSV} with columns {', '.join(SAMPLE_FIELDS)}")
    with table.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in SAMPLE_FIELDS if c not in (reader.fieldnames or ())]
        if missing:
            raise DatasetError(f"{table}: missing column(s) {missing}; expected {', '.join(SAMPLE_FIELDS)}")
        rows = list(reader)
    size = collector.options.size
    collector.regions.add(REGION_2D[collector.options.crop])
    for line, row in enumerate(rows, start=2):
        where = f"{table}:{line}"

        def work(row: dict[str, str] = row, where: str = where) -> None:
            patient = row["patient"].strip()
            if not patient:
                raise DatasetError(f"{where}: empty patient")
            side = _side_name(row["side"], where)
            try:
                slice_index = int(row["slice"])
            except ValueError:
                raise DatasetError(f"{where}: slice must be an integer, got {row['slice']!r}") from None
            image_path, mask_path = root / row["image"], root / row["mask"]
            for p in (image_path, mask_path):
                if not p.is_file():
                    raise DatasetError(f"{where}: file {p} does not exist")
            image, mask = _read_grey(image_path), _read_grey(mask_path) >= 128
            if image.shape != mask.shape:
                raise DatasetError(f"{mask_path}: mask {mask.shape} and image {image.shape} differ in size")
            if image.shape != (size, size):
                t = plan_slice_transform(image.shape, (1.0, 1.0), size)
                image, mask = image_to_model(image, t), mask_to_model(mask, t)
            if not mask.any() and collector.options.nerve_slices_only:
                raise EmptyMaskError(f"{mask_path}: mask is empty although only nerve slices were asked for "
                                     "(drop --nerve-slices-only to keep empty samples)")
            collector.add_sample(where, SampleMeta(patient, side, slice_index), image, mask)

        collector.run(where, work)
    used = len(collector.metas)
    sides = len({(m.patient, m.side) for m in collector.metas})
    collector.sources.append(SourceReport(str(table), "used", f"{used} of {len(rows)} rows: {sides} patient sides",
                                          used))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:64] or "_"


def export_2d(slices: SliceSet, out_dir: str | Path) -> Path:
    """Write `slices` in the paper's 2D form (PNG images and 0/255 masks + samples.csv); return the CSV."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: export folder exists and is not empty")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    rows = []
    for i, meta in enumerate(slices.metas):
        name = f"{_safe(meta.patient)}_{meta.side}_{meta.slice:04d}"
        if name in names:
            name = f"{name}_{i}"
        names.add(name)
        Image.fromarray(slices.images[i], mode="L").save(out / "images" / f"{name}.png")
        Image.fromarray(slices.masks[i].astype(np.uint8) * 255, mode="L").save(out / "masks" / f"{name}.png")
        rows.append([f"images/{name}.png", f"masks/{name}.png", meta.patient, meta.side, meta.slice])
    with (out / SAMPLES_CSV).open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(SAMPLE_FIELDS)
        writer.writerows(rows)
    logger.info("exported %d samples in the 2d form to %s", len(rows), out)
    return out / SAMPLES_CSV
