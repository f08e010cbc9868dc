"""Property: a mask taken series → side stacks → model space → back lands on the same voxels.

Random volumes (≤ 12×40×40), every axis permutation and flip with optional oblique rotation,
anisotropic spacings, both sides, default or custom regions of interest. The expected labels are
computed independently of the reformat: from each voxel's LPS centre and the regions' bounds.
"""

from __future__ import annotations

import itertools

import highdicom as hd
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from ian_node.phantom.mr_series import StudyInfo, build_mr_series
from ian_node.segment.reformat import PatientBox, default_rois, side_stacks, stack_to_volume
from ian_node.segment.volume import Side, load_series
from model.preprocess import mask_from_model, mask_to_model, plan_slice_transform

#: ~20 ms per example on one core; no separate CI profile is needed at this size.
EXAMPLES = 200
STUDY = StudyInfo(patient_id="GEO-2", patient_name="Roundtrip^Test")
SIGNED_PERMUTATIONS = [
    np.eye(3)[list(p)] * np.array(s)[:, None]
    for p in itertools.permutations(range(3))
    for s in itertools.product((1, -1), repeat=3)
]


@st.composite
def acquisitions(draw) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(affine, shape): a signed permutation of LPS, optionally rotated, with anisotropic spacing."""
    shape = (draw(st.integers(2, 12)), draw(st.integers(2, 40)), draw(st.integers(2, 40)))
    axes = SIGNED_PERMUTATIONS[draw(st.integers(0, len(SIGNED_PERMUTATIONS) - 1))]
    angles = draw(st.one_of(st.just((0.0, 0.0, 0.0)), st.tuples(*[st.floats(-40, 40)] * 3)))
    spacing = [draw(st.sampled_from([0.43, 0.5, 0.6, 0.8, 1.0, 1.2, 1.6])) for _ in range(3)]
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ axes.T @ np.diag(spacing)
    affine[:3, 3] = [draw(st.floats(-80, 80)) for _ in range(3)]
    return affine, shape


@st.composite
def regions(draw, defaults: dict[Side, PatientBox]) -> dict[Side, PatientBox] | None:
    """None (the default halves) or two disjoint custom boxes inside the volume's extent."""
    if draw(st.booleans()):
        return None
    lo = np.array([defaults[Side.RIGHT].x_min, defaults[Side.RIGHT].y_min, defaults[Side.RIGHT].z_min])
    hi = np.array([defaults[Side.LEFT].x_max, defaults[Side.LEFT].y_max, defaults[Side.LEFT].z_max])
    low = np.array([draw(st.floats(0, 0.25)) for _ in range(3)])
    high = np.array([draw(st.floats(0.75, 1)) for _ in range(3)])
    a, b = lo + (hi - lo) * low, lo + (hi - lo) * high
    x_split = float(lo[0] + (hi[0] - lo[0]) * draw(st.floats(0.3, 0.7)))
    yz = dict(y_min=a[1], y_max=b[1], z_min=a[2], z_max=b[2])
    return {Side.RIGHT: PatientBox(x_min=a[0], x_max=x_split, **yz),
            Side.LEFT: PatientBox(x_min=x_split, x_max=b[0], **yz)}


def voxel_centres(sv) -> np.ndarray:
    return sv.volume.map_indices_to_reference(np.indices(sv.shape).reshape(3, -1).T).reshape(*sv.shape, 3)


def expected_labels(centres: np.ndarray, rois: dict[Side, PatientBox], mask: np.ndarray) -> np.ndarray:
    """Labels by definition: mask voxels whose centres each side's box contains."""
    labels = np.zeros(mask.shape, np.uint8)
    for side, roi in rois.items():
        labels[roi.contains(centres) & mask] = side.label
    return labels


@settings(max_examples=EXAMPLES, deadline=None)
@given(acquisition=acquisitions(), size=st.sampled_from([160, 256]), seed=st.integers(0, 2**16), data=st.data())
def test_mask_through_stacks_and_model_space_and_back_is_identical(acquisition, size, seed, data) -> None:
    affine, shape = acquisition
    rng = np.random.default_rng(seed)
    volume = hd.Volume(rng.integers(0, 4000, shape).astype(np.uint16), affine, coordinate_system="PATIENT",
                       frame_of_reference_uid=STUDY.frame_of_reference_uid)
    sv = load_series(build_mr_series(volume, STUDY))
    centres = voxel_centres(sv)
    rois = data.draw(regions(default_rois(sv))) or default_rois(sv)
    assume(all(roi.contains(centres).any() for roi in rois.values()))
    mask = rng.random(sv.shape) > 0.6

    stacks = side_stacks(sv, rois)
    back = []
    for stack in stacks.values():
        t = plan_slice_transform(stack.slices.shape[1:], stack.pixel_spacing, size, require_exact=True)
        forward = [mask_to_model(m, t) for m in mask.reshape(-1)[stack.source_index]]
        back.append(np.stack([mask_from_model(m, t) for m in forward]))
    labels = stack_to_volume(list(stacks.values()), back, sv)

    np.testing.assert_array_equal(labels, expected_labels(centres, rois, mask))
