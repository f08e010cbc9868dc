"""Paint the phantom's tissues into the voxel grid: intensities, a tissue map, and the IAN labels.

Painting goes back to front (soft tissue, fat, muscles, glands, airway, bone, teeth, canal, vessels,
nerves), each step a vectorised mask over the whole grid or, for tubes, over a tube's neighbourhood.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from scipy import ndimage

from ian_node.phantom.anatomy import HALF_PI, Geometry, Mandible, SideTubes, build_mandible, side_tubes
from ian_node.phantom.params import TOOTH_WIDTHS_MM, PatientParams
from ian_node.phantom.tubes import Tube, TubeRenderer

F = np.float32


class Tissue(IntEnum):
    """Tissue classes of the phantom's tissue map (used for intensity statistics)."""

    AIR = 0
    SOFT = 1
    FAT = 2
    MUSCLE = 3
    GLAND = 4
    CORTEX = 5
    MARROW = 6
    TOOTH = 7
    VESSEL = 8
    NERVE = 9
    LINGUAL_NERVE = 10
    CANAL = 11
    METAL = 12
    VERTEBRA = 13


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # float32, noise-free, before bias
    tissue: np.ndarray  # uint8 Tissue
    labels: np.ndarray  # uint8: 0, 1 right IAN, 2 left IAN
    mandible: Mandible
    tubes: dict[int, SideTubes]
    nerve_length_in_fov_mm: dict[int, float]  # per side (-1 right, +1 left)
    canal_in_bone_fraction: dict[int, float]  # centreline samples of the canal course inside bone


def _texture(shape: tuple[int, int, int], rng: np.random.Generator, coarse: int) -> np.ndarray:
    """Smooth unit-variance noise: white noise on a coarse grid, blurred and upsampled linearly."""
    small = tuple(max(2, n // coarse + 2) for n in shape)
    noise = ndimage.gaussian_filter(rng.standard_normal(small, dtype=np.float32), sigma=1.0)
    noise /= noise.std() + F(1e-6)
    zoom = [n / s for n, s in zip(shape, small, strict=True)]
    return ndimage.zoom(noise, zoom, order=1, grid_mode=True, mode="nearest")[: shape[0], : shape[1], : shape[2]]


class _Canvas:
    def __init__(self, shape: tuple[int, int, int]):
        self.image = np.zeros(shape, dtype=np.float32)
        self.tissue = np.zeros(shape, dtype=np.uint8)

    def paint(self, mask: np.ndarray, tissue: Tissue, value: float | np.ndarray) -> None:
        self.tissue[mask] = tissue
        self.image[mask] = value[mask] if isinstance(value, np.ndarray) else value

    def paint_flat(self, voxels: np.ndarray, tissue: Tissue, value: float | np.ndarray,
                   fraction: np.ndarray | None = None) -> None:
        """Paint flat voxel indices, blending by a partial-volume `fraction` when given."""
        img, tis = self.image.reshape(-1), self.tissue.reshape(-1)
        if fraction is None:
            img[voxels] = value
            tis[voxels] = tissue
            return
        img[voxels] = img[voxels] * (1 - fraction) + np.asarray(value, dtype=np.float32) * fraction
        tis[voxels[fraction >= 0.5]] = tissue


def _ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    return (((x - F(centre[0])) / F(radii[0])) ** 2 + ((y - F(centre[1])) / F(radii[1])) ** 2
            + ((z - F(centre[2])) / F(radii[2])) ** 2) <= 1


def render(params: PatientParams, geometry: Geometry, rng: np.random.Generator) -> Rendered:
    """Noise-free MENSE-like image, tissue map and IAN labels of one patient."""
    shape = geometry.shape
    c = params.contrast
    m = build_mandible(params, geometry)
    x, y, z = geometry.anatomy_coords()
    tex_lo = _texture(shape, rng, 6)
    tex_hi = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=(0.6, 1.0, 1.0))
    tex_hi /= tex_hi.std() + F(1e-6)
    canvas = _Canvas(shape)

    # Body coordinates (polar about the back of the arch).
    dy = y - F(m.y_back)
    rho = np.hypot(x, dy)
    theta = np.arctan2(x, -dy)
    in_arch = np.abs(theta) <= F(HALF_PI)
    radius = m.radius(theta)
    u = rho - radius
    del dy, rho, radius
    t_half = m.thickness(np.minimum(np.abs(theta), F(HALF_PI))) / 2
    height = m.height(np.minimum(np.abs(theta), F(HALF_PI)))
    v = z - m.bottom(np.minimum(np.abs(theta), F(HALF_PI)))

    # Ramus coordinates, each side on its own half of the head.
    left = x > 0
    ram_h, ram_w, ram_t = (np.empty(shape, dtype=np.float32) for _ in range(3))
    for side, half in ((-1, ~left), (1, left)):
        r = m.rami[side]
        d = [x - F(r.origin[0]), y - F(r.origin[1]), z - F(r.origin[2])]
        for out, axis in ((ram_h, r.e_h), (ram_w, r.e_w), (ram_t, r.e_t)):
            np.copyto(out, d[0] * F(axis[0]) + d[1] * F(axis[1]) + d[2] * F(axis[2]), where=half)
    ramus = m.rami[1]  # both rami share width/height/thickness scale closely enough for soft tissue
    rt = F(ramus.thickness / 2)
    rw = F(ramus.width)

    # --- Soft tissue envelope: the face follows the arch, the neck continues behind it.
    face = F(params.soft_margin_mm * max(m.scale_xy, 0.6)) + F(params.masseter_mm) * (theta / F(HALF_PI)) ** 4
    outer = np.where(in_arch, u - t_half, np.abs(x) - F(m.half_width) - t_half)
    below = np.maximum(F(0.0), -v - F(2.0)) * F(0.8)
    depth_in = face - outer - below  # mm inside the skin
    del face, outer, below
    head = depth_in > 0
    canvas.paint(head, Tissue.SOFT, F(c.soft) * (1 + F(0.06) * tex_lo + F(0.03) * tex_hi))
    fat_value = F(c.fat) * (1 + F(0.04) * tex_lo + F(0.03) * tex_hi)
    canvas.paint(head & (depth_in < F(params.subcutaneous_fat_mm)), Tissue.FAT, fat_value)
    canvas.paint(head & (v < F(-3.0)) & (tex_lo > F(1.0)), Tissue.FAT, fat_value)  # submandibular fat

    muscle_value = F(c.muscle) * (1 + F(0.05) * tex_lo + F(0.05) * tex_hi)
    masseter = (ram_t > rt + F(0.3)) & (ram_t < rt + F(params.masseter_mm)) & (ram_w > -3) & (ram_w < rw + 3) \
        & (ram_h > -4) & (ram_h < F(0.8 * ramus.height))
    gap, mp = F(params.pterygoid_gap_mm), F(params.medial_pterygoid_mm)
    medial_pt = (ram_t < -(rt + gap)) & (ram_t > -(rt + gap + mp)) & (ram_w > 0) & (ram_w < F(0.75) * rw) \
        & (ram_h > -3) & (ram_h < F(0.75 * ramus.height))
    pterygo_fat = (ram_t <= -(rt + F(0.2))) & (ram_t >= -(rt + gap)) & (ram_w > F(0.05) * rw) & (ram_w < rw + 4) \
        & (ram_h > F(0.2 * ramus.height)) & (ram_h < F(1.1 * ramus.height))
    tongue = in_arch & (u < -t_half - F(1.0)) & (v > F(3.0))
    canvas.paint(head & (masseter | medial_pt | tongue), Tissue.MUSCLE, muscle_value)
    canvas.paint(head & pterygo_fat, Tissue.FAT, fat_value)
    parotid = (ram_w < -F(0.5)) & (ram_w > -F(15.0)) & (ram_t > -4) & (ram_t < rt + F(params.masseter_mm)) \
        & (ram_h > F(0.1 * ramus.height)) & (ram_h < F(ramus.height + 5))
    gland_value = F(c.gland) * (1 + F(0.08) * tex_hi + F(0.05) * tex_lo)
    canvas.paint(head & parotid, Tissue.GLAND, gland_value)
    for side in (-1, 1):
        th = np.radians(22 * side)
        centre = m.body_point(22 * side, -(float(m.thickness(F(th))) / 2 + 5), 0.55 * float(m.height(F(th))))
        canvas.paint(head & _ellipsoid(x, y, z, centre, (5, 8, 4.5)), Tissue.GLAND, gland_value)
        centre = m.body_point(70 * side, -(float(m.thickness(F(np.radians(70)))) / 2 + 4), -6)
        canvas.paint(head & _ellipsoid(x, y, z, centre, (7, 9, 6)), Tissue.GLAND, gland_value)
        centre = m.body_point(58 * side, float(m.thickness(F(np.radians(58)))) / 2 + 0.6 * params.masseter_mm,
                              float(m.height(F(np.radians(58)))) + 6)
        canvas.paint(head & _ellipsoid(x, y, z, centre, (5, 8, 7)), Tissue.FAT, fat_value)  # buccal fat pad
        ppf = np.array([side * (m.half_width - ramus.thickness / 2 - params.pterygoid_gap_mm
                                - params.medial_pterygoid_mm - 4), m.y_back + 3, m.rami[side].origin[2]
                        + 0.5 * ramus.height])
        canvas.paint(head & _ellipsoid(x, y, z, ppf, (4, 8, 0.35 * ramus.height)), Tissue.FAT, fat_value)

    # Airway, prevertebral muscle and a vertebral body behind it.
    prx, pry = params.pharynx_radii_mm
    pyc = m.y_back + pry + 4
    ring = ((x / F(prx + 3)) ** 2 + ((y - F(pyc)) / F(pry + 3)) ** 2) <= 1
    canvas.paint(head & ring, Tissue.MUSCLE, muscle_value)
    canvas.paint(((x / F(prx)) ** 2 + ((y - F(pyc)) / F(pry)) ** 2) <= 1, Tissue.AIR, F(0.0))
    vyc = pyc + pry + 14
    vert = ((x / F(10)) ** 2 + ((y - F(vyc)) / F(8)) ** 2)
    canvas.paint(head & (vert <= 1), Tissue.VERTEBRA, F(c.cortex))
    canvas.paint(head & (vert <= F(0.7)), Tissue.VERTEBRA, F(c.marrow) * (1 - F(0.25) * (tex_hi > 0.9)))

    # --- Mandible: body ∪ rami, cortex by depth below the surface.
    hb = height / 2
    body = in_arch & (((u / t_half) ** 2) ** 2 + (((v - hb) / hb) ** 2) ** 2 <= 1)
    depth_body = np.minimum(np.minimum(t_half - np.abs(u), v * F(m.cortex / m.cortex_inferior)), height - v)
    top = ramus.top(ram_w)
    wc = rw / 2
    in_ramus = (ram_h >= 0) & (ram_h <= top) & (((ram_t / rt) ** 2) ** 2 + (((ram_w - wc) / wc) ** 2) ** 2 <= 1)
    depth_ramus = np.minimum(np.minimum(rt - np.abs(ram_t), wc - np.abs(ram_w - wc)), top - ram_h)
    bone = body | in_ramus
    depth = np.where(body, depth_body, F(-1e3))
    np.maximum(depth, np.where(in_ramus, depth_ramus, F(-1e3)), out=depth)
    cortex = bone & (depth < F(m.cortex))
    trabeculae = (tex_hi > F(0.8)).astype(np.float32)
    marrow_value = F(c.marrow) * (1 + F(0.06) * tex_lo - F(0.35) * trabeculae)
    canvas.paint(bone & ~cortex, Tissue.MARROW, marrow_value)
    canvas.paint(cortex, Tissue.CORTEX, F(c.cortex) * (1 + F(0.3) * tex_hi))

    # --- Teeth along the alveolar crest, and the oral air above the tongue.
    _paint_teeth(canvas, params, m, theta, u, v, t_half, height, in_arch, c.tooth)
    crown = F(params.crown_height_mm * max(m.scale_z, 0.7))
    gutter = F(2.0 + params.oral_air_mm)
    oral = in_arch & (u < -t_half - F(1.0)) & (u > -t_half - F(1.0) - gutter) \
        & (np.abs(theta) < F(np.radians(75))) & (v > height + F(0.3) * crown) & (v < height + crown + gutter)
    canvas.paint(oral, Tissue.AIR, F(0.0))

    # --- Canal, vessels, nerves.
    labels = np.zeros(shape, dtype=np.uint8)
    tubes = {side: side_tubes(side, params, m) for side in (-1, 1)}
    renderer = TubeRenderer(geometry.to_index, shape, geometry.spacing, (x, y, z), margin_mm=5.0)
    pv = F(0.6 * np.cbrt(np.prod(geometry.spacing)))  # partial-volume edge width
    bone_flat = bone.reshape(-1)
    for side, st in tubes.items():
        a = params.side(side)
        dist = renderer.distances(st.nerve)
        arc = st.nerve.arc_length[dist.nearest]
        in_canal = (arc >= st.canal_start_mm) & (arc <= st.canal_end_mm) & bone_flat[dist.voxels]
        r_canal = dist.radius(st.nerve) + 2 * max(a.vessel_radius_mm) + 0.25
        wall = in_canal & (dist.distance >= r_canal) & (dist.distance < r_canal + params.canal_wall_mm)
        lumen = in_canal & (dist.distance < r_canal)
        canvas.paint_flat(dist.voxels[lumen], Tissue.CANAL, F(c.canal_fill))
        canvas.paint_flat(dist.voxels[wall], Tissue.CORTEX, F(c.cortex))
    flat_hi = tex_hi.reshape(-1)
    for st in tubes.values():
        for tube in st.distractors:
            _paint_tube(canvas, renderer, tube, Tissue.VESSEL, F(c.vessel), pv, flat_hi, 0.05)
        _paint_tube(canvas, renderer, st.lingual_nerve, Tissue.LINGUAL_NERVE, F(c.lingual_nerve), pv, flat_hi, 0.06)
        for tube in (st.artery, st.vein):
            _paint_tube(canvas, renderer, tube, Tissue.VESSEL, F(c.canal_vessel), pv, flat_hi, 0.05)
    for side, st in tubes.items():
        dist = _paint_tube(canvas, renderer, st.nerve, Tissue.NERVE, F(c.nerve), pv, flat_hi, 0.06)
        inside = dist.distance <= dist.radius(st.nerve)
        labels.reshape(-1)[dist.voxels[inside]] = 1 if side < 0 else 2
    length, in_bone = {}, {}
    for side, st in tubes.items():
        idx = np.rint(geometry.to_index[:, :3] @ st.nerve.points.T + geometry.to_index[:, 3:4]).astype(np.int64)
        in_fov = np.all((idx >= 0) & (idx < np.asarray(shape)[:, None]), axis=0)
        steps = np.linalg.norm(np.diff(st.nerve.points, axis=0), axis=1)
        length[side] = float(np.sum(steps[in_fov[1:] & in_fov[:-1]]))
        arc = st.nerve.arc_length
        course = in_fov & (arc >= st.canal_start_mm + 1.0) & (arc <= st.canal_end_mm - 2.0)
        hits = bone[idx[0, course], idx[1, course], idx[2, course]]
        in_bone[side] = float(hits.mean()) if hits.size else 0.0
    return Rendered(canvas.image, canvas.tissue, labels, m, tubes, length, in_bone)


def _paint_tube(canvas: _Canvas, renderer: TubeRenderer, tube: Tube, tissue: Tissue, value: np.float32,
                pv: np.float32, texture: np.ndarray, texture_gain: float):
    dist = renderer.distances(tube)
    fraction = np.clip((dist.radius(tube) - dist.distance) / pv + F(0.5), 0, 1).astype(np.float32)
    keep = fraction > 0
    voxels = dist.voxels[keep]
    shade = value * (1 + F(texture_gain) * texture[voxels])
    canvas.paint_flat(voxels, tissue, shade, fraction[keep])
    return dist


def _paint_teeth(canvas: _Canvas, params: PatientParams, m: Mandible, theta, u, v, t_half, height, in_arch,
                 tooth_value: float) -> None:
    """Crowns above the alveolar crest and roots within it, placed by arc length from the midline."""
    widths = np.array(TOOTH_WIDTHS_MM) * params.tooth_scale * m.scale_xy
    bounds = np.concatenate([[0.0], np.cumsum(widths)])
    grid = np.linspace(0, HALF_PI, 2048, dtype=np.float32)
    r = m.radius(grid)
    pts = np.stack([r * np.sin(grid), -r * np.cos(grid)], axis=1)
    arc_table = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    crown = params.crown_height_mm * max(m.scale_z, 0.7)
    cand = in_arch & (np.abs(u) < t_half + 1.5) & (v > height * F(1 - params.root_fraction) - 1) \
        & (v < height + F(crown) + 1)
    idx = np.flatnonzero(cand)
    if idx.size == 0:
        return
    th = theta.reshape(-1)[idx]
    s = np.interp(np.abs(th), grid, arc_table).astype(np.float32)
    tooth = np.searchsorted(bounds, s, side="right") - 1
    valid = tooth < len(widths)
    tooth = np.minimum(tooth, len(widths) - 1)
    centre = ((bounds[:-1] + bounds[1:]) / 2)[tooth]
    half_md = (widths[tooth] / 2 * 0.9).astype(np.float32)
    side_offset = np.where(th < 0, 0, 8)
    present = ~np.asarray(params.missing_teeth)[tooth + side_offset]
    uu, vv = u.reshape(-1)[idx], v.reshape(-1)[idx]
    hh, th_half = height.reshape(-1)[idx], t_half.reshape(-1)[idx]
    md = (s - centre) / half_md
    bl = uu / (th_half * F(0.8))
    crown_zone = (vv >= hh) & (vv <= hh + F(crown))
    root_len = hh * F(params.root_fraction)
    taper = np.clip((vv - (hh - root_len)) / np.maximum(root_len, F(1e-3)), 0, 1)  # 0 at tip, 1 at crest
    root_zone = (vv < hh) & (vv >= hh - root_len)
    crown_shape = md**2 + bl**2 + ((vv - hh - F(crown / 2)) / F(crown / 2 + 0.5)) ** 4 <= 1
    root_scale = F(0.35) + F(0.45) * taper
    root_shape = (md / root_scale) ** 2 + (bl / root_scale) ** 2 <= 1
    inside = valid & present & ((crown_zone & crown_shape) | (root_zone & root_shape))
    pulp = inside & ((md / F(0.3)) ** 2 + (bl / F(0.3)) ** 2 <= 1) & (vv < hh + F(crown * 0.5))
    canvas.paint_flat(idx[inside], Tissue.TOOTH, F(tooth_value))
    canvas.paint_flat(idx[pulp], Tissue.TOOTH, F(0.3))
