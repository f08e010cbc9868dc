"""`ian-node serve` as a real subprocess, with a dcmtk storescp destination, for end-to-end and crash tests.

The node under test is configured by a generated TOML file on free loopback ports, runs in its own
process (so a test can SIGKILL it), and is observed only from the outside: over DICOM, through the
files its destination received, and by reading its SQLite state (the single source of truth).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from ian_node.net import free_port
from ian_node.storage.records import Delivery, Job, Series
from ian_node.storage.state import State
from tests.integration.peers import wait_for_port
from tests.tools import dcmtk

NODE_AE = "IANNODE"
DEST_AE = "DEST"
SENDER_AE = "STORESCU"

_STATUS_RE = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")


@dataclass
class NodeSetup:
    """Folders, ports and policy of one node under test; `write_config` renders them as ian-node.toml."""

    root: Path
    checkpoint: Path
    port: int = 0
    dest_port: int = 0
    quiet_period_s: float = 1.0
    max_attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.dest_port = self.dest_port or free_port()

    @property
    def config_path(self) -> Path:
        return self.root / "ian-node.toml"

    @property
    def state_path(self) -> Path:
        return self.root / "data" / "state.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.root / "data" / "spool"

    def write_config(self) -> Path:
        self.config_path.write_text(f"""\
[dicom]
ae_title = "{NODE_AE}"
port = {self.port}

[storage]
spool_dir = "{self.spool_dir}"
state_path = "{self.state_path}"
min_free_bytes = 67108864  # tests must not depend on how full the machine's disk is
min_free_percent = 0.0

[model]
checkpoint = "{self.checkpoint}"
device = "cpu"
# a CPU runs this model about 3x faster in batches of 32 slices than in the default 8
batch_size = 32

[crop]
mode = "half"  # the untrained test checkpoints record no crop: trained on halves, as far as the node knows

[series]
quiet_period_s = {self.quiet_period_s}

[export]
max_attempts = {self.max_attempts}
backoff_s = {self.backoff_s}
max_backoff_s = {self.max_backoff_s}
targets = [{{ name = "pacs", kind = "dicom", ae_title = "{DEST_AE}", host = "127.0.0.1", port = {self.dest_port} }}]

[api]
port = {free_port()}
""")
        return self.config_path

    # -- the state, read from outside the node ----------------------------------------------------

    def jobs(self) -> list[Job]:
        """Every job, oldest first (empty while the node has not created its state yet)."""
        if not self.state_path.exists():
            return []
        with State(self.state_path) as state:
            return state.list_jobs()[::-1]

    def deliveries(self, job_id: int) -> list[Delivery]:
        with State(self.state_path) as state:
            return state.deliveries(job_id)

    def job_for(self, series_uid: str) -> Job | None:
        """The newest job of a series."""
        return next((j for j in reversed(self.jobs()) if j.series_uid == series_uid), None)

    def series(self, series_uid: str) -> Series | None:
        """The series' row (None while it has not arrived)."""
        if not self.state_path.exists():
            return None
        with State(self.state_path) as state:
            return state.series(series_uid)

    def describe(self) -> str:
        return "jobs: " + "; ".join(
            f"{j.id} {j.state} {j.series_uid} v{j.series_version} attempts {j.attempts} error {j.error}"
            for j in self.jobs()
        )


def ian_node_command() -> list[str]:
    """The installed `ian-node` console script next to this interpreter (else the module)."""
    script = Path(sys.executable).with_name("ian-node")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ian_node.app.cli"]


class ServeProcess:
    """`ian-node -v serve --config X` in its own process; its log goes to a file for failure messages."""

    def __init__(self, setup: NodeSetup, name: str = "serve") -> None:
        self.setup = setup
        self.log_path = setup.root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        #: Seconds from the last start's process launch to its SCP accepting connections (recovery included).
        self.startup_s: float | None = None

    def start(self, timeout: float = 60.0, write_config: bool = True) -> ServeProcess:
        """Start and wait until the SCP listens (after recovery: `Node.start` opens the port last).

        ``write_config=False`` keeps the config file as it is (see :meth:`restart`).
        """
        if write_config:
            self.setup.write_config()
        # One intra-op thread: on a busy 2-core machine two OpenMP threads spin against the other
        # processes and make inference many times slower.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*ian_node_command(), "-v", "serve", "--config", str(self.setup.config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.setup.root, env=env,
            )
        launched = time.monotonic()
        deadline = launched + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"ian-node serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                wait_for_port(self.setup.port, timeout=0.5)
                self.startup_s = time.monotonic() - launched
                return self
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"ian-node serve not listening after {timeout} s:\n{self.log_tail()}") from None

    def restart(self, timeout: float = 60.0) -> ServeProcess:
        """Start again after a kill or a stop with the very same config file (ports included), as an
        init system restarts a service; :attr:`startup_s` then holds its recovery time."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("ian-node serve is still running: kill or stop it before a restart")
        return self.start(timeout, write_config=False)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the node."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as an init system stops it; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"ian-node serve did not stop on SIGTERM within {timeout} s") from None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> ServeProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Destination:
    """dcmtk's storescp as the PACS: every received instance gets its own file (+uf), so duplicates count."""

    def __init__(self, folder: Path, port: int, ae_title: str = DEST_AE) -> None:
        self.folder, self.port, self.ae_title = folder, port, ae_title
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Destination:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TCP_NODELAY": "1"}  # without it Debian's storescp stalls ~40 ms per PDU
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.folder), "+uf", "+xa", str(self.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file()) if self.folder.exists() else []

    def segs_for(self, series_uid: str) -> list[Dataset]:
        """Every complete SEG received so far that references source series ``series_uid``."""
        found = []
        for path in self.files():
            try:
                ds = pydicom.dcmread(path)
            except Exception:  # storescp may still be writing it
                continue
            if ds.get("Modality") != "SEG":
                continue
            refs = {str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])}
            if series_uid in refs:
                ds.filename = str(path)
                found.append(ds)
        return found

    def __enter__(self) -> Destination:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sent_statuses(output: str) -> list[int]:
    """The DIMSE status of every C-STORE response in storescu's -d output, in order."""
    return [int(code, 16) for code in _STATUS_RE.findall(output)]


def storescu_command(port: int, files: Sequence[Path], options: Sequence[str] = ()) -> list[str]:
    """dcmtk storescu sending ``files`` to the node in one association, printing every response (-d)."""
    return [dcmtk("storescu"), "-d", "-nh", *options, "-aet", SENDER_AE, "-aec", NODE_AE, "127.0.0.1", str(port),
            *map(str, files)]
