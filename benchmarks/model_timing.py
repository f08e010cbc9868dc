"""What the benchmark times: eval forwards on the CPU (interleaved rounds) and on a CUDA device.

Imported by `models.py`, which puts the repository root on `sys.path` first.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from model_size import SIZE
from torch import Tensor

from model.networks.base import SegmentationNetwork

try:
    import resource
except ImportError:  # Unix only; page faults are then reported as 0
    resource = None  # type: ignore[assignment]

logger = logging.getLogger("benchmarks.model_timing")


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
            logger.info("CPU round %d/%d done (%d cells)", round_ + 1, repeats, len(active))
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
