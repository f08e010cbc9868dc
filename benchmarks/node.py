"""The node's speed: ingest rate against two references, end-to-end turnaround by stage, peak memory.

    python benchmarks/node.py                      # everything, about 10 minutes on a 2-core CPU
    python benchmarks/node.py --only turnaround --series 5

1. **Ingest** (instances/s): the same files sent by dcmtk storescu over one association and over
   ``--parallel`` at once, to dcmtk's storescp (``TCP_NODELAY=1``), a bare pynetdicom SCP that only
   writes and fsyncs each file, and the node's SCP (spool + SQLite + timers). The receivers and the
   sender come from ``benchmarks/ingest.py``; rounds interleave the receivers; medians are reported.
2. **Turnaround** of a `demo`-preset phantom series (88×138×256) with the bundled model: from the last
   instance acknowledged (its commit time in the state) to the SEG confirmed by a dcmtk storescp
   destination (the delivery's confirmation time in the state), split by stage from the worker's
   per-stage seconds. The node runs in this process with the model loaded beforehand (a running node
   loads it once, at its first job); a first series warms up and is not counted.
   *Overhead* = turnaround − quiet period − inference; the target is ≤ 25% of inference on a CPU.
3. **Peak memory**: ``VmHWM`` of an ``ian-node serve`` process (its own, fresh for each size) after
   it has received, segmented and delivered one series of each ``--memory-slices`` size.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ian_node.app.node import Node
from ian_node.config import DicomConfig, DicomTarget, ExportConfig, ModelConfig, NodeConfig, SeriesConfig, StorageConfig
from ian_node.net import free_port
from ian_node.phantom.study import PhantomConfig, generate_phantom, phantom_preset, write_phantom
from ian_node.storage.records import JobState
from model.checkpoint import BUNDLED_CHECKPOINT

DCMTK = Path("/usr/bin")  # pynetdicom's own storescu shim shadows dcmtk's on PATH
NODE_AE, DEST_AE = "IANNODE", "DEST"


def _load_ingest():  # type: ignore[no-untyped-def]
    """benchmarks/ingest.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("ian_node_bench_ingest", Path(__file__).with_name("ingest.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s") from None
            time.sleep(0.05)


def _storescu(port: int, files: list[Path]) -> None:
    proc = subprocess.run([str(DCMTK / "storescu"), "-aet", "BENCH", "-aec", NODE_AE, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed: {proc.stderr[-500:]}")


@contextmanager
def _storescp(folder: Path) -> Iterator[int]:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([str(DCMTK / "storescp"), "-aet", DEST_AE, "-od", str(folder), "+uf", "+xa", str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_gib = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except OSError:
        mem_gib = float("nan")
    load = os.getloadavg()
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {mem_gib:.0f} GiB RAM; load average at start "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min); Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), {platform.platform()}")


# ---------------------------------------------------------------------------------------------
# 1. ingest


def ingest(root: Path, files_count: int, rows: int, repeats: int, parallel: int) -> None:
    bench = _load_ingest()
    files = bench.make_files(root / "ingest-files", files_count, rows)
    size_kib = files[0].stat().st_size / 1024
    rates: dict[tuple[str, int], list[float]] = {}
    for round_ in range(repeats):
        for name, receiver in bench.RECEIVERS.items():
            for p in (1, parallel):
                with receiver(root / f"ingest-{name}-{p}-{round_}") as port:
                    seconds = bench.send(port, files, p)
                rates.setdefault((name, p), []).append(files_count / seconds)
    med = {key: statistics.median(v) for key, v in rates.items()}
    print(f"\n## Ingest: {files_count} MR instances of {size_kib:.0f} KiB, median of {repeats} rounds (instances/s)\n")
    print(f"| receiver | 1 association | {parallel} associations |")
    print("|---|---:|---:|")
    for name in bench.RECEIVERS:
        spread = " ".join(f"{min(rates[(name, p)]):.0f}-{max(rates[(name, p)]):.0f}" for p in (1, parallel))
        print(f"| {name} | {med[(name, 1)]:.1f} | {med[(name, parallel)]:.1f} |  <!-- range {spread} -->")
    print()
    for ref, target in (("storescp", 1.0), ("bare", 0.9)):
        ratios = " | ".join(f"{med[('node', p)] / med[(ref, p)]:.2f}×" for p in (1, parallel))
        print(f"- node / {ref}: {ratios} (1 | {parallel} associations); target ≥ {target:.1f}×")


# ---------------------------------------------------------------------------------------------
# 2. turnaround

STAGES = ("load", "preprocess", "inference", "inverse_postprocess", "seg_build")


@dataclass(frozen=True)
class Turnaround:
    seconds: dict[str, float]  # quiet, queue, the worker's stages, export, turnaround


def _measure_one(node: Node, files: list[Path], series_uid: str, timeout: float = 900.0) -> Turnaround:
    before = dict(node.worker.totals.seconds)
    jobs_before = node.worker.totals.jobs
    _storescu(node.scp.port, files)
    deadline = time.monotonic() + timeout
    while True:
        job = next((j for j in node.state.list_jobs() if j.series_uid == series_uid), None)
        if job is not None and job.state is JobState.DONE and node.worker.totals.jobs > jobs_before:
            break
        if job is not None and job.state is JobState.FAILED:
            raise RuntimeError(f"job {job.id} failed: {job.error}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"series {series_uid} not delivered within {timeout} s")
        time.sleep(0.02)
    series = node.state.series(series_uid)
    (delivery,) = node.state.deliveries(job.id)
    stages = {k: node.worker.totals.seconds[k] - before.get(k, 0.0) for k in (*STAGES, "total")}
    assert series is not None and job.started_at is not None and delivery.delivered_at is not None
    out = {
        "quiet": job.created_at - series.last_received_at,
        "queue": job.started_at - job.created_at,
        **{k: stages[k] for k in STAGES},
        "export": delivery.delivered_at - job.started_at - stages["total"],
        "turnaround": delivery.delivered_at - series.last_received_at,
    }
    return Turnaround(out)


def turnaround(root: Path, checkpoint: Path, series: int, quiet_s: float, batch_size: int, device: str) -> None:
    config_phantom = phantom_preset("demo")  # life size, so that the localiser finds the crop
    studies = []
    for patient in range(series + 1):  # seed 0: held out from the bundled model's training (seed 2026)
        studies.append(write_phantom(generate_phantom(patient, 0, config_phantom), root / f"turnaround-{patient}"))
    with _storescp(root / "turnaround-pacs") as dest_port:
        config = NodeConfig(
            dicom=DicomConfig(ae_title=NODE_AE, port=0),
            storage=StorageConfig(spool_dir=root / "turnaround-node" / "spool",
                                  state_path=root / "turnaround-node" / "state.sqlite3"),
            series=SeriesConfig(quiet_period_s=quiet_s),
            model=ModelConfig(checkpoint=checkpoint, device=device, batch_size=batch_size),
            export=ExportConfig(targets=(DicomTarget(name="pacs", ae_title=DEST_AE, host="127.0.0.1",
                                                     port=dest_port),)),
        )
        node = Node(config)
        node.start()
        try:
            predictor = node.worker.predictor  # loaded once, before timing
            runs = [_measure_one(node, list(s.instances), s.series_uid) for s in studies]
        finally:
            node.stop()
    measured = runs[1:]
    med = {k: statistics.median(r.seconds[k] for r in measured) for k in measured[0].seconds}
    inference = med["inference"]
    without_quiet = med["turnaround"] - quiet_s
    overhead = without_quiet - inference
    shape = "×".join(map(str, config_phantom.shape))
    print(f"\n## Turnaround: {shape} phantom series, {checkpoint.name} "
          f"({predictor.checkpoint.meta.architecture}, input {predictor.size}), device {predictor.device}, "
          f"batch {batch_size}, quiet period {quiet_s:g} s; median of {len(measured)} series after 1 warm-up\n")
    print("| stage | seconds |")
    print("|---|---:|")
    labels = {"quiet": "quiet period (timer fires)", "queue": "queue (worker wakes)", "load": "load (read + decode)",
              "preprocess": "preprocess (sides, coronal, slice transform)", "inference": "inference",
              "inverse_postprocess": "inverse + post-processing", "seg_build": "SEG build",
              "export": "export (result write + C-STORE until confirmed)", "turnaround": "**turnaround**"}
    for key, label in labels.items():
        print(f"| {label} | {med[key]:.2f} |")
    print(f"\n- turnaround without the configured quiet period: {without_quiet:.2f} s")
    print(f"- overhead = that − inference = {overhead:.2f} s = {100 * overhead / inference:.0f}% of inference "
          f"(target ≤ 25%)")
    print("- per series (turnaround / inference): "
          + ", ".join(f"{r.seconds['turnaround']:.2f} / {r.seconds['inference']:.2f}" for r in measured))


# ---------------------------------------------------------------------------------------------
# 3. peak memory


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _job_state(state_path: Path, series_uid: str) -> tuple[str, str | None] | None:
    with sqlite3.connect(f"file:{state_path}?mode=ro", uri=True, timeout=30) as db:
        row = db.execute("SELECT state, error FROM jobs WHERE series_uid = ? ORDER BY id DESC LIMIT 1",
                         (series_uid,)).fetchone()
    return None if row is None else (row[0], row[1])


def _serve_config(root: Path, port: int, dest_port: int, checkpoint: Path, batch_size: int, device: str) -> Path:
    path = root / "ian-node.toml"
    path.write_text(f"""\
[dicom]
ae_title = "{NODE_AE}"
port = {port}
[storage]
spool_dir = "{root / 'spool'}"
state_path = "{root / 'state.sqlite3'}"
[model]
checkpoint = "{checkpoint}"
device = "{device}"
batch_size = {batch_size}
[series]
quiet_period_s = 1.0
[crop]
mode = "half"  # `small`-preset series of any length: the localiser is for life-size heads
[export]
targets = [{{ name = "pacs", kind = "dicom", ae_title = "{DEST_AE}", host = "127.0.0.1", port = {dest_port} }}]
[api]
port = {free_port()}
""")
    return path


_JOB_LINE = re.compile(r"job \d+ \(series [0-9.]+ v\d+\): (.*?); ")


def peak_memory(root: Path, slices: list[int], checkpoint: Path, batch_size: int, device: str) -> None:
    exe = Path(sys.executable).with_name("ian-node")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "ian_node.app.cli"]
    print("\n## Peak memory of `ian-node serve` (VmHWM), one fresh process per series size\n")
    print("| series | files | idle after start-up | peak after the job | job stages (s) |")
    print("|---|---:|---:|---:|---|")
    for n in slices:
        folder = root / f"memory-{n}"
        study = write_phantom(generate_phantom(0, 0, PhantomConfig(shape=(n, 192, 192))), folder / "phantom")
        port = free_port()
        with _storescp(folder / "pacs") as dest_port:
            config = _serve_config(folder, port, dest_port, checkpoint, batch_size, device)
            log = (folder / "serve.log").open("wb")
            proc = subprocess.Popen([*command, "-v", "serve", "--config", str(config)], stdout=log,
                                    stderr=subprocess.STDOUT)
            try:
                _wait_for_port(port)
                idle = _proc_status(proc.pid)["VmHWM"]
                _storescu(port, list(study.instances))
                deadline = time.monotonic() + 1800
                while (state := _job_state(folder / "state.sqlite3", study.series_uid)) is None or state[0] not in (
                        "done", "failed"):
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"{n}-slice series not done; see {folder / 'serve.log'}")
                    time.sleep(0.2)
                if state[0] != "done":
                    raise RuntimeError(f"{n}-slice job failed: {state[1]}")
                peak = _proc_status(proc.pid)["VmHWM"]
            finally:
                proc.terminate()
                proc.wait()
                log.close()
        match = _JOB_LINE.search((folder / "serve.log").read_text())
        stages = match.group(1) if match else "?"
        size_mib = sum(p.stat().st_size for p in study.instances) / 2**20
        print(f"| {n}×192×192 ({size_mib:.0f} MiB) | {len(study.instances)} | {idle / 1024:.0f} MiB | "
              f"{peak / 1024:.0f} MiB | {stages} |")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("ingest", "turnaround", "memory"), action="append",
                        help="run only these parts (repeatable; default: all)")
    parser.add_argument("--ingest-files", type=int, default=200)
    parser.add_argument("--ingest-rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="ingest rounds")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--series", type=int, default=3, help="turnaround series measured (after 1 warm-up)")
    parser.add_argument("--quiet", type=float, default=1.0, help="quiet period of the turnaround node (s)")
    parser.add_argument("--memory-slices", default="64,500", help="series sizes for the peak-memory part")
    parser.add_argument("--checkpoint", type=Path, default=BUNDLED_CHECKPOINT)
    parser.add_argument("--batch-size", type=int, default=ModelConfig().batch_size)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    parts = set(args.only or ("ingest", "turnaround", "memory"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the serve processes of the memory part
    if not args.checkpoint.exists():
        parser.error(f"checkpoint {args.checkpoint} does not exist (python -m training.default_model)")

    print(f"# ian-node benchmark ({time.strftime('%Y-%m-%d %H:%M')})\n\n{machine()}")
    with tempfile.TemporaryDirectory(prefix="ian-node-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        if "ingest" in parts:
            ingest(root, args.ingest_files, args.ingest_rows, args.repeats, args.parallel)
        if "turnaround" in parts:
            turnaround(root, args.checkpoint, args.series, args.quiet, args.batch_size, args.device)
        if "memory" in parts:
            slices = [int(s) for s in args.memory_slices.split(",")]
            peak_memory(root, slices, args.checkpoint, args.batch_size, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
