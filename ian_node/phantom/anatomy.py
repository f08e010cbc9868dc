"""Geometry of the phantom: the acquisition grid, the mandible, and the nerve and vessel courses.

Coordinates: the *anatomy frame* is the patient's LPS frame turned by a small head rotation, in mm,
centred on the mandible: +x the patient's left, +y posterior, +z superior. The patient's right IAN
therefore lies at negative x (lower LPS x). The mandible is a U-shaped body (a superellipse arch in
the axial plane, with a rounded-rectangle cross-section) plus two rami (plates rising from the gonial
angles); `phantom_render` paints tissues from these shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from ian_node.phantom.params import PatientParams, SideAnatomy
from ian_node.phantom.tubes import Tube, offset_tube, sample_curve

#: Where the anatomy frame's origin sits in LPS (mm): the mandible of a supine head near isocentre.
ANATOMY_ORIGIN_LPS = np.array([0.0, -35.0, -95.0])
#: Fraction of the field of view the bony envelope may fill when it is scaled to fit (the `small`
#: preset): room for the pose's rotation and offset.
FILL = 0.84
FILL_Z = 0.72  # the slab is thin: head pitch and roll move the condyles and chin most along it
HALF_PI = np.pi / 2


@dataclass(frozen=True)
class Geometry:
    """The voxel grid and its relation to LPS and to the anatomy frame."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # slice, row, column (mm)
    affine: np.ndarray  # 4x4, (slice, row, column) indices -> LPS mm, highdicom's convention
    head: np.ndarray  # 3x3 rotation, anatomy frame -> LPS
    to_anatomy: np.ndarray  # 3x4, indices -> anatomy mm
    to_index: np.ndarray  # 3x4, anatomy mm -> indices

    def anatomy_coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Anatomy-frame x, y, z (mm, float32) of every voxel centre."""
        k, i, j = (np.arange(n, dtype=np.float32) for n in self.shape)
        m = self.to_anatomy.astype(np.float32)
        return tuple(  # type: ignore[return-value]
            m[a, 0] * k[:, None, None] + m[a, 1] * i[None, :, None] + m[a, 2] * j[None, None, :] + m[a, 3]
            for a in range(3)
        )


def acquisition_geometry(params: PatientParams, shape: tuple[int, int, int], centre: np.ndarray,
                         supersample: int = 1) -> Geometry:
    """Axial grid (rows anterior→posterior, columns right→left), slightly oblique on some patients.

    `centre` is the field of view's centre in the anatomy frame. With `supersample` k the slices are
    k times as many and k times as thin over the same slab (their centres average to the coarse
    ones), for rendering partial volume. The slice axis runs along minus the normal (row × column
    cosines), as highdicom orders a series, so `highdicom.get_volume_from_series` reads the written
    series back to this very affine.
    """
    ps, rs = params.pixel_spacing_mm, params.row_spacing_mm
    ss = params.slice_spacing_mm / supersample
    shape = (int(shape[0]) * supersample, int(shape[1]), int(shape[2]))
    oblique = Rotation.from_rotvec(np.radians(params.oblique_deg) * np.asarray(params.oblique_axis)).as_matrix()
    row_cos, col_cos = oblique @ np.array([1.0, 0.0, 0.0]), oblique @ np.array([0.0, 1.0, 0.0])
    normal = np.cross(row_cos, col_cos)
    axes = np.stack([-normal * ss, col_cos * rs, row_cos * ps], axis=1)
    head = head_rotation(params)
    centre_lps = ANATOMY_ORIGIN_LPS + head @ np.asarray(centre, dtype=np.float64)
    centre_idx = (np.array(shape, dtype=np.float64) - 1) / 2
    affine = np.eye(4)
    affine[:3, :3] = axes
    affine[:3, 3] = centre_lps - axes @ centre_idx
    to_anatomy = np.zeros((3, 4))
    to_anatomy[:, :3] = head.T @ axes
    to_anatomy[:, 3] = head.T @ (affine[:3, 3] - ANATOMY_ORIGIN_LPS)
    inv_axes = np.linalg.inv(axes)
    to_index = np.zeros((3, 4))
    to_index[:, :3] = inv_axes @ head
    to_index[:, 3] = inv_axes @ (ANATOMY_ORIGIN_LPS - affine[:3, 3])
    return Geometry(shape, (ss, rs, ps), affine, head, to_anatomy, to_index)


def head_rotation(params: PatientParams) -> np.ndarray:
    """The head's pose: anatomy frame → LPS rotation."""
    return Rotation.from_euler("xyz", params.head_rotation_deg, degrees=True).as_matrix()


def to_lps(params: PatientParams, point: np.ndarray) -> np.ndarray:
    """An anatomy-frame point in patient LPS millimetres."""
    return ANATOMY_ORIGIN_LPS + head_rotation(params) @ np.asarray(point, dtype=np.float64)


@dataclass(frozen=True)
class Ramus:
    """One ramus as a plate: origin at the gonial angle, axes up (h), anterior (w), lateral (t)."""

    origin: np.ndarray
    e_h: np.ndarray
    e_w: np.ndarray
    e_t: np.ndarray
    height: float
    width: float
    thickness: float

    def point(self, w: float, h: float, t: float) -> np.ndarray:
        return self.origin + w * self.e_w + h * self.e_h + t * self.e_t

    def top(self, w: np.ndarray) -> np.ndarray:
        """Upper edge: condyle behind, coronoid in front, the sigmoid notch between."""
        wf = w / np.float32(self.width)
        condyle = np.float32(0.09 * self.height) * np.exp(-((wf - np.float32(0.12)) / np.float32(0.14)) ** 2)
        notch = np.float32(0.25 * self.height) * np.exp(-((wf - np.float32(0.52)) / np.float32(0.17)) ** 2)
        return np.float32(self.height) + condyle - notch


@dataclass(frozen=True)
class Mandible:
    """The scaled mandible. Body coordinates: polar angle θ about (0, y_back) (0 = chin, >0 the
    patient's left), radial offset u from the arch midline (>0 buccal), height v above the inferior border."""

    half_width: float
    depth: float
    exponent: float
    y_back: float
    z_bottom_front: float
    rise: float
    height_front: float
    height_back: float
    thickness_front: float
    thickness_back: float
    cortex: float
    cortex_inferior: float
    rami: dict[int, Ramus]
    scale_xy: float
    scale_z: float

    def radius(self, theta: np.ndarray) -> np.ndarray:
        """Distance from (0, y_back) to the arch midline at polar angle θ (superellipse)."""
        n = np.float32(self.exponent)
        s = np.abs(np.sin(theta)) / np.float32(self.half_width)
        c = np.abs(np.cos(theta)) / np.float32(self.depth)
        return (s**n + c**n) ** (np.float32(-1.0) / n)

    def _w(self, theta):
        return (np.asarray(theta, dtype=np.float32) / np.float32(HALF_PI)) ** 2

    def height(self, theta):
        return np.float32(self.height_front) + np.float32(self.height_back - self.height_front) * self._w(theta)

    def bottom(self, theta):
        return np.float32(self.z_bottom_front) + np.float32(self.rise) * self._w(theta)

    def thickness(self, theta):
        frac = np.abs(np.asarray(theta, dtype=np.float32)) / np.float32(HALF_PI)
        return np.float32(self.thickness_front) + np.float32(self.thickness_back - self.thickness_front) * frac

    def body_point(self, theta_deg: float, u: float, v: float) -> np.ndarray:
        """A point in body coordinates; `v` in mm above the inferior border."""
        th = np.radians(theta_deg)
        rho = float(self.radius(np.float32(th))) + u
        return np.array([rho * np.sin(th), self.y_back - rho * np.cos(th), float(self.bottom(th)) + v])


def _ramus(side: int, anatomy: SideAnatomy, origin: np.ndarray, height: float, width: float,
           thickness: float) -> Ramus:
    beta, flare = np.radians(anatomy.ramus_lean_deg), np.radians(anatomy.ramus_flare_deg)
    e_h = np.array([side * np.tan(flare), np.sin(beta), np.cos(beta)])
    e_h /= np.linalg.norm(e_h)
    lateral = np.array([float(side), 0.0, 0.0])
    e_t = lateral - (lateral @ e_h) * e_h
    e_t /= np.linalg.norm(e_t)
    e_w = np.cross(e_t, e_h)
    if e_w[1] > 0:  # anterior is -y
        e_w = -e_w
    return Ramus(origin, e_h, e_w, e_t, height, width, thickness)


def canal_radius(anatomy: SideAnatomy) -> float:
    """Mandibular canal radius: the nerve plus the artery and vein beside it."""
    return anatomy.nerve_radius_mm + 2 * max(anatomy.vessel_radius_mm) + 0.1


def _dimensions(params: PatientParams, s_xy: float, s_z: float) -> dict[str, float]:
    """Scaled mandible dimensions; the canal must still fit, so thickness and height have floors."""
    r_canal = max(canal_radius(params.right), canal_radius(params.left))
    min_thick = 2 * (r_canal + params.cortex_mm + 0.8)
    min_height = 2 * (r_canal + params.cortex_inferior_mm) + 8
    lean = np.radians(max(params.right.ramus_lean_deg, params.left.ramus_lean_deg))
    flare = np.radians(max(params.right.ramus_flare_deg, params.left.ramus_flare_deg))
    d = {
        "half_width": params.arch_half_width_mm * s_xy,
        "depth": params.arch_depth_mm * s_xy,
        "t_front": max(params.body_thickness_front_mm * s_xy, min_thick + 1.5),
        "t_back": max(params.body_thickness_back_mm * s_xy, min_thick),
        "h_front": max(params.body_height_front_mm * s_z, min_height + 2),
        "h_back": max(params.body_height_back_mm * s_z, min_height),
        "rise": params.inferior_rise_mm * s_z,
        "ramus_h": params.ramus_height_mm * s_z,
        "ramus_w": max(params.ramus_width_mm * s_xy, 4 * r_canal + 6),
        "ramus_t": max(params.ramus_thickness_mm * s_xy, min_thick),
        "crown": params.crown_height_mm * max(s_z, 0.7),
    }
    d["width"] = 2 * (d["half_width"] + d["ramus_t"] / 2 + d["ramus_h"] * np.tan(flare) + 2)
    d["post"] = d["ramus_h"] * 1.1 * np.sin(lean) + 2  # condyle behind the gonial angle
    d["front"] = d["depth"] + d["t_front"] / 2 + 1  # chin in front of the gonial angle
    d["top"] = max(d["rise"] + d["ramus_h"] * 1.1 * np.cos(lean), d["h_front"] + d["crown"]) + 1
    return d


def build_mandible(params: PatientParams, fov_mm: tuple[float, float, float] | None = None) -> Mandible:
    """The mandible, life size times the head scale, or scaled to fill `fov_mm` (slab, rows, columns).

    Either way the bony envelope is centred on the anatomy frame's origin.
    """
    if fov_mm is None:
        s_xy = s_z = params.head_scale
        d = _dimensions(params, s_xy, s_z)
    else:
        fz, fy, fx = fov_mm
        s_xy = s_z = 1.05
        for _ in range(8):  # shrink until the floors on thickness and height fit too
            d = _dimensions(params, s_xy, s_z)
            fit_xy = FILL * min(fx / d["width"], fy / (d["front"] + d["post"]))
            fit_z = FILL_Z * fz / d["top"]
            if fit_xy >= 1 and fit_z >= 1:
                break
            s_xy, s_z = s_xy * min(1.0, fit_xy), s_z * min(1.0, fit_z)
            # Tiny test grids cannot hold the floors; keep the shape plausible rather than flatten it.
            s_z = max(s_z, 0.6 * s_xy)
        d = _dimensions(params, s_xy, s_z)
    y_back = (d["front"] - d["post"]) / 2
    z_bottom_front = -d["top"] / 2
    rami = {}
    for side in (-1, 1):
        origin = np.array([side * d["half_width"], y_back, z_bottom_front + d["rise"]])  # gonial angle
        k = params.side(side).ramus_scale  # mild asymmetry
        rami[side] = _ramus(side, params.side(side), origin, d["ramus_h"] * k, d["ramus_w"], d["ramus_t"])
    return Mandible(
        half_width=d["half_width"], depth=d["depth"], exponent=params.arch_exponent, y_back=y_back,
        z_bottom_front=z_bottom_front, rise=d["rise"], height_front=d["h_front"], height_back=d["h_back"],
        thickness_front=d["t_front"], thickness_back=d["t_back"],
        cortex=params.cortex_mm, cortex_inferior=params.cortex_inferior_mm,
        rami=rami, scale_xy=float(s_xy), scale_z=float(s_z),
    )


@dataclass(frozen=True)
class SideTubes:
    """One side's tubes and where along the nerve the bony canal runs."""

    nerve: Tube
    canal_start_mm: float  # arc length of the mandibular foramen
    canal_end_mm: float  # arc length of the mental foramen
    artery: Tube
    vein: Tube
    lingual_nerve: Tube
    distractors: tuple[Tube, ...]


def _tube(name: str, control: list[np.ndarray], radius: float | np.ndarray) -> Tube:
    points = sample_curve(np.asarray(control))
    r = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(points),)).copy()
    return Tube(name, points, r)


#: How far below the cranial base's inferior surface the traced nerve begins (mm).
OVALE_DEPTH_MM = 3.0


def foramen_ovale(side: int, params: PatientParams, mandible: Mandible, z_cranial_base: float) -> np.ndarray:
    """Where the IAN's trace begins: under the cranial base, medial to the condyle, above the
    mandibular foramen (anatomy frame, mm)."""
    a, ram = params.side(side), mandible.rami[side]
    wf, hf = a.foramen_w * ram.width, a.foramen_h * ram.height
    z = z_cranial_base - OVALE_DEPTH_MM
    h_ovale = (z - float(ram.origin[2])) / float(ram.e_h[2])
    ovale = ram.point(wf - 6.0 * min(1.0, mandible.scale_xy), max(h_ovale, hf + 3.0),
                      -(ram.thickness / 2 + (params.pterygoid_gap_mm + 6.0) * min(1.0, mandible.scale_xy)))
    ovale[2] = min(float(ovale[2]), z)
    return _lateral_of_midline(ovale, side, ram)


def _lateral_of_midline(point: np.ndarray, side: int, ram: Ramus) -> np.ndarray:
    """Keep a point medial to the ramus well lateral of the midline, even where the canal's floors
    make a scaled-down ramus thick (the `small` preset's tiny grids)."""
    point = np.array(point, dtype=np.float64)
    point[0] = side * max(side * float(point[0]), 0.6 * abs(float(ram.origin[0])))
    return point


def side_tubes(side: int, params: PatientParams, mandible: Mandible, z_cranial_base: float) -> SideTubes:
    """The IAN from the cranial base (foramen ovale) to the mental foramen, as the paper annotated it,
    its canal vessels, and the bright look-alikes around it (lingual nerve, pterygoid plexus,
    facial/retromandibular/lingual vessels)."""
    a = params.side(side)
    ram = mandible.rami[side]
    name = "right" if side < 0 else "left"
    r_c = canal_radius(a)
    tr = ram.thickness / 2
    wf, hf = a.foramen_w * ram.width, a.foramen_h * ram.height
    gap = params.pterygoid_gap_mm

    def body(theta: float, buccal: float | None, v_frac: float, u: float | None = None) -> np.ndarray:
        th = np.radians(theta)
        t_half = float(mandible.thickness(np.float32(th))) / 2
        h = float(mandible.height(np.float32(th)))
        lim = max(0.0, t_half - r_c - mandible.cortex - 0.3)
        uu = buccal * lim if u is None else u
        v = np.clip(v_frac * h, mandible.cortex_inferior + r_c + 0.6, h - r_c - 2.0)
        return mandible.body_point(side * theta, uu, float(v))

    inner_t = -(tr - r_c - mandible.cortex - 0.3)
    t3, t4, t5 = a.canal_theta_deg
    ovale = foramen_ovale(side, params, mandible, z_cranial_base)
    rise = float((ovale - ram.origin) @ ram.e_h) - hf  # along the ramus, foramen ovale to mandibular foramen
    ctrl = [
        ovale,
        _lateral_of_midline(ram.point(wf - 1.5, hf + 0.6 * rise, -(tr + 0.6 * gap)), side, ram),
        ram.point(wf - 0.5, hf + 0.3 * rise, -(tr + 0.35 * gap)),
        foramen := ram.point(wf, hf, -tr),  # mandibular foramen, on the medial surface
        ram.point(wf + 2.0, 0.55 * hf, min(inner_t * 0.8, 0.0)),
        body(t3, a.canal_buccal[0], a.canal_height[0]),
        body(t4, a.canal_buccal[1], a.canal_height[1]),
    ]
    mental_theta = a.mental_theta_deg
    if a.anterior_loop:
        ctrl.append(body(mental_theta - 4.0, 0.0, a.canal_height[2]))
    else:
        ctrl.append(body(t5, a.canal_buccal[2], a.canal_height[2]))
    t_mental = float(mandible.thickness(np.float32(np.radians(mental_theta)))) / 2
    ctrl.append(body(mental_theta, None, a.mental_height, u=t_mental + 0.8))
    points = sample_curve(np.asarray(ctrl))
    # The spline may bulge above the foramen ovale where the course is short (tiny grids): the
    # trace begins at the last sample above that level, as the annotator's began at the skull base.
    at_foramen = int(np.argmin(np.linalg.norm(points - foramen, axis=1)))
    above = np.flatnonzero(points[:at_foramen, 2] > z_cranial_base - OVALE_DEPTH_MM)
    points = points[above[-1] + 1 :] if above.size else points
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    canal_start = float(arc[np.argmin(np.linalg.norm(points - foramen, axis=1))])
    radius = a.nerve_radius_mm * (1 - a.nerve_taper * np.clip((arc - canal_start) / (arc[-1] - canal_start), 0, 1))
    nerve = Tube(f"{name} IAN", points, radius)
    # The curve ends 0.8 mm outside the mental foramen; only the canal's part inside bone is drawn.
    canal_end = float(arc[-1]) - 1.0

    twist = np.radians(a.vessel_twist_deg) * arc / arc[-1]
    vessels = []
    for kind, r_v, ang in zip(("artery", "vein"), a.vessel_radius_mm, a.vessel_angle_deg, strict=True):
        dist = radius + r_v + 0.1
        vessels.append(offset_tube(nerve, f"{name} inferior alveolar {kind}", dist, np.radians(ang) + twist, r_v))

    def half_t(theta_deg: float) -> float:
        return float(mandible.thickness(np.float32(np.radians(theta_deg)))) / 2

    def h_of(theta_deg: float) -> float:
        return float(mandible.height(np.float32(np.radians(theta_deg))))

    # The lingual nerve: same brightness and size, medial to the ramus, then in the floor of the mouth.
    lingual = _tube(f"{name} lingual nerve", [
        ram.point(wf + 5.0, hf + a.extraosseous_mm + 2.0, -(tr + 0.5 * gap)),
        ram.point(0.85 * ram.width, hf - 2.0, -(tr + 0.8 * gap)),
        body(72, None, 0.85, u=-(half_t(72) + 3.5)),
        body(52, None, 0.7, u=-(half_t(52) + 5.0)),
        body(34, None, 0.6, u=-(half_t(34) + 8.0)),
    ], a.lingual_nerve_radius_mm)

    r_rmv, r_fa, r_fv, r_la = a.distractor_radius_mm
    distractors = [
        _tube(f"{name} retromandibular vein", [
            ram.point(-5.0, -12.0, 1.5), ram.point(-6.0, 0.5 * ram.height, 1.0),
            ram.point(-4.5, ram.height + 6.0, 2.0)], r_rmv),
        _tube(f"{name} facial artery", [
            mandible.body_point(side * 76, half_t(76) + 2.5, -8.0),
            mandible.body_point(side * 67, half_t(67) + 2.0, 0.0),
            mandible.body_point(side * 57, half_t(57) + 6.0, h_of(57) + 8.0),
            mandible.body_point(side * 48, half_t(48) + 9.0, h_of(48) + 20.0)], r_fa),
        _tube(f"{name} facial vein", [
            mandible.body_point(side * 80, half_t(80) + 3.0, -9.0),
            mandible.body_point(side * 71, half_t(71) + 2.5, 0.0),
            mandible.body_point(side * 62, half_t(62) + 7.0, h_of(62) + 9.0),
            mandible.body_point(side * 54, half_t(54) + 10.0, h_of(54) + 22.0)], r_fv),
        _tube(f"{name} lingual artery", [
            mandible.body_point(side * 82, -(half_t(82) + 6.0), 0.15 * h_of(82)),
            mandible.body_point(side * 62, -(half_t(62) + 8.0), 0.25 * h_of(62)),
            mandible.body_point(side * 40, -(half_t(40) + 9.0), 0.3 * h_of(40)),
            mandible.body_point(side * 20, -(half_t(20) + 8.0), 0.35 * h_of(20))], r_la),
    ]
    for n, (dw, dt, dh, r_p, ang) in enumerate(a.plexus):
        centre = ram.point(wf + 3.0 * dw, hf + dh, -(tr + 0.5 * gap) + 0.3 * dt)
        phi = np.radians(ang)
        direction = np.cos(phi) * ram.e_h + np.sin(phi) * ram.e_w
        bend = 1.5 * ram.e_t
        distractors.append(_tube(f"{name} pterygoid plexus {n}", [
            centre - 5.0 * direction, centre + bend * 0.5, centre + 5.0 * direction], r_p))
    return SideTubes(nerve, canal_start, canal_end, vessels[0], vessels[1], lingual, tuple(distractors))
