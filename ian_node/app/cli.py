"""The `ian-node` command.

Each subcommand is a pair: a function that adds its parser, and a handler `(args) -> exit status`.
Adding one (`serve`, `predict`, `jobs`) means writing that pair and listing it in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ian_node import __version__
from ian_node.app.predict import add_predict
from ian_node.logs import setup_logging

if TYPE_CHECKING:
    from ian_node.storage.records import Job

logger = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]


def _shape(text: str) -> tuple[int, int, int]:
    """'64,192,192' or '64x192x192' -> (slices, rows, columns)."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be three integers like 64,192,192, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape must be three positive integers like 64,192,192, got {text!r}")
    return shape  # type: ignore[return-value]


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a positive integer, got 0")
    return value


def _phantom_config(args: argparse.Namespace):
    from dataclasses import replace

    from ian_node.phantom.study import phantom_preset

    config = phantom_preset(getattr(args, "preset", "demo"))  # the demo always runs the demo preset
    return replace(config, shape=args.shape) if args.shape else config


def format_summary(summary: dict) -> str:
    """A short human-readable report of one phantom's summary JSON."""
    lines = [
        f"patient {summary['patient_id']} (seed {summary['seed']}, index {summary['patient_index']})",
        "  shape {} voxels, spacing {} mm".format(
            "x".join(str(n) for n in summary["shape"]), " x ".join(f"{s:.3f}" for s in summary["spacing_mm"])),
    ]
    params = summary["parameters"]
    pose = ", ".join(f"{v:+.1f}" for v in params["head_rotation_deg"])
    offset = ", ".join(f"{v:+.1f}" for v in params["offset_mm"])
    lines.append(f"  head scale {params['head_scale']:.2f}, rotation ({pose}) deg, offset ({offset}) mm")
    lines.append(f"  oblique {params['oblique_deg']:.1f} deg, motion {'yes' if params['motion'] else 'no'}, "
                 f"metal restorations {len(params['metals'])} "
                 f"({sum(m['reaches_canal'] for m in params['metals'])} reaching the canal)")
    for side, info in summary["nerves"].items():
        lines.append(f"  {side:5s} IAN: {info['voxels']} voxels, {info['length_in_fov_mm']:.1f} mm long, "
                     f"mean diameter {info['mean_diameter_mm']:.2f} mm")
    for side, box in summary.get("crop_boxes", {}).items():
        ranges = " ".join(f"{axis} [{lo:.1f}, {hi:.1f}]" for axis, (lo, hi) in zip("xyz", box, strict=True))
        lines.append(f"  {side:5s} crop box (LPS mm): {ranges}")
    stats = summary["intensity"]
    lines.append(f"  intensity (stored values, noise SD {stats['noise_sd']:.1f}):")
    lines.append("    {:15s} {:>8s} {:>8s} {:>7s} {:>22s}".format("tissue", "mean", "SD", "CNR", "nerve within p5-p95"))
    n = stats["nerve"]
    lines.append(f"    {'nerve (IAN)':15s} {n['mean']:8.1f} {n['sd']:8.1f}")
    for name, value in stats.items():
        if not isinstance(value, dict) or name in ("nerve", "cnr", "nerve_within_p5_p95") or not value.get("count"):
            continue
        cnr = stats["cnr"].get(name, float("nan"))
        overlap = stats["nerve_within_p5_p95"].get(name, float("nan"))
        lines.append(f"    {name:15s} {value['mean']:8.1f} {value['sd']:8.1f} {cnr:7.1f} {overlap:22.0%}")
    return "\n".join(lines)


# --- phantom -----------------------------------------------------------------------------------

def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write synthetic MRN studies with ground-truth SEGs",
                       description="Write N synthetic MR neurography studies (DICOM series + ground-truth "
                                   "SEG + summary.json), one folder per patient, and an index.json.")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--patients", type=_positive, default=1, help="number of patients (default 1)")
    p.add_argument("--seed", type=_non_negative, default=0, help="seed: patient i of a seed never changes")
    p.add_argument("--preset", choices=("small", "demo", "paper"), default="small",
                   help="small: 64x192x192, the bony anatomy scaled to fit (tests; default); demo: a life-size "
                        "head at 220 mm field of view and 0.86 x 1.6 x 1.6 mm voxels (the demo's); paper: the "
                        "whole lower head at the paper's 220 mm field of view and 0.429 x 0.8 x 1.6 mm voxels")
    p.add_argument("--shape", type=_shape, default=None, help="slices,rows,columns (default: the preset's)")
    p.set_defaults(func=_run_phantom)


def _run_phantom(args: argparse.Namespace) -> int:
    import json

    from ian_node.phantom.study import write_phantoms

    started = time.perf_counter()
    written = write_phantoms(args.out, args.patients, args.seed, _phantom_config(args))
    for files in written:
        summary = json.loads(files.summary.read_text())
        nerves = summary["nerves"]
        print(f"{files.patient_id}: {len(files.instances)} instances, right IAN {nerves['right']['voxels']} "
              f"voxels, left IAN {nerves['left']['voxels']} voxels -> {files.root}")
    print(f"wrote {len(written)} studies to {args.out} in {time.perf_counter() - started:.1f} s")
    return 0


# --- demo --------------------------------------------------------------------------------------

def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the node end to end on a phantom study",
                       description="Make a phantom study, start the node and a stand-in PACS on free loopback "
                                   "ports, send the series with a real SCU, wait for the SEG, validate it and "
                                   "print per-stage timings and the DSC against the ground truth.")
    p.add_argument("--out", type=Path, default=None, help="working folder (default: a new temporary folder)")
    p.add_argument("--seed", type=_non_negative, default=0)
    p.add_argument("--patient", type=_non_negative, default=0, help="patient index within the seed")
    p.add_argument("--shape", type=_shape, default=None, help="slices,rows,columns (default 64,192,192)")
    p.add_argument("--checkpoint", type=Path, default=None, help="model checkpoint (default: the bundled one)")
    p.add_argument("--crop", choices=("auto", "half"), default=None,
                   help="each side's crop: auto (the localiser) or half; default: the node's default ([crop] mode)")
    p.add_argument("--localiser", type=Path, default=None, help="localiser checkpoint (default: the bundled one)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import json

    from ian_node.app.demo import run_demo
    from ian_node.config import CropConfig

    crop = CropConfig(**({"mode": args.crop} if args.crop else {}), localiser=args.localiser)
    out = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="ian-node-demo-"))
    report = run_demo(out, args.seed, args.patient, _phantom_config(args), args.checkpoint, crop=crop)
    print(format_summary(json.loads((report.phantom_dir / "summary.json").read_text())))
    print(report.format())
    return 0 if report.dciodvfy_errors in (None, []) else 1


# --- serve -------------------------------------------------------------------------------------

def _add_config_arg(p: argparse.ArgumentParser, again: bool = False) -> None:
    """``--config``; ``again`` for an action's own parser, so it may also follow the action word."""
    from ian_node.config import ENV_CONFIG_FILE

    default = os.environ.get(ENV_CONFIG_FILE)
    p.add_argument("--config", type=Path, default=argparse.SUPPRESS if again else Path(default) if default else None,
                   help="ian-node.toml (default: $IAN_NODE_CONFIG, else built-in defaults; "
                        "IAN_NODE_<SECTION>_<KEY> environment variables override)")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the DICOM node until SIGTERM/SIGINT",
                       description="Run the DICOM node until SIGTERM/SIGINT. On stderr it logs a start-up block "
                                   "(listener, HTTP API, model, selection rules, storage and targets), one line per "
                                   "job started and ended, warnings and errors, and one line at shutdown; -v adds "
                                   "per-series detail, -vv debug output. Library messages lose their quoted values (patient data).")
    _add_config_arg(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from ian_node.app.node import Node
    from ian_node.config import load_config

    Node(load_config(args.config)).serve_forever()
    return 0


# --- jobs --------------------------------------------------------------------------------------

def _add_jobs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="list, show or retry jobs, and list skipped series, in the node's state")
    _add_config_arg(p)
    actions = p.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("list", help="recent jobs")
    ls.add_argument("--state", default=None, help="only jobs in this state")
    show = actions.add_parser("show", help="one job with its deliveries")
    show.add_argument("id", type=_positive)
    retry = actions.add_parser("retry", help="re-deliver a failed job's result, re-run it, or release a held one")
    retry.add_argument("id", type=_positive)
    skipped = actions.add_parser("skipped", help="series the selection rules skipped, with their reasons")
    for action in (ls, show, retry, skipped):
        _add_config_arg(action, again=True)
        _add_verbose(action, "verbose_action")
    p.set_defaults(func=_run_jobs)


def _run_jobs(args: argparse.Namespace) -> int:
    from ian_node.config import load_config
    from ian_node.storage.records import JobOutcome, JobState, SeriesState, StateError
    from ian_node.storage.state import State

    config = load_config(args.config)
    if not config.storage.state_path.exists():
        print(f"ian-node jobs: no state at {config.storage.state_path}", file=sys.stderr)
        return 2
    with State(config.storage.state_path) as state:
        if args.action == "skipped":
            for series in state.list_series(SeriesState.SKIPPED):
                print(f"series {series.series_uid} v{series.version} ({series.modality or 'no modality'}, "
                      f"{series.slice_count} slices): {series.status_reason}")
            return 0
        if args.action == "list":
            for job in state.list_jobs(JobState(args.state) if args.state else None):
                print(f"{job.id:6d} {job.state:9s} series {job.series_uid} v{job.series_version}"
                      + _job_flag(job) + _qa_marker(job) + (f"  error: {job.error}" if job.error else ""))
            return 0
        job = state.job(args.id)
        if job is None:
            print(f"ian-node jobs: no job {args.id}", file=sys.stderr)
            return 2
        if args.action == "retry":
            try:
                job = state.retry_job(args.id)
            except StateError as exc:
                print(f"ian-node jobs: {exc}", file=sys.stderr)
                return 2
        print(f"job {job.id}: {job.state}, series {job.series_uid} v{job.series_version}, attempts {job.attempts}"
              + (f", outcome {job.outcome}" if job.outcome else "") + (f", error: {job.error}" if job.error else ""))
        if job.flag and job.outcome is not JobOutcome.NO_REGION:  # a failed job's error already says it
            print(f"  flag: {job.flag}")
        for side, crop in (job.crop or {}).items():
            box = crop.get("box_mm")
            ranges = " ".join(f"{a} [{lo:.1f}, {hi:.1f}]" for a, (lo, hi) in zip("xyz", box, strict=True)) if box else "none"
            confidence = f", confidence {crop['confidence']:.2f}" if crop.get("confidence") is not None else ""
            voxels = f", {job.voxels[side]} voxels" if job.voxels and side in job.voxels else ""
            print(f"  {side:5s} crop {crop.get('mode')}: {ranges}{confidence}{voxels}")
        for qa in job.qa or ():
            print(f"  {qa['side']:5s} QA {qa['verdict']}: length {qa['length_mm']:.1f} mm, {qa['gaps']} gaps (longest "
                  f"{qa['longest_gap_mm']:.1f} mm), mean probability {qa['mean_probability']:.2f}"
                  + "".join(f"; {r}" for r in qa["reasons"]))
        if job.state is JobState.HELD:
            print(f"  held by QA (qa.on_fail = \"hold\"): `ian-node jobs retry {job.id}` delivers it")
        for d in state.deliveries(job.id):
            print(f"  -> {d.target}: {d.state}, attempts {d.attempts}" + (f", last error: {d.last_error}" if d.last_error else ""))
    return 0


def _job_flag(job: Job) -> str:
    """The list's marker for a job whose localiser found no mandible: NOT SEGMENTED, or SENT FLAGGED."""
    if job.outcome is None or job.outcome == "segmented":
        return ""
    return "  [no region: not segmented]" if job.outcome == "no_region" else "  [no region: segmented anyway]"


def _qa_marker(job: Job) -> str:
    """The list's marker for a job whose QA was not a clean pass: "  [QA right PASS, left FAIL]"."""
    if not job.qa or all(q["verdict"] == "PASS" for q in job.qa):
        return ""
    return "  [QA " + ", ".join(f"{q['side']} {q['verdict']}" for q in job.qa) + "]"


#: (name, add-parser function) of every subcommand, in help order.
SUBCOMMANDS: tuple[tuple[str, Callable[[argparse._SubParsersAction], None]], ...] = (
    ("demo", _add_demo),
    ("serve", _add_serve),
    ("predict", add_predict),
    ("jobs", _add_jobs),
    ("phantom", _add_phantom),
)


#: Where each level of the parser counts its -v (argparse lets a subcommand's defaults overwrite
#: the same name set before it, so each level has its own); the verbosity is their sum.
VERBOSE_DESTS = ("verbose", "verbose_command", "verbose_action")
_VERBOSE_HELP = ("more logging, before or after the command: -v our per-series and per-job detail, -vv debug "
                 "from every library (patient data is redacted at every level)")


def _add_verbose(p: argparse.ArgumentParser, dest: str) -> None:
    p.add_argument("-v", "--verbose", dest=dest, action="count", default=argparse.SUPPRESS, help=_VERBOSE_HELP)


def verbosity(args: argparse.Namespace) -> int:
    """How many -v were given, wherever on the command line."""
    return sum(getattr(args, dest, 0) for dest in VERBOSE_DESTS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ian-node", description="DICOM AI node for inferior alveolar nerve "
                                     "segmentation on MR neurography (phantom-trained demo model: not for "
                                     "clinical use).")
    parser.add_argument("--version", action="version", version=f"ian-node {__version__}")
    _add_verbose(parser, "verbose")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for _, add in SUBCOMMANDS:
        add(sub)
    for command in sub.choices.values():
        _add_verbose(command, "verbose_command")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ian-node` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.func
    with setup_logging(verbosity(args)):
        try:
            return handler(args)
        except (ValueError, OSError) as exc:
            logger.error("%s failed: %s", args.command, exc)
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
