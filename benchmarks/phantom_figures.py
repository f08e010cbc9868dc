"""The pictures of docs/phantoms.md: phantom slices with the ground truth outlined and the crop boxes drawn.

    python benchmarks/phantom_figures.py                      # docs/images/phantoms/*.png, ~1 min
    python benchmarks/phantom_figures.py --paper-patients 0 12 32 --out-dir /tmp/figs

For each chosen `paper` patient (and one `small` patient) one PNG: an axial slice and a coronal
reformat through the nerves, each ground-truth IAN outlined (right orange, left cyan), each side's
crop box (the paper's manual crop, `Phantom.crop_boxes`, LPS mm) drawn where it cuts the plane, and
the coronal plane zoomed into the box of the side with more nerve in that plane. The boxes are mapped through the volume affine: every
pixel centre of the plane goes to LPS and is tested with `PatientBox.contains`, so a slightly oblique
acquisition or a head rotation draws exactly what the crop keeps. The axial slice is the one with the
most nerve voxels; the coronal plane is the row (anterior-posterior index) with the most nerve voxels,
which passes through the rami where the nerve runs down to the mandibular foramen. Images are shown
in radiological convention (patient right on the viewer's left), millimetres on both axes. Each
PNG is saved with a small fixed palette (grey levels plus the outline colours) to stay small.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ian_node.phantom.study import Phantom, generate_phantom, phantom_preset  # noqa: E402
from ian_node.segment.reformat import PatientBox  # noqa: E402

NERVE_COLOURS = {1: "#ff8c1a", 2: "#22d3ee"}  # right, left
BOX_COLOURS = {"right": "#facc15", "left": "#4ade80"}


@dataclass(frozen=True)
class Plane:
    """One 2-D cut of the volume: image, labels, the LPS point of every pixel and the pixel size."""

    image: np.ndarray
    labels: np.ndarray
    lps: np.ndarray  # (rows, cols, 3)
    spacing: tuple[float, float]  # (vertical, horizontal) mm
    title: str


def _lps(affine: np.ndarray, k: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    idx = np.stack(np.broadcast_arrays(k, i, j), axis=-1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def axial_plane(phantom: Phantom, k: int) -> Plane:
    """Slice `k` of the acquisition: rows anterior→posterior, columns right→left."""
    vol = np.asarray(phantom.volume.array)
    _, rows, cols = vol.shape
    ss, rs, cs = (float(v) for v in phantom.volume.spacing)
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    lps = _lps(np.asarray(phantom.volume.affine), np.full_like(i, k), i, j)
    return Plane(vol[k], phantom.labels[k], lps, (rs, cs), f"axial, slice {k} of {vol.shape[0]}")


def coronal_plane(phantom: Phantom, i: int) -> Plane:
    """Row `i` of every slice: vertical superior→inferior (slice order), columns right→left."""
    vol = np.asarray(phantom.volume.array)
    slices, _, cols = vol.shape
    ss, rs, cs = (float(v) for v in phantom.volume.spacing)
    k, j = np.meshgrid(np.arange(slices), np.arange(cols), indexing="ij")
    lps = _lps(np.asarray(phantom.volume.affine), k, np.full_like(k, i), j)
    return Plane(vol[:, i, :], phantom.labels[:, i, :], lps, (ss, cs), f"coronal reformat, row {i} of {vol.shape[1]}")


def nerve_planes(phantom: Phantom) -> tuple[int, int]:
    """The axial slice and the coronal row that hold the most nerve voxels."""
    nerve = phantom.labels > 0
    return int(np.argmax(nerve.sum(axis=(1, 2)))), int(np.argmax(nerve.sum(axis=(0, 2))))


def draw_plane(ax: Axes, plane: Plane, boxes: dict[str, PatientBox], window: tuple[float, float],
               zoom: PatientBox | None = None) -> None:
    """Image in mm, nerve outlines, box outlines; `zoom` limits the view to that box's cut."""
    h, w = plane.image.shape
    dv, dh = plane.spacing
    y, x = np.arange(h) * dv, np.arange(w) * dh
    ax.imshow(plane.image, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest",
              extent=(-dh / 2, (w - 0.5) * dh, (h - 0.5) * dv, -dv / 2))
    for label, colour in NERVE_COLOURS.items():
        mask = plane.labels == label
        if mask.any():
            ax.contour(x, y, mask.astype(np.float32), levels=[0.5], colors=colour,
                       linewidths=0.6 if zoom is None else 0.8)
    for name, box in boxes.items():
        inside = box.contains(plane.lps)
        if inside.any():
            ax.contour(x, y, inside.astype(np.float32), levels=[0.5], colors=BOX_COLOURS[name],
                       linewidths=0.9, linestyles="--")
    if zoom is not None:
        rows, cols = np.nonzero(zoom.contains(plane.lps))
        if rows.size:
            ax.set_xlim(cols.min() * dh - 2, cols.max() * dh + 2)
            ax.set_ylim(rows.max() * dv + 2, rows.min() * dv - 2)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=6, length=2)
    ax.set_title(plane.title, fontsize=8)


def pose_text(phantom: Phantom) -> str:
    p = phantom.params
    rot = ", ".join(f"{v:+.1f}" for v in p["head_rotation_deg"])
    off = ", ".join(f"{v:+.1f}" for v in p["offset_mm"])
    oblique = f", oblique {p['oblique_deg']:.1f}°" if p["oblique_deg"] else ""
    return f"head_rotation_deg ({rot}), offset_mm ({off}), head_scale {p['head_scale']:.2f}{oblique}"


def _palette_png(image: Image.Image, greys: int, path: Path) -> None:
    """Save with a fixed palette (`greys` grey levels plus the outline colours), so lines keep their colour."""
    colours = [tuple(int(c[k:k + 2], 16) for k in (1, 3, 5)) for c in (*NERVE_COLOURS.values(), *BOX_COLOURS.values())]
    levels = np.linspace(0, 255, greys).round().astype(int)
    entries = [(int(v), int(v), int(v)) for v in levels] + colours
    palette = Image.new("P", (1, 1))
    palette.putpalette([c for rgb in entries for c in rgb] + [0] * 3 * (256 - len(entries)))
    image.quantize(palette=palette, dither=Image.Dither.NONE).save(path, optimize=True)


def figure(phantom: Phantom, preset: str, path: Path, dpi: int, colours: int) -> dict:
    """Write one patient's PNG and return what the caption needs."""
    k, i = nerve_planes(phantom)
    axial, coronal = axial_plane(phantom, k), coronal_plane(phantom, i)
    vol = np.asarray(phantom.volume.array)
    window = (float(np.percentile(vol, 1)), float(np.percentile(vol, 99.7)))
    boxes = phantom.crop_boxes
    fig, axes = plt.subplots(1, 3, figsize=(11, 4.1), gridspec_kw={"width_ratios": [1.0, 1.0, 0.62]})
    draw_plane(axes[0], axial, boxes, window)
    axes[0].set_xlabel("R ← column (mm) → L", fontsize=7)
    axes[0].set_ylabel("A ← row (mm) → P", fontsize=7)
    draw_plane(axes[1], coronal, boxes, window)
    axes[1].set_xlabel("R ← column (mm) → L", fontsize=7)
    axes[1].set_ylabel("S ← slice (mm) → I", fontsize=7)
    side = "right" if np.count_nonzero(coronal.labels == 1) >= np.count_nonzero(coronal.labels == 2) else "left"
    draw_plane(axes[2], coronal, {side: boxes[side]}, window, zoom=boxes[side])
    axes[2].set_title(f"coronal, {side} crop box", fontsize=8)
    handles = [Line2D([], [], color=NERVE_COLOURS[1], lw=1.2, label="right IAN (GT)"),
               Line2D([], [], color=NERVE_COLOURS[2], lw=1.2, label="left IAN (GT)"),
               Line2D([], [], color=BOX_COLOURS["right"], lw=1.2, ls="--", label="right crop box"),
               Line2D([], [], color=BOX_COLOURS["left"], lw=1.2, ls="--", label="left crop box")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"{preset} preset, seed {phantom.seed} patient {phantom.patient_index}: {pose_text(phantom)}",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    buf.seek(0)
    _palette_png(Image.open(buf).convert("RGB"), colours, path)
    p = phantom.params
    return {"file": path.name, "preset": preset, "seed": phantom.seed, "patient": phantom.patient_index,
            "axial_slice": k, "coronal_row": i, "shape": list(vol.shape),
            "spacing_mm": [float(v) for v in phantom.volume.spacing],
            "head_rotation_deg": list(p["head_rotation_deg"]), "offset_mm": list(p["offset_mm"]),
            "head_scale": p["head_scale"], "oblique_deg": p["oblique_deg"], "metals": len(p["metals"]),
            "motion": p["motion"], "anterior_loop": {"right": p["right"]["anterior_loop"],
                                                     "left": p["left"]["anterior_loop"]},
            "bytes": path.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=13, help="phantom seed (default 13)")
    parser.add_argument("--paper-patients", type=int, nargs="+", default=[0, 12, 32],
                        help="paper-preset patients to draw; the first is the reference pose (default 0 12 32)")
    parser.add_argument("--small-patients", type=int, nargs="*", default=[0],
                        help="small-preset patients to draw (default 0)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "images" / "phantoms")
    parser.add_argument("--json", type=Path, default=None, help="also write each figure's caption facts here")
    parser.add_argument("--dpi", type=int, default=100, help="figure resolution (default 100)")
    parser.add_argument("--colours", type=int, default=64, help="grey levels in the PNG palette (default 64)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    captions = []
    for preset, patients in (("paper", args.paper_patients), ("small", args.small_patients)):
        for index in patients:
            phantom = generate_phantom(index, args.seed, phantom_preset(preset))
            path = args.out_dir / f"{preset}_s{args.seed}_p{index}.png"
            caption = figure(phantom, preset, path, args.dpi, args.colours)
            captions.append(caption)
            print(f"{path} ({caption['bytes'] / 1000:.0f} kB): axial slice {caption['axial_slice']}, "
                  f"coronal row {caption['coronal_row']}; {pose_text(phantom)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(captions, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
