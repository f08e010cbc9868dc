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
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

try:
    import resource
except ImportError:  # Unix only; page faults are then reported as 0
    resource = None  # type: ignore[assignment]

# Runnable from a plain checkout (e.g. a fresh GPU machine) without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.networks.base import SegmentationNetwork  # noqa: E402
from model.registry import build  # noqa: E402

log = logging.getLogger("benchmarks.models")

SIZE = 256


@dataclass(frozen=True)
class Entry:
    """One benchmarked network: a table label, its registry name and build options."""

    label: str
    network: str
    options: tuple[tuple[str, object], ...] = ()

    def build(self, in_channels: int) -> SegmentationNetwork:
        return build(self.network, in_channels=in_channels, width=1.0, **dict(self.options))


@dataclass(frozen=True)
class Reference:
    """REFERENCE.md's figures for the official model (3 input channels, 1 class); None = not given."""

    params: int | None
    gmacs: float | None


#: The paper's network twice (the default paper variant and the released variant), then the comparators.
ENTRIES: tuple[Entry, ...] = (
    Entry("ian_net", "ian_net"),
    Entry("ian_net_released", "ian_net", (("attention", False),)),
    Entry("caranet", "caranet"),
    Entry("ds_transunet", "ds_transunet"),
    Entry("ducknet", "ducknet"),
    Entry("deeplabv3plus", "deeplabv3plus"),
    Entry("hardnet_mseg", "hardnet_mseg"),
    Entry("meganet", "meganet"),
)

#: ian_net (attention on) uses every module the released code builds, so it is compared with the
#: released build count; the released forward skips 230,144 of them. 82.9 GFLOPs = 2 × 41.45 GMACs
#: is the released forward's figure.
REFERENCES: dict[str, Reference] = {
    "ian_net": Reference(15_316_097, None),
    "ian_net_released": Reference(15_316_097 - 230_144, 41.45),
    "caranet": Reference(44_590_000, 11.40),
    "ds_transunet": Reference(171_440_000, 54.5),
    "ducknet": Reference(38_870_000, 24.15),
    "deeplabv3plus": Reference(39_760_000, None),
    "hardnet_mseg": Reference(17_420_000, 6.00),
    "meganet": Reference(44_190_000, 15.10),
}


def _cpu_fused_attention_flops(query_shape, key_shape, value_shape, *_: Any, out_shape=None, **__: Any) -> int:
    """The counter's own SDPA formula, for the CPU fused kernel it has no entry for (torch 2.13)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_fused_attention_flops}


def count_params(entry: Entry, in_channels: int) -> int:
    """Parameters of the full-width network, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = entry.build(in_channels)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class MacCount:
    macs: int
    #: FLOPs / 2 per aten op, so a reader can see what was counted.
    by_op: dict[str, int]
    device: str


def count_macs(entry: Entry, in_channels: int = 3, size: int = SIZE) -> MacCount:
    """MACs of one eval forward at size×size: FlopCounterMode FLOPs / 2 (convolutions and matmuls).

    Counted on the meta device, where no arithmetic runs and `scaled_dot_product_attention`
    decomposes into matmuls the counter sees; if a network cannot run on meta, a real CPU forward
    is counted, with the CPU fused-attention kernel given the counter's SDPA formula.
    """
    try:
        return _count_macs_on("meta", entry, in_channels, size)
    except (NotImplementedError, RuntimeError) as exc:  # an op without a meta kernel, or a data-dependent one
        log.info("%s: cannot count on the meta device (%s); counting a CPU forward", entry.label, exc)
        return _count_macs_on("cpu", entry, in_channels, size)


def _count_macs_on(device: str, entry: Entry, in_channels: int, size: int) -> MacCount:
    with torch.device(device):
        model = entry.build(in_channels).eval()
        x = torch.zeros(1, in_channels, size, size)
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter, torch.no_grad():
        model(x)
    by_op = {str(op): flops // 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    return MacCount(counter.get_total_flops() // 2, by_op, device)


@dataclass(frozen=True)
class CpuTiming:
    batch: int
    threads: int
    #: Wall seconds per call (one batch), one per repeat, after the warm-up call.
    seconds: tuple[float, ...]
    #: Process CPU seconds (all threads) per call: time spent descheduled by other processes does
    #: not count, so with one thread this is the latency an idle machine would show.
    cpu_seconds: tuple[float, ...]
    #: Minor page faults per timed call (process-wide, so other threads' faults count too): large
    #: freed buffers go back to the OS and fault in again on the next call (glibc's mmap threshold).
    minor_faults_per_call: float

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def per_slice_s(self) -> float:
        return self.median_s / self.batch

    @property
    def cpu_per_slice_s(self) -> float:
        return statistics.median(self.cpu_seconds) / self.batch


def cpu_latencies(
    models: dict[str, SegmentationNetwork],
    batches: Sequence[int],
    repeats: int,
    min_repeats: int,
    budget_s: float,
    size: int = SIZE,
) -> dict[str, list[CpuTiming]]:
    """Median wall time of eval forwards on the CPU, the networks interleaved round by round.

    On a shared machine, load comes and goes; timing every network once per round spreads a busy
    spell over all of them instead of ruining one network's cell. After `min_repeats` rounds, a cell
    that has used up `budget_s` seconds drops out, so slow networks get fewer repeats.
    """
    inputs = {b: torch.randn(b, 1, size, size, generator=torch.Generator().manual_seed(b)) for b in batches}
    cells = [(label, b) for label in models for b in batches]
    seconds: dict[tuple[str, int], list[float]] = {cell: [] for cell in cells}
    cpu_seconds: dict[tuple[str, int], list[float]] = {cell: [] for cell in cells}
    faults: dict[tuple[str, int], int] = {cell: 0 for cell in cells}
    with torch.inference_mode():
        for label, b in cells:  # warm-up: first-call allocations and kernel selection
            models[label](_as_channels(inputs[b], models[label]))
        for round_ in range(repeats):
            active = [c for c in cells if round_ < min_repeats or sum(seconds[c]) < budget_s]
            if not active:
                break
            for label, b in active:
                x = _as_channels(inputs[b], models[label])
                before = _minor_faults()
                start, cpu_start = time.perf_counter(), time.process_time()
                models[label](x)
                seconds[(label, b)].append(time.perf_counter() - start)
                cpu_seconds[(label, b)].append(time.process_time() - cpu_start)
                faults[(label, b)] += _minor_faults() - before
            log.info("CPU round %d/%d done (%d cells)", round_ + 1, repeats, len(active))
    threads = torch.get_num_threads()
    timing = {
        (label, b): CpuTiming(b, threads, tuple(seconds[(label, b)]), tuple(cpu_seconds[(label, b)]),
                              faults[(label, b)] / len(seconds[(label, b)]))
        for label, b in cells
    }
    return {label: [timing[(label, b)] for b in batches] for label in models}


def _as_channels(x: Tensor, model: SegmentationNetwork) -> Tensor:
    channels = model_in_channels(model)
    return x if channels == x.shape[1] else x.expand(-1, channels, -1, -1).contiguous()


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def model_in_channels(model: torch.nn.Module) -> int:
    """Input channels of the first convolution (networks differ in what they store)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
    raise ValueError(f"{type(model).__name__}: no Conv2d found")


@dataclass(frozen=True)
class GpuTiming:
    batch: int
    precision: str
    #: Milliseconds per call, each iteration bracketed by CUDA events and synchronised.
    latency_ms: tuple[float, ...]
    #: Slices per second over back-to-back iterations (no host sync between them).
    throughput: float
    peak_memory_mib: float

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latency_ms)

    @property
    def per_slice_s(self) -> float:
        return self.median_ms / 1000.0 / self.batch


def autocast_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def gpu_timing(
    model: SegmentationNetwork, batch: int, precision: str, warmup: int, iters: int, size: int = SIZE
) -> GpuTiming:
    """Latency (events, synchronised per call) and back-to-back throughput on the current CUDA device."""
    device = torch.device("cuda")
    x = torch.randn(batch, model_in_channels(model), size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    context: Callable[[], AbstractContextManager[Any]]
    if precision == "fp32":
        context = nullcontext
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        context = lambda: torch.autocast("cuda", dtype=dtype)  # noqa: E731
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), context():
        for _ in range(warmup):
            model(x)
        torch.cuda.synchronize(device)
        latency = []
        for _ in range(iters):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            model(x)
            end.record()
            end.synchronize()
            latency.append(begin.elapsed_time(end))
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(iters):
            model(x)
        end.record()
        end.synchronize()
        throughput = batch * iters / (begin.elapsed_time(end) / 1000.0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    return GpuTiming(batch, precision, tuple(latency), throughput, peak)


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
    log.info("%s: %.2f M params, %.2f GMACs", entry.label, params[3] / 1e6, macs.macs / 1e9)
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
                log.error("%s: GPU batch %d %s: %s: %s", entry.label, batch, precision, kind, exc)
                torch.cuda.empty_cache()
                continue
            log.info("%s: GPU batch %d %s: %.2f ms, %.0f slices/s", entry.label, batch, precision,
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
        log.info("wrote %s", args.json)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
