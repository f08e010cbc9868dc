"""The paper-scale phantoms are not solved by trivial segmenters (issue 13), and those segmenters do work.

Each baseline is tuned on two paper-preset phantoms and scored, the way the benchmark scores a network
(per-slice DSC, mean over the coronal slices with nerve inside each side's manual crop, at the paper's
256 px), on two others. `benchmarks/phantom_difficulty.py` adds what a network reaches on the same slices.
"""

from __future__ import annotations

import numpy as np
import pytest

from ian_node.phantom.study import phantom_preset
from training.baselines import REFERENCE_SIZE, Baseline, BaselineScore, baselines, evaluate, tune
from training.data import LoadReport, SampleMeta, SliceSet
from training.data.phantoms import phantom_slice_set

SEED = 13
TUNING_PATIENTS = range(0, 2)
EVALUATION_PATIENTS = range(100, 102)
#: The issue's bar: a trivial segmenter stays below this mean DSC on the paper preset.
TRIVIAL_DSC = 0.2


def _slices(patients: range) -> SliceSet:
    # every slice of each landmark crop (the default): a volume-wide percentile must see the crop's empty slices too
    return phantom_slice_set(patients, SEED, phantom_preset("paper"), REFERENCE_SIZE, "oracle")


@pytest.fixture(scope="module")
def paper_scores() -> dict[str, tuple[BaselineScore, BaselineScore]]:
    """(tuned on the tuning phantoms, scored on the evaluation phantoms) per baseline."""
    tuning, evaluation = _slices(TUNING_PATIENTS), _slices(EVALUATION_PATIENTS)
    assert evaluation.masks.any(axis=(1, 2)).sum() >= 40, "too few evaluation slices carry nerve to judge"
    scores = {}
    for baseline in baselines(REFERENCE_SIZE):
        tuned = tune(baseline, tuning)
        scores[baseline.name] = (tuned, evaluate(baseline, tuned.params, evaluation))
    return scores


@pytest.mark.parametrize("name", ["brightest_blob", "percentile"])
def test_trivial_baseline_stays_below_dsc_0_2_on_paper_phantoms(paper_scores, name):
    tuned, held_out = paper_scores[name]
    assert held_out.mean_dsc < TRIVIAL_DSC, (tuned, held_out)


def _disc_slices(n: int, seed: int, size: int = 64, radius: float = 5.0) -> SliceSet:
    """Noisy slices, each with one bright disc (the mask) somewhere away from the border."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for _ in range(n):
        cy, cx = rng.uniform(radius + 4, size - radius - 4, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        image = rng.normal(70, 12, (size, size)) + 140 * disc
        images.append(np.clip(image, 0, 255).astype(np.uint8))
        masks.append(disc)
    metas = tuple(SampleMeta("P", "right", i) for i in range(n))
    return SliceSet(np.stack(images), np.stack(masks), metas, LoadReport("synthetic", ""))


@pytest.mark.parametrize("baseline", baselines(64), ids=lambda b: b.name)
def test_baseline_finds_an_obvious_bright_disc(baseline: Baseline):
    tuned = tune(baseline, _disc_slices(4, seed=1))
    held_out = evaluate(baseline, tuned.params, _disc_slices(6, seed=2))
    assert held_out.mean_dsc > 0.8, (tuned, held_out)
