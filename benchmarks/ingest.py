"""Ingest rate of the node's SCP against two references, measured side by side with the same files.

    python benchmarks/ingest.py [--files 200] [--rows 256] [--repeats 3] [--parallel 4]

Receivers, each writing to its own folder on the same file system:

- ``storescp``: dcmtk's storescp, with ``TCP_NODELAY=1`` in its environment (without it Debian's
  build stalls about 40 ms per instance on loopback);
- ``bare``: a pynetdicom SCP whose handler only writes ``event.encoded_dataset()`` to a file and
  fsyncs it: the floor of what a Python SCP can do durably;
- ``node``: the node's StorageSCP with its spool, SQLite state (WAL, synchronous=FULL) and quiet-period
  timers: header check, sha256, temp file + rename, then the file fsync, the directory fsync and the
  group commit of the row running concurrently; success only after all three (see ian_node/receive/scp.py).

Each sender is dcmtk's storescu: one association with every file, then ``--parallel`` associations
at once with the files split between them. The rate is files / wall time of the sender(s); the
median over ``--repeats`` rounds is reported, receivers interleaved within each round, and the
ratios are those of the medians, followed by the median and range of the per-round ratios (on a
shared machine the rates drift by a factor of two between minutes, so use many rounds).

The last column is the receiver process's CPU time per instance (user + system, all its threads),
which is what bounds the rate when the machine's cores are busy. ``--dir`` puts the receivers'
folders elsewhere (``/dev/shm`` shows the cost without any disk), ``--receivers`` picks a subset.
``--receivers bare,node,node-without-commit`` adds a diagnostic receiver: the node's SCP whose rows
are answered at once and never recorded, which shows what the durable SQLite commit costs.

``--sender-nodelay`` gives the storescu senders ``TCP_NODELAY=1`` too. Without it, storescp's rate on
one association is dominated by Nagle / delayed-ACK stalls on this machine (tens of instances/s);
with it, storescp shows its real speed, which includes no fsync at all.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE, evt

from ian_node.config import DicomConfig, SeriesConfig, TlsConfig
from ian_node.jobs.completion import SeriesTracker
from ian_node.net import free_port
from ian_node.receive.commit import GroupCommitter
from ian_node.receive.scp import TRANSFER_SYNTAXES, StorageSCP
from ian_node.storage.records import ReceivedInstance, RecordOutcome
from ian_node.storage.spool import Spool
from ian_node.storage.state import State

DCMTK = Path("/usr/bin")  # pynetdicom's own storescu shim shadows dcmtk's on PATH


def _wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def make_files(folder: Path, count: int, rows: int) -> list[Path]:
    """``count`` single-frame MR instances of ``rows``² 16-bit pixels in one series."""
    folder.mkdir(parents=True)
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    template.Rows = template.Columns = rows
    rng = np.random.default_rng(0)
    template.PixelData = rng.integers(0, 4096, (rows, rows), dtype=np.int16).tobytes()
    template.SeriesInstanceUID = generate_uid(prefix=None)
    paths = []
    for number in range(1, count + 1):
        template.SOPInstanceUID = generate_uid(prefix=None)
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.InstanceNumber = number
        paths.append(folder / f"{number:05d}.dcm")
        template.save_as(paths[-1], enforce_file_format=True)
    return paths


@contextmanager
def storescp_receiver(out: Path) -> Iterator[int]:
    out.mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen([str(DCMTK / "storescp"), "-aet", "IANNODE", "-od", str(out), "+xa", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def bare_receiver(out: Path) -> Iterator[int]:
    out.mkdir(parents=True)

    def handle_store(event: evt.Event) -> int:
        with open(out / f"{event.request.AffectedSOPInstanceUID}.dcm", "wb") as fh:
            fh.write(event.encoded_dataset())
            fh.flush()
            os.fsync(fh.fileno())
        return 0x0000

    ae = AE(ae_title="IANNODE")
    ae.maximum_associations = 16
    ae.add_supported_context(MRImageStorage, list(TRANSFER_SYNTAXES))
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


@contextmanager
def node_receiver(out: Path) -> Iterator[int]:
    state = State(out / "state.sqlite3")
    spool = Spool(out / "spool")
    tracker = SeriesTracker(state, spool, SeriesConfig(quiet_period_s=3600))
    scp = StorageSCP(DicomConfig(port=0, max_associations=16), TlsConfig(), state, spool, tracker.instance_stored)
    tracker.start()
    scp.start()
    try:
        yield scp.port
    finally:
        scp.stop()
        tracker.stop()
        state.close()


@contextmanager
def node_without_commit_receiver(out: Path) -> Iterator[int]:
    """Diagnostic, not a node: its SCP with every row answered at once and never recorded (no sha256,
    no folder fsync, no SQLite commit), i.e. what ingest costs apart from the durable commit."""

    def answered(self: GroupCommitter, instance: ReceivedInstance, dataset: bytes | None = None,
                 directory: Path | None = None) -> Future[RecordOutcome]:
        future: Future[RecordOutcome] = Future()
        future.set_result(RecordOutcome(instance.series_uid, 1, time.time(), True, True, instance.sop_instance_uid))
        return future

    with mock.patch.object(GroupCommitter, "submit", answered), node_receiver(out) as port:
        yield port


RECEIVERS: dict[str, Callable[[Path], AbstractContextManager[int]]] = {
    "storescp": storescp_receiver,
    "bare": bare_receiver,
    "node": node_receiver,
}
#: Picked only by name with --receivers (benchmarks/node.py runs RECEIVERS).
DIAGNOSTIC_RECEIVERS: dict[str, Callable[[Path], AbstractContextManager[int]]] = {
    "node-without-commit": node_without_commit_receiver,
}


def _round_ratios(node: list[float], ref: list[float]) -> str:
    """The node / reference ratio of each round (measured back to back): median [min–max]."""
    ratios = [n / r for n, r in zip(node, ref, strict=True)]
    return f"{statistics.median(ratios):.2f} [{min(ratios):.2f}–{max(ratios):.2f}]"


def _cpu_seconds() -> float:
    """CPU time of this process (the in-process receivers' threads), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def send(port: int, files: list[Path], parallel: int, nodelay: bool = False) -> float:
    """Seconds for ``parallel`` storescu processes to send ``files`` between them."""
    chunks = [files[i::parallel] for i in range(parallel)]
    env = {**os.environ, "TCP_NODELAY": "1"} if nodelay else None
    start = time.perf_counter()
    procs = [
        subprocess.Popen([str(DCMTK / "storescu"), "-aet", "BENCH", "-aec", "IANNODE", "127.0.0.1", str(port),
                          *map(str, chunk)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for chunk in chunks
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--sender-nodelay", action="store_true", help="TCP_NODELAY=1 for storescu too")
    parser.add_argument("--dir", type=Path, default=None, help="where receivers write (default: the temp folder)")
    parser.add_argument("--receivers", default=",".join(RECEIVERS), help="comma-separated subset of receivers")
    args = parser.parse_args(argv)
    known = {**RECEIVERS, **DIAGNOSTIC_RECEIVERS}
    unknown = [name for name in args.receivers.split(",") if name not in known]
    if unknown:
        parser.error(f"unknown receivers {unknown}; choose from {sorted(known)}")
    chosen = {name: known[name] for name in args.receivers.split(",")}

    with tempfile.TemporaryDirectory(prefix="ian-node-ingest-", dir=args.dir) as tmp:
        root = Path(tmp)
        files = make_files(root / "files", args.files, args.rows)
        size_kib = files[0].stat().st_size / 1024
        rates: dict[tuple[str, int], list[float]] = {}
        cpu: dict[tuple[str, int], list[float]] = {}
        for round_ in range(args.repeats):
            for name, receiver in chosen.items():
                for parallel in (1, args.parallel):
                    with receiver(root / f"{name}-{parallel}-{round_}") as port:
                        before = _cpu_seconds()
                        seconds = send(port, files, parallel, args.sender_nodelay)
                        used = _cpu_seconds() - before
                    rates.setdefault((name, parallel), []).append(len(files) / seconds)
                    cpu.setdefault((name, parallel), []).append(used / len(files))

    senders = "TCP_NODELAY=1" if args.sender_nodelay else "default environment"
    print(f"{args.files} files of {size_kib:.0f} KiB, median of {args.repeats} rounds, instances/s;"
          f" storescu senders with {senders}\n")
    print(f"| receiver | 1 association | {args.parallel} associations | receiver CPU ms/instance (1 / {args.parallel}) |")
    print("|---|---:|---:|---:|")
    med = {key: statistics.median(values) for key, values in rates.items()}
    cpu_ms = {key: 1e3 * statistics.median(values) for key, values in cpu.items()}
    for name in chosen:
        load = "(separate process)" if name == "storescp" else f"{cpu_ms[(name, 1)]:.2f} / {cpu_ms[(name, args.parallel)]:.2f}"
        print(f"| {name} | {med[(name, 1)]:.1f} | {med[(name, args.parallel)]:.1f} | {load} |")
    print()
    measured = [name for name in chosen if name not in ("storescp", "bare")]
    for name in measured:
        for ref in [r for r in ("storescp", "bare") if r in chosen]:
            ratios = " | ".join(f"{med[(name, p)] / med[(ref, p)]:.2f}×" for p in (1, args.parallel))
            spread = " | ".join(_round_ratios(rates[(name, p)], rates[(ref, p)]) for p in (1, args.parallel))
            print(f"{name} / {ref}: {ratios}  (1 | {args.parallel} associations); per round: {spread}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
