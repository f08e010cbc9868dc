"""The `ian-node` command.

Each subcommand is a pair: a function that adds its parser, and a handler `(args) -> exit status`.
Adding one (`serve`, `predict`, `jobs`) means writing that pair and listing it in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ian_node import __version__

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
    from ian_node.phantom import PhantomConfig

    return PhantomConfig(shape=args.shape) if args.shape else PhantomConfig()


def format_summary(summary: dict) -> str:
    """A short human-readable report of one phantom's summary JSON."""
    lines = [
        f"patient {summary['patient_id']} (seed {summary['seed']}, index {summary['patient_index']})",
        "  shape {} voxels, spacing {} mm".format(
            "x".join(str(n) for n in summary["shape"]), " x ".join(f"{s:.3f}" for s in summary["spacing_mm"])),
    ]
    params = summary["parameters"]
    lines.append(f"  oblique {params['oblique_deg']:.1f} deg, motion {'yes' if params['motion'] else 'no'}, "
                 f"metal restorations {len(params['metals'])} "
                 f"({sum(m['reaches_canal'] for m in params['metals'])} reaching the canal)")
    for side, info in summary["nerves"].items():
        lines.append(f"  {side:5s} IAN: {info['voxels']} voxels, {info['length_in_fov_mm']:.1f} mm long, "
                     f"mean diameter {info['mean_diameter_mm']:.2f} mm")
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
    p.add_argument("--shape", type=_shape, default=None, help="slices,rows,columns (default 64,192,192)")
    p.set_defaults(func=_run_phantom)


def _run_phantom(args: argparse.Namespace) -> int:
    import json

    from ian_node.phantom import write_phantoms

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
    p = sub.add_parser("demo", help="generate a phantom study and print its summary",
                       description="Generate one phantom study (MR series + ground-truth SEG) and print "
                                   "its summary.")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: a new temporary folder)")
    p.add_argument("--seed", type=_non_negative, default=0)
    p.add_argument("--patient", type=_non_negative, default=0, help="patient index within the seed")
    p.add_argument("--shape", type=_shape, default=None, help="slices,rows,columns (default 64,192,192)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import json

    from ian_node.phantom import generate_phantom, write_phantom

    out = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="ian-node-demo-"))
    started = time.perf_counter()
    phantom = generate_phantom(args.patient, args.seed, _phantom_config(args))
    generated = time.perf_counter()
    files = write_phantom(phantom, out)
    written = time.perf_counter()
    print(format_summary(json.loads(files.summary.read_text())))
    print(f"  generated in {generated - started:.2f} s, written in {written - generated:.2f} s")
    print(f"  series: {files.series_dir} ({len(files.instances)} files)\n  ground truth SEG: {files.seg}")
    return 0


#: (name, add-parser function) of every subcommand, in help order.
SUBCOMMANDS: tuple[tuple[str, Callable[[argparse._SubParsersAction], None]], ...] = (
    ("demo", _add_demo),
    ("phantom", _add_phantom),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ian-node", description="DICOM AI node for inferior alveolar nerve "
                                     "segmentation on MR neurography (phantom-trained demo model: not for "
                                     "clinical use).")
    parser.add_argument("--version", action="version", version=f"ian-node {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for _, add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ian-node` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Handler = args.func
    try:
        return handler(args)
    except (ValueError, OSError) as exc:
        logger.error("%s failed: %s", args.command, exc)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
