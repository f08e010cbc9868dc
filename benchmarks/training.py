"""Training throughput per network (images/s) and the data loader's share of step time.

    python benchmarks/training.py                       # CPU: width 0.125, 64 px, batch 16, 1 thread
    python benchmarks/training.py --gpu                 # CUDA: full width, 256 px, batch 32, AMP, 3 channels
    python benchmarks/training.py --networks ian_net --steps 20 --json out.json

Every step is the benchmark's own training step (`training.loop`): the `SliceDataset` of
`training.data` behind `make_loader` (worker processes and pinned memory on CUDA, as in training),
AdamW, autocast + GradScaler on CUDA, and the Focal Tversky loss over each network's deep supervision.
The samples are random uint8 images and masks of the model size: the loader's cost depends on their
size, not their content. Per step, the time spent waiting for the loader's next batch and the time of
the transfer + forward + backward + optimiser step (device-synchronised) are measured separately; the
table reports medians over the timed steps, after warm-up steps.

With `--estimate` the script also scales the measured step times up to the paper's benchmark (10
repeats × 50 epochs of ~4,220 training and ~900 validation images, seven networks; no early stopping),
so the estimate in docs/benchmark.md can be replaced by one computed from measured step times.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.registry import NETWORKS, build  # noqa: E402
from training.data import LoadReport, SampleMeta, SliceSet  # noqa: E402
from training.loop import make_loader  # noqa: E402
from training.losses import FocalTverskyLoss, deep_supervision_loss  # noqa: E402

logger = logging.getLogger("benchmarks.training")

#: The paper's dataset: 6,027 images of 51 nerves; 70/15/15 by patient gives about these per repeat.
PAPER_TRAIN, PAPER_VAL, PAPER_TEST = 4220, 900, 900
PAPER_REPEATS, PAPER_EPOCHS = 10, 50


@dataclass(frozen=True)
class Throughput:
    network: str
    device: str
    width: float
    size: int
    batch: int
    amp: bool
    images_per_s: float
    step_ms: float  # median wait + compute
    loader_wait_ms: float  # median
    loader_share: float  # median wait / median step
    eval_images_per_s: float


def synthetic_slices(n: int, size: int, seed: int = 0) -> SliceSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    masks = rng.random((n, size, size)) < 0.01
    metas = tuple(SampleMeta(f"P{i // 40}", "right", i) for i in range(n))
    return SliceSet(images, masks, metas, LoadReport("synthetic", ""))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(network: str, device: torch.device, width: float, size: int, batch: int, in_channels: int, amp: bool,
            steps: int, warmup: int, num_workers: int | None) -> Throughput:
    """Median training step of `network`, split into loader wait and compute, plus eval throughput."""
    torch.manual_seed(0)
    model = build(network, in_channels=in_channels, width=width).to(device).train()
    use_amp = amp and device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    loss_fn = FocalTverskyLoss()
    slices = synthetic_slices(batch * (steps + warmup), size)
    loader = make_loader(slices.torch_dataset(range(len(slices)), in_channels), batch, True, device, num_workers,
                         torch.Generator().manual_seed(0), drop_last=True)
    waits, computes = [], []
    batches = iter(loader)
    for step in range(steps + warmup):
        t0 = time.perf_counter()
        images, masks, _ = next(batches)
        t1 = time.perf_counter()
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=use_amp):
            output = model(images)
        loss = deep_supervision_loss(output, masks, model.loss_weights, loss_fn)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        _sync(device)
        t2 = time.perf_counter()
        if step >= warmup:
            waits.append(t1 - t0)
            computes.append(t2 - t1)
    model.eval()
    x = torch.rand(batch, in_channels, size, size, device=device)
    eval_times = []
    with torch.no_grad(), torch.autocast(device.type, enabled=use_amp):
        for i in range(max(3, warmup) + 3):
            _sync(device)
            t0 = time.perf_counter()
            model(x)
            _sync(device)
            if i >= warmup:
                eval_times.append(time.perf_counter() - t0)
    wait, compute = statistics.median(waits), statistics.median(computes)
    step = statistics.median([w + c for w, c in zip(waits, computes, strict=True)])
    return Throughput(network, str(device), width, size, batch, use_amp, batch / step, 1000 * step, 1000 * wait,
                      wait / (wait + compute), batch / statistics.median(eval_times))


def estimate_hours(t: Throughput) -> float:
    """Hours of the paper's 10 × 50-epoch protocol for one network at this throughput (no early stop)."""
    per_epoch = PAPER_TRAIN / t.images_per_s + PAPER_VAL / t.eval_images_per_s
    return PAPER_REPEATS * (PAPER_EPOCHS * per_epoch + PAPER_TEST / t.eval_images_per_s) / 3600


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", choices=tuple(NETWORKS), default=list(NETWORKS))
    p.add_argument("--gpu", action="store_true", help="CUDA at full width, 256 px, batch 32, AMP, 3 channels")
    p.add_argument("--width", type=float)
    p.add_argument("--size", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--in-channels", type=int, choices=(1, 3))
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--steps", type=int, default=8, help="timed steps per network")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    p.add_argument("--num-workers", type=int, help="loader workers (default: the training loop's choice)")
    p.add_argument("--estimate", action="store_true", help="scale measured steps to the paper's full benchmark")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu asked for but CUDA is not available")
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.set_num_threads(args.threads)
    if args.gpu:
        torch.backends.cudnn.benchmark = True
    width = args.width or (1.0 if args.gpu else 0.125)
    size = args.size or (256 if args.gpu else 64)
    batch = args.batch or (32 if args.gpu else 16)
    in_channels = args.in_channels or (3 if args.gpu else 1)
    results = []
    for name in args.networks:
        r = measure(name, device, width, size, batch, in_channels, not args.no_amp, args.steps, args.warmup,
                    args.num_workers)
        results.append(r)
        print(f"measured {name}: {r.images_per_s:.1f} img/s", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"\nTraining throughput on {name}: width {width}, {size} px, batch {batch}, {in_channels} channel(s), "
          f"AMP {results[0].amp}, median of {args.steps} steps\n")
    print("| Network | Train (img/s) | Step (ms) | Loader wait (ms) | Loader share | Eval (img/s) |"
          + (" Paper protocol (h) |" if args.estimate else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.estimate else ""))
    for r in results:
        row = (f"| {r.network} | {r.images_per_s:.1f} | {r.step_ms:.1f} | {r.loader_wait_ms:.2f} | "
               f"{100 * r.loader_share:.1f} % | {r.eval_images_per_s:.1f} |")
        print(row + (f" {estimate_hours(r):.2f} |" if args.estimate else ""))
    if args.estimate:
        print(f"\nAll {len(results)} networks × {PAPER_REPEATS} repeats × {PAPER_EPOCHS} epochs: "
              f"{sum(estimate_hours(r) for r in results):.1f} h (no early stopping)")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
