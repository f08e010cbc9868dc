"""`ian-node predict`: files in, SEG out, no network, for scripts and research."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment DICOM files or a folder into a SEG file (no network)")
    p.add_argument("inputs", type=Path, nargs="+", help="DICOM files and/or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="SEG file to write")
    p.add_argument("--series", default=None, help="SeriesInstanceUID to use when the inputs hold several")
    p.add_argument("--checkpoint", type=Path, default=None, help="model checkpoint (default: the bundled one)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from ian_node.config import ModelConfig
    from ian_node.segment.pipeline import segment_series
    from ian_node.segment.result import load_predictor, result_segmentation

    files = [f for p in args.inputs for f in (sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p])]
    by_series: dict[str, list[Path]] = {}
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as exc:
            logger.warning("skipping %s: not a readable DICOM file (%s)", path, exc)
            continue
        if ds.get("Modality") == "SEG":
            continue
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(path)
    if args.series is not None:
        by_series = {k: v for k, v in by_series.items() if k == args.series}
    if len(by_series) != 1:
        found = ", ".join(f"{k} ({len(v)} files)" for k, v in by_series.items()) or "none"
        print(f"ian-node predict: need exactly one image series (use --series); found: {found}", file=sys.stderr)
        return 2
    (uid, paths), = by_series.items()
    predictor = load_predictor(ModelConfig(checkpoint=args.checkpoint, device=args.device))
    result = segment_series(paths, predictor)
    seg = result_segmentation(result, 1, predictor.checkpoint)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(args.out, enforce_file_format=True)
    print(f"series {uid}: {len(paths)} files -> {args.out}; "
          + ", ".join(f"{k} IAN {v} voxels" for k, v in result.voxels.items()) + "; "
          + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
    return 0
