"""Region-wise scores: the ramus, the body and the anterior loop / mental foramen of known nerve shapes, in
nominal and in measured millimetres."""

from __future__ import annotations

import csv
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from ian_node.segment.measure import Region, centreline, region_map
from ian_node.segment.pipeline import PreparedSeries, prepare, to_model_space
from ian_node.segment.volume import Side
from training.data import LoadOptions, SampleMeta, load_dataset
from training.data.nifti import read_pair
from training.regions import (
    NOMINAL,
    StackGeometry,
    count_regions,
    geometry_kind,
    measured_geometry,
    score_regions,
    side_regions,
    side_stacks,
    write_region_reports,
)

N, SIZE = 60, 64


def _l_nerve(radius: float = 2.5) -> np.ndarray:
    """A side's coronal stack (A→P, rows S→I) holding an L: a flat body along slices 5-45 at row 40, then a
    ramus rising steeply to row 5 by slice 52, as the nerve runs in the mandible."""
    grid = np.stack(np.meshgrid(np.arange(N), np.arange(SIZE), np.arange(SIZE), indexing="ij"), -1).astype(float)

    def distance(a: tuple, b: tuple) -> np.ndarray:
        a_, d = np.asarray(a, float), np.asarray(b, float) - np.asarray(a, float)
        t = np.clip(((grid - a_) @ d) / (d @ d), 0.0, 1.0)
        return np.linalg.norm(grid - (a_ + t[..., None] * d), axis=-1)

    return np.minimum(distance((5, 40, 30), (45, 40, 30)), distance((45, 40, 30), (52, 5, 30))) <= radius


@pytest.fixture(scope="module")
def nerve() -> np.ndarray:
    return _l_nerve()


@pytest.fixture(scope="module")
def regions(nerve) -> np.ndarray:
    out = side_regions(nerve, NOMINAL)
    assert out is not None
    return out


def test_the_steep_limb_is_ramus_the_anterior_end_mental_and_the_flat_middle_body(nerve, regions):
    at = regions[nerve]
    slices, rows = np.nonzero(nerve)[0], np.nonzero(nerve)[1]
    assert set(at[rows < 30].tolist()) == {Region.RAMUS}  # the rising limb, well above the body
    assert set(at[slices < 12].tolist()) == {Region.MENTAL}  # the anterior end
    assert set(at[(slices > 25) & (slices < 38)].tolist()) == {Region.BODY}
    assert set(np.unique(regions).tolist()) == {Region.RAMUS, Region.BODY, Region.MENTAL}  # every pixel has one


def test_a_prediction_missing_one_region_has_recall_zero_there_and_one_elsewhere(nerve, regions):
    for missing in Region:
        scores = count_regions(nerve & (regions != missing), nerve, regions)
        assert scores[missing].recall == 0.0 and scores[missing].dsc == 0.0
        for other in set(Region) - {missing}:
            assert scores[other].recall == 1.0 and scores[other].dsc == 1.0


def test_a_false_positive_counts_against_the_region_it_is_nearest_to(nerve, regions):
    pred = nerve.copy()
    pred[50, 5:8, 40:43] = True  # beside the top of the ramus
    scores = count_regions(pred, nerve, regions)
    assert scores[Region.RAMUS].fp == 9 and scores[Region.RAMUS].recall == 1.0 and scores[Region.RAMUS].dsc < 1
    assert scores[Region.BODY].dsc == scores[Region.MENTAL].dsc == 1.0


def test_an_empty_ground_truth_has_no_regions():
    assert side_regions(np.zeros((4, 8, 8), bool)) is None


def test_the_geometry_sets_where_the_mental_stretch_ends(nerve):
    coarse = side_regions(nerve, StackGeometry(slice_mm=2.0, row_mm=2.0, col_mm=2.0))
    fine = side_regions(nerve, NOMINAL)
    assert (coarse[nerve] == Region.MENTAL).sum() < (fine[nerve] == Region.MENTAL).sum()


def test_sampled_slices_are_stacked_per_side_and_scored_per_run(nerve, regions, tmp_path):
    """Every other slice, as a benchmark's slice_step samples them; the test set lists them out of order."""
    kept = list(range(0, N, 2))
    metas = tuple(SampleMeta("p1", "right", k) for k in kept)
    masks = nerve[kept]
    order = np.random.default_rng(0).permutation(len(kept))
    (stack,) = side_stacks(metas, masks, order)
    assert [metas[k].slice for k in stack.indices] == kept
    sampled = regions[kept]
    assert (stack.regions[masks] == sampled[masks]).mean() > 0.95  # the same split at half the slices
    no_body = {int(k): masks[k] & (stack.regions[i] != Region.BODY) for i, k in enumerate(stack.indices)}
    rows = score_regions("ian_net", 0, [stack], masks, no_body)
    by_region = {r.region: r for r in rows}
    assert by_region["body"].recall == 0.0 and by_region["ramus"].recall == by_region["mental"].recall == 1.0
    assert {r.geometry for r in rows} == {"nominal"}
    files = write_region_reports(rows, tmp_path)
    assert files["fig_regions"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with files["regions_csv"].open(newline="") as f:
        table = {r["region"]: r for r in csv.DictReader(f)}
    assert float(table["body"]["recall_mean"]) == 0.0 and float(table["ramus"]["dsc_mean"]) == 1.0
    assert "Nominal geometry" in files["regions_md"].read_text()


# ---------------------------------------------------------------- real millimetres, from a loaded volume
SPACING_MM = (0.5, 2.0, 0.5)  # NIfTI (RAS) x, y, z: coronal slices 2 mm apart, fine in-plane voxels
SHAPE = (120, 40, 80)


def _capsule_distance(points: np.ndarray, a: tuple, b: tuple) -> np.ndarray:
    a_, d = np.asarray(a, float), np.asarray(b, float) - np.asarray(a, float)
    t = np.clip(((points - a_) @ d) / (d @ d), 0.0, 1.0)
    return np.linalg.norm(points - (a_ + t[..., None] * d), axis=-1)


@pytest.fixture(scope="module")
def anisotropic_pair(tmp_path_factory):
    """A NIfTI pair whose right nerve (RAS mm) runs 50 mm forward, nearly flat, from a ramus rising 27 mm."""
    root = tmp_path_factory.mktemp("anisotropic")
    mm = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1) * np.array(SPACING_MM)
    nerve = np.minimum(_capsule_distance(mm, (45, 60, 12), (45, 10, 10)),
                       _capsule_distance(mm, (45, 10, 10), (45, 6, 37.5))) <= 1.8
    image = np.random.default_rng(0).normal(100, 10, SHAPE).astype(np.float32) + 200 * nerve
    affine = np.diag([*SPACING_MM, 1.0])
    for folder, name, data in (("imagesTr", "p1_0000", image), ("labelsTr", "p1", nerve.astype(np.uint8))):
        (root / folder).mkdir()
        nib.save(nib.Nifti1Image(data, affine), root / folder / f"{name}.nii.gz")
    return root / "imagesTr" / "p1_0000.nii.gz", root / "labelsTr" / "p1.nii.gz"


def test_recorded_millimetres_place_the_regions_as_the_node_does_in_the_source_volume(anisotropic_pair, tmp_path):
    """Truth: the node's region split of the nerve in the source volume's own mm, carried to model space.
    Measured geometry reproduces it; nominal (1 mm per 2 mm slice and per 0.625 mm pixel) stretches the
    15 mm mental stretch over 15 slices, 30 mm."""
    image_path, label_path = anisotropic_pair
    options = LoadOptions(size=SIZE, crop="half")
    slices = load_dataset(image_path.parent.parent, "nifti", options)
    (g,) = slices.report.geometry
    assert (g.side, g.slice_mm, g.slice_step) == ("right", 2.0, 1)
    assert g.row_mm == g.col_mm == pytest.approx(40.0 / SIZE)  # the right half: 80 rows x 60 columns of 0.5 mm

    pair = read_pair(image_path, label_path, options)
    nerve = pair.labels == Side.RIGHT.label
    affine = np.asarray(pair.series.volume.affine)
    source_regions = region_map(nerve, affine, centreline(nerve, affine))
    prepared = PreparedSeries(pair.series, tuple(s for s in prepare(pair.series, SIZE).sides
                                                 if s.stack.side is Side.RIGHT))
    truth = np.full((len(prepared.sides[0].images), SIZE, SIZE), -1, dtype=np.int8)
    for region in Region:
        truth[to_model_space(prepared, (nerve & (source_regions == region)).astype(np.uint8)).astype(bool)] = region

    everything = np.arange(len(slices))
    (measured,) = side_stacks(slices.metas, slices.masks, everything, measured_geometry(slices.report))
    (nominal,) = side_stacks(slices.metas, slices.masks, everything)
    gt = slices.masks[measured.indices]
    expected = truth[[slices.metas[k].slice for k in measured.indices]][gt]
    assert (measured.regions[gt] == expected).mean() > 0.95
    assert (nominal.regions[gt] == expected).mean() < 0.85

    def mental_mm(stack) -> float:
        return float(np.any((stack.regions == Region.MENTAL) & gt, axis=(1, 2)).sum() * g.slice_mm)

    assert 12.0 <= mental_mm(measured) <= 18.0 and mental_mm(nominal) >= 26.0
    rows = score_regions("ian_net", 0, [measured], slices.masks, {int(k): slices.masks[k] for k in everything})
    assert {r.geometry for r in rows} == {"measured"} and geometry_kind(rows) == "measured"
    assert "Measured geometry" in write_region_reports(rows, tmp_path)["regions_md"].read_text()
    assert geometry_kind([*rows, replace(rows[0], geometry="nominal")]) == "mixed"
