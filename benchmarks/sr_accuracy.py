"""How close are the SR's figures to the phantom truth? Length, volume and diameter on ground-truth masks.

    python benchmarks/sr_accuracy.py                              # 8 demo phantoms (seed 5), ~1 min on 2 cores
    python benchmarks/sr_accuracy.py --preset paper --patients 3  # the paper's finer voxels
    python benchmarks/sr_accuracy.py --json out.json

For each phantom, each side's ground-truth label (the phantom's annotation: spherical brush strokes
along the nerve's course) is measured by `ian_node.segment.measure.measure_labels`, exactly what
`build_measurement_report` records, and compared with what the generator knows:

- length against the generator's nerve centreline inside the field of view
  (``nerve_length_in_fov_mm``), signed error in percent;
- volume against the label's own voxel volume (the SR reports voxel count x voxel volume, so this
  only checks the bookkeeping: it must be 0 %);
- mean equivalent diameter against the annotation brush's nominal diameter (2 x inset x nerve radius
  at the mandibular foramen; the nerve tapers by up to ~15 % towards the mental foramen, so the
  measured mean is expected slightly below it);
- the region lengths (ramus, body, anterior loop / mental foramen) and the time per side.
Prints a Markdown table (docs/sr.md has one) and a summary line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ian_node.phantom.study import generate_phantom, phantom_preset
from ian_node.segment.measure import Region, measure_tract


def measure_phantom(preset: str, seed: int, patient: int) -> list[dict[str, Any]]:
    phantom = generate_phantom(patient, seed, phantom_preset(preset))
    rows = []
    for side, label in (("right", 1), ("left", 2)):
        mask = phantom.labels == label
        start = time.perf_counter()
        m = measure_tract(mask, phantom.volume.affine)
        seconds = time.perf_counter() - start
        if m is None:
            continue
        params = phantom.params[side]
        true_length = float(phantom.params["nerve_length_in_fov_mm"][side])
        true_volume = float(np.count_nonzero(mask) * phantom.volume.voxel_volume)
        brush = 2 * params["annotation_inset"] * params["nerve_radius_mm"]
        rows.append({
            "patient": patient, "side": side,
            "length_mm": m.length_mm, "true_length_mm": true_length,
            "length_error_pct": 100 * (m.length_mm / true_length - 1),
            "volume_mm3": m.volume_mm3, "true_volume_mm3": true_volume,
            "volume_error_pct": 100 * (m.volume_mm3 / true_volume - 1),
            "mean_diameter_mm": m.mean_diameter_mm, "min_diameter_mm": m.min_diameter_mm,
            "brush_diameter_mm": brush,
            "regions_mm": {r.name.lower(): m.region(r).length_mm for r in Region},
            "seconds": seconds,
        })
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| patient | side | length (mm) | true (mm) | error | volume (mm³) | label (mm³) | error "
             "| mean / min diameter (mm) | brush (mm) | ramus / body / mental (mm) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reg = r["regions_mm"]
        lines.append(
            f"| {r['patient']} | {r['side']} | {r['length_mm']:.1f} | {r['true_length_mm']:.1f} "
            f"| {r['length_error_pct']:+.1f}% | {r['volume_mm3']:.0f} | {r['true_volume_mm3']:.0f} "
            f"| {r['volume_error_pct']:+.1f}% | {r['mean_diameter_mm']:.2f} / {r['min_diameter_mm']:.2f} "
            f"| {r['brush_diameter_mm']:.2f} | {reg['ramus']:.0f} / {reg['body']:.0f} / {reg['mental']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", help="phantom preset (demo, paper, small)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="write every row as JSON")
    args = parser.parse_args()
    rows = [row for patient in range(args.patients) for row in measure_phantom(args.preset, args.seed, patient)]
    print(_table(rows))
    errors = [abs(r["length_error_pct"]) for r in rows]
    diam = [r["mean_diameter_mm"] / r["brush_diameter_mm"] - 1 for r in rows]
    print(f"\n{args.preset} seed {args.seed}, {len(rows)} nerves: |length error| median {statistics.median(errors):.1f}% "
          f"max {max(errors):.1f}%; volume error max {max(abs(r['volume_error_pct']) for r in rows):.1f}%; "
          f"mean diameter vs brush median {100 * statistics.median(diam):+.1f}%; "
          f"time per side median {statistics.median(r['seconds'] for r in rows):.2f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
