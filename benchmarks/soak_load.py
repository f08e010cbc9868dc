"""The soak campaign's load: what it sends (8 associations of valid MR series) and the senders.

Each sender is a thread that runs dcmtk storescu associations one after another, re-sending what
was not acknowledged when the node was killed mid-association, as a real PACS would.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from tests.integration.peers import make_mr_series
from tests.integration.serve_process import NODE_AE, SENDER_AE
from tests.tools import dcmtk


@dataclass(frozen=True)
class Campaign:
    associations: int = 8
    series: int = 8  # per association
    slices: int = 125  # per series
    hits_per_stage: int = 4
    kills: int = 16  # at least, while any stage can still be hit
    gap_s: tuple[float, float] = (2.0, 6.0)  # random wait after a restart before the next kill is aimed
    aim_timeout_s: float = 20.0
    quiet_period_s: float = 3.0
    outage_at_s: float = 60.0
    outage_s: float = 600.0
    backoff_s: float = 2.0
    max_backoff_s: float = 30.0
    max_attempts: int = 100  # per delivery: outlasts the outage at max_backoff_s
    time_limit_s: float = 2400.0
    seed: int = 1


FULL = Campaign()
QUICK = Campaign(series=2, slices=50, hits_per_stage=1, kills=5, gap_s=(0.5, 2.0), aim_timeout_s=8.0,
                 quiet_period_s=2.0, outage_at_s=5.0, outage_s=12.0, backoff_s=0.5, max_backoff_s=2.0,
                 time_limit_s=140.0)


def _dataset_sha(data: bytes) -> str:
    """sha256 of a DICOM file's data set (what the node hashes): the bytes after the file meta."""
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a DICOM file with a File Meta Information Group Length")
    return hashlib.sha256(data[144 + int.from_bytes(data[140:144], "little"):]).hexdigest()


def _strip_trailing_padding(path: Path) -> None:
    """Drop a final (FFFC,FFFC) Data Set Trailing Padding (MR_small has one): storescu never sends it,
    so without it the sent file's data set is byte for byte what the node receives."""
    data = path.read_bytes()
    at = data.rfind(b"\xfc\xff\xfc\xffOB\x00\x00")
    if at > 0 and at + 12 + int.from_bytes(data[at + 8:at + 12], "little") == len(data):
        path.write_bytes(data[:at])


@dataclass
class Load:
    files: list[list[Path]]  # per association, in sending order
    series_of: dict[Path, str]
    sha: dict[str, str]  # SOP Instance UID -> sha256 of the data set sent
    unacked: Counter[str] = field(default_factory=Counter)  # series -> instances not yet acknowledged

    @classmethod
    def make(cls, folder: Path, c: Campaign) -> Load:
        files: list[list[Path]] = [[] for _ in range(c.associations)]
        series_of: dict[Path, str] = {}
        sha: dict[str, str] = {}
        for a in range(c.associations):
            for s in range(c.series):
                for p in make_mr_series(folder / f"a{a}s{s}", c.slices, SeriesDescription=f"soak a{a} s{s}"):
                    _strip_trailing_padding(p)
                    series_of[p] = pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID
                    sha[p.stem] = _dataset_sha(p.read_bytes())
                    files[a].append(p)
        return cls(files, series_of, sha, Counter(series_of.values()))


class Sender(threading.Thread):
    """storescu associations one after another until every file was answered Success."""

    def __init__(self, name: str, port: int, files: list[Path], load: Load, lock: threading.Lock,
                 stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.port, self.files, self.load, self.lock, self.stop = port, files, load, lock, stop
        self.acked: set[Path] = set()
        self.runs = self.associations = self.broken = self.requests = 0
        self.statuses: Counter[str] = Counter()
        self.in_association = False
        self.proc: subprocess.Popen[str] | None = None

    def run(self) -> None:
        while not self.stop.is_set() and len(self.acked) < len(self.files):
            self._associate([f for f in self.files if f not in self.acked])
            if len(self.acked) < len(self.files):
                self.stop.wait(0.5)  # the node is down or restarting: try again shortly

    def _associate(self, todo: list[Path]) -> None:
        args = [dcmtk("storescu"), "-v", "-nh", "-to", "10", "-ta", "10", "-td", "60", "-aet", SENDER_AE,
                "-aec", NODE_AE, "127.0.0.1", str(self.port), *map(str, todo)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.runs += 1
        current: Path | None = None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("I: Association Accepted"):
                self.in_association = True
                self.associations += 1
            elif line.startswith("I: Sending file: "):
                current = Path(line[len("I: Sending file: "):].strip())
            elif line.startswith("I: Sending Store Request"):
                self.requests += 1
            elif (m := re.match(r"I: Received Store Response \((.*)\)", line)) and current is not None:
                self.statuses[m.group(1)] += 1
                if m.group(1) == "Success" and current not in self.acked:
                    with self.lock:
                        self.acked.add(current)
                        self.load.unacked[self.load.series_of[current]] -= 1
                current = None
        accepted, self.in_association = self.in_association, False
        self.broken += self.proc.wait() != 0 and accepted

    def mid_association(self) -> bool:
        return self.in_association and len(self.acked) < len(self.files)
