"""The paper's picture figures (Fig 5: one network's failure, below- and above-average cases; Fig 6: a
grid of every network on the same slices), drawn with matplotlib's object API like `training.report`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from model.registry import PAPER_NETWORK
from training.metrics import ImageScore
from training.report import by_model, display_name, model_order, save_figure

#: Ground truth, prediction and false-positive colours of the overlays.
YELLOW, BLUE, RED = (1.0, 0.85, 0.0), (0.1, 0.35, 1.0), (1.0, 0.1, 0.1)


@dataclass(frozen=True)
class OverlayCase:
    """One image for Fig 5: the input (H, W) in [0, 1], binary ground truth and prediction, a title."""

    image: np.ndarray
    target: np.ndarray
    prediction: np.ndarray
    title: str


@dataclass(frozen=True)
class GridRow:
    """One row of Fig 6: the input, its ground truth and each model's binary prediction."""

    image: np.ndarray
    target: np.ndarray
    predictions: Mapping[str, np.ndarray]


def select_fig5_cases(scores: Iterable[ImageScore], model: str = PAPER_NETWORK) -> list[tuple[str, ImageScore]]:
    """Fig 5's three images of `model`: a complete failure, a below-average and an above-average case.

    (a) the first image (by repeat, patient, side, slice) with DSC = 0, or the lowest-DSC image when
    there is no complete failure (labelled so); (b)/(c) the image at the median DSC of the images
    with 0 < DSC < mean and DSC > mean respectively, falling back to the nearest to the mean.
    """
    own = sorted((s for s in scores if s.model == model), key=lambda s: s.key)
    if not own:
        raise ValueError(f"no scores for model {model!r}")
    mean = float(np.mean([s.dsc for s in own]))
    zeros = [s for s in own if s.dsc == 0.0]
    first = ("complete failure", zeros[0]) if zeros else ("lowest DSC (no complete failure)",
                                                          min(own, key=lambda s: s.dsc))
    below = [s for s in own if 0.0 < s.dsc < mean] or own
    above = [s for s in own if s.dsc > mean] or own
    return [first, ("below average", _at_median(below)), ("above average", _at_median(above))]


def plot_fig5(cases: Sequence[OverlayCase], path: str | Path) -> Path:
    """Rows of cases; columns: input, ground truth (yellow), prediction (blue)."""
    if not cases:
        raise ValueError("Fig 5 needs at least one case")
    fig = Figure(figsize=(7.5, 2.6 * len(cases)), dpi=120, layout="constrained")
    axes = fig.subplots(len(cases), 3, squeeze=False)
    for row, (case, letter) in enumerate(zip(cases, "abcdefghij", strict=False)):
        gray = _gray(case.image)
        panels = [(gray, "Input"), (overlay(gray, [(case.target, YELLOW)]), "Ground truth"),
                  (overlay(gray, [(case.prediction, BLUE)]), "Prediction")]
        for col, (img, label) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(label)
        axes[row, 0].set_ylabel(f"({letter}) {case.title}", fontsize=9)
    return save_figure(fig, path)


def select_fig6_keys(scores: Iterable[ImageScore], reference: str = PAPER_NETWORK, n: int = 4) -> list[tuple]:
    """`n` images scored for every model, at evenly spaced quantiles of the reference model's DSC."""
    grouped = by_model(scores)
    if reference not in grouped:
        raise ValueError(f"no scores for reference model {reference!r}")
    common = set.intersection(*({s.key for s in items} for items in grouped.values()))
    ref = sorted((s for s in grouped[reference] if s.key in common), key=lambda s: (s.dsc, s.key))
    if not ref:
        raise ValueError("no image was scored for every model")
    picks = np.linspace(0, len(ref) - 1, n + 2)[1:-1] if len(ref) > n else np.arange(len(ref))
    keys = [ref[int(round(i))].key for i in picks]
    return list(dict.fromkeys(keys))


def plot_fig6(rows: Sequence[GridRow], path: str | Path, models: Sequence[str] | None = None) -> Path:
    """Grid: one row per slice; columns input, ground truth (blue), then each model with prediction
    red, ground truth blue and their overlap yellow."""
    if not rows:
        raise ValueError("Fig 6 needs at least one row")
    models = list(models) if models is not None else model_order(rows[0].predictions)
    ncols = 2 + len(models)
    fig = Figure(figsize=(1.9 * ncols, 1.9 * len(rows) + 0.4), dpi=120, layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    titles = ["Input", "Ground truth", *(display_name(m) for m in models)]
    for r, row in enumerate(rows):
        gray = _gray(row.image)
        gt = np.asarray(row.target, bool)
        panels = [gray, overlay(gray, [(gt, BLUE)])]
        for m in models:
            pred = np.asarray(row.predictions[m], bool)
            panels.append(overlay(gray, [(pred & ~gt, RED), (gt & ~pred, BLUE), (pred & gt, YELLOW)]))
        for c, img in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    return save_figure(fig, path)


def overlay(gray: np.ndarray, layers: Sequence[tuple[np.ndarray, tuple[float, float, float]]],
            alpha: float = 0.6) -> np.ndarray:
    """RGB (H, W, 3) of a grey image with each boolean mask blended in its colour."""
    rgb = np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=2).astype(np.float32)
    for mask, colour in layers:
        m = np.asarray(mask, bool)
        if m.shape != gray.shape:
            raise ValueError(f"mask shape {m.shape} differs from image shape {gray.shape}")
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(colour, np.float32)
    return rgb


def _at_median(items: Sequence[ImageScore]) -> ImageScore:
    median = float(np.median([s.dsc for s in items]))
    return min(items, key=lambda s: (abs(s.dsc - median), s.key))


def _gray(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img[0] if img.shape[0] == 1 else img.mean(axis=0)
    if img.ndim != 2:
        raise ValueError(f"expected an image (H, W) or (C, H, W), got shape {np.shape(image)}")
    return img
