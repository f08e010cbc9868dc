"""The benchmark's own crop localiser: the node's stage one, trained on the user's studies after the runs.

The node crops each side in mode ``auto`` with a localiser whose boxes follow the crop region the
checkpoint was trained on (`ian_node.segment.crop.check_crop_compatible`). The bundled localiser
learnt phantoms; this one learns the user's data, next to the exported checkpoint:

- **studies**: those of the exported repeat's training patients (training) and validation patients
  (the safety margin: `training.localiser.build_localiser` calibrates it on them). The test patients'
  volumes are never read, so the exported pair is still untouched by its test data.
- **boxes**: the checkpoint's crop region, by the rule its samples were cropped by (the oracle crop of
  `training.data.collect.Collector.crop`): ``landmarks``, each study's landmark crop (`find_crop_boxes`);
  ``nerve-margins``, its nerve grown by `NERVE_MARGINS_MM` (a study with one side annotated is left
  out: the other side's box is unknown, and an empty target would teach "no mandible there").
- **volumes**: DICOM series + SEG (`training.data.dicom.read_study`) and NIfTI pairs
  (`training.data.nifti.read_pair`), the readers the samples came from. The 2d form holds no volumes
  and a ``half`` checkpoint needs no localiser: both are skipped, and the reason recorded.

The result is OUT/export/localiser.pt (`model.localiser` format), recorded in the ledger, the summary
and the exported checkpoint's metadata. A localiser already there for the same repeat, samples and
settings is kept, not retrained. In the localiser file, which is deployed, patients appear only as
`patient_key` pseudonyms; the summary and the ledger name them, as their splits already do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ian_node.segment.reformat import PatientBox
from ian_node.segment.volume import SeriesError, SeriesVolume, Side
from model.localiser import LocaliserCheckpointError, LocaliserMeta, load_localiser, save_localiser
from training.data.collect import CROP_SUMMARY, Collector, DatasetError, LoadOptions, find_crop_boxes, sided_labels
from training.localiser import LocaliserSample, LocaliserTrainOptions, build_localiser, sample_from_volume
from training.presets import Runtime
from training.runner import BenchmarkPaths, Ledger
from training.splits import Split

logger = logging.getLogger(__name__)

#: The crop regions a localiser can learn (a ``half`` checkpoint needs none).
LOCALISED_REGIONS = ("landmarks", "nerve-margins")


@dataclass(frozen=True)
class StudyVolumes:
    """One study as the localiser needs it: its patient, series, sided label volume and landmark boxes."""

    patient: str
    series: SeriesVolume
    labels: np.ndarray
    landmarks: dict[Side, PatientBox] | None


#: A study's name (its SEG or label file) and how to read it; the reader returns None for a patient
#: outside the wanted set, before reading its pixel data where the format allows.
StudyReader = tuple[str, Callable[[], StudyVolumes | None]]


def patient_key(patient: str) -> str:
    """A patient's pseudonym in the deployed localiser file (16 hex digits of its ID's SHA-256)."""
    return hashlib.sha256(patient.encode("utf-8")).hexdigest()[:16]


def _options_record(options: LocaliserTrainOptions) -> dict[str, Any]:
    """The settings that change the localiser (threads do not), as JSON."""
    data = dataclasses.asdict(options)
    data.pop("threads")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def _finite(value: Any) -> Any:
    """JSON has no NaN: undefined scores (no nerve, no box) are written as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------- reading the studies
def dicom_readers(root: Path, load: LoadOptions, wanted: Callable[[str], bool], region: str) -> list[StudyReader]:
    """One reader per SEG under `root` (`training.data.dicom.read_study`), with its landmark boxes."""
    from training.data.dicom import index_tree, read_study

    index = index_tree(root)

    def read(seg_path: Path) -> StudyVolumes | None:
        study = read_study(seg_path, index, root, load.unsided, wanted)
        if study is None:
            return None
        landmarks = find_crop_boxes(seg_path.parent / CROP_SUMMARY) if region == "landmarks" else None
        return StudyVolumes(study.patient, study.series, study.labels, landmarks)

    return [(str(p), lambda p=p: read(p)) for p in index.segs]


def nifti_readers(root: Path, load: LoadOptions, wanted: Callable[[str], bool], region: str) -> list[StudyReader]:
    """One reader per NIfTI pair under `root` (`training.data.nifti.read_pair`); pairs have no landmarks."""
    from training.data.nifti import find_pairs, read_pair

    def read(image: Path, label: Path, patient: str) -> StudyVolumes | None:
        if not wanted(patient):
            return None
        pair = read_pair(image, label, load)
        return StudyVolumes(patient, pair.series, pair.labels, None)

    return [(str(label), lambda i=image, lab=label, p=patient: read(i, lab, p)) for image, label, patient in find_pairs(root)]


READERS: dict[str, Callable[[Path, LoadOptions, Callable[[str], bool], str], list[StudyReader]]] = {
    "dicom": dicom_readers, "nifti": nifti_readers}


def study_sample(study: StudyVolumes, region: str, spacing: float, where: str) -> LocaliserSample:
    """A study as a localiser sample whose boxes follow `region`, cropped by the samples' own oracle rule."""
    landmarks = study.landmarks if region == "landmarks" else None
    crop = Collector(LoadOptions()).crop(study.series, study.labels, landmarks, where)
    if crop.region != region:
        raise DatasetError(f"{where}: no landmark crop boxes ({CROP_SUMMARY}), and the checkpoint's crop region "
                           "is 'landmarks'")
    boxes = crop.rois or {}
    if set(boxes) != set(Side):
        have = ", ".join(s.value for s in boxes) or "no"
        raise DatasetError(f"{where}: {have} side annotated; the localiser needs both sides' {region} boxes")
    labels = sided_labels(study.series, study.labels)
    return sample_from_volume(study.patient, study.series.volume, boxes, spacing, labels)


def read_samples(readers: list[StudyReader], roles: dict[str, str], region: str,
                 spacing: float) -> tuple[dict[str, list[LocaliserSample]], list[dict[str, str]]]:
    """Localiser samples by role ("train" / "val", from each patient's role in `roles`), and the studies
    left out with the reason. Studies of other patients (the test patients) are not read."""
    samples: dict[str, list[LocaliserSample]] = {"train": [], "val": []}
    skipped: list[dict[str, str]] = []
    for where, read in readers:
        try:
            study = read()
            if study is None:
                continue
            samples[roles[study.patient]].append(study_sample(study, region, spacing, where))
        except (DatasetError, SeriesError, OSError, ValueError) as exc:
            logger.warning("localiser: leaving out %s: %s", Path(where).name, exc)
            skipped.append({"source": where, "reason": str(exc)})
    return samples, skipped


# ---------------------------------------------------------------- the benchmark's step
def _reusable(path: Path, identity: dict[str, Any], settings: bool) -> dict[str, Any] | None:
    """The record of the localiser at `path` when it was trained for `identity` (and the same settings)."""
    if not path.is_file():
        return None
    try:
        loaded = load_localiser(path)
    except LocaliserCheckpointError as exc:
        logger.warning("%s is not a readable localiser (%s); training a new one", path, exc)
        return None
    made = loaded.meta.training.get("benchmark", {})
    keys = [k for k in identity if settings or k != "options"]
    if any(made.get(k) != identity[k] for k in keys):
        return None
    return {"sha256": loaded.sha256, "meta": loaded.meta}


def benchmark_localiser(paths: BenchmarkPaths, ledger: Ledger, source: dict[str, Any], region: str, repeat: int,
                        options: LocaliserTrainOptions, runtime: Runtime, train: bool = True) -> dict[str, Any]:
    """Train (or keep) the localiser of exported repeat `repeat`; its record for the ledger and summary.

    `status` is "trained", "kept" (already there for the same repeat, samples and settings), "off"
    (0 iterations) or "skipped" (with a `reason`). `train` False (``--evaluate-only``) only keeps one.
    """
    split = next(s for s in ledger.splits if s.repeat == repeat)
    options = dataclasses.replace(options, region=region, seed=split.seed, threads=runtime.threads)
    identity = {"repeat": repeat, "split_seed": split.seed, "data_fingerprint": ledger.fingerprint,
                "region": region, "options": _options_record(options)}
    outcome = _step(paths, ledger, source, split, region, options, runtime, identity, train)
    record = {"status": outcome.pop("status"), "repeat": repeat, "region": region, "options": identity["options"],
              **({"path": str(paths.localiser)} if "sha256" in outcome else {}), **outcome}
    if record["status"] in ("skipped", "off"):
        logger.info("localiser: %s (%s)", record["status"], record["reason"])
        if paths.localiser.is_file():
            logger.warning("%s is left from an earlier run and is not this checkpoint's localiser", paths.localiser)
    ledger.localiser = record
    ledger.save()
    return record


def _step(paths: BenchmarkPaths, ledger: Ledger, source: dict[str, Any], split: Split, region: str,
          options: LocaliserTrainOptions, runtime: Runtime, identity: dict[str, Any], train: bool) -> dict[str, Any]:
    """The localiser's outcome for `split`: kept, trained, off or skipped (with the reason)."""
    if region not in LOCALISED_REGIONS:
        return {"status": "skipped", "reason": f"the checkpoint's crop region is {region!r}: crop mode 'half' "
                                               "needs no localiser"}
    if options.iterations == 0:
        return {"status": "off", "reason": "--localiser-iterations 0"}
    kept = _reusable(paths.localiser, identity, settings=train)
    if kept is not None:
        logger.info("localiser: %s was trained for repeat %d on these samples; kept", paths.localiser, split.repeat)
        before = ledger.localiser or {}
        known = {k: before[k] for k in ("patients", "studies_left_out") if k in before
                 and before.get("sha256") == kept["sha256"]}
        return {"status": "kept", **_describe(kept["sha256"], kept["meta"]), **known}
    if not train:
        return {"status": "skipped", "reason": "--evaluate-only trains no localiser, and none was trained for "
                                               f"repeat {split.repeat}"}
    fmt = source.get("format", "")
    if fmt not in READERS:
        return {"status": "skipped", "reason": f"the {fmt!r} form holds no volumes to train a localiser on "
                                               "(its slices were cropped when they were made)"}
    root = paths.phantoms if source.get("data") == "generated phantoms" else Path(source.get("data", ""))
    if not root.is_dir():
        return {"status": "skipped", "reason": f"the data folder {root} is not there any more"}
    roles = {**{p: "val" for p in split.val}, **{p: "train" for p in split.train}}
    fields = LoadOptions.__dataclass_fields__
    load = LoadOptions(**{k: v for k, v in source.get("load", {}).items() if k in fields})
    started = time.perf_counter()
    readers = READERS[fmt](root, load, roles.__contains__, region)
    samples, left_out = read_samples(readers, roles, region, options.spacing_mm)
    logger.info("localiser: %d training and %d validation studies (repeat %d, region %s) read in %.0f s; %d left "
                "out", len(samples["train"]), len(samples["val"]), split.repeat, region,
                time.perf_counter() - started, len(left_out))
    if not samples["train"]:
        return {"status": "skipped", "reason": "no training patient's study could become a localiser sample",
                "studies_left_out": left_out}
    net, meta = build_localiser(samples["train"], samples["val"], options,
                                label=f"crop localiser of train_benchmark repeat {split.repeat} ({region})",
                                progress=runtime.progress)
    meta.training["benchmark"] = {
        **identity, "studies": {role: [patient_key(s.name) for s in samples[role]] for role in ("train", "val")},
        "studies_left_out": len(left_out)}
    sha = save_localiser(paths.localiser, net, meta)
    logger.info("localiser: %s (sha256 %s), safety margin %.0f mm, validation %s", paths.localiser, sha[:12],
                meta.safety_margin_mm, meta.training.get("validation"))
    return {"status": "trained", **_describe(sha, meta), "studies_left_out": left_out,
            "patients": {role: sorted({s.name for s in samples[role]}) for role in ("train", "val")}}


def _describe(sha: str, meta: LocaliserMeta) -> dict[str, Any]:
    """The numbers a localiser record gives: hash, margin, validation scores, studies, training time."""
    made = meta.training.get("benchmark", {})
    return {"sha256": sha, "safety_margin_mm": meta.safety_margin_mm, "min_confidence": meta.min_confidence,
            "validation": _finite(meta.training.get("validation", {})),
            "studies": {role: len(v) for role, v in made.get("studies", {}).items()},
            "iterations": meta.training.get("iterations"), "train_seconds": meta.training.get("seconds")}


def checkpoint_record(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the exported checkpoint's metadata keeps of a localiser record (None without a localiser):
    no patient IDs and no paths, since the checkpoint is deployed."""
    if not record or "sha256" not in record:
        return None
    return {k: v for k, v in record.items() if k not in ("patients", "studies_left_out", "path")}
