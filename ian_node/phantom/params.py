"""Per-patient parameters of the synthetic MRN phantom, drawn deterministically from (seed, patient).

Lengths are adult sizes in millimetres; docs/phantoms.md lists the ranges with their sources. At the
`paper` preset the head is life size times `head_scale`; the `small` preset scales the bony anatomy
to fill its field of view, while the nerve, vessels and canal keep their real sizes. The draws happen
in a fixed order whatever the configuration, so patient i of seed s keeps the same anatomy when the
image size or the number of patients changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: Tooth mesiodistal widths (mm) from the midline: central and lateral incisor, canine, premolars 1-2,
#: molars 1-3 (lower jaw, adult).
TOOTH_WIDTHS_MM = (5.4, 5.9, 6.9, 7.0, 7.3, 11.2, 10.5, 10.0)


@dataclass(frozen=True)
class SideAnatomy:
    """One side's ramus and nerve course (the two sides differ a little, as in patients)."""

    ramus_lean_deg: float  # posterior lean of the ramus from vertical
    ramus_flare_deg: float  # lateral flare of the ramus going up
    foramen_w: float  # mandibular foramen: fraction of ramus width from the posterior border
    foramen_h: float  # ... and fraction of ramus height above the gonial angle
    canal_theta_deg: tuple[float, float, float]  # course in the body: angle from the midline
    canal_height: tuple[float, float, float]  # ... height as a fraction of body height
    canal_buccal: tuple[float, float, float]  # ... -1 lingual wall .. +1 buccal wall
    mental_theta_deg: float  # mental foramen
    mental_height: float
    anterior_loop: bool
    nerve_radius_mm: float
    nerve_taper: float  # fractional radius loss from foramen to mental foramen
    vessel_radius_mm: tuple[float, float]  # inferior alveolar artery, vein
    vessel_angle_deg: tuple[float, float]  # their position around the nerve (0 = above)
    vessel_twist_deg: float  # slow rotation of the bundle along its course
    extraosseous_mm: float  # how far above the mandibular foramen the lingual nerve parts from the IAN
    lingual_nerve_radius_mm: float
    ramus_scale: float  # mild asymmetry: this side's ramus height factor
    annotation_inset: float  # the annotator's brush radius as a fraction of the nerve radius
    distractor_radius_mm: tuple[float, float, float, float]  # retromandibular v., facial a., facial v., lingual a.
    plexus: tuple[tuple[float, float, float, float, float], ...]  # pterygoid venous plexus tubes


@dataclass(frozen=True)
class Contrast:
    """Tissue intensities before bias and noise, MENSE-like: nerve bright, cortical bone dark."""

    nerve: float
    canal_vessel: float
    vessel: float
    fat: float
    marrow: float
    muscle: float
    soft: float
    gland: float
    cortex: float
    tooth: float
    canal_fill: float
    lingual_nerve: float
    brain: float
    fat_failure: float  # how bright fat gets where its suppression fails (MENSE fat saturation is uneven)


@dataclass(frozen=True)
class MetalSpec:
    """A metal restoration: a crown on one tooth, optionally with an implant reaching the canal."""

    side: int  # -1 patient's right, +1 left
    tooth: int  # index into TOOTH_WIDTHS_MM
    reaches_canal: bool
    void_radius_mm: float
    rim_width_mm: float
    rim_gain: float


@dataclass(frozen=True)
class PatientParams:
    """Everything that makes one synthetic patient."""

    pixel_spacing_mm: float  # column spacing (left-right)
    row_spacing_mm: float  # row spacing (anterior-posterior, the phase-encode direction)
    slice_spacing_mm: float
    oblique_axis: tuple[float, float, float]
    oblique_deg: float
    head_rotation_deg: tuple[float, float, float]  # about x (pitch), y (roll), z (yaw)
    offset_mm: tuple[float, float, float]  # the head's centre from the field of view's centre (x, y, z)
    head_scale: float  # life-size head at the paper preset: every bony and soft length times this
    arch_half_width_mm: float
    arch_depth_mm: float
    arch_exponent: float
    body_height_front_mm: float
    body_height_back_mm: float
    inferior_rise_mm: float
    body_thickness_front_mm: float
    body_thickness_back_mm: float
    ramus_height_mm: float
    ramus_width_mm: float
    ramus_thickness_mm: float
    cortex_mm: float
    cortex_inferior_mm: float
    canal_wall_mm: float
    tooth_scale: float
    missing_teeth: tuple[bool, ...]  # 16: right 0-7 then left 0-7
    crown_height_mm: float
    root_fraction: float
    masseter_mm: float
    pterygoid_gap_mm: float
    medial_pterygoid_mm: float
    subcutaneous_fat_mm: float
    soft_margin_mm: float
    pharynx_radii_mm: tuple[float, float]
    oral_air_mm: float
    cranial_base_gap_mm: float  # condyle top to the roof of the glenoid fossa (the cranial base)
    cranial_base_mm: float  # thickness of the middle cranial fossa floor
    zygoma_half_width_mm: float  # half the bizygomatic breadth (lateral border of the arches)
    zygoma_radius_mm: float  # the arch's half height
    eam_radius_mm: float
    eam_behind_condyle_mm: float
    head_half_width_mm: float  # half the head breadth above the cranial base
    head_length_mm: float  # glabella-opisthocranion length
    palate_above_occlusion_mm: float
    palate_mm: float  # hard palate thickness
    sinus_radii_mm: tuple[float, float, float]
    right: SideAnatomy
    left: SideAnatomy
    contrast: Contrast
    noise_sigma: float
    bias_strength: float
    bias_coefficients: tuple[float, ...]
    motion: bool
    motion_amplitude_px: float
    motion_period_lines: float
    motion_phase: float
    metals: tuple[MetalSpec, ...]
    psf_fwhm_mm: float

    def side(self, s: int) -> SideAnatomy:
        return self.right if s < 0 else self.left

    def summary(self) -> dict:
        """A JSON-friendly dict of the parameters."""
        return asdict(self)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _side(rng: np.random.Generator, nerve_diameter: tuple[float, float]) -> SideAnatomy:
    plexus = tuple(
        (_u(rng, -4, 2), _u(rng, -3, 6), _u(rng, 2, 16), _u(rng, 0.45, 0.9), _u(rng, -35, 35))
        for _ in range(4)
    )
    theta3 = _u(rng, 64, 70)
    return SideAnatomy(
        ramus_lean_deg=_u(rng, 8, 18),
        ramus_flare_deg=_u(rng, 0, 6),
        foramen_w=_u(rng, 0.5, 0.62),
        foramen_h=_u(rng, 0.4, 0.52),
        canal_theta_deg=(theta3, _u(rng, 46, 52), _u(rng, 31, 36)),
        canal_height=(_u(rng, 0.38, 0.48), _u(rng, 0.3, 0.38), _u(rng, 0.32, 0.42)),
        canal_buccal=(_u(rng, -0.9, -0.4), _u(rng, -0.4, 0.2), _u(rng, -0.1, 0.5)),
        mental_theta_deg=_u(rng, 19, 25),  # below the second premolar
        mental_height=_u(rng, 0.45, 0.58),
        anterior_loop=bool(rng.random() < 0.25),
        nerve_radius_mm=_u(rng, nerve_diameter[0] / 2, nerve_diameter[1] / 2),
        nerve_taper=_u(rng, 0.0, 0.15),
        vessel_radius_mm=(_u(rng, 0.25, 0.4), _u(rng, 0.3, 0.5)),
        vessel_angle_deg=(_u(rng, -60, -10), _u(rng, 10, 70)),
        vessel_twist_deg=_u(rng, -60, 60),
        extraosseous_mm=_u(rng, 8, 16),
        lingual_nerve_radius_mm=_u(rng, 0.9, 1.25),
        ramus_scale=_u(rng, 0.95, 1.05),
        annotation_inset=_u(rng, 0.8, 0.95),
        distractor_radius_mm=(_u(rng, 1.2, 2.0), _u(rng, 0.8, 1.3), _u(rng, 1.0, 1.6), _u(rng, 0.7, 1.2)),
        plexus=plexus,
    )


def draw_patient(rng: np.random.Generator, *, pixel_spacing: tuple[float, float],
                 row_spacing: tuple[float, float] | None, slice_spacing: tuple[float, float],
                 nerve_diameter: tuple[float, float], max_offset_mm: float, max_rotation_deg: float,
                 head_scale: tuple[float, float], nerve_signal: tuple[float, float] = (0.82, 1.0),
                 noise: tuple[float, float], bias: tuple[float, float], motion_probability: float,
                 metal_probability: float, metal_reaches_canal_probability: float,
                 oblique_probability: float, max_oblique_deg: float) -> PatientParams:
    """Draw one patient. Every call makes the same number of draws in the same order."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    oblique = rng.random() < oblique_probability
    oblique_deg = max_oblique_deg * _u(rng, 0.25, 1.0)
    head = tuple(_u(rng, -max_rotation_deg, max_rotation_deg) for _ in range(3))
    offset = tuple(_u(rng, -max_offset_mm, max_offset_mm) for _ in range(3))
    missing = tuple(bool(m) for m in rng.random(16) < 0.12)
    right, left = _side(rng, nerve_diameter), _side(rng, nerve_diameter)

    nerve = _u(rng, *nerve_signal)
    contrast = Contrast(
        nerve=nerve,
        canal_vessel=nerve * _u(rng, 0.8, 1.1),
        vessel=_u(rng, 0.7, 1.0),
        fat=_u(rng, 0.12, 0.3),
        marrow=_u(rng, 0.45, 0.62),
        muscle=_u(rng, 0.26, 0.38),
        soft=_u(rng, 0.36, 0.46),
        gland=_u(rng, 0.46, 0.6),
        cortex=_u(rng, 0.03, 0.08),
        tooth=_u(rng, 0.02, 0.05),
        canal_fill=_u(rng, 0.45, 0.65),
        lingual_nerve=nerve * _u(rng, 0.9, 1.08),
        brain=_u(rng, 0.3, 0.42),
        fat_failure=_u(rng, 0.55, 0.85),
    )

    has_metal = rng.random() < metal_probability
    n_metal = int(rng.integers(1, 4))
    metal_draws = []
    for _ in range(3):
        metal_draws.append(MetalSpec(
            side=-1 if rng.random() < 0.5 else 1,
            tooth=int(rng.integers(3, 7)),
            reaches_canal=bool(rng.random() < metal_reaches_canal_probability),
            void_radius_mm=_u(rng, 2.5, 5.5),
            rim_width_mm=_u(rng, 0.6, 1.4),
            rim_gain=_u(rng, 0.8, 2.0),
        ))
    metals = tuple(metal_draws[:n_metal]) if has_metal else ()
    motion = rng.random() < motion_probability

    column_spacing = _u(rng, *pixel_spacing)
    rows = _u(rng, *(row_spacing or (1.0, 1.0)))  # drawn either way: later draws stay the same patient
    rows = rows if row_spacing is not None else column_spacing
    return PatientParams(
        pixel_spacing_mm=column_spacing,
        row_spacing_mm=rows,
        slice_spacing_mm=_u(rng, *slice_spacing),
        oblique_axis=tuple(float(v) for v in axis),
        oblique_deg=oblique_deg if oblique else 0.0,
        head_rotation_deg=head,
        offset_mm=offset,
        head_scale=_u(rng, *head_scale),
        arch_half_width_mm=_u(rng, 40, 47),
        arch_depth_mm=_u(rng, 66, 78),
        arch_exponent=_u(rng, 1.8, 2.6),
        body_height_front_mm=_u(rng, 28, 34),
        body_height_back_mm=_u(rng, 21, 26),
        inferior_rise_mm=_u(rng, 2, 7),
        body_thickness_front_mm=_u(rng, 12.5, 15),
        body_thickness_back_mm=_u(rng, 10.5, 13),
        ramus_height_mm=_u(rng, 50, 60),
        ramus_width_mm=_u(rng, 28, 34),
        ramus_thickness_mm=_u(rng, 9.0, 10.5),
        cortex_mm=_u(rng, 1.2, 2.0),
        cortex_inferior_mm=_u(rng, 2.4, 3.4),
        canal_wall_mm=_u(rng, 0.5, 0.9),
        tooth_scale=_u(rng, 0.92, 1.06),
        missing_teeth=missing,
        crown_height_mm=_u(rng, 6.5, 8.5),
        root_fraction=_u(rng, 0.3, 0.42),
        masseter_mm=_u(rng, 8, 13),
        pterygoid_gap_mm=_u(rng, 3.5, 6.0),
        medial_pterygoid_mm=_u(rng, 8, 11),
        subcutaneous_fat_mm=_u(rng, 3, 8),
        soft_margin_mm=_u(rng, 8, 14),
        pharynx_radii_mm=(_u(rng, 8, 13), _u(rng, 4, 8)),
        oral_air_mm=_u(rng, 0.0, 4.0),
        cranial_base_gap_mm=_u(rng, 3.0, 6.0),
        cranial_base_mm=_u(rng, 4.0, 8.0),
        zygoma_half_width_mm=_u(rng, 62.0, 70.0),
        zygoma_radius_mm=_u(rng, 2.5, 3.5),
        eam_radius_mm=_u(rng, 3.0, 4.5),
        eam_behind_condyle_mm=_u(rng, 9.0, 14.0),
        head_half_width_mm=_u(rng, 70.0, 78.0),
        head_length_mm=_u(rng, 178.0, 198.0),
        palate_above_occlusion_mm=_u(rng, 12.0, 18.0),
        palate_mm=_u(rng, 3.0, 6.0),
        sinus_radii_mm=(_u(rng, 10.0, 14.0), _u(rng, 14.0, 18.0), _u(rng, 13.0, 17.0)),
        right=right,
        left=left,
        contrast=contrast,
        noise_sigma=_u(rng, *noise),
        bias_strength=_u(rng, *bias),
        bias_coefficients=tuple(float(v) for v in rng.normal(size=9)),
        motion=bool(motion),
        motion_amplitude_px=_u(rng, 0.4, 1.5),
        motion_period_lines=_u(rng, 6, 24),
        motion_phase=_u(rng, 0, 2 * np.pi),
        metals=metals,
        psf_fwhm_mm=_u(rng, 0.7, 1.0),
    )
