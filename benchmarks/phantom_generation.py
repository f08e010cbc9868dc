"""How long one phantom patient takes to generate on one core, and its peak memory, per preset.

    python benchmarks/phantom_generation.py                      # 5 patients per preset, ~2 min
    python benchmarks/phantom_generation.py --patients 3 --write --out phantom_generation.json

Each (patient, preset) runs in a fresh Python process pinned to one CPU (`os.sched_setaffinity`) with
OMP/OpenBLAS/MKL threads set to 1 before numpy is imported, so one preset's allocations cannot inflate
the other's peak and no library uses a second core. The presets alternate patient by patient, so the
paper/small ratio is measured side by side under the same machine load. Time is the wall clock of
`generate_phantom` alone (imports excluded) and the child's CPU time; memory is the child's peak resident
set (`ru_maxrss` from `os.wait4`), which includes the interpreter and its imports (reported apart).
`--write` also times writing the study (MR series, SEG, summary.json) to a temporary folder, as
`ian-node phantom` does; the peak then covers the write too. Issue 13's target for one `paper`
patient: at most 30 s on one core and a peak under 3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
TARGET_PAPER_S = 30.0
TARGET_PAPER_PEAK_GB = 3.0


@dataclass(frozen=True)
class Run:
    """One patient of one preset, measured in its own process."""

    preset: str
    patient: int
    generate_s: float
    generate_cpu_s: float  # CPU time of `generate_phantom` alone (robust when other work shares the core)
    write_s: float | None
    cpu_s: float  # the child's user + system time, whole process
    import_peak_gb: float  # resident peak after the imports, before generation
    generate_peak_gb: float  # resident peak after generation (before any write)
    peak_gb: float  # the child's overall resident peak (os.wait4)
    shape: tuple[int, int, int]


def _child(preset: str, patient: int, seed: int, cpu: int, write: bool) -> None:
    """Runs in the measured process: pin, import, generate (and write), report JSON on stdout."""
    os.sched_setaffinity(0, {cpu})
    import resource

    sys.path.insert(0, str(ROOT))
    from ian_node.phantom.study import generate_phantom, phantom_preset, write_phantom

    def peak_gb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9

    config = phantom_preset(preset)
    imported = peak_gb()
    started, cpu_started = time.perf_counter(), time.process_time()
    phantom = generate_phantom(patient, seed, config)
    generate_s, generate_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    generated = peak_gb()
    write_s = None
    if write:
        with tempfile.TemporaryDirectory(prefix="phantom-bench-") as tmp:
            started = time.perf_counter()
            write_phantom(phantom, Path(tmp) / "p")
            write_s = time.perf_counter() - started
    print(json.dumps({"generate_s": generate_s, "generate_cpu_s": generate_cpu_s, "write_s": write_s, "import_peak_gb": imported,
                      "generate_peak_gb": generated, "shape": list(phantom.volume.spatial_shape)}))


def measure(preset: str, patient: int, seed: int, cpu: int, write: bool) -> Run:
    """Run one patient in a fresh single-threaded process pinned to `cpu` and read its rusage."""
    env = dict(os.environ, **{name: "1" for name in THREAD_VARS})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", preset, "--seed", str(seed),
           "--patient", str(patient), "--cpu", str(cpu)] + (["--write"] if write else [])
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # reaps the child itself: its own rusage, not a sum
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{preset} patient {patient}: child exited {proc.returncode}:\n{err.read()[-2000:]}")
        report = json.loads(out.read().strip().splitlines()[-1])
    return Run(preset, patient, report["generate_s"], report["generate_cpu_s"], report["write_s"], usage.ru_utime + usage.ru_stime,
               report["import_peak_gb"], report["generate_peak_gb"], usage.ru_maxrss * 1024 / 1e9,
               tuple(report["shape"]))


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "max": max(values), "min": min(values)}


def summarise(runs: list[Run], presets: list[str], write: bool) -> dict:
    """Median/max per preset and the paper/small ratios (of medians, and the median of per-patient ratios)."""
    out: dict = {}
    for preset in presets:
        mine = [r for r in runs if r.preset == preset]
        out[preset] = {key: _stats([getattr(r, key) for r in mine])
                       for key in ("generate_s", "generate_cpu_s", "cpu_s", "import_peak_gb", "generate_peak_gb",
                                   "peak_gb")}
        if write:
            out[preset]["write_s"] = _stats([r.write_s or 0.0 for r in mine])
        out[preset]["shape"] = list(mine[0].shape)
    if {"paper", "small"} <= set(presets):
        pairs = [(p, s) for p in runs if p.preset == "paper" for s in runs
                 if s.preset == "small" and s.patient == p.patient]
        out["paper_over_small"] = {
            key: {"of_medians": out["paper"][key]["median"] / out["small"][key]["median"],
                  "median_per_patient": statistics.median(getattr(p, key) / getattr(s, key) for p, s in pairs)}
            for key in ("generate_s", "generate_cpu_s", "cpu_s", "peak_gb") + (("write_s",) if write else ())
        }
    if "paper" in out:
        paper = out["paper"]
        out["targets"] = {"paper_max_generate_s": TARGET_PAPER_S, "paper_max_peak_gb": TARGET_PAPER_PEAK_GB,
                          "time_met_wall": paper["generate_s"]["max"] <= TARGET_PAPER_S,
                          "time_met_cpu": paper["generate_cpu_s"]["max"] <= TARGET_PAPER_S,
                          "wall_over_cpu": paper["generate_s"]["median"] / paper["generate_cpu_s"]["median"],
                          "memory_met": paper["peak_gb"]["max"] < TARGET_PAPER_PEAK_GB}
    return out


def table(summary: dict, presets: list[str], write: bool) -> str:
    """A Markdown table: medians and maxima per preset, then the ratio row."""
    cols = [("generate_s", "generate wall (s)"), ("generate_cpu_s", "generate CPU (s)")]
    cols += [("write_s", "write (s)")] if write else []
    cols += [("peak_gb", "peak RSS (GB)"), ("import_peak_gb", "of which imports (GB)")]
    head = "| preset | shape | " + " | ".join(f"{label} median / max" for _, label in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for preset in presets:
        s = summary[preset]
        cells = [f"{s[key]['median']:.2f} / {s[key]['max']:.2f}" for key, _ in cols]
        lines.append(f"| {preset} | {'x'.join(map(str, s['shape']))} | " + " | ".join(cells) + " |")
    if "paper_over_small" in summary:
        r = summary["paper_over_small"]
        cells = [f"{r[key]['of_medians']:.1f}x" if key in r else "" for key, _ in cols]
        lines.append("| paper / small | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=5, help="patients per preset (default 5)")
    parser.add_argument("--seed", type=int, default=13, help="phantom seed (default 13)")
    parser.add_argument("--presets", nargs="+", default=["small", "paper"], choices=["small", "paper"],
                        help="presets to compare, alternated patient by patient (default: small paper)")
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the last allowed one)")
    parser.add_argument("--write", action="store_true", help="also time writing the DICOM study")
    parser.add_argument("--out", type=Path, default=None, help="write the runs and summary as JSON here")
    parser.add_argument("--child", metavar="PRESET", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--patient", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    if args.child:
        _child(args.child, args.patient, args.seed, cpu, args.write)
        return 0
    if args.patients < 1:
        parser.error(f"--patients must be >= 1, got {args.patients}")
    runs: list[Run] = []
    load_before = os.getloadavg()
    for patient in range(args.patients):
        for preset in args.presets:
            run = measure(preset, patient, args.seed, cpu, args.write)
            runs.append(run)
            extra = f", write {run.write_s:.2f} s" if run.write_s is not None else ""
            print(f"{preset:>5} patient {patient}: generate {run.generate_s:.2f} s (CPU {run.generate_cpu_s:.2f} s)"
                  f"{extra}, peak {run.peak_gb:.2f} GB", flush=True)
    summary = summarise(runs, args.presets, args.write)
    print()
    print(table(summary, args.presets, args.write))
    if "targets" in summary:
        t = summary["targets"]
        verdict = {True: "met", False: "MISSED"}
        print(f"\nissue 13 targets for one paper patient: <= {t['paper_max_generate_s']:.0f} s on one core "
              f"(wall clock {verdict[t['time_met_wall']]}, CPU time {verdict[t['time_met_cpu']]}), "
              f"peak < {t['paper_max_peak_gb']:.0f} GB ({verdict[t['memory_met']]})")
        if t["wall_over_cpu"] > 1.2:
            print(f"the pinned core was shared: wall clock / CPU time = {t['wall_over_cpu']:.2f} "
                  f"(load average {os.getloadavg()[0]:.1f}); the CPU time is what one free core would take")
    if args.out:
        doc = {"seed": args.seed, "patients": args.patients, "cpu": cpu, "write": args.write,
               "machine": {"python": platform.python_version(), "processor": platform.processor(),
                           "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()},
               "summary": summary, "runs": [asdict(r) for r in runs]}
        args.out.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
