"""The whole lower head around the mandible: skull base, zygomatic arches, ear canals, palate, sinuses, skin.

The paper crops each side of a 220 mm study by hand between anatomical landmarks (superiorly the
cranial base, inferiorly the lowest point of the chin, medially the midline palatal suture, laterally
the lateral border of the zygomatic arch, anteriorly the buccal skin, posteriorly the external
acoustic meatus). Here those landmarks are real structures of the phantom, placed relative to the
mandible in the anatomy frame (see `phantom_anatomy`), so each patient's crop box follows its own
anatomy and pose. `HeadLayout` holds their positions; `render` paints them from the masks below.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ian_node.phantom.anatomy import Mandible, foramen_ovale, head_rotation
from ian_node.phantom.params import PatientParams
from ian_node.phantom.tubes import Tube, sample_curve

F = np.float32


@dataclass(frozen=True)
class HeadLayout:
    """Levels and structures of the head, in anatomy-frame millimetres (+x left, +y posterior, +z up)."""

    scale: float
    z_menton: float  # the lowest point of the chin
    z_occlusal: float
    z_palate: float  # the palate's oral surface
    palate_mm: float
    z_cranial_base: float  # inferior surface of the middle cranial fossa floor
    cranial_base_mm: float
    y_face: float  # the most anterior skin, at the lips
    y_palate: float  # middle of the hard palate (its suture runs along x = 0)
    y_head_centre: float
    y_fossa_front: float  # the middle cranial fossa floor spans these y (behind the maxillary sinuses ...
    y_fossa_back: float  # ... to behind the ear canals)
    head_half_width: float
    head_length: float
    zygoma: dict[int, Tube]  # per side (-1 right, +1 left)
    eam: dict[int, Tube]  # external acoustic meatus, lateral opening first
    temporal_bone: dict[int, tuple[np.ndarray, np.ndarray]]  # centre, radii of the petromastoid block
    sinus: dict[int, tuple[np.ndarray, np.ndarray]]
    landmarks: dict[str, np.ndarray]

    @property
    def z_top(self) -> float:
        """The top of what a lower-head acquisition must cover: the cranial base with its thickness."""
        return self.z_cranial_base + self.cranial_base_mm

    def fov_centre(self) -> np.ndarray:
        """Where a technologist centres the slab: mid-head in plane, chin to above the cranial base."""
        return np.array([0.0, self.y_head_centre, (self.z_menton - 6.0 + self.z_top + 10.0) / 2])


def _condyle_top(m: Mandible, side: int) -> np.ndarray:
    ram = m.rami[side]
    w = 0.12 * ram.width
    return ram.point(w, float(ram.top(np.float32(w))), 0.0)


def head_layout(params: PatientParams, m: Mandible) -> HeadLayout:
    """Place the head's structures around this mandible and read off the paper's crop landmarks."""
    s = float(m.scale_xy)
    sz = float(m.scale_z)
    condyles = {side: _condyle_top(m, side) for side in (-1, 1)}
    z_condyle = max(float(c[2]) for c in condyles.values())
    z_cb = z_condyle + params.cranial_base_gap_mm * sz
    theta_back = np.float32(np.radians(80))
    z_occ = float(m.bottom(theta_back) + m.height(theta_back)) + params.crown_height_mm * max(sz, 0.7)
    z_pal = z_occ + params.palate_above_occlusion_mm * sz
    y_front_arch = m.y_back - float(m.radius(np.float32(0.0)))
    y_face = y_front_arch - m.thickness_front / 2 - params.soft_margin_mm * s - 4.0 * s
    length = params.head_length_mm * s
    half_width = params.head_half_width_mm * s
    zyg_half = params.zygoma_half_width_mm * s
    r_zyg = params.zygoma_radius_mm * s

    zygoma, eam, temporal, sinus, landmarks = {}, {}, {}, {}, {}
    for side in (-1, 1):
        name = "right" if side < 0 else "left"
        c = condyles[side]
        outer = abs(float(c[0])) + m.rami[side].thickness / 2
        # Arch: from the articular tubercle in front of the condyle, bowing out to its lateral
        # border, into the zygoma body beside the maxillary sinus.
        ctrl = np.array([
            [side * (outer + 2.0 * s), c[1] - 9.0 * s, z_condyle - 1.0 * sz],
            [side * (zyg_half - r_zyg), c[1] - 26.0 * s, z_condyle - 3.0 * sz],
            [side * (zyg_half - r_zyg - 7.0 * s), c[1] - 44.0 * s, z_condyle - 7.0 * sz],
            [side * (zyg_half - r_zyg - 16.0 * s), c[1] - 56.0 * s, z_condyle - 12.0 * sz],
        ])
        points = sample_curve(ctrl)
        zygoma[side] = Tube(f"{name} zygomatic arch", points, np.full(len(points), r_zyg))
        lateral = points[np.argmax(side * points[:, 0])] + np.array([side * r_zyg, 0.0, 0.0])
        # Ear canal: behind the condyle, from the skin of the side of the head inwards.
        y_eam = float(c[1]) + params.eam_behind_condyle_mm * s
        z_eam = z_condyle - 2.0 * sz
        skin_x = half_width + 2.0 * s
        e_pts = sample_curve(np.array([[side * skin_x, y_eam, z_eam], [side * (skin_x - 13.0 * s), y_eam - 1.0 * s,
                                                                        z_eam + 0.5], [side * (skin_x - 26.0 * s),
                                                                                       y_eam - 3.0 * s, z_eam]]))
        eam[side] = Tube(f"{name} external acoustic meatus", e_pts, np.full(len(e_pts), params.eam_radius_mm * s))
        temporal[side] = (np.array([side * (skin_x - 24.0 * s), y_eam + 6.0 * s, z_eam + 3.0 * sz]),
                          np.array([14.0 * s, 15.0 * s, 11.0 * sz]))
        rx, ry, rz = (r * s for r in params.sinus_radii_mm)
        sinus[side] = (np.array([side * (m.half_width * 0.72), m.y_back - 0.55 * m.depth,
                                 z_pal + params.palate_mm * sz + rz + 2.0]), np.array([rx, ry, rz]))
        landmarks[f"zygomatic_arch_{name}"] = lateral
        landmarks[f"external_acoustic_meatus_{name}"] = e_pts[0]
        # The cranial base over this side's infratemporal fossa (foramen ovale to condyle), at its
        # highest point in the image: a tilted head tilts the skull base's inferior surface.
        ovale = foramen_ovale(side, params, m, z_cb)
        gx, gy = np.meshgrid(np.linspace(ovale[0], c[0], 7), np.linspace(min(ovale[1], c[1]) - 10.0 * s,
                                                                          max(ovale[1], c[1]) + 10.0 * s, 9))
        roof = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, z_cb)], axis=1)
        landmarks[f"cranial_base_{name}"] = roof[np.argmax((roof @ head_rotation(params).T)[:, 2])]
        # The most anterior buccal skin of this side, as seen in the image: the skin over the
        # incisor-to-premolar region of the face, its most anterior point in LPS.
        th = np.radians(np.linspace(5.0, 45.0, 17))
        rho = m.radius(th.astype(np.float32)).astype(np.float64) + m.thickness_front / 2 + params.soft_margin_mm * s
        skin = np.stack([side * rho * np.sin(th), m.y_back - rho * np.cos(th), np.full(len(th), z_occ)], axis=1)
        landmarks[f"buccal_skin_{name}"] = skin[np.argmin((skin @ head_rotation(params).T)[:, 1])]
    y_palate = m.y_back - 0.5 * float(m.radius(np.float32(0.0)))
    y_fossa_front = float(sinus[1][0][1] + sinus[1][1][1])
    y_fossa_back = max(float(t[0][1] + t[1][1]) for t in temporal.values()) + 5.0 * s
    landmarks["palatal_suture"] = np.array([0.0, y_palate, z_pal])
    # "The most inferior point of the chin" as seen in the image: with the head rolled or pitched,
    # the lowest point of the chin's inferior border in LPS, not necessarily the midline menton.
    chin = np.array([m.body_point(float(t), 0.0, 0.0) for t in np.linspace(-45.0, 45.0, 31)])
    landmarks["menton"] = chin[np.argmin((chin @ head_rotation(params).T)[:, 2])]
    return HeadLayout(
        scale=s, z_menton=float(chin[15][2]), z_occlusal=z_occ, z_palate=z_pal,
        palate_mm=params.palate_mm * sz, z_cranial_base=z_cb, cranial_base_mm=params.cranial_base_mm * sz,
        y_face=y_face, y_palate=y_palate, y_head_centre=y_face + 0.5 * length,
        y_fossa_front=y_fossa_front, y_fossa_back=y_fossa_back, head_half_width=half_width,
        head_length=length, zygoma=zygoma, eam=eam, temporal_bone=temporal, sinus=sinus, landmarks=landmarks,
    )


def cranium_depth(layout: HeadLayout, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Millimetres inside the skin of the upper head (negative outside; -inf below the occlusal plane).

    An axial superellipse that widens from the cheeks at the occlusal plane to the zygomatic arches
    and the full head breadth above the cranial base; the mandible's face (`render`) covers below.
    """
    zf = (z - F(layout.z_occlusal)) / F(max(layout.z_cranial_base - layout.z_occlusal, 1.0))
    return np.where(zf >= F(-0.15), head_outline_depth(layout, x, y, np.clip(zf, 0, 1)), F(-np.inf))


def head_outline_depth(layout: HeadLayout, x: np.ndarray, y: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    """Millimetres inside the axial head outline at relative height `t` (0 occlusal plane, 1 cranial
    base); below the occlusal plane it also rounds off the back of the neck."""
    half_w = F(layout.head_half_width * 0.8) + F(layout.head_half_width * 0.2) * t
    half_l = F(layout.head_length * 0.42) + F(layout.head_length * 0.08) * t
    yc = F(layout.y_face) + half_l
    r = ((np.abs(x) / half_w) ** 2.5 + (np.abs(y - yc) / half_l) ** 2.5) ** F(0.4)
    return (F(1.0) - r) * np.minimum(half_w, half_l)


def crop_box(landmarks: dict[str, np.ndarray], side: int) -> np.ndarray:
    """The paper's manual crop of one side as [[xmin, xmax], [ymin, ymax], [zmin, zmax]] in LPS mm.

    Landmarks must already be in LPS: medially the palatal suture, laterally the zygomatic arch,
    anteriorly the buccal skin, posteriorly the ear canal, inferiorly the lowest point of the chin
    in the image, superiorly the cranial base (the box is axis-aligned in LPS, as a crop of the axial images is).
    """
    name = "right" if side < 0 else "left"
    xs = sorted((float(landmarks["palatal_suture"][0]), float(landmarks[f"zygomatic_arch_{name}"][0])))
    ys = sorted((float(landmarks[f"buccal_skin_{name}"][1]), float(landmarks[f"external_acoustic_meatus_{name}"][1])))
    zs = sorted((float(landmarks["menton"][2]), float(landmarks[f"cranial_base_{name}"][2])))
    return np.array([xs, ys, zs])
