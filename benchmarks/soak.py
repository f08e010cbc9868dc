"""Soak: nothing acknowledged is lost and every series version gets one result, under load and faults.

    python benchmarks/soak.py --quick      # under a minute on 2 cores; tests/integration/test_soak.py runs it
    python benchmarks/soak.py              # full: 8 x 1,000 instances, >= 16 kills, a 10-minute outage
    python benchmarks/soak.py --outage 60 --json audit.json --keep

One bounded campaign on loopback only, against a real `ian-node serve` with a real config (durable
spool, SQLite state, quiet period, worker, a tiny untrained checkpoint, a dcmtk `storescp` destination):
**load**: ``--associations`` dcmtk `storescu` senders in parallel, each with ``--series`` x ``--slices``
MR instances in one association, re-sending (as a PACS would) whatever was not answered Success;
**kills**: SIGKILLs at random moments, each aimed at a stage (mid-receive, inside a quiet period,
mid-job, mid-export) and recorded with what it hit, as read from the state the crash left; the node
restarts at once with the same config (recovery time: process start to port open). No kill is made
while a running job is on its last attempt (the node fails it then, by design) or while the backlog
drains; **outage**: the destination stops ``--outage-at`` s into the load for ``--outage`` s;
**audit**: instances sent, acknowledged, and in state and spool with the sha256 of the data set sent
(lost must be 0); one SEG per (source series, version) at the destination, read from its Referenced
Series and Series Number (missing and duplicated must be 0; it must be the SEG the job stored, and
each series' last version must cover all its slices); kills by stage, recovery and drain times, peak
RSS of serve, spool disk use. Exit status 0 when the audit passes.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a plain checkout: the helpers below live in tests/
    sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from ian_node.segment.result import SEG_SERIES_NUMBER_BASE  # noqa: E402
from ian_node.storage.state import State  # noqa: E402
from ian_node.uids import derived_uid  # noqa: E402
from tests.integration.node_harness import untrained_checkpoint  # noqa: E402
from tests.integration.serve_process import Destination, NodeSetup, ServeProcess  # noqa: E402

sys.path.insert(1, str(Path(__file__).resolve().parent))  # the sibling module, also when loaded by path
from soak_load import FULL, QUICK, Campaign, Load, Sender, _dataset_sha  # noqa: E402

STAGES = ("receive", "quiet", "job", "export")
#: The node fails a job interrupted this many times while running (State.recover's default).
MAX_JOB_ATTEMPTS = inspect.signature(State.recover).parameters["max_job_attempts"].default


@dataclass(frozen=True)
class Snapshot:
    """The state now, read only (after a kill nothing may touch the files before the node's recovery)."""

    running: tuple[tuple[int, int], ...] = ()  # (job id, attempts)
    exporting: tuple[int, ...] = ()
    queued: int = 0
    awaiting: frozenset[str] = frozenset()
    pending: frozenset[int] = frozenset()  # jobs with a delivery pending

    @classmethod
    def read(cls, path: Path) -> Snapshot:
        if not path.exists():
            return cls()
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            jobs = db.execute("SELECT id, state, attempts FROM jobs").fetchall()
            return cls(tuple((i, a) for i, s, a in jobs if s == "running"),
                       tuple(i for i, s, _ in jobs if s == "exporting"), sum(s == "queued" for _, s, _ in jobs),
                       frozenset(r[0] for r in db.execute("SELECT series_uid FROM series WHERE awaiting_completion")),
                       frozenset(r[0] for r in db.execute("SELECT job_id FROM deliveries WHERE state = 'pending'")))
        except sqlite3.OperationalError:  # the schema is still being created
            return cls()
        finally:
            db.close()


@dataclass
class Kill:
    at_s: float
    aimed: str
    hit: list[str]
    detail: str
    recovery_s: float = 0.0
    recovered: str = ""  # the restarted node's own 'recovered: ...' line


class Soak:
    def __init__(self, c: Campaign, work: Path) -> None:
        self.c, self.work = c, work
        self.rng = random.Random(c.seed)
        self.lock = threading.Lock()  # sender acknowledgements
        self.kill_lock = threading.Lock()  # a kill + restart, or the destination's return
        self.stop, self.draining = threading.Event(), threading.Event()
        self.kills: list[Kill] = []
        self.peak_rss_kib = 0
        self.outage: dict[str, float] = {}
        self.notes: list[str] = []

    def _elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _loading(self) -> bool:
        return any(s.is_alive() for s in self.senders)

    def _dest_up(self) -> bool:
        return self.dest.proc is not None and self.dest.proc.poll() is None

    def _quiet(self, snap: Snapshot) -> list[str]:
        """Series whose every instance was acknowledged and whose quiet period has not concluded."""
        with self.lock:
            return sorted(s for s in snap.awaiting if self.load.unacked.get(s, 1) == 0)

    def _sample_rss(self) -> None:
        try:  # VmHWM: the peak resident set of the serve process running now
            status = Path(f"/proc/{self.serve.proc.pid}/status").read_text() if self.serve.proc else ""
            self.peak_rss_kib = max(self.peak_rss_kib, int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)))
        except (OSError, AttributeError):  # between a kill and the restart
            pass

    def _rss_loop(self) -> None:
        while not self.stop.wait(0.2):
            self._sample_rss()

    def _feasible(self, stage: str, snap: Snapshot) -> bool:
        """Whether ``stage`` can still be seen later in this campaign."""
        later = {"receive": False, "quiet": bool(snap.awaiting),
                 "job": bool(snap.awaiting or snap.queued or snap.running),
                 "export": bool(snap.exporting) or not self._dest_up()}
        return self._loading() or later[stage]

    def _kill_loop(self, deadline: float) -> None:
        hits = Counter[str]()
        while time.monotonic() < deadline and not self.stop.is_set():
            snap = Snapshot.read(self.setup.state_path)
            feasible = [s for s in STAGES if self._feasible(s, snap)]
            wanted = [s for s in feasible if hits[s] < self.c.hits_per_stage]
            if not feasible or (not wanted and len(self.kills) >= self.c.kills):
                return
            aim = self.rng.choice(wanted or feasible)
            gap = self.rng.uniform(*self.c.gap_s)
            outage_left = self.c.outage_at_s + self.c.outage_s - self._elapsed()
            if aim == "export" and not self._loading() and outage_left > 0:  # spread them over the outage
                gap = self.rng.uniform(0.3, 0.9) * outage_left / max(1, self.c.kills - len(self.kills))
            if self.stop.wait(gap):
                return
            if kill := self._aimed_kill(aim, min(deadline, time.monotonic() + self.c.aim_timeout_s)):
                hits.update(kill.hit)

    def _aimed_kill(self, aim: str, until: float) -> Kill | None:
        while time.monotonic() < until and not self.stop.is_set():
            snap = Snapshot.read(self.setup.state_path)
            seen = {"receive": any(s.mid_association() for s in self.senders), "quiet": bool(self._quiet(snap)),
                    "job": bool(snap.running), "export": bool(snap.exporting)}
            if seen[aim] and all(a < MAX_JOB_ATTEMPTS for _, a in snap.running) and not self.draining.is_set():
                with self.kill_lock:
                    if not self.draining.is_set():
                        return self._kill_and_restart(aim)
            time.sleep(0.01)
        return None

    def _kill_and_restart(self, aim: str) -> Kill:
        receiving = sum(s.mid_association() for s in self.senders)
        self._sample_rss()
        self.serve.kill()
        at = self._elapsed()
        snap = Snapshot.read(self.setup.state_path)  # exactly what the crash left
        quiet = self._quiet(snap)
        parts = {
            "receive": f"{receiving} association(s) mid-transfer" if receiving else "",
            "quiet": f"{len(quiet)} fully acknowledged series awaiting completion" if quiet else "",
            "job": "job(s) running: " + ", ".join(f"{i} (attempt {a})" for i, a in snap.running) if snap.running else "",
            "export": (f"{len(snap.exporting)} job(s) exporting, destination {'up' if self._dest_up() else 'down'}"
                       if snap.exporting else ""),
        }
        kill = Kill(round(at, 2), aim, [s for s in STAGES if parts[s]], "; ".join(p for p in parts.values() if p))
        self.serve.restart()
        kill.recovery_s = round(self.serve.startup_s or 0.0, 3)
        lines = [ln for ln in self.serve.log_path.read_text(errors="replace").splitlines() if " recovered: " in ln]
        kill.recovered = lines[-1].split(" recovered: ", 1)[1] if lines else "(no recovery line)"
        self.kills.append(kill)
        print(f"  kill {len(self.kills):2d} at {at:6.1f} s, aimed {aim:7s} hit {'+'.join(kill.hit) or '-':26s} "
              f"recovered in {kill.recovery_s:.2f} s ({kill.detail})", flush=True)
        return kill

    def _outage_loop(self) -> None:
        if self.stop.wait(self.c.outage_at_s):
            return
        self.dest.stop()
        self.outage["start_s"] = round(self._elapsed(), 2)
        print(f"  destination down at {self.outage['start_s']:.1f} s for {self.c.outage_s:g} s", flush=True)
        if self.stop.wait(self.c.outage_s):
            return
        with self.kill_lock:  # no kill in flight: the node is up while the backlog is taken
            backlog = Snapshot.read(self.setup.state_path).pending
            self.dest.start()
            self.outage["end_s"] = round(self._elapsed(), 2)
            self.draining.set()
        back = time.monotonic()
        while not self.stop.is_set() and backlog & Snapshot.read(self.setup.state_path).pending:
            time.sleep(0.05)
        self.draining.clear()
        self.outage.update(backlog=len(backlog), drain_s=round(time.monotonic() - back, 2))
        print(f"  destination back at {self.outage['end_s']:.1f} s: {len(backlog)} pending result(s) "
              f"delivered in {self.outage['drain_s']:.2f} s", flush=True)

    def run(self) -> dict:
        c, started = self.c, time.monotonic()
        deadline = started + c.time_limit_s
        self.load = Load.make(self.work / "load", c)
        generated_s = time.monotonic() - started
        checkpoint = untrained_checkpoint(self.work / "model.pt", size=32, attention=False)
        self.setup = NodeSetup(self.work / "node", checkpoint, quiet_period_s=c.quiet_period_s,
                               max_attempts=c.max_attempts, backoff_s=c.backoff_s, max_backoff_s=c.max_backoff_s)
        self.dest = Destination(self.work / "destination", self.setup.dest_port).start()
        self.serve = ServeProcess(self.setup).start()
        self.senders = [Sender(f"storescu-{i}", self.setup.port, files, self.load, self.lock, self.stop)
                        for i, files in enumerate(self.load.files)]
        self.t0 = time.monotonic()
        threads = [*self.senders, threading.Thread(target=self._outage_loop, daemon=True),
                   threading.Thread(target=self._rss_loop, daemon=True)]
        for t in threads:
            t.start()
        quiescent = False
        try:
            self._kill_loop(deadline)
            quiescent = self._wait_quiescent(deadline)
        except Exception as exc:  # e.g. a restart that failed: reported, and the audit still runs
            self.notes.append(f"campaign stopped: {type(exc).__name__}: {exc}")
        finally:
            self.stop.set()
            for s in self.senders:
                if s.proc is not None and s.proc.poll() is None:
                    s.proc.kill()
            for t in threads:
                t.join(timeout=30)
            self._sample_rss()
            self.serve.stop()
            self.dest.stop()
        audit = self._audit(checkpoint)
        audit["campaign"] = {**asdict(c), "quiescent": quiescent, "generation_s": round(generated_s, 1),
                             "load_to_quiescent_s": round(self._elapsed(), 1), "notes": self.notes}
        audit["passed"] = audit["passed"] and not self.notes
        return audit

    def _wait_quiescent(self, deadline: float) -> bool:
        """Everything acknowledged, the backlog drained, no open series, job or delivery."""
        while time.monotonic() < deadline:
            snap = Snapshot.read(self.setup.state_path)
            if not (self._loading() or "drain_s" not in self.outage or snap.awaiting or snap.queued
                    or snap.running or snap.exporting):
                return True
            time.sleep(0.25)
        self.notes.append(f"time limit of {self.c.time_limit_s:g} s reached before the node was quiescent")
        return False

    def _audit(self, checkpoint: Path) -> dict:
        db = sqlite3.connect(f"file:{self.setup.state_path}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        rows = {r["sop_instance_uid"]: r for r in db.execute("SELECT * FROM instances")}
        series = {r["series_uid"]: r for r in db.execute("SELECT * FROM series")}
        jobs = db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        deliveries = Counter(r[0] for r in db.execute("SELECT state FROM deliveries"))
        db.close()
        instances = self._audit_instances(rows)
        results = self._audit_results(series, jobs, checkpoint)
        results["deliveries"] = dict(deliveries)
        recovery = [k.recovery_s for k in self.kills]
        spool = [p for p in self.setup.spool_dir.rglob("*") if p.is_file()]
        kills = {"count": len(self.kills), "aimed": dict(Counter(k.aimed for k in self.kills)),
                 "hit": {s: sum(s in k.hit for k in self.kills) for s in STAGES},
                 "recovery_s_median": round(statistics.median(recovery), 3) if recovery else None,
                 "recovery_s_max": max(recovery, default=None), "each": [asdict(k) for k in self.kills]}
        resources = {"peak_rss_serve_mib": round(self.peak_rss_kib / 1024, 1), "spool_files": len(spool),
                     "spool_bytes": sum(p.stat().st_size for p in spool),
                     "spool_disk_bytes": sum(p.stat().st_blocks * 512 for p in spool),
                     "state_bytes": sum(p.stat().st_size for p in self.setup.state_path.parent.glob("state.sqlite3*"))}
        passed = (instances["lost"] == instances["not_acknowledged"] == results["missing"] == results["duplicated"]
                  == results["wrong_result"] == results["series_without_complete_final_result"] == 0)
        return {"passed": passed, "instances": instances, "results": results, "kills": kills,
                "outage": self.outage, "resources": resources}

    def _audit_instances(self, rows: dict[str, sqlite3.Row]) -> dict:
        acked = [p for s in self.senders for p in s.acked]
        lost = []
        for path in acked:
            row = rows.get(path.stem)
            stored = self.setup.spool_dir / row["path"] if row else None
            if row is None or stored is None or not stored.is_file():
                lost.append(f"{path.stem}: {'no row in the state' if row is None else 'no file in the spool'}")
            elif not row["sha256"] == self.load.sha[path.stem] == _dataset_sha(stored.read_bytes()):
                lost.append(f"{path.stem}: sha256 differs (sent / state / spool)")
            elif row["unconfirmed"] is not None:
                lost.append(f"{path.stem}: row still unconfirmed after a clean stop")
        sent = {p.stem for files in self.load.files for p in files}
        return {
            "sent": len(sent), "c_store_requests": sum(s.requests for s in self.senders),
            "c_store_responses": sum(sum(s.statuses.values()) for s in self.senders),
            "acknowledged": len(acked), "not_acknowledged": len(sent) - len(acked),
            "statuses": dict(sum((s.statuses for s in self.senders), Counter())),
            "storescu_runs": sum(s.runs for s in self.senders),
            "associations": sum(s.associations for s in self.senders),
            "associations_broken": sum(s.broken for s in self.senders),
            "in_state": len(rows), "in_state_not_sent": len(set(rows) - sent),
            "received_more_than_once": sum(r["times_received"] > 1 for r in rows.values()),
            "lost": len(lost), "lost_detail": lost[:20],
        }

    def _audit_results(self, series: dict[str, sqlite3.Row], jobs: list[sqlite3.Row], checkpoint: Path) -> dict:
        received: dict[tuple[str, int], list[pydicom.Dataset]] = {}  # (source series, version) -> SEGs
        unreadable = 0
        for path in self.dest.files():
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                unreadable += 1
                continue
            if ds.get("Modality") == "SEG":
                key = (str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID), int(ds.SeriesNumber) - SEG_SERIES_NUMBER_BASE)
                received.setdefault(key, []).append(ds)
        model_sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        missing, duplicated, wrong, copies, derived = [], [], [], 0, 0
        covers: dict[tuple[str, int], int] = {}
        for j in jobs:
            key = (j["series_uid"], j["series_version"])
            name = f"job {j['id']} (series {key[0]} v{key[1]})"
            if not (got := received.get(key)):
                missing.append(f"{name}: no SEG at the destination")
                continue
            if len({(str(d.SeriesInstanceUID), str(d.SOPInstanceUID)) for d in got}) > 1:
                duplicated.append(f"{name}: {len(got)} different SEGs for one series version")
            copies += len(got) - 1
            stored = pydicom.dcmread(self.setup.spool_dir / j["result_path"], stop_before_pixels=True)
            if any(d.SOPInstanceUID != stored.SOPInstanceUID for d in got):
                wrong.append(f"{name}: the SEG delivered is not the result the job stored")
            # ian_node.segment.result documents SEG UIDs derived from (series, version, model hash)
            derived += got[0].SeriesInstanceUID == derived_uid(None, "ian-node-result", *key, model_sha, "series")
            covers[key] = len(got[0].ReferencedSeriesSequence[0].ReferencedInstanceSequence)
        keys = {(j["series_uid"], j["series_version"]) for j in jobs}
        duplicated += [f"SEG of {u} v{v}: no job made it" for (u, v) in received if (u, v) not in keys]
        incomplete = []
        for uid in sorted(set(self.load.series_of.values())):
            s = series.get(uid)
            final = covers.get((uid, s["version"]), 0) if s else 0
            if not s or s["awaiting_completion"] or s["status"] != "selected" or final != self.c.slices:
                incomplete.append(f"series {uid}: " + ("not in the state" if not s else (
                    f"status {s['status']}, version {s['version']}, last result covers {final} of {self.c.slices}")))
        return {
            "series": len(set(self.load.series_of.values())), "series_in_state": len(series),
            "series_versions": sum(s["version"] for s in series.values()), "jobs": len(jobs),
            "job_states": dict(Counter(j["state"] for j in jobs)),
            "jobs_rerun_after_a_kill": sum(j["attempts"] > 1 for j in jobs),
            "failed_jobs": [f"job {j['id']}: {j['error']}" for j in jobs if j["state"] == "failed"],
            "results_expected": len(jobs), "results_delivered": len(jobs) - len(missing),
            "partial_results": sum(n < self.c.slices for n in covers.values()),
            "seg_files_at_destination": sum(len(v) for v in received.values()), "redelivered_copies": copies,
            "missing": len(missing), "duplicated": len(duplicated), "wrong_result": len(wrong),
            "series_without_complete_final_result": len(incomplete), "unreadable_files_at_destination": unreadable,
            "seg_uids_derived_as_documented": int(derived), "detail": (missing + duplicated + wrong + incomplete)[:20],
        }


def print_audit(audit: dict) -> None:
    c, o, m = audit["campaign"], audit["outage"], audit["resources"]
    print(f"\n## Soak audit: {'PASS' if audit['passed'] else 'FAIL'}\n\nload: {c['associations']} associations x "
          f"{c['series']} series x {c['slices']} slices; quiet period {c['quiet_period_s']:g} s; outage "
          f"{c['outage_s']:g} s at {c['outage_at_s']:g} s; seed {c['seed']}; {c['load_to_quiescent_s']} s from the "
          f"first association to quiescence; code {audit.get('code', {}).get('commit', '?')}")
    for section in ("instances", "results"):
        print(f"\n| {section} | count |\n|---|---:|")
        print("\n".join(f"| {k.replace('_', ' ')} | {v} |" for k, v in audit[section].items() if isinstance(v, int)))
    r, k = audit["results"], audit["kills"]
    print(f"\nC-STORE statuses seen by the senders: {audit['instances']['statuses']}; job states {r['job_states']};"
          f" deliveries {r['deliveries']}; failed jobs: {r['failed_jobs'] or 'none'}")
    print(f"kills: {k['count']} (aimed {k['aimed']}; hit {k['hit']}); recovery (process start to port open) median "
          f"{k['recovery_s_median']} s, max {k['recovery_s_max']} s")
    print(f"outage: {o}\nresources: peak RSS of serve {m['peak_rss_serve_mib']} MiB; spool {m['spool_files']} files, "
          f"{m['spool_bytes'] / 2**20:.1f} MiB ({m['spool_disk_bytes'] / 2**20:.1f} MiB on disk); state "
          f"{m['state_bytes'] / 2**20:.1f} MiB")
    for line in [*audit["instances"]["lost_detail"], *r["detail"], *c["notes"]]:
        print(f"  ! {line}")


def run_campaign(c: Campaign, work: Path | None = None, keep: bool = False) -> dict:
    """Run one campaign in ``work`` (default: a new temporary folder, removed after a pass unless
    ``keep``) and return its audit."""
    folder = work or Path(tempfile.mkdtemp(prefix="ian-node-soak-"))
    folder.mkdir(parents=True, exist_ok=True)
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "describe", "--always", "--dirty"], capture_output=True, text=True).stdout
    changed = subprocess.run([*git, "status", "--short", "--", "ian_node", "model"], capture_output=True, text=True)
    audit = Soak(c, folder).run()
    audit.update(work=str(folder), code={"commit": commit.strip(), "uncommitted": changed.stdout.splitlines()})
    if audit["passed"] and not keep and work is None:
        shutil.rmtree(folder, ignore_errors=True)
    return audit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the test suite's campaign")
    ints = ("associations", "series", "slices", "kills", "hits_per_stage", "seed")
    seconds = ("outage", "outage_at", "quiet_period", "time_limit")
    for name in ints + seconds:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int if name in ints else float)
    parser.add_argument("--work", type=Path, help="work folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder after a pass")
    parser.add_argument("--json", type=Path, help="also write the audit here")
    args = parser.parse_args(argv)
    overrides = {**{k: getattr(args, k) for k in ints}, **{f"{k}_s": getattr(args, k) for k in seconds}}
    c = replace(QUICK if args.quick else FULL, **{k: v for k, v in overrides.items() if v is not None})
    print(f"soak: {c.associations} x {c.series * c.slices} instances, >= {c.kills} kills, outage {c.outage_s:g} s; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    audit = run_campaign(c, args.work, args.keep)
    print_audit(audit)
    print(f"\nwork folder: {audit['work']}" + ("" if Path(audit["work"]).exists() else " (removed)"))
    if args.json:
        args.json.write_text(json.dumps(audit, indent=2, default=str))
    return 0 if audit["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
