"""Overlay pictures of a job's result: for each side, the axial, coronal and sagittal slices through
the centroid of that side's label, with the SEG outlined on the source image.

They are what an operator looks at to judge a result without a viewer, so they are drawn the way a
radiologist reads them: the volume is turned to the patient axes nearest its own (highdicom's
``to_patient_orientation``: a permutation and flips of the voxel axes, no resampling), the patient's
right is on the image's left, anterior is up in axial slices and superior up in the others, and the
pixel spacing sets the aspect. Each picture is cropped around the side's nerve (its extent in that
plane plus :data:`MARGIN_MM`, at least :data:`MIN_FIELD_MM`) so that a 3 mm nerve is visible.

Rendering reads the whole series and the SEG, so the PNGs are cached in the spool next to the
result (``results/job-<id>-overlays/<side>-<plane>.png``), written atomically, and drawn again when
missing or older than the result. Matplotlib's object API (no pyplot) on the Agg canvas: no display,
no global figure state, safe in a server thread.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ian_node.logs import exception_text
from ian_node.segment.seg import read_segmentation_labels
from ian_node.segment.volume import Side, load_series
from ian_node.storage.records import Job
from ian_node.storage.spool import RESULTS_DIR, Spool, atomic_write
from ian_node.storage.state import State

logger = logging.getLogger(__name__)

SIDES: tuple[str, ...] = tuple(side.value for side in Side)
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
#: The outline colour of each side, also the page's legend (colour-blind safe pair).
SIDE_COLOURS = {"right": "#ff9f1c", "left": "#2ec4b6"}
#: Context kept around the nerve in each picture, and the smallest field shown (mm).
MARGIN_MM = 20.0
MIN_FIELD_MM = 70.0
#: The longer side of a picture, in pixels.
PICTURE_PX = 360
#: Axis order after reorientation: voxel axes increase towards the patient's Left, Posterior, Head.
_ORIENTATION = "LPH"


class OverlayUnavailable(RuntimeError):
    """The job has no pictures to show (no result yet, or its source instances are gone); says why."""


@dataclass(frozen=True)
class Plane:
    """One picture's slice: the 2D image (rows top to bottom), its mask, and the spacing (mm) of rows and columns."""

    image: np.ndarray
    labels: np.ndarray
    row_mm: float
    column_mm: float
    #: The patient directions at the top, bottom, left and right edges (e.g. "A", "P", "R", "L").
    edges: tuple[str, str, str, str]


def _planes(volume: np.ndarray, labels: np.ndarray, spacing: Sequence[float], centre: Sequence[int]) -> dict[str, Plane]:
    """The three slices through ``centre`` of a volume in LPH axis order, turned for display."""
    i, j, k = (int(c) for c in centre)
    sx, sy, sz = (float(s) for s in spacing)
    return {
        # axial (slice k): rows A->P (axis 1), columns R->L (axis 0)
        "axial": Plane(volume[:, :, k].T, labels[:, :, k].T, sy, sx, ("A", "P", "R", "L")),
        # coronal (slice j): rows H->F (axis 2 reversed), columns R->L
        "coronal": Plane(volume[:, j, :].T[::-1], labels[:, j, :].T[::-1], sz, sx, ("S", "I", "R", "L")),
        # sagittal (slice i): rows H->F, columns A->P
        "sagittal": Plane(volume[i, :, :].T[::-1], labels[i, :, :].T[::-1], sz, sy, ("S", "I", "A", "P")),
    }


def _window(extent: np.ndarray, size: int, spacing: float) -> slice:
    """Rows (or columns) ``extent`` (indices where the nerve is; empty: none) plus the margin, at least the minimum field."""
    centre = (extent.min() + extent.max()) / 2 if extent.size else (size - 1) / 2
    half = max((extent.max() - extent.min() + 1) * spacing / 2 + MARGIN_MM if extent.size else 0, MIN_FIELD_MM / 2)
    half_px = int(np.ceil(half / spacing))
    low = int(max(0, min(round(centre) - half_px, size - 2 * half_px)))
    return slice(low, min(size, low + 2 * half_px + 1))


def render_plane(plane: Plane, label: int, window: tuple[float, float]) -> bytes:
    """One PNG: the slice in grey, both sides' outlines, the orientation letters; cropped round ``label``."""
    rows_of, cols_of = np.nonzero(plane.labels == label)
    rows = _window(rows_of, plane.image.shape[0], plane.row_mm)
    cols = _window(cols_of, plane.image.shape[1], plane.column_mm)
    image, labels = plane.image[rows, cols], plane.labels[rows, cols]
    height_mm, width_mm = image.shape[0] * plane.row_mm, image.shape[1] * plane.column_mm
    scale = PICTURE_PX / max(height_mm, width_mm)
    dpi = 100
    figure = Figure(figsize=(width_mm * scale / dpi, height_mm * scale / dpi), dpi=dpi, facecolor="black")
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_axis_off()
    axes.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], interpolation="bilinear",
                aspect=plane.row_mm / plane.column_mm)
    for side in Side:
        mask = labels == side.label
        if mask.any() and not mask.all():
            axes.contour(mask.astype(np.float32), levels=[0.5], colors=[SIDE_COLOURS[side.value]], linewidths=1.4)
    top, bottom, left, right = plane.edges
    style = {"color": "#e8e8e8", "fontsize": 11, "fontweight": "bold", "fontfamily": "DejaVu Sans"}
    axes.text(0.5, 0.98, top, transform=axes.transAxes, ha="center", va="top", **style)
    axes.text(0.5, 0.02, bottom, transform=axes.transAxes, ha="center", va="bottom", **style)
    axes.text(0.02, 0.5, left, transform=axes.transAxes, ha="left", va="center", **style)
    axes.text(0.98, 0.5, right, transform=axes.transAxes, ha="right", va="center", **style)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, facecolor="black")
    return buffer.getvalue()


def render_overlays(sources: Sequence[Path], seg: Path) -> dict[tuple[str, str], bytes]:
    """Every picture of a result: (side, plane) -> PNG; a side without voxels is shown through the volume's centre."""
    series = load_series(sources)
    labels = read_segmentation_labels(pydicom.dcmread(seg), series)
    oriented = series.volume.to_patient_orientation(_ORIENTATION)
    oriented_labels = series.volume.with_array(labels).to_patient_orientation(_ORIENTATION)
    volume, label_array = np.asarray(oriented.array, dtype=np.float32), np.asarray(oriented_labels.array)
    low, high = np.percentile(volume, (1.0, 99.5))
    window = (float(low), float(high) if high > low else float(low) + 1.0)
    pictures = {}
    for side in Side:
        voxels = np.argwhere(label_array == side.label)
        centre = voxels.mean(axis=0).round() if len(voxels) else (np.array(volume.shape) - 1) / 2
        for name, plane in _planes(volume, label_array, oriented.spacing, centre).items():
            pictures[side.value, name] = render_plane(plane, side.label, window)
    return pictures


def overlay_relpath(job_id: int, side: str, plane: str) -> str:
    """Where a picture is cached in the spool, next to the job's result."""
    if side not in SIDES or plane not in PLANES:
        raise ValueError(f"no picture {side}-{plane}: sides {', '.join(SIDES)}, planes {', '.join(PLANES)}")
    return f"{RESULTS_DIR}/job-{int(job_id)}-overlays/{side}-{plane}.png"


class OverlayCache:
    """The pictures of each job's result, drawn once (one job at a time per job id) and kept in the spool."""

    def __init__(self, state: State, spool: Spool) -> None:
        self._state = state
        self._spool = spool
        self._locks: dict[int, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def picture(self, job: Job, side: str, plane: str) -> Path:
        """The PNG's path, drawn first (all six of the job) when missing or older than the result."""
        path = self._spool.root / overlay_relpath(job.id, side, plane)
        if job.result_path is None:
            raise OverlayUnavailable(f"job {job.id} has no result yet")
        result = self._spool.path(job.result_path)
        with self._lock(job.id):
            if not self._fresh(path, result):
                self._draw(job, result)
        return path

    def _lock(self, job_id: int) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(job_id, threading.Lock())

    @staticmethod
    def _fresh(path: Path, result: Path) -> bool:
        try:
            return path.stat().st_mtime_ns >= result.stat().st_mtime_ns
        except FileNotFoundError:
            return False

    def _draw(self, job: Job, result: Path) -> None:
        instances = self._state.instances(job.series_uid, job.series_version)
        sources = [self._spool.path(i.path) for i in instances]
        missing = [p for p in sources if not p.is_file()]
        if not sources or missing or not result.is_file():
            raise OverlayUnavailable(f"job {job.id}: the source instances or the result are no longer in the spool")
        try:
            pictures = render_overlays(sources, result)
        except Exception as exc:  # a series or SEG the node accepted but cannot picture: say so, keep serving
            logger.warning("job %d: overlay pictures cannot be drawn: %s", job.id, exception_text(exc))
            raise OverlayUnavailable(f"job {job.id}: the pictures cannot be drawn ({type(exc).__name__})") from exc
        for (side, plane), png in pictures.items():
            atomic_write(self._spool.root / overlay_relpath(job.id, side, plane), png)
        logger.info("job %d: %d overlay pictures drawn", job.id, len(pictures))
