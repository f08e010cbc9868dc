"""nnU-Net's rows of ``reports/per_nerve_metrics.csv``: each test nerve's 3D prediction in the source series.

The same path as every network's rows (`training.nerve_eval`): each test study is read again and
prepared exactly as its samples were (`eval_studies`), every coronal slice of each side's crop is
predicted, the node's inverse (`finish_series`, tract clean-up off) maps the result back to source
voxels, and `score_labels` (`training.nerve_metrics.nerve_row`) scores it. Only the predictor differs:
the slices are handed to nnU-Net as one case per side (the whole crop stack, every slice, at the
series' coronal spacing; nnU-Net resamples to its plans' spacing itself), predicted by the run's fold
0 (`training.nnunet.child`), and nnU-Net's labels are fed to `finish_series` as probabilities 0 or 1.
Each run's rows are kept in its folder (``per_nerve.json``) keyed like the networks' (its final
checkpoint's SHA-256 and the samples' fingerprint), so re-reporting does not run nnU-Net again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from training.data import SliceSet
from training.data.collect import Collector, LoadOptions, coronal_spacing, model_pixel_mm
from training.localiser_run import READERS
from training.nerve_eval import (
    EVAL_FORMAT,
    EvalStudy,
    NerveEvaluation,
    eval_studies,
    keep_rows,
    predict_labels,
    read_kept_rows,
    score_labels,
)
from training.nerve_metrics import NerveRow, write_per_nerve_csv
from training.nnunet import NnunetError
from training.nnunet.export import FILE_ENDING, dataset_id, write_case
from training.nnunet.run import NnunetPaths, NnunetSettings, child_step, nnunet_env
from training.outputs import complete_repeats
from training.runner import BenchmarkPaths, Ledger, RunRecord, run_key

logger = logging.getLogger(__name__)


class StoredLabels:
    """A `SlicePredictor` whose answer was computed beforehand (nnU-Net's labels of a study's slices)."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def predict(self, images: np.ndarray) -> np.ndarray:
        if images.shape != self.labels.shape:
            raise NnunetError(f"nnU-Net labels {self.labels.shape} do not match the study's slices {images.shape}")
        return self.labels.astype(np.float32)


def with_nnunet_nerves(nerves: NerveEvaluation, runs: list[RunRecord], records: list[RunRecord], ledger: Ledger,
                       paths: BenchmarkPaths, slices: SliceSet, source: dict[str, Any],
                       settings: NnunetSettings) -> NerveEvaluation:
    """`nerves` with the rows of the nnU-Net `runs` of the reported repeats added (CSV rewritten); unchanged
    when the per-nerve step was skipped. `records` are the networks' runs, which decide the reported repeats."""
    reported = set(complete_repeats(records, ledger.protocol.models))
    runs = [r for r in runs if r.repeat in reported]
    if nerves.csv is None or not runs:
        return nerves
    identity = {r.key: _identity(paths, r, ledger.fingerprint) for r in runs}
    kept = {r.key: read_kept_rows(paths.run_dir(r.model, r.repeat), identity[r.key]) for r in runs}
    todo = [r for r in runs if kept[r.key] is None]
    fresh: dict[str, list[NerveRow]] = defaultdict(list)
    for row in nerve_rows(todo, ledger, paths, slices, source, settings) if todo else []:
        fresh[run_key(row.model, row.repeat)].append(row)
    for r in todo:
        keep_rows(paths.run_dir(r.model, r.repeat), identity[r.key], fresh[r.key])
    rows = [row for r in runs for row in (kept[r.key] if kept[r.key] is not None else fresh[r.key])]
    all_rows = (*nerves.rows, *rows)
    csv_path = write_per_nerve_csv(all_rows, nerves.csv)
    logger.info("per-nerve metrics: %d nnU-Net nerves of %d runs added to %s", len(rows), len(runs), csv_path)
    return replace(nerves, rows=all_rows, record={**nerves.record, "nerves": len(all_rows),
                                                   "nnunet_runs": len(runs), "nnunet_runs_predicted": len(todo)})


def _identity(paths: BenchmarkPaths, record: RunRecord, fingerprint: str) -> dict[str, Any]:
    """What a run's kept per-nerve rows must have been computed from (as `training.nerve_eval` keys its own)."""
    run_dir = paths.run_dir(record.model, record.repeat)
    checkpoint = Path(json.loads((run_dir / "evaluation.json").read_text(encoding="utf-8"))["nnunet"]["checkpoint"])
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    return {"format": EVAL_FORMAT, "run": record.key, "checkpoint_sha256": digest, "data_fingerprint": fingerprint}


def nerve_rows(runs: list[RunRecord], ledger: Ledger, paths: BenchmarkPaths, slices: SliceSet,
               source: dict[str, Any], settings: NnunetSettings) -> list[NerveRow]:
    """Per-nerve rows of nnU-Net runs (rows named ``nnunet_<configuration>``), repeat by repeat."""
    root = paths.phantoms if source.get("data") == "generated phantoms" else Path(source.get("data", ""))
    fields_ = LoadOptions.__dataclass_fields__
    load = LoadOptions(**{k: v for k, v in source.get("load", {}).items() if k in fields_})
    collector = Collector(load)
    sides: dict[str, set[str]] = defaultdict(set)
    for m in slices.metas:
        sides[m.patient].add(m.side)
    npaths = NnunetPaths.of(paths)
    env = nnunet_env(npaths, settings)
    by_repeat: dict[int, list[RunRecord]] = defaultdict(list)
    for r in runs:
        by_repeat[r.repeat].append(r)
    out: list[NerveRow] = []
    for split in ledger.splits:
        if split.repeat not in by_repeat:
            continue
        test = {p for p in split.test if p in sides}
        readers = READERS[source["format"]](root, load, test.__contains__, slices.report.crop.get("region", ""))
        studies = list(eval_studies(readers, collector, ledger.protocol.size, sides))
        folder = npaths.root / "nerves" / f"repeat_{split.repeat}"
        images = folder / "images"
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir(parents=True)
        names = _write_studies(studies, images)
        for r in by_repeat[split.repeat]:
            configuration = r.model.removeprefix("nnunet_")
            predicted = folder / configuration
            child_step("predict", [str(dataset_id(split.repeat)), configuration, settings.trainer,
                                   settings.device_type, str(images), str(predicted)], env,
                       npaths.logs / f"nerves_repeat{split.repeat}_{configuration}_predict.log")
            for study, cases in zip(studies, names, strict=True):
                labels = np.concatenate([_read(predicted / f"{c}{FILE_ENDING}") == 1 for c in cases])
                out += score_labels(r.model, r.repeat, study,
                                    predict_labels(study, StoredLabels(labels), 0.5))
    return out


def _write_studies(studies: list[EvalStudy], folder: Path) -> list[list[str]]:
    """Each study's sides as nnU-Net cases (every slice of the crop stack); returns the case names per study."""
    names = []
    for i, study in enumerate(studies):
        step = coronal_spacing(study.prepared.series)
        cases = []
        for j, side in enumerate(study.prepared.sides):
            name = f"nerve_{i:03d}_{j}"
            write_case(side.images, (step, *model_pixel_mm(side.transform)), folder / f"{name}_0000{FILE_ENDING}")
            cases.append(name)
        names.append(cases)
    return names


def _read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    if not path.is_file():
        raise NnunetError(f"{path}: nnU-Net wrote no prediction")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def add_nnunet_runs(records: list[RunRecord], nerves: NerveEvaluation, ledger: Ledger, paths: BenchmarkPaths,
                    slices: SliceSet, source: dict[str, Any], settings: NnunetSettings,
                    train: bool = True) -> tuple[list[RunRecord], NerveEvaluation]:
    """`train_benchmark --nnunet`: every nnU-Net run of the benchmark (`nnunet_rows`), and `nerves` with their
    per-nerve rows added; the runs join `records`, so every other table gets their rows too."""
    from training.nnunet.run import nnunet_rows

    runs = nnunet_rows(ledger, paths, slices, settings, train=train)
    return runs, with_nnunet_nerves(nerves, runs, records, ledger, paths, slices, source, settings)
