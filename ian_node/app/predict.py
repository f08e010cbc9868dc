"""`ian-node predict`: files in, SEG out, no network, for scripts and research.

It applies the node's selection rules by default (modality, localizers and scouts, one volume of at
least two slices), so a file-in run answers as the node would; `--any-modality` lifts the modality
rule for research on other image types. It says what it found and what it ignored.

The crop is the node's (``[crop]``): ``--crop auto`` (the localiser, default), ``half``, or ``box`` /
``oracle`` with ``--roi`` boxes. ``--report`` writes the crop used per side, voxel counts, timings and
the outcome as JSON; ``--sr`` writes the nerves' measurements as a TID 1500 SR beside the SEG;
``--probability-seg`` the network's probabilities as a FRACTIONAL SEG; ``--empty-segments`` is the
node's ``[output] empty_segments``. Exit status: 0 segmented, 1 the series cannot be segmented, 2 bad inputs or
options (or a checkpoint the crop cannot reproduce), 3 no mandible region found (report still written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from ian_node.config import CROP_MODES, ConfigError, CropConfig, SeriesConfig, check_box, check_box_pair

logger = logging.getLogger(__name__)


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment DICOM files or a folder into a SEG file (no network)")
    p.add_argument("inputs", type=Path, nargs="+", help="DICOM files and/or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="SEG file to write")
    p.add_argument("--series", default=None, help="SeriesInstanceUID to use when the inputs hold several")
    p.add_argument("--checkpoint", type=Path, default=None, help="model checkpoint (default: the bundled one)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--any-modality", action="store_true",
                   help="segment image series of any modality (the node's rule: MR only)")
    p.add_argument("--crop", choices=CROP_MODES, default="auto",
                   help="each side's crop: auto (the localiser finds it; default), half (the volume's halves), "
                        "box or oracle (the --roi boxes; oracle is recorded as such)")
    p.add_argument("--roi", type=Path, default=None,
                   help='JSON boxes for --crop box/oracle: {"right": [[x_min, x_max], [y_min, y_max], '
                        '[z_min, z_max]], "left": ...} in LPS mm, or a file with a "crop_boxes" key (a phantom\'s '
                        "summary.json)")
    p.add_argument("--localiser", type=Path, default=None, help="localiser checkpoint (default: the bundled one)")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="per-side localiser confidence below which no region is found (default: the localiser's)")
    p.add_argument("--segment-when-not-found", action="store_true",
                   help="when no region is found, segment anyway in the localiser's boxes (or halves)")
    p.add_argument("--report", type=Path, default=None,
                   help="write a JSON report: crop used per side (mode, box_mm, confidence), voxels, timings, outcome")
    p.add_argument("--sr", type=Path, default=None,
                   help="also write a TID 1500 measurement report (SR) of each nerve's length, volume and diameters, "
                        "whole and per region, with the QA verdicts, referencing the SEG (docs/sr.md)")
    p.add_argument("--probability-seg", type=Path, default=None,
                   help="also write the network's per-side nerve probability as a FRACTIONAL (PROBABILITY) SEG "
                        "(the node's [output] probability_seg; docs/seg.md)")
    p.add_argument("--empty-segments", choices=("empty_frame", "omit"), default="empty_frame",
                   help="a side with no voxels: keep its segment with one empty frame (default), or leave it out "
                        "(the node's [output] empty_segments; with both sides empty no SEG is written, exit 1)")
    p.set_defaults(func=run_predict)


@dataclass
class Found:
    """What the inputs hold: image series by UID, and counts of what was ignored and why."""

    series: dict[str, list[Path]] = field(default_factory=dict)
    headers: dict[str, list[Dataset]] = field(default_factory=dict)
    ignored: Counter[str] = field(default_factory=Counter)

    def ignored_text(self) -> str:
        """E.g. "1 SEG ignored, 2 files are not DICOM"."""
        parts = []
        for what, n in sorted(self.ignored.items()):
            if what == NOT_DICOM:
                parts.append(f"{n} file{'s are' if n > 1 else ' is'} not DICOM")
            else:
                parts.append(f"{n} {what} ignored")
        return ", ".join(parts)


NOT_DICOM = "not DICOM"


def find_series(inputs: list[Path]) -> Found:
    """Read every file's header once; group the image series, count the rest by kind."""
    found = Found()
    for root in inputs:
        if not root.exists():
            raise InputError(f"{root} does not exist")
        files = sorted(x for x in root.rglob("*") if x.is_file()) if root.is_dir() else [root]
        if root.is_dir() and not files:
            raise InputError(f"{root} is an empty folder")
        for path in files:
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, RecursionError):
                found.ignored[NOT_DICOM] += 1
                continue
            modality = str(ds.get("Modality", ""))
            if modality in ("SEG", "SR", "PR", "KO", "RTSTRUCT") or "PixelData" not in ds and "Rows" not in ds:
                found.ignored[modality or "non-image instance"] += 1
                continue
            uid = str(ds.get("SeriesInstanceUID", ""))
            found.series.setdefault(uid, []).append(path)
            found.headers.setdefault(uid, []).append(ds)
    return found


class InputError(ValueError):
    """The inputs hold nothing predict can segment; the message says what was found."""


def _selected(found: Found, args: argparse.Namespace) -> tuple[str, list[Path]]:
    """The one image series to segment, after the node's selection rules; InputError otherwise."""
    from ian_node.jobs.completion import volume_skip_reason  # the node's own rules, not a copy

    ignored = found.ignored_text()
    listing = {uid: paths for uid, paths in found.series.items() if args.series in (None, uid)}
    if not listing:
        what = f"no image series {args.series}" if args.series else "no image series"
        raise InputError(f"{what} in the inputs" + (f" ({ignored})" if ignored else ""))
    if len(listing) > 1:
        names = ", ".join(f"{uid} ({len(paths)} files)" for uid, paths in listing.items())
        raise InputError(f"{len(listing)} image series found, choose one with --series: {names}")
    (uid, paths), = listing.items()
    rules = SeriesConfig(min_slices=2)
    modality = str(found.headers[uid][0].get("Modality", ""))
    if not args.any_modality and modality not in rules.modalities:
        raise InputError(f"series {uid} is {modality or 'without a modality'}, not {'/'.join(rules.modalities)} "
                         "(--any-modality segments it anyway)")
    reason = volume_skip_reason(found.headers[uid], rules)
    if reason is not None:
        raise InputError(f"series {uid} is not segmented: {reason}")
    return uid, paths


def read_roi(path: Path) -> dict[str, tuple[tuple[float, float], ...]]:
    """The boxes of a ``--roi`` file: {"right": box, "left": box}, directly or under "crop_boxes"."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"--roi {path}: cannot read it: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"--roi {path}: not JSON: {exc}") from None
    if isinstance(data, dict) and "crop_boxes" in data:
        data = data["crop_boxes"]
    if not isinstance(data, dict) or not {"right", "left"} <= set(data):
        raise InputError(f'--roi {path}: expected {{"right": [[x_min, x_max], [y_min, y_max], [z_min, z_max]], '
                         '"left": ...} (LPS mm) or a "crop_boxes" key holding that')
    try:
        boxes = {side: check_box(side, data[side]) for side in ("right", "left")}
        check_box_pair("left", boxes["right"], boxes["left"])
    except ConfigError as exc:
        raise InputError(f"--roi {path}: {exc}") from None
    return boxes


def crop_config(args: argparse.Namespace) -> CropConfig:
    """The ``[crop]`` section predict's options describe; InputError names the option at fault."""
    boxed = args.crop in ("box", "oracle")
    if boxed and args.roi is None:
        raise InputError(f"--crop {args.crop} needs --roi FILE.json with a box for each side")
    if args.roi is not None and not boxed:
        raise InputError(f"--roi is used only with --crop box or oracle, not {args.crop}")
    boxes = read_roi(args.roi) if args.roi is not None else {}
    try:
        return CropConfig(mode=args.crop, right=boxes.get("right"), left=boxes.get("left"), localiser=args.localiser,
                          min_confidence=args.min_confidence, segment_when_not_found=args.segment_when_not_found)
    except ConfigError as exc:
        option = {"localiser": "--localiser", "min_confidence": "--min-confidence"}.get(exc.key, "--crop")
        raise InputError(f"{option}: {exc.reason}") from None


def _write_report(path: Path | None, report: dict[str, object]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def _crop_text(crop: dict[str, dict[str, object]]) -> str:
    """E.g. "right auto [[-60.1, -12.0], ...] confidence 0.91"."""
    parts = []
    for side, c in crop.items():
        box = c["box_mm"]
        text = "no box" if box is None else "[" + ", ".join(f"[{lo:.1f}, {hi:.1f}]" for lo, hi in box) + "] mm"
        parts.append(f"{side} {c['mode']} {text}" + ("" if c["confidence"] is None else f" confidence {c['confidence']:.2f}"))
    return "; ".join(parts)


def run_predict(args: argparse.Namespace) -> int:
    from ian_node.config import ModelConfig
    from ian_node.segment.crop import CropError, NoRegionError
    from ian_node.segment.pipeline import failure_message, segment_series
    from ian_node.segment.result import (
        load_crop_localiser,
        load_predictor,
        omitted_flag,
        pipeline_options,
        result_probability_segmentation,
        result_report,
        result_segmentation,
    )
    from ian_node.segment.seg import NoSegmentsError
    from ian_node.segment.volume import SeriesError
    from model.localiser import LocaliserCheckpointError

    try:
        crop = crop_config(args)
        found = find_series(args.inputs)
        uid, paths = _selected(found, args)
    except InputError as exc:
        print(f"ian-node predict: {exc}", file=sys.stderr)
        return 2
    if found.ignored:
        print(f"ian-node predict: {found.ignored_text()}", file=sys.stderr)
    try:
        localiser = load_crop_localiser(crop)
        predictor = load_predictor(ModelConfig(checkpoint=args.checkpoint, device=args.device), crop, localiser)
    except (CropError, LocaliserCheckpointError) as exc:
        print(f"ian-node predict: {exc}", file=sys.stderr)
        return 2
    if args.checkpoint is None:
        print(f"model: {predictor.checkpoint.meta.label}", file=sys.stderr)
    report: dict[str, object] = {"series_uid": uid, "crop_mode": crop.mode, "out": None}
    try:
        options = replace(pipeline_options(crop), keep_probabilities=args.probability_seg is not None)
        result = segment_series(paths, predictor, options, localiser)
        seg = result_segmentation(result, 1, predictor.checkpoint, empty_segments=args.empty_segments)
    except NoRegionError as exc:
        report.update(outcome="no_region", flag=exc.crop.problem, roi=exc.crop.as_json(), voxels=None,
                      timings=exc.timings)
        _write_report(args.report, report)
        print(f"ian-node predict: {failure_message(exc)}; not segmented ({_crop_text(exc.crop.as_json())}; "
              "--segment-when-not-found segments anyway, --crop box --roi FILE gives the boxes)", file=sys.stderr)
        return 3
    except (SeriesError, NoSegmentsError) as exc:
        print(f"ian-node predict: {failure_message(exc)}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(args.out, enforce_file_format=True)
    if args.sr is not None:
        args.sr.parent.mkdir(parents=True, exist_ok=True)
        result_report(result, seg).save_as(args.sr, enforce_file_format=True)
        report["sr"] = str(args.sr)
    if args.probability_seg is not None:
        args.probability_seg.parent.mkdir(parents=True, exist_ok=True)
        probability = result_probability_segmentation(result, 1, predictor.checkpoint,
                                                      empty_segments=args.empty_segments)
        probability.save_as(args.probability_seg, enforce_file_format=True)
        report["probability_seg"] = str(args.probability_seg)
    used = result.crop.as_json() if result.crop is not None else None
    problem = result.crop.problem if result.crop is not None else ""
    omitted = omitted_flag(seg)
    report.update(outcome="segmented_no_region" if problem else "segmented",
                  flag=" | ".join(f for f in (problem, omitted) if f) or None, roi=used,
                  voxels=result.voxels, timings=result.timings, out=str(args.out))
    _write_report(args.report, report)
    if problem:
        print(f"ian-node predict: {problem}; segmented anyway (--segment-when-not-found)", file=sys.stderr)
    if omitted:
        print(f"ian-node predict: {omitted} (--empty-segments omit)", file=sys.stderr)
    print(f"series {uid}: {len(paths)} files -> {args.out}; "
          + ", ".join(f"{k} IAN {v} voxels" for k, v in result.voxels.items()) + "; "
          + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
    if used is not None:
        print(f"crop: {_crop_text(used)}")
    if args.sr is not None:
        print(f"measurements (TID 1500 SR) -> {args.sr}")
    if args.probability_seg is not None:
        print(f"probabilities (FRACTIONAL SEG) -> {args.probability_seg}")
    return 0

