"""Turnaround with and without concluding a series on its stated size (``series.settle_on_stated_size``).

    python benchmarks/completion.py                 # 3 series after 1 warm-up per mode, quiet period 10 s
    python benchmarks/completion.py --series 5 --quiet 10 --preset demo --crop auto

The same phantom series (``ImagesInAcquisition`` and ``AcquisitionNumber`` written into every
instance, as scanners do) are sent by dcmtk ``storescu`` over loopback to an in-process node, first
with the stated size ignored (the quiet period concludes each series), then with it used; each mode
has its own node and state, and a first series warms it up and is not counted. The turnaround is
``benchmarks/node.py``'s: from the last instance committed to the SEG confirmed by a dcmtk
``storescp`` destination, with the same per-stage split. Medians and their ratio are printed as
Markdown.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
from pathlib import Path

import pydicom
import torch

from ian_node.app.node import Node
from ian_node.config import (
    CropConfig,
    DicomConfig,
    DicomTarget,
    ExportConfig,
    ModelConfig,
    NodeConfig,
    SeriesConfig,
    StorageConfig,
)
from ian_node.phantom.study import generate_phantom, phantom_preset, write_phantom
from model.checkpoint import BUNDLED_CHECKPOINT


def _load_node_benchmark():  # type: ignore[no-untyped-def]
    """benchmarks/node.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("ian_node_bench_node", Path(__file__).with_name("node.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_node_benchmark()


def stated_series(root: Path, count: int, preset: str) -> list[tuple[str, list[Path]]]:
    """``count`` phantom series whose instances state ImagesInAcquisition (one acquisition)."""
    out = []
    for patient in range(count):
        files = write_phantom(generate_phantom(patient, 0, phantom_preset(preset)), root / f"series-{patient}")
        for path in files.instances:
            ds = pydicom.dcmread(path)
            ds.ImagesInAcquisition = len(files.instances)
            ds.AcquisitionNumber = 1
            ds.save_as(path, enforce_file_format=True)
        out.append((files.series_uid, list(files.instances)))
    return out


def run_mode(root: Path, series: list[tuple[str, list[Path]]], stated: bool, args: argparse.Namespace) -> list[dict[str, float]]:
    """Every series through one fresh node; the per-series seconds of benchmarks/node.py."""
    mode = "stated" if stated else "quiet"
    with bench._storescp(root / f"pacs-{mode}") as dest_port:
        config = NodeConfig(
            dicom=DicomConfig(ae_title=bench.NODE_AE, port=0),
            storage=StorageConfig(spool_dir=root / f"node-{mode}" / "spool",
                                  state_path=root / f"node-{mode}" / "state.sqlite3"),
            series=SeriesConfig(quiet_period_s=args.quiet, settle_on_stated_size=stated,
                                stated_size_min_slices=5),
            model=ModelConfig(checkpoint=args.checkpoint, device=args.device, threads=args.threads),
            crop=CropConfig(mode=args.crop),
            export=ExportConfig(targets=(DicomTarget(name="pacs", ae_title=bench.DEST_AE, host="127.0.0.1",
                                                     port=dest_port),)),
        )
        node = Node(config)
        node.start()
        try:
            node.worker.predictor  # noqa: B018 (loaded once, before timing)
            return [bench._measure_one(node, files, uid).seconds for uid, files in series]
        finally:
            node.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=3, help="series measured per mode (after 1 warm-up)")
    parser.add_argument("--quiet", type=float, default=10.0, help="quiet period (s): the node's default")
    parser.add_argument("--preset", default="small", help="phantom preset (small, demo, paper)")
    parser.add_argument("--crop", default="half", help="crop mode (half needs no localiser; auto: demo preset)")
    parser.add_argument("--checkpoint", type=Path, default=BUNDLED_CHECKPOINT)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for inference")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TCP_NODELAY", "1")
    with tempfile.TemporaryDirectory(prefix="ian-node-completion-") as tmp:
        root = Path(tmp)
        series = stated_series(root, args.series + 1, args.preset)
        quiet = run_mode(root, series, stated=False, args=args)[1:]
        stated = run_mode(root, series, stated=True, args=args)[1:]
    keys = ("quiet", "queue", "inference", "export", "turnaround")
    med = {mode: {k: statistics.median(r[k] for r in runs) for k in keys}
           for mode, runs in (("quiet", quiet), ("stated", stated))}
    shape = "×".join(map(str, phantom_preset(args.preset).shape))
    print(f"\n## Turnaround: {shape} `{args.preset}` phantom series, crop {args.crop}, {args.checkpoint.name} on "
          f"{args.device} ({args.threads} thread(s)), quiet period {args.quiet:g} s; median of {args.series} series "
          f"per mode after 1 warm-up ({bench.machine()})\n")
    print("| seconds (median) | quiet period only | concluded on stated size |")
    print("|---|---:|---:|")
    labels = {"quiet": "last instance → job queued", "queue": "job queued → worker starts",
              "inference": "inference", "export": "export (until confirmed)", "turnaround": "**turnaround**"}
    for key, label in labels.items():
        print(f"| {label} | {med['quiet'][key]:.2f} | {med['stated'][key]:.2f} |")
    ratio = med["quiet"]["turnaround"] / med["stated"]["turnaround"]
    print(f"\n- ratio (quiet period only / stated size): **{ratio:.1f}×**; saved "
          f"{med['quiet']['turnaround'] - med['stated']['turnaround']:.2f} s per series")
    for mode, runs in (("quiet period only", quiet), ("stated size", stated)):
        print(f"- {mode}, per series (turnaround): " + ", ".join(f"{r['turnaround']:.2f}" for r in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
