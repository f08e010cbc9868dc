"""CPU time of `ian-node serve` while its destination is down, next to the same node with nothing to do.

    python benchmarks/outage_cpu.py [--seconds 60] [--repeats 3] [--destinations refused,silent]
                                    [--backoff-s 10] [--max-backoff-s 600] [--timeout-s 30]

Each round starts fresh `ian-node serve` processes (the bundled model, default settings apart from
free loopback ports and the export policy below), one after the other:

- ``idle``: nothing received, nothing pending;
- ``refused``: one result waiting for a C-STORE destination whose port is closed (the connection is
  refused at once: a PACS host that is up with its service down);
- ``silent``: one result waiting for a destination that accepts the TCP connection and never answers
  (a hung PACS): each attempt waits ``--timeout-s`` for the association before it counts as failed.

The pending delivery is put in the node's SQLite state before it starts (a job in ``exporting`` with
its result in the spool), exactly what a node that crashed or stopped during an outage finds again;
so no model runs during the measurement. Once the node listens, the script waits ``--warm-up``
seconds (start-up, the first attempt), then reads the process's CPU time (user + system, every
thread, from /proc) over ``--seconds`` of wall time. It prints each run, the median per scenario, and
each outage scenario's median as a ratio to the idle node's median.

The idle node's own floor is mostly pynetdicom's listener calling ``gc.collect()`` every 30 s (about
0.1 s of CPU each with torch loaded), so a window holds one or two of them whatever the scenario;
/proc counts in 10 ms ticks. ``PYTHONPATH=<an exported tree>`` measures another version of the node
(run from outside the checkout, so that the checkout is not first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from ian_node.net import free_port
from ian_node.storage.records import DeliveryState, ReceivedInstance
from ian_node.storage.spool import Spool
from ian_node.storage.state import State

TICKS = os.sysconf("SC_CLK_TCK")
SCENARIOS = ("idle", "refused", "silent")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime: fields 14 and 15 of stat(5)


def seed_pending_delivery(root: Path) -> None:
    """One job whose result waits for its delivery to "pacs", as a node leaves it mid-outage."""
    spool, source = Spool(root / "spool"), pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    with State(root / "state.sqlite3") as state:
        path = spool.write_instance(source.SeriesInstanceUID, source.SOPInstanceUID, b"source")
        state.record_instance(ReceivedInstance(
            sop_instance_uid=source.SOPInstanceUID, sop_class_uid=source.SOPClassUID,
            series_uid=source.SeriesInstanceUID, study_uid=source.StudyInstanceUID,
            transfer_syntax_uid=source.file_meta.TransferSyntaxUID, path=path, size=6, sha256="x", modality="MR",
            calling_ae="MODALITY", peer_host="127.0.0.1",
        ))
        series = state.series(source.SeriesInstanceUID)
        state.settle_series(series.series_uid, series.last_received_at, None)
        job = state.claim_next_job()
        result = source.copy()
        result.SOPInstanceUID = result.file_meta.MediaStorageSOPInstanceUID = generate_uid(prefix=None)
        result.SeriesInstanceUID = generate_uid(prefix=None)
        staged = root / "result.dcm"
        result.save_as(staged, enforce_file_format=True)
        state.mark_job_exporting(job.id, spool.write_result(job.id, staged.read_bytes()), ["pacs"])


@contextmanager
def silent_destination() -> Iterator[int]:
    """A port that completes TCP handshakes (the kernel's backlog) but never reads or answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


def write_config(root: Path, dest_port: int, args: argparse.Namespace) -> Path:
    config = root / "ian-node.toml"
    config.write_text(f"""\
[dicom]
port = {free_port()}

[storage]
spool_dir = "{root / 'spool'}"
state_path = "{root / 'state.sqlite3'}"

[export]
backoff_s = {args.backoff_s}
max_backoff_s = {args.max_backoff_s}
max_attempts = 1000
targets = [{{ name = "pacs", kind = "dicom", ae_title = "DEST", host = "127.0.0.1", port = {dest_port}, \
timeout_s = {args.timeout_s} }}]

[api]
port = {free_port()}
""")
    return config


def wait_listening(root: Path, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """Until the node's DICOM port accepts connections (it opens last, after recovery)."""
    port = int(next(line.split("=")[1] for line in (root / "ian-node.toml").read_text().splitlines()
                    if line.startswith("port")))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ian-node serve exited with {proc.returncode}: see {root / 'serve.log'}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"ian-node serve not listening after {timeout} s")


def measure(scenario: str, args: argparse.Namespace) -> tuple[float, int]:
    """CPU seconds of one node over the window, and how many attempts it made in it."""
    with tempfile.TemporaryDirectory(prefix=f"outage-{scenario}-") as folder, silent_destination() as silent:
        root = Path(folder)
        if scenario != "idle":
            seed_pending_delivery(root)
        dest_port = silent if scenario == "silent" else free_port()
        config = write_config(root, dest_port, args)
        script = Path(sys.executable).with_name("ian-node")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "ian_node.app.cli"]
        with (root / "serve.log").open("wb") as log:
            proc = subprocess.Popen([*command, "serve", "--config", str(config)], stdout=log,
                                    stderr=subprocess.STDOUT, cwd=root)
        try:
            wait_listening(root, proc)
            time.sleep(args.warm_up)
            attempts_before = _attempts(root)
            before, started = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.seconds)
            used, wall = cpu_seconds(proc.pid) - before, time.monotonic() - started
            attempts = _attempts(root) - attempts_before
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        if scenario != "idle":
            with State(root / "state.sqlite3") as state:
                (delivery,) = state.deliveries(1)
            assert delivery.state is DeliveryState.PENDING, f"{scenario}: the delivery ended: {delivery}"
        return used * args.seconds / wall, attempts


def _attempts(root: Path) -> int:
    if not (root / "state.sqlite3").exists():
        return 0
    with State(root / "state.sqlite3") as state:
        return sum(d.attempts for d in state.deliveries(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured wall time per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warm-up", type=float, default=5.0, help="seconds between listening and measuring")
    parser.add_argument("--destinations", default="refused,silent", help="outage scenarios, comma-separated")
    parser.add_argument("--backoff-s", type=float, default=10.0)
    parser.add_argument("--max-backoff-s", type=float, default=600.0)
    parser.add_argument("--timeout-s", type=float, default=30.0, help="the target's timeout (silent scenario)")
    args = parser.parse_args()
    outages = [s.strip() for s in args.destinations.split(",") if s.strip()]
    unknown = set(outages) - set(SCENARIOS[1:])
    if unknown:
        parser.error(f"unknown destinations {sorted(unknown)}; choose from {', '.join(SCENARIOS[1:])}")
    runs: dict[str, list[float]] = {s: [] for s in ("idle", *outages)}
    print(f"{args.seconds:g} s per run, {args.repeats} rounds, backoff {args.backoff_s:g} s doubling to "
          f"{args.max_backoff_s:g} s, target timeout {args.timeout_s:g} s, {os.cpu_count()} CPUs")
    for round_ in range(1, args.repeats + 1):
        for scenario in runs:
            used, attempts = measure(scenario, args)
            runs[scenario].append(used)
            print(f"round {round_} {scenario:8s} CPU {used:7.3f} s ({100 * used / args.seconds:5.2f} % of one core)"
                  f"{'' if scenario == 'idle' else f', {attempts} attempts in the window'}", flush=True)
    idle = statistics.median(runs["idle"])
    print(f"\nmedian CPU over {args.seconds:g} s (ratio to the idle node)")
    for scenario, values in runs.items():
        median = statistics.median(values)
        ratio = f"{median / idle:6.2f}x" if idle > 0 else "   n/a"
        print(f"  {scenario:8s} {median:7.3f} s  {ratio}  (runs: {', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
