"""Size and speed of the seven networks: parameters, MACs at 256², CPU latency, GPU latency/throughput.

    python benchmarks/models.py [--networks ian_net ducknet ...] [--threads N] [--repeats R] [--json OUT]

Everything runs at full width. Parameters are counted for 1 and 3 input channels (REFERENCE.md counts
3-channel models); MACs are FlopCounterMode FLOPs / 2 at 256×256 with 3 input channels. Latency uses
1 input channel (the node's grey MR slices), eval mode and `torch.inference_mode`, after one warm-up
call per cell, and reports the median over repeats. On the CPU the networks are timed round by round
(one call per network and batch per round), so that a busy spell on a shared machine is spread over
all of them; after `--min-repeats` rounds a cell whose repeats add up to `--cpu-budget` seconds stops,
so slow networks get fewer repeats. Process CPU time is recorded next to wall time. When CUDA is
present the GPU cells are measured too: batch 1 and 32, fp32 and autocast (bf16 where supported,
else fp16), channels_last, timed with CUDA events.

The Markdown tables go to stdout; `--json` writes the raw numbers, every repeat included.

What is counted (parameters, MACs) is in `model_size.py`, how the CPU and GPU are timed in
`model_timing.py`; this script runs them and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Runnable from a plain checkout (e.g. a fresh GPU machine) without `pip install -e .`: the repository
# root first (for `model`), then this folder for the sibling modules (already on the path when run as a
# script, not under `python -m benchmarks.models`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from model_size import ENTRIES, REFERENCES, SIZE, Entry, MacCount, Reference, count_macs, count_params  # noqa: E402
from model_timing import CpuTiming, GpuTiming, autocast_dtype, cpu_latencies, gpu_timing  # noqa: E402

logger = logging.getLogger("benchmarks.models")


@dataclass
class Result:
    label: str
    network: str
    options: dict[str, object]
    params: dict[int, int]
    macs: MacCount
    reference: Reference
    cpu: list[CpuTiming] = field(default_factory=list)
    gpu: list[GpuTiming] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def machine() -> dict[str, object]:
    """What the numbers were measured on; the load average shows whether the machine was shared."""
    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info.update(
            gpu=torch.cuda.get_device_name(0),
            cuda_version=torch.version.cuda,
            cudnn_version=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def count_entry(entry: Entry, size: int) -> Result:
    params = {c: count_params(entry, c) for c in (3, 1)}
    macs = count_macs(entry, 3, size)
    logger.info("%s: %.2f M params, %.2f GMACs", entry.label, params[3] / 1e6, macs.macs / 1e9)
    return Result(entry.label, entry.network, dict(entry.options), params, macs, REFERENCES[entry.label])


def time_on_cpu(entries: Sequence[Entry], results: dict[str, Result], args: argparse.Namespace) -> None:
    models = {}
    for entry in entries:
        torch.manual_seed(0)
        models[entry.label] = entry.build(1).eval()
    timings = cpu_latencies(models, args.cpu_batches, args.repeats, args.min_repeats, args.cpu_budget, args.size)
    for label, cells in timings.items():
        results[label].cpu.extend(cells)


def time_on_gpu(entry: Entry, result: Result, args: argparse.Namespace) -> None:
    """Batch × precision cells for one network; a failing cell is recorded in `errors`, not fatal."""
    torch.manual_seed(0)
    model = entry.build(1).eval().to("cuda", memory_format=torch.channels_last)
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype()]
    for batch in args.gpu_batches:
        for precision in ("fp32", amp):
            try:
                timing = gpu_timing(model, batch, precision, args.gpu_warmup, args.gpu_iters, args.size)
            except RuntimeError as exc:  # out of memory, or an op without a kernel for this dtype
                kind = "out of memory" if isinstance(exc, torch.cuda.OutOfMemoryError) else "failed"
                result.errors.append(f"GPU batch {batch} {precision}: {kind}: {exc}")
                logger.error("%s: GPU batch %d %s: %s: %s", entry.label, batch, precision, kind, exc)
                torch.cuda.empty_cache()
                continue
            logger.info("%s: GPU batch %d %s: %.2f ms, %.0f slices/s", entry.label, batch, precision,
                        timing.median_ms, timing.throughput)
            result.gpu.append(timing)
    del model
    torch.cuda.empty_cache()


#: The issue's GPU targets for the paper's network: the seed's RTX 3090 figure, and a throughput floor.
TARGET_LATENCY_S = 0.018
TARGET_THROUGHPUT = 1000.0


def _pct(ours: float, reference: float | None) -> str:
    return "—" if reference is None else f"{100.0 * (ours - reference) / reference:+.2f} %"


def size_table(results: Sequence[Result]) -> str:
    rows = [
        "| network | params (3 ch) | REFERENCE.md | Δ | params (1 ch) | GMACs at 256² | REFERENCE.md | Δ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ref = r.reference
        gmacs = r.macs.macs / 1e9
        rows.append(
            f"| {r.label} | {r.params[3]:,} | {'—' if ref.params is None else f'{ref.params / 1e6:.2f} M'} "
            f"| {_pct(r.params[3], ref.params)} | {r.params[1]:,} | {gmacs:.2f} "
            f"| {'—' if ref.gmacs is None else f'{ref.gmacs:.2f}'} | {_pct(gmacs, ref.gmacs)} |"
        )
    return "\n".join(rows)


def cpu_table(results: Sequence[Result]) -> str:
    """Per batch: median wall s/slice, the fastest repeat, median process CPU s/slice, repeats."""
    batches = sorted({t.batch for r in results for t in r.cpu})
    head = " | ".join(f"b{b} wall s/slice, median (min) | b{b} CPU s/slice | b{b} n" for b in batches)
    rows = [f"| network | {head} |", "|---|" + "---:|" * (3 * len(batches))]
    for r in results:
        by_batch = {t.batch: t for t in r.cpu}
        cells = []
        for b in batches:
            t = by_batch.get(b)
            if t is None:
                cells += ["—"] * 3
                continue
            cells += [f"{t.per_slice_s:.3f} ({min(t.seconds) / b:.3f})", f"{t.cpu_per_slice_s:.3f}", str(len(t.seconds))]
        rows.append(f"| {r.label} | {' | '.join(cells)} |")
    return "\n".join(rows)


def gpu_table(results: Sequence[Result]) -> str:
    rows = [
        "| network | precision | batch | latency ms (median) | s/slice | slices/s (back-to-back) | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for t in r.gpu:
            rows.append(
                f"| {r.label} | {t.precision} | {t.batch} | {t.median_ms:.2f} | {t.per_slice_s:.5f} "
                f"| {t.throughput:,.0f} | {t.peak_memory_mib:,.0f} |"
            )
    return "\n".join(rows)


def target_lines(results: Sequence[Result]) -> list[str]:
    """The issue's two GPU targets, checked for each IAN-Net variant that was measured on the GPU."""
    lines = []
    for r in results:
        if r.network != "ian_net" or not r.gpu:
            continue
        batch1 = [t for t in r.gpu if t.batch == 1]
        amp32 = [t for t in r.gpu if t.batch == 32 and t.precision != "fp32"]
        if batch1:
            best = min(batch1, key=lambda t: t.per_slice_s)
            verdict = "meets" if best.per_slice_s < TARGET_LATENCY_S else "MISSES"
            lines.append(
                f"{r.label}: batch 1 {best.per_slice_s:.4f} s/slice ({best.precision}) {verdict} "
                f"the < {TARGET_LATENCY_S} s/slice target"
            )
        if amp32:
            t = amp32[0]
            verdict = "meets" if t.throughput >= TARGET_THROUGHPUT else "MISSES"
            lines.append(
                f"{r.label}: batch 32 {t.precision} {t.throughput:,.0f} slices/s {verdict} "
                f"the >= {TARGET_THROUGHPUT:,.0f} slices/s target"
            )
    return lines


def to_json(results: Sequence[Result], info: dict[str, object], args: argparse.Namespace) -> dict[str, object]:
    def cpu(t: CpuTiming) -> dict[str, object]:
        return {**asdict(t), "median_s": t.median_s, "per_slice_s": t.per_slice_s,
                "cpu_per_slice_s": t.cpu_per_slice_s}

    def gpu(t: GpuTiming) -> dict[str, object]:
        return {**asdict(t), "median_ms": t.median_ms, "per_slice_s": t.per_slice_s}

    return {
        "machine": info,
        "settings": {**{k: v for k, v in vars(args).items() if k != "json"}, "latency_in_channels": 1, "macs_in_channels": 3},
        "networks": [
            {
                "label": r.label,
                "network": r.network,
                "options": r.options,
                "params": {f"in_channels_{c}": n for c, n in r.params.items()},
                "macs": asdict(r.macs),
                "reference": asdict(r.reference),
                "cpu": [cpu(t) for t in r.cpu],
                "gpu": [gpu(t) for t in r.gpu],
                "errors": r.errors,
            }
            for r in results
        ],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    labels = [e.label for e in ENTRIES]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", choices=labels, default=labels, metavar="NAME",
                        help=f"which to run (default all): {', '.join(labels)}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="timed CPU repeats per cell, at most (default 5)")
    parser.add_argument("--min-repeats", type=int, default=3, help="timed CPU repeats per cell, at least (default 3)")
    parser.add_argument("--cpu-budget", type=float, default=30.0,
                        help="after --min-repeats rounds, a CPU cell stops once its repeats sum to this (default 30 s)")
    parser.add_argument("--cpu-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--gpu-batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--gpu-warmup", type=int, default=10)
    parser.add_argument("--gpu-iters", type=int, default=50)
    parser.add_argument("--size", type=int, default=SIZE, help="input H = W (default 256)")
    parser.add_argument("--no-cpu", action="store_true", help="skip CPU latency")
    parser.add_argument("--no-gpu", action="store_true", help="skip GPU timing even when CUDA is present")
    parser.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    args = parser.parse_args(argv)
    for name in ("threads", "repeats", "min_repeats", "gpu_warmup", "gpu_iters", "size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if min(args.cpu_batches + args.gpu_batches) < 1:
        parser.error("batch sizes must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    info = machine()
    started = time.perf_counter()
    entries = [e for e in ENTRIES if e.label in args.networks]
    by_label = {e.label: count_entry(e, args.size) for e in entries}
    if not args.no_cpu:
        time_on_cpu(entries, by_label, args)
    if torch.cuda.is_available() and not args.no_gpu:
        for entry in entries:
            time_on_gpu(entry, by_label[entry.label], args)
    results = list(by_label.values())
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["wall_s"] = round(time.perf_counter() - started, 1)

    print(f"## Size (full width, 1 class, {args.size}×{args.size}; MACs = FlopCounterMode FLOPs / 2)\n")
    print(size_table(results))
    if any(r.cpu for r in results):
        print(f"\n## CPU latency ({info['cpu_model']}, {info['cpu_count']} cores, torch threads "
              f"{info['torch_threads']}, 1 input channel, median)\n")
        print(cpu_table(results))
    if any(r.gpu for r in results):
        print(f"\n## GPU ({info['gpu']}, channels_last, CUDA events; autocast = {autocast_dtype()})\n")
        print(gpu_table(results))
        for line in target_lines(results):
            print(f"- {line}")
    errors = [f"{r.label}: {error}" for r in results for error in r.errors]
    if errors:
        print("\n## Failed cells\n")
        print("\n".join(f"- {e}" for e in errors))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(results, info, args), indent=2, default=str) + "\n")
        logger.info("wrote %s", args.json)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
