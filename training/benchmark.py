"""The `train_benchmark` command: the paper's seven-network benchmark on exported studies, in one folder.

    train_benchmark [run] --out DIR [--data DIR --format dicom|nifti|2d] [--preset paper|smoke|phantom]
                    [--models ...] [protocol flags] [--evaluate-only]
    train_benchmark export-2d IN OUT --format dicom|nifti [--size N]

`run` (the default) trains every (model, repeat) of the protocol, resumably, then writes the per-image
metrics, Tables 1 and 2, p-values, Figs 4-6, the timing table, `summary.json`, our network's best
checkpoint and its crop localiser (`training.localiser_run`) under `--out` (layout in `training.runner`). Every protocol setting is a flag; a flag left
out takes the preset's value (default preset: `paper`). Running the same command again continues an
interrupted benchmark; `--evaluate-only` rebuilds the reports from the saved runs.
Exit status: 0 done, 2 bad input or settings (the message names the file or setting), 1 other errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from ian_node.logs import LoggingSetup, setup_logging
from model.registry import NETWORKS
from training.data import CROPS, FORMATS, DatasetError, LoadOptions, export_2d, load_dataset
from training.environment import configure_cublas
from training.nnunet import DEFAULT_TRAINER, configurations_argument
from training.presets import (
    IAN_NET_VARIANTS,
    LOCALISER_PRESETS,
    PRESETS,
    Protocol,
    Runtime,
    localiser_preset,
    preset,
    with_pretrained,
)
from training.runner import BenchmarkError, BenchmarkPaths, Ledger, prepare_data, reevaluate, train_all

logger = logging.getLogger(__name__)


def _triple(kind: type, sep: str = ","):  # type: ignore[no-untyped-def]
    def parse(text: str) -> tuple:
        parts = text.replace("x", sep).split(sep)
        try:
            values = tuple(kind(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected three numbers like 1{sep}2{sep}3, got {text!r}") from None
        if len(values) != 3:
            raise argparse.ArgumentTypeError(f"expected three numbers, got {text!r}")
        return values
    return parse


def _labels(text: str) -> tuple[int, int]:
    try:
        right, left = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RIGHT,LEFT label values like 1,2, got {text!r}") from None
    return right, left


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input data")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip inputs that cannot be used (reported in the summary) instead of stopping")
    g.add_argument("--unsided-segments", choices=("error", "split"), default="error",
                   help="a SEG segment without right/left: refuse it (default) or split it by side of the head")
    g.add_argument("--nifti-labels", type=_labels, default=(1, 2), metavar="R,L",
                   help="label values of the right and left nerve in NIfTI label volumes (equal: split by side)")
    g.add_argument("--localiser", type=Path, help="crop auto: the localiser checkpoint (default: the bundled one)")


def _add_sample_options(g: argparse._ArgumentGroup, defaults: bool) -> None:
    """--crop, --nerve-slices-only / --all-slices and --slice-step; `defaults`: give their LoadOptions
    defaults (export-2d) rather than None (run: None takes the preset's value)."""
    base = LoadOptions()
    g.add_argument("--crop", choices=CROPS, default=base.crop if defaults else None,
                   help="each side's crop: oracle (the study's landmark crop from the summary.json next to its SEG, "
                        "else its nerve grown by fixed margins), auto (the node's localiser) or half (the volume's "
                        "halves)" + (f"; default {base.crop}" if defaults else ""))
    slices = g.add_mutually_exclusive_group()
    slices.add_argument("--nerve-slices-only", dest="nerve_slices_only", action="store_const", const=True,
                        default=base.nerve_slices_only if defaults else None,
                        help="samples are the coronal slices that carry nerve (the paper's selection)")
    slices.add_argument("--all-slices", dest="nerve_slices_only", action="store_const", const=False,
                        help="samples are every coronal slice of the crop, nerve-free ones included (what the "
                             "node predicts)" + ("; the default" if defaults else ""))
    g.add_argument("--slice-step", type=int, default=base.slice_step if defaults else None,
                   help="keep every k-th of those slices" + (" (default 1)" if defaults else ""))


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train and evaluate the benchmark (default)",
                       description="Train and evaluate the seven networks under the paper's protocol.")
    p.add_argument("--out", type=Path, required=True, help="folder that holds everything the benchmark writes")
    p.add_argument("--data", type=Path, help="dataset folder (optional for the smoke and phantom presets)")
    p.add_argument("--format", choices=FORMATS, default="dicom", help="dataset form (default dicom)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="paper", help="settings not given as flags")
    p.add_argument("--evaluate-only", action="store_true", help="rebuild the reports from the saved runs")
    g = p.add_argument_group("protocol (default: the preset's value)")
    g.add_argument("--models", nargs="+", choices=tuple(NETWORKS), help="networks to train")
    g.add_argument("--repeats", type=int, help="Monte Carlo repeats (paper: 10)")
    g.add_argument("--fractions", type=_triple(float), metavar="TRAIN,VAL,TEST",
                   help="patient fractions (paper: 0.7,0.15,0.15)")
    g.add_argument("--seed", type=int, help="master seed of splits, weights and shuffling")
    g.add_argument("--epochs", type=int, help="paper: 50")
    g.add_argument("--batch-size", type=int, help="paper: 32")
    g.add_argument("--lr", type=float, help="AdamW learning rate (paper: 1e-3)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (paper: 1e-4)")
    g.add_argument("--min-lr", type=float, help="cosine annealing floor (default 0)")
    g.add_argument("--patience", type=int, help="early stopping patience in epochs (paper: 25)")
    g.add_argument("--alpha", dest="tversky_alpha", type=float, help="Tversky weight of false negatives (0.7)")
    g.add_argument("--beta", dest="tversky_beta", type=float, help="Tversky weight of false positives (0.3)")
    g.add_argument("--gamma", dest="focal_gamma", type=float, help="focal exponent (paper: 2.0)")
    g.add_argument("--threshold", type=float, help="probability threshold of the masks (0.5)")
    g.add_argument("--no-amp", dest="amp", action="store_const", const=False, help="no mixed precision on CUDA")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="deterministic torch algorithms (cuDNN, cuBLAS, torch); the ops torch has none for are "
                        "recorded per run (default: on; docs/benchmark.md, Reproducibility)")
    g.add_argument("--width", type=float, help="channel width factor of every network (paper: 1.0)")
    g.add_argument("--size", type=int, help="model input size in pixels (paper: 256)")
    g.add_argument("--in-channels", type=int, choices=(1, 3), help="grey replicated to 1 or 3 channels (context 1)")
    g.add_argument("--context", type=int, metavar="K",
                   help="2.5D: K adjacent coronal slices (odd) as the K input channels, the centre slice predicted, "
                        "the edge slice repeated at a stack's ends (default 1: 2D, the paper's)")
    g.add_argument("--ian-net-variant", choices=IAN_NET_VARIANTS,
                   help="the variant of the ian_net row (the ian_net_released row is always the released one)")
    g.add_argument("--pretrained", dest="pretrained_dir", type=Path, metavar="DIR",
                   help="folder of ImageNet backbone files for the comparators whose authors used them, under the "
                        "exact names docs/models.md lists (nothing is downloaded; needs --width 1.0)")
    _add_sample_options(g, defaults=False)
    g.add_argument("--phantom-patients", type=int, help="generated phantom patients when --data is absent")
    g.add_argument("--phantom-preset", help="kind of generated phantoms: small or paper (whole lower head, "
                                            "220 mm field of view)")
    g.add_argument("--phantom-seed", type=int, help="phantom generator seed")
    loc = p.add_argument_group("crop localiser (trained after the runs for the exported checkpoint)")
    loc.add_argument("--localiser-iterations", type=int, metavar="N",
                     help="training iterations of the localiser trained on the exported repeat's training and "
                          "validation patients (default: the preset's; paper and phantom "
                          f"{LOCALISER_PRESETS['paper'].iterations}, smoke {LOCALISER_PRESETS['smoke'].iterations}); "
                          "0: train none")
    nn = p.add_argument_group("nnU-Net rows (optional extra: pip install ian-node[nnunet]; a real run needs a GPU)")
    nn.add_argument("--nnunet", type=configurations_argument, metavar="2d,3d_fullres",
                    help="also train nnU-Net on each repeat's split and add its rows (nnunet_2d, nnunet_3d_fullres) "
                         "to every table (training.nnunet, docs/nnunet.md)")
    nn.add_argument("--nnunet-trainer", default=DEFAULT_TRAINER, metavar="NAME",
                    help=f"nnU-Net trainer class (default {DEFAULT_TRAINER}; nnUNetTrainer_ianSmoke: 2 iterations)")
    _add_data_options(p)
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    r.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    r.add_argument("--num-workers", type=int, help="data loader workers (default: min(8, CPUs) on CUDA, 0 on CPU)")
    r.add_argument("--eval-batch-size", type=int, help="batch size of validation and test prediction")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    r.add_argument("-v", "--verbose", action="count", default=0,
                   help="log INFO messages on the console (-vv: debug, every library; benchmark.log: INFO or more)")


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-2d", help="write a 3D dataset in the paper's 2D form",
                       description="Write DICOM or NIfTI studies as coronal PNG images and masks + samples.csv.")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--format", choices=("dicom", "nifti"), default="dicom")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    _add_sample_options(p.add_argument_group("samples"), defaults=True)
    _add_data_options(p)
    p.add_argument("-v", "--verbose", action="count", default=0, help="log INFO messages (-vv: debug)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_benchmark", description=__doc__.split("\n\n")[0],
                                epilog="`run` is the default command: `train_benchmark --out DIR ...` is "
                                       "`train_benchmark run --out DIR ...`. See docs/benchmark.md.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    _add_export_parser(sub)
    return p


def _protocol(args: argparse.Namespace) -> Protocol:
    names = [f for f in Protocol.__dataclass_fields__ if f not in ("models", "pretrained")]
    overrides = {n: getattr(args, n, None) for n in names}
    protocol = preset(args.preset, models=tuple(args.models) if args.models else None, **overrides)
    return with_pretrained(protocol, args.pretrained_dir)  # missing files fail here, before any training


def _setup_logging(verbosity: int, log_file: Path | None) -> LoggingSetup:
    """ian-node's logging (patient data redacted, warnings included): console at ``verbosity``, the log file at
    INFO or more; console lines go through tqdm so that they do not break the progress bars."""
    return setup_logging(verbosity, console_format="%(levelname)s %(name)s: %(message)s", progress_bars=True,
                         log_file=log_file)


def _load_options(args: argparse.Namespace) -> LoadOptions:
    return LoadOptions(skip_bad=args.skip_bad, unsided=args.unsided_segments, right_label=args.nifti_labels[0],
                       left_label=args.nifti_labels[1],
                       localiser=str(args.localiser.resolve()) if args.localiser is not None else None)


def run(args: argparse.Namespace) -> int:
    """The `run` command; returns the exit status."""
    from training.localiser_run import benchmark_localiser
    from training.nerve_eval import evaluate_nerves
    from training.outputs import checkpoint_crop, environment, export_best, export_choice, write_reports, write_summary

    paths = BenchmarkPaths(args.out)
    runtime = Runtime(device=args.device, threads=args.threads, num_workers=args.num_workers,
                      eval_batch_size=args.eval_batch_size, progress=args.progress,
                      pretrained_dir=None if args.pretrained_dir is None else str(args.pretrained_dir.resolve()))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.evaluate_only:
        if not paths.ledger.is_file():
            raise BenchmarkError(f"{paths.ledger}: no benchmark to evaluate in {args.out}")
        stored = Ledger.read(paths.ledger)
        protocol, preset_name = stored.protocol, stored.preset or args.preset
        logger.info("evaluate only: using the protocol stored in %s", paths.ledger)
    else:
        protocol, preset_name = _protocol(args), args.preset
    if protocol.deterministic:
        configure_cublas()  # before anything in this process calls cuBLAS
    localiser_options = localiser_preset(preset_name, args.localiser_iterations)
    slices, source = prepare_data(paths, protocol, args.data, args.format, _load_options(args),
                                  reuse=args.evaluate_only)
    ledger = Ledger.open(paths.ledger, protocol, slices, args.preset)
    context = environment(args.device)
    context["preset"] = ledger.preset
    context["data"] = {**source, "samples": len(slices),
                       "skipped_sources": [asdict(s) for s in slices.report.skipped]}
    context["runtime"] = asdict(runtime)
    if slices.report.skipped:
        logger.warning("%d input source(s) skipped (--skip-bad); see summary.json data_report",
                       len(slices.report.skipped))
    records = reevaluate(ledger, paths, slices, runtime) if args.evaluate_only else train_all(
        ledger, paths, slices, runtime)
    nerves = evaluate_nerves(records, ledger, paths, slices, source, runtime)  # reports/per_nerve_metrics.csv
    if args.nnunet:  # nnU-Net's runs, after the networks', as rows of every table (training.nnunet)
        from training.nnunet.nerves import add_nnunet_runs
        from training.nnunet.run import NnunetSettings

        extra, nerves = add_nnunet_runs(records, nerves, ledger, paths, slices, source,
                                        NnunetSettings(args.nnunet, args.nnunet_trainer, args.device),
                                        train=not args.evaluate_only)
        records = [*records, *extra]
    context["per_nerve"] = nerves.record
    reports = write_reports(records, ledger, paths, slices)
    if nerves.csv is not None:
        reports["files"]["per_nerve_csv"] = str(nerves.csv)
    choice = export_choice(records, reports["scores"], paths)
    localiser = None if choice is None else benchmark_localiser(
        paths, ledger, source, checkpoint_crop(protocol, slices)["region"], choice[0].repeat, localiser_options,
        runtime, train=not args.evaluate_only)
    exported = export_best(records, reports["scores"], ledger, paths, slices, context, localiser)
    summary = write_summary(paths, ledger, records, reports, exported, slices, context, localiser)
    print(f"benchmark in {paths.root}: {len(records)} runs, repeats {reports['repeats_reported']} reported")
    print(f"  Table 1: {reports['files']['table1_md']}\n  summary: {summary}")
    ranking = reports["ranking_stability"]
    if ranking:
        tau = "undefined" if ranking["mean_tau"] is None else f"{ranking['mean_tau']:.3f}"
        print(f"  ranking over repeats: {reports['files']['ranking_md']} (mean Kendall tau {tau})")
    print(f"  samples: {len(slices)}, crop {slices.report.crop or protocol.crop}")
    if exported:
        print(f"  checkpoint: {exported['path']} (repeat {exported['repeat']}, chosen on validation DSC)")
    if localiser and "sha256" in localiser:
        print(f"  localiser: {localiser['path']} ({localiser['status']}; region {localiser['region']}, safety "
              f"margin {localiser['safety_margin_mm']:.0f} mm)")
    elif localiser:
        print(f"  localiser: none ({localiser['reason']})")
    return 0


def export(args: argparse.Namespace) -> int:
    """The `export-2d` command."""
    options = LoadOptions(**{**asdict(_load_options(args)), "size": args.size, "crop": args.crop,
                             "nerve_slices_only": args.nerve_slices_only, "slice_step": args.slice_step})
    slices = load_dataset(args.input, args.format, options)
    table = export_2d(slices, args.output)
    print(f"wrote {len(slices)} samples to {args.output} ({table.name}); {len(slices.report.skipped)} source(s) skipped;"
          f" crop {slices.report.crop}")
    for s in slices.report.skipped:
        print(f"  skipped {s.source}: {s.detail}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "export-2d", "-h", "--help"):
        argv = ["run", *argv]
    args = parser().parse_args(argv)
    log_file = args.out / "benchmark.log" if args.command == "run" else None
    with _setup_logging(args.verbose, log_file):
        try:
            return run(args) if args.command == "run" else export(args)
        except (DatasetError, BenchmarkError, ValueError) as exc:
            logger.error("%s", exc)
            logger.info("details", exc_info=True)  # the traceback goes to the log file only
            return 2

if __name__ == "__main__":
    sys.exit(main())
