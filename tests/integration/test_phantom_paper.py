"""The `paper` phantom preset: the paper's acquisition over a whole lower head, posed like a patient.

One paper-scale patient is generated for the module (about 15 s on one core): its DICOM passes
dciodvfy, its summary carries the crop landmarks and boxes, every annotated nerve voxel lies in its
side's box, and the node's pipeline takes its anisotropic pixels (0.8 x 0.4297 mm) through the
coronal reformat cropped by those boxes and back.
"""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from ian_node.phantom.params import draw_patient
from ian_node.phantom.render import Tissue
from ian_node.phantom.study import PAPER, Phantom, PhantomFiles, generate_phantom, phantom_preset, write_phantom
from ian_node.segment.pipeline import PipelineOptions, finish, prepare, to_model_space
from ian_node.segment.volume import Side, load_series
from tests.tools import dciodvfy_errors

pytestmark = pytest.mark.integration

LANDMARKS = {"menton", "palatal_suture"} | {
    f"{name}_{side}" for side in ("right", "left")
    for name in ("cranial_base", "zygomatic_arch", "buccal_skin", "external_acoustic_meatus")}


@pytest.fixture(scope="module")
def paper() -> Phantom:
    return generate_phantom(1, 2026, phantom_preset("paper"))


@pytest.fixture(scope="module")
def written(paper: Phantom, tmp_path_factory) -> PhantomFiles:
    return write_phantom(paper, tmp_path_factory.mktemp("paper"))


def _lps(phantom: Phantom, mask: np.ndarray) -> np.ndarray:
    affine = np.asarray(phantom.volume.affine)
    return np.argwhere(mask).astype(np.float64) @ affine[:3, :3].T + affine[:3, 3]


def test_paper_preset_is_the_papers_acquisition(paper: Phantom):
    slice_mm, row_mm, col_mm = paper.volume.spacing
    assert (slice_mm, row_mm, col_mm) == pytest.approx((1.6, 0.8, 0.4297))
    rows, cols = paper.volume.spatial_shape[1:]
    assert rows * row_mm == pytest.approx(220, abs=1) and cols * col_mm == pytest.approx(220, abs=1)
    # From below the chin to above the cranial base.
    top = max(paper.landmarks[f"cranial_base_{s}"][2] for s in ("right", "left"))
    corners = np.array([[k, 0, 0] for k in (0, paper.volume.spatial_shape[0] - 1)], dtype=np.float64)
    slab = corners @ np.asarray(paper.volume.affine)[:3, :3].T + np.asarray(paper.volume.affine)[:3, 3]
    assert slab[:, 2].min() < paper.landmarks["menton"][2] and slab[:, 2].max() > top


def test_whole_head_structures_are_there(paper: Phantom):
    present = {Tissue(t) for t in np.unique(paper.tissue)}
    assert {Tissue.SKULL, Tissue.BRAIN, Tissue.CORTEX, Tissue.MARROW, Tissue.TOOTH, Tissue.MUSCLE, Tissue.GLAND,
            Tissue.FAT, Tissue.NERVE, Tissue.LINGUAL_NERVE, Tissue.VESSEL, Tissue.CANAL, Tissue.AIR} <= present


def test_every_annotated_voxel_lies_in_its_sides_crop_box(paper: Phantom):
    assert set(paper.landmarks) == LANDMARKS
    for label, side in ((1, "right"), (2, "left")):
        box = paper.crop_boxes[side]
        points = _lps(paper, paper.labels == label)
        assert len(points) > 200
        assert box.contains(points).all(), side
    right, left = paper.crop_boxes["right"], paper.crop_boxes["left"]
    assert right.x_max == pytest.approx(left.x_min)  # both meet at the palatal suture
    assert right.x_min < -50 and left.x_max > 50  # out to the zygomatic arches


def test_annotation_is_conservative_inside_the_bright_nerve(paper: Phantom):
    labelled = paper.labels > 0
    nerve = paper.tissue == Tissue.NERVE
    assert np.mean(nerve[labelled]) > 0.6
    assert labelled.sum() < (nerve | labelled).sum()


def test_summary_json_has_landmarks_and_crop_boxes(written: PhantomFiles, paper: Phantom):
    summary = json.loads(written.summary.read_text())
    assert set(summary["landmarks"]) == LANDMARKS
    for side in ("right", "left"):
        box = np.array(summary["crop_boxes"][side])
        assert box.shape == (3, 2) and np.all(box[:, 0] < box[:, 1])
        np.testing.assert_allclose(box, paper.crop_boxes[side].bounds)
    for side in ("right", "left"):
        assert {"voxels", "volume_mm3", "length_in_fov_mm", "mean_diameter_mm"} <= set(summary["nerves"][side])


@pytest.mark.parametrize("which", [0, 40, -1])
def test_paper_instances_pass_dciodvfy(written: PhantomFiles, which: int):
    assert dciodvfy_errors(written.instances[which]) == []
    ds = pydicom.dcmread(written.instances[which], stop_before_pixels=True)
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.8, 0.4297])


def test_paper_ground_truth_seg_passes_dciodvfy(written: PhantomFiles):
    assert dciodvfy_errors(written.seg) == []


def test_pipeline_takes_anisotropic_pixels_through_the_crop_boxes_and_back(written: PhantomFiles, paper: Phantom):
    series = load_series([pydicom.dcmread(p) for p in written.instances])
    assert tuple(series.volume.spacing) == pytest.approx(tuple(paper.volume.spacing))
    rois = {Side(name): box for name, box in paper.crop_boxes.items()}
    prepared = prepare(series, 256, rois)
    gt = to_model_space(prepared, paper.labels)
    assert gt.any(axis=(1, 2)).sum() > 60  # coronal slices with nerve, both sides
    back = finish(prepared, gt, PipelineOptions(max_gap_mm=None))
    for label in (1, 2):
        a, b = back == label, paper.labels == label
        dsc = 2 * np.sum(a & b) / (a.sum() + b.sum())
        assert dsc > 0.95, (label, dsc)


def test_pose_and_size_vary_within_the_issues_ranges():
    poses = []
    for i in range(40):
        rng = np.random.default_rng(i)
        params = draw_patient(
            rng, pixel_spacing=PAPER.pixel_spacing_mm, row_spacing=PAPER.row_spacing_mm,
            slice_spacing=PAPER.slice_spacing_mm, nerve_diameter=PAPER.nerve_diameter_mm,
            max_offset_mm=PAPER.max_offset_mm, max_rotation_deg=PAPER.max_rotation_deg, head_scale=PAPER.head_scale,
            noise=PAPER.noise_sigma, bias=PAPER.bias_strength, motion_probability=PAPER.motion_probability,
            metal_probability=PAPER.metal_probability,
            metal_reaches_canal_probability=PAPER.metal_reaches_canal_probability,
            oblique_probability=PAPER.oblique_probability, max_oblique_deg=PAPER.max_oblique_deg)
        poses.append((*params.head_rotation_deg, *params.offset_mm, params.head_scale,
                      params.right.ramus_scale - params.left.ramus_scale))
    poses = np.array(poses)
    assert np.abs(poses[:, :3]).max() <= 10 and np.abs(poses[:, :3]).max() > 8
    assert np.abs(poses[:, 3:6]).max() <= 20 and np.abs(poses[:, 3:6]).max() > 15
    assert 0.85 <= poses[:, 6].min() < 0.9 and 1.1 < poses[:, 6].max() <= 1.15
    assert np.abs(poses[:, 7]).max() > 0.03  # the two sides differ
