"""The localiser stage: its grid, box fitting, margins, the four crop modes, its checkpoint and training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ian_node.phantom.study import generate_phantom, phantom_datasets, phantom_preset
from ian_node.segment.crop import NO_REGION, CropError, CropMode, CropRequest, check_crop_compatible, resolve_crop
from ian_node.segment.localise import LocaliserGrid, fit_box, grow, localiser_grid, locate
from ian_node.segment.reformat import PatientBox, default_rois
from ian_node.segment.volume import Side, load_series
from model.checkpoint import CheckpointMeta
from model.localiser import (
    BUNDLED_LOCALISER,
    LocaliserCheckpointError,
    LocaliserMeta,
    LocaliserNet,
    load_localiser,
    save_localiser,
)
from training.localiser import (
    COARSE_PAPER,
    LocaliserTrainOptions,
    box_iou,
    build_localiser,
    phantom_sample,
    score_samples,
)


@pytest.fixture(scope="module")
def small_phantom():
    return generate_phantom(3, 77, phantom_preset("small"))


@pytest.fixture(scope="module")
def small_series(small_phantom):
    return load_series(phantom_datasets(small_phantom))


def _grid(shape=(16, 16, 16), spacing=3.0) -> LocaliserGrid:
    return LocaliserGrid(np.zeros((2, *shape), np.float32), np.array([-24.0, -24.0, -24.0]), spacing)


def _blind(tmp_path: Path) -> Path:
    """A localiser whose every voxel answers 'not in a crop box'."""
    net = LocaliserNet((4, 4, 4, 4))
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(-20.0)
    path = tmp_path / "blind.pt"
    save_localiser(path, net, LocaliserMeta(channels=(4, 4, 4, 4)))
    return path


def test_grid_is_lps_aligned_and_marks_the_field_of_view(small_series):
    grid = localiser_grid(small_series.volume, 3.0)
    assert grid.image.shape[0] == 2 and all(n % 8 == 0 for n in grid.image.shape[1:])
    fov = grid.image[1] > 0
    assert 0.2 < fov.mean() < 1.0  # the grid is padded beyond the field of view
    assert grid.image[0][~fov].max() == 0.0
    assert 0.5 < np.percentile(grid.image[0][fov], 99) < 1.5  # normalised by the 99th percentile
    # voxel (i, j, k) lies at origin + spacing * index: the field of view's centre maps to the grid's middle
    corners = np.asarray(small_series.volume.map_indices_to_reference(
        np.array([[0, 0, 0], np.array(small_series.shape) - 1])))
    centre = corners.mean(axis=0)
    middle = grid.origin + grid.spacing * (np.array(grid.image.shape[1:]) - 1) / 2
    np.testing.assert_allclose(middle, centre, atol=1e-6)


def test_fit_box_recovers_a_box_to_sub_voxel_accuracy():
    grid = _grid()
    truth = PatientBox(-10.2, 14.9, -20.0, 5.3, -7.7, 19.1)
    probability = grid.occupancy(truth).astype(np.float32)
    box, confidence = fit_box(probability, grid)
    assert box is not None and confidence > 0.99
    # a voxel-centre mask of a box is recovered to within half a voxel per face
    assert np.abs(box.bounds - truth.bounds).max() <= grid.spacing / 2 + 1e-6
    probability[0, 0, 0] = 1.0  # a stray voxel away from the box changes nothing
    assert np.allclose(fit_box(probability, grid)[0].bounds, box.bounds)


def test_fit_box_of_an_empty_map_is_none_with_zero_confidence():
    assert fit_box(np.zeros((16, 16, 16), np.float32), _grid()) == (None, 0.0)


def test_grow_moves_faces_out_but_never_across_the_midline():
    right, left = PatientBox(-60, -2, -50, 20, -90, -40), PatientBox(2, 60, -50, 20, -90, -40)
    grown = grow({Side.RIGHT: right, Side.LEFT: left}, 4.0)
    np.testing.assert_allclose(grown[Side.RIGHT].bounds, [[-64, 0], [-54, 24], [-94, -36]])
    np.testing.assert_allclose(grown[Side.LEFT].bounds, [[0, 64], [-54, 24], [-94, -36]])
    assert grow({Side.RIGHT: None, Side.LEFT: left}, 4.0)[Side.RIGHT] is None


def test_box_iou_known_answer():
    a, b = PatientBox(0, 2, 0, 2, 0, 2), PatientBox(1, 3, 0, 2, 0, 2)
    assert box_iou(a, b) == pytest.approx(4 / 12)


def test_half_box_and_oracle_modes_record_what_they_used(small_series):
    half = resolve_crop(small_series, CropRequest(CropMode.HALF))
    assert half.found and half.rois == default_rois(small_series)
    boxes = {Side.RIGHT: PatientBox(-40, 0, -80, 0, -130, -50), Side.LEFT: PatientBox(0, 40, -80, 0, -130, -50)}
    for mode in (CropMode.BOX, CropMode.ORACLE):
        result = resolve_crop(small_series, CropRequest(mode, boxes))
        assert result.rois == boxes
        assert result.as_json()["left"] == {"mode": mode.value, "box_mm": [[0, 40], [-80, 0], [-130, -50]],
                                            "confidence": None}


def test_box_mode_without_both_boxes_is_refused():
    with pytest.raises(CropError, match="both sides"):
        CropRequest(CropMode.BOX, {Side.RIGHT: PatientBox(-1, 0, -1, 0, -1, 0)})


def test_auto_mode_with_a_blind_localiser_reports_no_mandible_region(small_series, tmp_path):
    result = resolve_crop(small_series, CropRequest(), load_localiser(_blind(tmp_path)))
    assert not result.found and result.problem.startswith(NO_REGION)
    assert result.as_json()["right"]["box_mm"] is None and result.as_json()["right"]["confidence"] == 0.0


def test_localiser_checkpoint_round_trip_and_foreign_file(tmp_path):
    path = _blind(tmp_path)
    loaded = load_localiser(path)
    assert loaded.meta.channels == (4, 4, 4, 4) and len(loaded.sha256) == 64
    (tmp_path / "x.pt").write_bytes(b"not torch")
    with pytest.raises(LocaliserCheckpointError, match="not a readable"):
        load_localiser(tmp_path / "x.pt")
    torch.save({"format": "other"}, tmp_path / "y.pt")
    with pytest.raises(LocaliserCheckpointError, match="not an ian-node localiser"):
        load_localiser(tmp_path / "y.pt")


def test_auto_crop_refuses_a_checkpoint_it_cannot_reproduce(tmp_path):
    localiser = load_localiser(_blind(tmp_path))
    with pytest.raises(CropError, match="halves"):
        check_crop_compatible(CheckpointMeta("ian_net"), "auto", localiser)  # no crop recorded: legacy halves
    margins = CheckpointMeta("ian_net", crop={"region": "nerve-margins", "trained_with": "oracle", "samples": "all"})
    with pytest.raises(CropError, match="nerve-margins"):
        check_crop_compatible(margins, "auto", localiser)
    with pytest.raises(CropError, match="needs a localiser"):
        check_crop_compatible(CheckpointMeta("ian_net", crop={"region": "landmarks"}), "auto", None)
    check_crop_compatible(margins, "half", None)  # half and box are always allowed
    check_crop_compatible(CheckpointMeta("ian_net", crop={"region": "landmarks"}), "auto", localiser)


def test_localiser_trains_and_its_margin_is_calibrated_on_validation_nerves():
    samples = [phantom_sample(generate_phantom(i, 5, COARSE_PAPER), 6.0) for i in range(3)]
    options = LocaliserTrainOptions(spacing_mm=6.0, channels=(4, 4, 8, 8), canvas=(40, 40, 32), iterations=4,
                                    threads=1)
    net, meta = build_localiser(samples[:2], samples[2:], options, label="test", progress=False)
    assert meta.training["iterations"] == 4 and meta.spacing_mm == 6.0
    assert 0.0 <= meta.safety_margin_mm <= 16.0
    assert isinstance(net, LocaliserNet)


def test_bundled_localiser_contains_every_nerve_voxel_of_held_out_demo_phantoms():
    localiser = load_localiser()
    assert localiser.path == BUNDLED_LOCALISER and localiser.meta.region == "landmarks"
    for index in (0, 1):  # seed 77: never seen in training (seeds 11-14)
        phantom = generate_phantom(index, 77, phantom_preset("demo"))
        scores = score_samples(localiser, [phantom_sample(phantom, localiser.meta.spacing_mm)])
        assert all(s.contained >= 0.995 and s.iou > 0.5 and s.confidence >= localiser.meta.min_confidence
                   for s in scores), scores
    found = locate(load_series(phantom_datasets(phantom)), localiser)  # the node's path, from DICOM
    assert all(found.sides[s].box is not None and found.sides[s].confidence > 0.5 for s in Side)


def test_node_warns_when_the_localiser_is_not_the_one_exported_with_the_checkpoint(tmp_path, caplog):
    from ian_node.config import CropConfig, ModelConfig
    from ian_node.segment.result import load_crop_localiser, load_predictor
    from tests.crop_tools import LANDMARK_CROP, constant_localiser, crop_checkpoint

    checkpoint = crop_checkpoint(tmp_path / "c.pt", {**LANDMARK_CROP, "localiser_sha256": "0" * 64})
    crop = CropConfig(localiser=constant_localiser(tmp_path / "l.pt", 20.0))
    with caplog.at_level("WARNING"):
        load_predictor(ModelConfig(checkpoint=checkpoint), crop, load_crop_localiser(crop))
    assert "not the pair train_benchmark made" in caplog.text


def test_bundled_localiser_finds_the_crop_of_an_oblique_off_centre_series():
    import dataclasses

    # every acquisition tilted (up to 8 degrees), the head up to 20 mm off-centre, anisotropic voxels
    config = dataclasses.replace(phantom_preset("demo"), oblique_probability=1.0)
    phantom = generate_phantom(2, 78, config)
    series = load_series(phantom_datasets(phantom))
    rotation = np.asarray(series.volume.affine)[:3, :3] / np.array(series.volume.spacing)
    assert not np.allclose(np.abs(rotation), np.round(np.abs(rotation)), atol=1e-3)  # truly oblique
    localiser = load_localiser()
    scores = score_samples(localiser, [phantom_sample(phantom, localiser.meta.spacing_mm)])
    assert all(s.contained >= 0.995 and s.iou > 0.5 for s in scores), scores
