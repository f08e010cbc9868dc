"""`ian-node predict`: files in, SEG out, no network, for scripts and research.

It applies the node's selection rules by default (modality, localizers and scouts, one volume of at
least two slices), so a file-in run answers as the node would; `--any-modality` lifts the modality
rule for research on other image types. It says what it found and what it ignored.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from ian_node.config import SeriesConfig

logger = logging.getLogger(__name__)


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment DICOM files or a folder into a SEG file (no network)")
    p.add_argument("inputs", type=Path, nargs="+", help="DICOM files and/or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="SEG file to write")
    p.add_argument("--series", default=None, help="SeriesInstanceUID to use when the inputs hold several")
    p.add_argument("--checkpoint", type=Path, default=None, help="model checkpoint (default: the bundled one)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--any-modality", action="store_true",
                   help="segment image series of any modality (the node's rule: MR only)")
    p.set_defaults(func=run_predict)


@dataclass
class Found:
    """What the inputs hold: image series by UID, and counts of what was ignored and why."""

    series: dict[str, list[Path]] = field(default_factory=dict)
    headers: dict[str, list[Dataset]] = field(default_factory=dict)
    ignored: Counter[str] = field(default_factory=Counter)

    def ignored_text(self) -> str:
        """E.g. "1 SEG ignored, 2 files are not DICOM"."""
        parts = []
        for what, n in sorted(self.ignored.items()):
            if what == NOT_DICOM:
                parts.append(f"{n} file{'s are' if n > 1 else ' is'} not DICOM")
            else:
                parts.append(f"{n} {what} ignored")
        return ", ".join(parts)


NOT_DICOM = "not DICOM"


def find_series(inputs: list[Path]) -> Found:
    """Read every file's header once; group the image series, count the rest by kind."""
    found = Found()
    for root in inputs:
        if not root.exists():
            raise InputError(f"{root} does not exist")
        files = sorted(x for x in root.rglob("*") if x.is_file()) if root.is_dir() else [root]
        if root.is_dir() and not files:
            raise InputError(f"{root} is an empty folder")
        for path in files:
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, RecursionError):
                found.ignored[NOT_DICOM] += 1
                continue
            modality = str(ds.get("Modality", ""))
            if modality in ("SEG", "SR", "PR", "KO", "RTSTRUCT") or "PixelData" not in ds and "Rows" not in ds:
                found.ignored[modality or "non-image instance"] += 1
                continue
            uid = str(ds.get("SeriesInstanceUID", ""))
            found.series.setdefault(uid, []).append(path)
            found.headers.setdefault(uid, []).append(ds)
    return found


class InputError(ValueError):
    """The inputs hold nothing predict can segment; the message says what was found."""


def _selected(found: Found, args: argparse.Namespace) -> tuple[str, list[Path]]:
    """The one image series to segment, after the node's selection rules; InputError otherwise."""
    from ian_node.jobs.completion import volume_skip_reason  # the node's own rules, not a copy

    ignored = found.ignored_text()
    listing = {uid: paths for uid, paths in found.series.items() if args.series in (None, uid)}
    if not listing:
        what = f"no image series {args.series}" if args.series else "no image series"
        raise InputError(f"{what} in the inputs" + (f" ({ignored})" if ignored else ""))
    if len(listing) > 1:
        names = ", ".join(f"{uid} ({len(paths)} files)" for uid, paths in listing.items())
        raise InputError(f"{len(listing)} image series found, choose one with --series: {names}")
    (uid, paths), = listing.items()
    rules = SeriesConfig(min_slices=2)
    modality = str(found.headers[uid][0].get("Modality", ""))
    if not args.any_modality and modality not in rules.modalities:
        raise InputError(f"series {uid} is {modality or 'without a modality'}, not {'/'.join(rules.modalities)} "
                         "(--any-modality segments it anyway)")
    reason = volume_skip_reason(found.headers[uid], rules)
    if reason is not None:
        raise InputError(f"series {uid} is not segmented: {reason}")
    return uid, paths


def run_predict(args: argparse.Namespace) -> int:
    from ian_node.config import ModelConfig
    from ian_node.segment.pipeline import failure_message, segment_series
    from ian_node.segment.result import load_predictor, result_segmentation
    from ian_node.segment.volume import SeriesError

    try:
        found = find_series(args.inputs)
        uid, paths = _selected(found, args)
    except InputError as exc:
        print(f"ian-node predict: {exc}", file=sys.stderr)
        return 2
    if found.ignored:
        print(f"ian-node predict: {found.ignored_text()}", file=sys.stderr)
    predictor = load_predictor(ModelConfig(checkpoint=args.checkpoint, device=args.device))
    if args.checkpoint is None:
        print(f"model: {predictor.checkpoint.meta.label}", file=sys.stderr)
    try:
        result = segment_series(paths, predictor)
        seg = result_segmentation(result, 1, predictor.checkpoint)
    except SeriesError as exc:
        print(f"ian-node predict: {failure_message(exc)}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(args.out, enforce_file_format=True)
    print(f"series {uid}: {len(paths)} files -> {args.out}; "
          + ", ".join(f"{k} IAN {v} voxels" for k, v in result.voxels.items()) + "; "
          + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
    return 0
