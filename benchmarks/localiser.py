"""How good is the automatic crop? Localiser accuracy, end-to-end DSC per crop mode, and CPU time.

    python benchmarks/localiser.py                                # 8 held-out paper phantoms, ~6 min on 2 cores
    python benchmarks/localiser.py --patients 2 --json out.json   # quicker
    python benchmarks/localiser.py --checkpoint RUN/export/ian_net_best.pt --e2e-patients 8

Held-out phantoms: `paper` preset (life-size heads off-centre by up to 20 mm and rotated up to 10°
about each axis, 40% oblique acquisitions), seed 0, patients 100 onwards (`--first`; the `phantom`
  benchmark preset trains on patients 0-9 of seed 0); the bundled
localiser was trained and calibrated on seeds 11-14 (`training.localiser`). Each study is written as
DICOM files and read back by the node's loader, as a received series would be.

1. Localiser accuracy per side (`training.localiser.score_samples`, with the safety margin the node
   applies): the fraction of ground-truth nerve voxels inside the box (target >= 99.5% on every
   patient), the IoU with the landmark crop and the signed error of each face in mm.
2. End-to-end per-nerve 3D DSC of the node's pipeline (`segment_series`) with the `auto`, `oracle`
   (the landmark crop) and `half` crops, side by side on the same patients, with the checkpoint given
   (default: the bundled one): after the node's 3D clean-up (`clean_up`, what is sent) and before it
   (the network's masks put back in the source voxels), so that the crop's effect is told apart from
   the clean-up's choice of component.
3. CPU time of one job, split by stage (load, localise, preprocess, inference, inverse and
   post-processing, SEG build), median over the patients, and the peak resident memory of a process
   that runs one whole job.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ian_node.app.demo import dice  # noqa: E402
from ian_node.phantom.mr_series import in_loaded_order  # noqa: E402
from ian_node.phantom.study import generate_phantom, phantom_preset, write_phantom  # noqa: E402
from ian_node.segment.crop import CropMode, CropRequest, NoRegionError  # noqa: E402
from ian_node.segment.pipeline import PipelineOptions, clean_up, segment_series  # noqa: E402
from ian_node.segment.result import result_segmentation  # noqa: E402
from ian_node.segment.volume import Side, load_series  # noqa: E402
from model.checkpoint import BUNDLED_CHECKPOINT, load_checkpoint  # noqa: E402
from model.localiser import load_localiser  # noqa: E402
from model.predictor import Predictor, PredictorOptions  # noqa: E402
from training.data.collect import nerve_points  # noqa: E402
from training.localiser import sample_from_volume, score_samples  # noqa: E402


def _one_job(paths: list[str], checkpoint: str, threads: int, queue: Any) -> None:
    """A whole job in a fresh process: its stage timings and peak resident memory."""
    torch.set_num_threads(threads)
    loaded = load_checkpoint(checkpoint)
    predictor = Predictor(loaded, PredictorOptions(device="cpu"))
    localiser = load_localiser()
    start = time.perf_counter()
    result = segment_series([Path(p) for p in paths], predictor, PipelineOptions(), localiser)
    t1 = time.perf_counter()
    result_segmentation(result, 1, loaded)
    t2 = time.perf_counter()
    timings = {**result.timings, "seg_build": t2 - t1, "total": t2 - start}
    queue.put({"timings": timings, "peak_rss_mb": _vm_hwm_mb()})


def _vm_hwm_mb() -> float:
    """This process's peak resident memory. Not `getrusage`: Linux carries ru_maxrss across exec, so a
    spawned child would report the parent's peak (here, the phantom generation's) as its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    config = phantom_preset("paper")
    localiser = load_localiser(args.localiser)
    loaded = load_checkpoint(args.checkpoint)
    predictor = Predictor(loaded, PredictorOptions(device="cpu"))
    scores, e2e, jobs = [], [], []
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.first, args.first + args.patients):
            phantom = generate_phantom(index, args.seed, config)
            paths = list(write_phantom(phantom, Path(tmp) / f"p{index}").instances)
            series = load_series(paths)
            boxes = {Side(k): v for k, v in phantom.crop_boxes.items()}
            sample = sample_from_volume(phantom.study.patient_id, series.volume, boxes, localiser.meta.spacing_mm)
            sample = type(sample)(sample.name, sample.grid, boxes,
                                  nerve_points(phantom.labels, np.asarray(phantom.volume.affine)))
            scores += [s.__dict__ for s in score_samples(localiser, [sample])]
            if index < args.first + args.e2e_patients:
                truth = in_loaded_order(phantom.labels, phantom.volume.affine, series.volume.affine)
                for mode in (CropMode.AUTO, CropMode.ORACLE, CropMode.HALF):
                    request = CropRequest(mode, boxes if mode is CropMode.ORACLE else None)
                    try:  # the network's masks before the 3D clean-up, then the node's clean-up on them
                        raw = segment_series(series, predictor, PipelineOptions(crop=request, max_gap_mm=None),
                                             localiser).labels
                    except NoRegionError:  # the node sends nothing: an empty result
                        raw = np.zeros_like(truth)
                    labels = clean_up(raw.copy(), series, PipelineOptions().max_gap_mm)
                    for side in Side:
                        e2e.append({"patient": index, "side": side.value, "crop": mode.value,
                                    "dsc": dice(labels == side.label, truth == side.label),
                                    "dsc_before_clean_up": dice(raw == side.label, truth == side.label)})
            if index < args.first + args.timed_patients:
                queue = ctx.Queue()
                proc = ctx.Process(target=_one_job, args=([str(p) for p in paths], str(args.checkpoint),
                                                          args.threads, queue))
                proc.start()
                jobs.append(queue.get(timeout=600))
                proc.join()
            print(f"patient {index}: " + ", ".join(f"{s['side']} contained {s['contained']:.4f} iou {s['iou']:.3f}"
                                                    for s in scores[-2:]), flush=True)
    return {"settings": {k: str(v) for k, v in vars(args).items()}, "localiser_sha256": localiser.sha256,
            "checkpoint_sha256": loaded.sha256, "localiser": scores, "e2e": e2e, "jobs": jobs,
            "summary": summarise(scores, e2e, jobs)}


def summarise(scores: list[dict], e2e: list[dict], jobs: list[dict]) -> dict[str, Any]:
    errors = np.array([s["face_error_mm"] for s in scores], dtype=float)
    out: dict[str, Any] = {
        "sides": len(scores),
        "min_contained": min(s["contained"] for s in scores),
        "sides_below_99.5%": sum(s["contained"] < 0.995 for s in scores),
        "iou_median": statistics.median(s["iou"] for s in scores),
        "iou_min": min(s["iou"] for s in scores),
        "face_error_mm_median_abs": dict(zip(("x_min", "x_max", "y_min", "y_max", "z_min", "z_max"),
                                             np.round(np.nanmedian(np.abs(errors), axis=0), 2).tolist(), strict=True)),
        "face_error_mm_mean_signed": np.round(np.nanmean(errors, axis=0), 2).tolist(),
        "confidence_min": min(s["confidence"] for s in scores),
    }
    for key in ("dsc", "dsc_before_clean_up"):
        for mode in ("auto", "oracle", "half"):
            values = [r[key] for r in e2e if r["crop"] == mode]
            if values:
                out[f"{key}_{mode}_mean"] = float(np.mean(values))
                out[f"{key}_{mode}_median"] = float(np.median(values))
        pairs: dict[tuple, dict[str, float]] = {}
        for r in e2e:
            pairs.setdefault((r["patient"], r["side"]), {})[r["crop"]] = r[key]
        diffs = [v["auto"] - v["oracle"] for v in pairs.values() if "auto" in v and "oracle" in v]
        if diffs:
            out[f"{key}_auto_minus_oracle_mean"] = float(np.mean(diffs))
            out[f"{key}_auto_minus_oracle_median"] = float(np.median(diffs))
    if jobs:
        stages = jobs[0]["timings"].keys()
        out["job_seconds_median"] = {k: round(statistics.median(j["timings"][k] for j in jobs), 3) for k in stages}
        out["peak_rss_mb_max"] = round(max(j["peak_rss_mb"] for j in jobs), 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8, help="held-out phantoms for the localiser's accuracy")
    parser.add_argument("--e2e-patients", type=int, default=8, help="of those, how many run the three crops")
    parser.add_argument("--timed-patients", type=int, default=3, help="of those, how many time a whole job")
    parser.add_argument("--first", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=BUNDLED_CHECKPOINT)
    parser.add_argument("--localiser", type=Path, default=None, help="default: the bundled localiser")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
