"""Synthetic MRN phantoms: determinism, anatomy, sides, intensities, artefacts, files and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ian_node.app.cli import main
from ian_node.phantom.render import Tissue
from ian_node.phantom.study import Phantom, PhantomConfig, generate_phantom, intensity_statistics, write_phantoms

SMALL = PhantomConfig(shape=(24, 96, 96))
MANDIBLE = (Tissue.CORTEX, Tissue.MARROW, Tissue.CANAL)  # the skull and upper teeth are not the mandible


@pytest.fixture(scope="module")
def default_phantom() -> Phantom:
    """The one default-size study of this suite (64 x 192 x 192)."""
    return generate_phantom(3, 2026)


def _lps(phantom: Phantom, mask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).astype(np.float64)
    affine = np.asarray(phantom.volume.affine)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def test_same_seed_and_patient_give_identical_phantoms():
    a, b = generate_phantom(1, 5, SMALL), generate_phantom(1, 5, SMALL)
    assert np.array_equal(a.volume.array, b.volume.array)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.volume.affine, b.volume.affine)
    assert (a.study, a.series, a.params) == (b.study, b.series, b.params)


def test_different_patients_and_seeds_differ():
    base = generate_phantom(0, 5, SMALL)
    for other in (generate_phantom(1, 5, SMALL), generate_phantom(0, 6, SMALL)):
        assert not np.array_equal(base.volume.array, other.volume.array)
        assert not np.array_equal(base.labels, other.labels)
        assert base.study.patient_id != other.study.patient_id
        assert base.study.study_uid != other.study.study_uid


def test_default_study_has_the_acquisition_geometry_of_the_issue(default_phantom: Phantom):
    vol = default_phantom.volume
    assert vol.spatial_shape == (64, 192, 192)
    assert vol.array.dtype == np.uint16
    slice_mm, row_mm, col_mm = vol.spacing
    assert row_mm == pytest.approx(col_mm)
    assert 0.43 <= row_mm <= 0.6
    assert 0.8 <= slice_mm <= 1.6
    # Axial: the slice normal is close to the patient's z axis.
    assert abs(vol.unit_vectors()[0][2]) > 0.95


def test_default_field_of_view_contains_the_whole_mandible(default_phantom: Phantom):
    bone = np.isin(default_phantom.tissue, MANDIBLE)
    assert bone.sum() > 10_000
    for axis in range(3):
        for end in (0, -1):
            assert not np.take(bone, end, axis=axis).any(), f"mandible touches the edge of axis {axis}"


def test_default_nerves_have_realistic_size_and_run_inside_bone(default_phantom: Phantom):
    spacing = np.prod(default_phantom.volume.spacing)
    for name, label in (("right", 1), ("left", 2)):
        count = int(np.count_nonzero(default_phantom.labels == label))
        length = default_phantom.params["nerve_length_in_fov_mm"][name]
        diameter = 2 * np.sqrt(count * spacing / (np.pi * length))
        assert 40 <= length <= 130, (name, length)
        assert 1.8 <= diameter <= 3.3, (name, diameter)
        assert default_phantom.params["canal_in_bone_fraction"][name] >= 0.95


def test_nerve_is_bright_but_overlaps_vessels_and_fat(default_phantom: Phantom):
    stats = intensity_statistics(default_phantom)
    nerve = stats["nerve"]["mean"]
    # MENSE-like: nerve brighter than marrow, muscle and cortical bone (dark) ...
    assert nerve > stats["marrow"]["mean"] > stats["cortical_bone"]["mean"]
    assert nerve > stats["muscle"]["mean"]
    assert stats["cnr"]["cortical_bone"] > 5
    # ... but no threshold separates it from its bright look-alikes.
    assert stats["nerve_within_p5_p95"]["vessel"] > 0.5
    # Fat is suppressed, unevenly: mostly darker than the nerve, with patches where saturation fails.
    assert stats["fat"]["mean"] < nerve
    assert stats["fat"]["p95"] > 1.5 * stats["fat"]["p5"]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_right_label_lies_at_lower_lps_x_even_when_oblique(index: int):
    config = PhantomConfig(shape=(24, 96, 96), oblique_probability=1.0, max_oblique_deg=12.0)
    phantom = generate_phantom(index, 9, config)
    orientation = np.asarray(phantom.volume.direction)
    assert not np.allclose(np.abs(orientation), np.eye(3)[[2, 1, 0]], atol=1e-3), "expected an oblique grid"
    right, left = _lps(phantom, phantom.labels == 1), _lps(phantom, phantom.labels == 2)
    assert len(right) > 100 and len(left) > 100
    assert right[:, 0].max() < left[:, 0].min()


def test_background_noise_is_rician():
    config = PhantomConfig(shape=(24, 96, 96), motion_probability=0.0, bias_strength=(0.0, 0.0))
    phantom = generate_phantom(2, 4, config)
    air = np.asarray(phantom.volume.array)[phantom.tissue == Tissue.AIR].astype(np.float64)
    sigma = phantom.params["noise_sigma"] * phantom.params["intensity_scale"]
    # Zero signal plus complex Gaussian noise is Rayleigh distributed: mean = sigma * sqrt(pi / 2).
    assert air.size > 5000
    assert np.median(air) / sigma == pytest.approx(np.sqrt(2 * np.log(2)), rel=0.12)


def test_motion_ghosts_raise_the_signal_outside_the_head():
    still = generate_phantom(4, 4, PhantomConfig(shape=(24, 96, 96), motion_probability=0.0))
    moving = generate_phantom(4, 4, PhantomConfig(shape=(24, 96, 96), motion_probability=1.0))
    air = still.tissue == Tissue.AIR
    assert np.array_equal(still.labels, moving.labels)
    # Ghosts are copies of the head, weaker where the suppressed fat used to be bright: a few percent
    # of the air's noise floor over ~50,000 voxels (its standard error is about 0.2%).
    assert moving.volume.array[air].mean() > 1.03 * still.volume.array[air].mean()


def test_metal_reaching_the_canal_voids_part_of_the_labelled_nerve():
    config = PhantomConfig(shape=(24, 96, 96), metal_probability=1.0, metal_reaches_canal_probability=1.0)
    phantom = generate_phantom(0, 3, config)
    assert phantom.params["metals"] and all(m["reaches_canal"] for m in phantom.params["metals"])
    image = np.asarray(phantom.volume.array)
    void = phantom.tissue == Tissue.METAL
    assert np.any(void & (phantom.labels > 0))
    # Bright pile-up rims around the void reach above the nerve's mean.
    near = ~void & (np.abs(np.diff(void.astype(np.int8), axis=2, prepend=0)) > 0)
    assert image[near].max() > image[phantom.labels > 0].mean()


@pytest.mark.parametrize("kwargs", [
    {"shape": (2, 96, 96)}, {"shape": (24, 96)}, {"pixel_spacing_mm": (0.6, 0.4)},
    {"slice_spacing_mm": (-1.0, 1.0)}, {"metal_probability": 1.5}, {"max_oblique_deg": 45.0},
    {"row_spacing_mm": (0.9, 0.8)}, {"head_scale": (0.2, 1.0)}, {"max_offset_mm": -1.0},
    {"max_rotation_deg": 45.0}, {"supersample": 0},
])
def test_config_rejects_invalid_values(kwargs):
    with pytest.raises(ValueError, match="PhantomConfig"):
        PhantomConfig(**kwargs)


def test_generate_rejects_negative_seed():
    with pytest.raises(ValueError, match="seed"):
        generate_phantom(0, -1, SMALL)


def test_patient_files_do_not_depend_on_how_many_patients_are_written(tmp_path):
    one = write_phantoms(tmp_path / "one", 1, 12, SMALL)
    two = write_phantoms(tmp_path / "two", 2, 12, SMALL)
    a, b = one[0], two[0]
    assert a.patient_id == b.patient_id and a.study_uid == b.study_uid
    assert [p.name for p in a.instances] == [p.name for p in b.instances]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a.instances, b.instances, strict=True))
    assert a.seg.read_bytes() == b.seg.read_bytes()
    assert two[1].study_uid != a.study_uid


def test_phantom_cli_writes_n_studies_with_summaries(tmp_path):
    out = tmp_path / "studies"
    assert main(["phantom", str(out), "--patients", "2", "--seed", "8", "--shape", "24,96,96"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert [p["patient_id"] for p in index["patients"]] == ["IANPH-8-0000", "IANPH-8-0001"]
    for entry in index["patients"]:
        assert len(list((out / entry["series_dir"]).glob("*.dcm"))) == 24
        assert (out / entry["seg"]).is_file()
        summary = json.loads((out / entry["summary"]).read_text())
        assert summary["nerves"]["right"]["voxels"] > 0 and summary["nerves"]["left"]["voxels"] > 0
        assert summary["intensity"]["nerve"]["count"] > 0


def test_console_script_rejects_a_bad_shape_with_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ian_node.app.cli", "phantom", str(tmp_path), "--shape", "1,2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "shape" in proc.stderr


@pytest.mark.parametrize("index", range(3))
def test_crop_boxes_hold_every_annotated_voxel_whatever_the_pose(index: int):
    # The small preset's own grid: the tiny test grid squashes the anatomy past proportion.
    phantom = generate_phantom(index, 13)
    for label, side in ((1, "right"), (2, "left")):
        points = _lps(phantom, phantom.labels == label)
        assert len(points) > 50
        assert phantom.crop_boxes[side].contains(points).all(), (side, phantom.params["head_rotation_deg"])
