"""Paint the phantom's tissues into the voxel grid: intensities, a tissue map, and the IAN labels.

Painting goes back to front (soft tissue, fat, muscles, glands, brain, airway, skull, mandible, teeth,
palate, sinuses, arches, ear canals, canal, vessels, nerves), each step a vectorised mask over the
whole grid or, for tubes, over a tube's neighbourhood. Tissues are painted on a grid `supersample`
times finer along the slices and averaged down, so edges carry partial volume. The labels are the
annotator's, not the tissue's: overlapping spheres along the nerve, a little inside its bright edge,
evaluated at the acquired voxel centres (the paper's spherical brush, conservative at boundaries).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from scipy import ndimage

from ian_node.phantom.anatomy import HALF_PI, Geometry, Mandible, SideTubes, canal_radius, side_tubes
from ian_node.phantom.head import HeadLayout, cranium_depth, head_outline_depth
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
    BRAIN = 14
    SKULL = 15  # bone other than the mandible: cranial base, temporal bone, vault, maxilla, zygomatic arches


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # float32, noise-free, before bias
    tissue: np.ndarray  # uint8 Tissue
    labels: np.ndarray  # uint8: 0, 1 right IAN, 2 left IAN
    mandible: Mandible
    layout: HeadLayout
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


@dataclass(frozen=True)
class Shade:
    """A textured intensity, evaluated only where it is painted (whole-grid value arrays cost memory):
    base × (1 + lo·coarse texture + hi·fine texture − pits·[fine texture > 0.8])."""

    base: float | np.ndarray
    lo: float = 0.0
    hi: float = 0.0
    pits: float = 0.0


class _Canvas:
    def __init__(self, shape: tuple[int, int, int], tex_lo: np.ndarray, tex_hi: np.ndarray):
        self.image = np.zeros(shape, dtype=np.float32)
        self.tissue = np.zeros(shape, dtype=np.uint8)
        self.tex_lo, self.tex_hi = tex_lo, tex_hi

    def paint(self, mask: np.ndarray, tissue: Tissue, value: float | Shade) -> None:
        self.tissue[mask] = tissue
        if not isinstance(value, Shade):
            self.image[mask] = value
            return
        hi = self.tex_hi[mask]
        gain = F(1.0) + F(value.lo) * self.tex_lo[mask] + F(value.hi) * hi - F(value.pits) * (hi > F(0.8))
        base = value.base[mask] if isinstance(value.base, np.ndarray) else F(value.base)
        self.image[mask] = base * gain

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


def render(params: PatientParams, geometry: Geometry, acquired: Geometry, m: Mandible, layout: HeadLayout,
           rng: np.random.Generator) -> Rendered:
    """Noise-free MENSE-like image, tissue map and IAN labels of one patient on the `acquired` grid.

    `geometry` is the same slab with `acquired.shape[0] * k` slices, where tissues are painted.
    """
    shape = geometry.shape
    k = shape[0] // acquired.shape[0]
    c = params.contrast
    x, y, z = geometry.anatomy_coords()
    tex_lo = _texture(shape, rng, 6)
    tex_hi = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=(0.6, 1.0, 1.0))
    tex_hi /= tex_hi.std() + F(1e-6)
    canvas = _Canvas(shape, tex_lo, tex_hi)

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
    np.minimum(depth_in, head_outline_depth(layout, x, y, 0.0) + F(6.0), out=depth_in)  # the back of the neck
    np.maximum(depth_in, cranium_depth(layout, x, y, z), out=depth_in)
    head = depth_in > 0
    canvas.paint(head, Tissue.SOFT, Shade(c.soft, 0.1, 0.04))
    # MENSE fat saturation is uneven: fat stays dark in most places and fails in broad patches.
    failure = np.clip(F(0.7) * _texture(shape, rng, 24) - F(0.15), 0, 1)
    failure *= F(c.fat_failure - c.fat)
    failure += F(c.fat)
    fat_value = Shade(failure, 0.04, 0.03)
    canvas.paint(head & (depth_in < F(params.subcutaneous_fat_mm)), Tissue.FAT, fat_value)
    canvas.paint(head & (v < F(-3.0)) & (tex_lo > F(1.0)), Tissue.FAT, fat_value)  # submandibular fat

    muscle_value = Shade(c.muscle, 0.09, 0.06)  # fibres and fatty streaks
    masseter = (ram_t > rt + F(0.3)) & (ram_t < rt + F(params.masseter_mm)) & (ram_w > -3) & (ram_w < rw + 3) \
        & (ram_h > -4) & (ram_h < F(0.8 * ramus.height))
    gap, mp = F(params.pterygoid_gap_mm), F(params.medial_pterygoid_mm)
    medial_pt = (ram_t < -(rt + gap)) & (ram_t > -(rt + gap + mp)) & (ram_w > 0) & (ram_w < F(0.75) * rw) \
        & (ram_h > -3) & (ram_h < F(0.75 * ramus.height))
    pterygo_fat = (ram_t <= -(rt + F(0.2))) & (ram_t >= -(rt + gap)) & (ram_w > F(0.05) * rw) & (ram_w < rw + 4) \
        & (ram_h > F(0.2 * ramus.height)) & (ram_h < F(1.1 * ramus.height))
    # The tongue fills the arch and its base runs on behind the rami to the oropharynx, rounded.
    inner = F(m.half_width) - t_half - F(1.0)
    base = ~in_arch & (((y - F(m.y_back)) / F(0.35 * m.depth)) ** 2 + (x / inner) ** 2 <= 1)
    tongue = ((in_arch & (u < -t_half - F(1.0))) | base) & (v > F(3.0)) & (z < F(layout.z_palate))
    del inner, base
    canvas.paint(head & (masseter | medial_pt | tongue), Tissue.MUSCLE, muscle_value)
    canvas.paint(head & pterygo_fat, Tissue.FAT, fat_value)
    parotid = (ram_w < -F(0.5)) & (ram_w > -F(15.0)) & (ram_t > -4) & (ram_t < rt + F(params.masseter_mm)) \
        & (ram_h > F(0.1 * ramus.height)) & (ram_h < F(ramus.height + 5))
    gland_value = Shade(c.gland, 0.08, 0.1)
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
    canvas.paint((((x / F(prx)) ** 2 + ((y - F(pyc)) / F(pry)) ** 2) <= 1) & (z < F(layout.z_cranial_base)),
                 Tissue.AIR, F(0.0))
    vyc = pyc + pry + 14
    vert = ((x / F(10)) ** 2 + ((y - F(vyc)) / F(8)) ** 2)
    canvas.paint(head & (vert <= 1), Tissue.VERTEBRA, F(c.cortex))
    canvas.paint(head & (vert <= F(0.7)), Tissue.VERTEBRA, Shade(c.marrow, pits=0.25))
    del vert, ring
    _paint_skull(canvas, params, layout, m, (x, y, z), depth_in, (theta, u, t_half), tex_lo)
    del depth_in, head

    # --- Mandible: body ∪ rami, cortex by depth below the surface.
    hb = height / 2
    body = in_arch & (((u / t_half) ** 2) ** 2 + (((v - hb) / hb) ** 2) ** 2 <= 1)
    depth_body = np.minimum(np.minimum(t_half - np.abs(u), v * F(m.cortex / m.cortex_inferior)), height - v)
    top = ramus.top(ram_w)
    wc = rw / 2
    in_ramus = (ram_h >= 0) & (ram_h <= top) & (((ram_t / rt) ** 2) ** 2 + (((ram_w - wc) / wc) ** 2) ** 2 <= 1)
    depth_ramus = np.minimum(np.minimum(rt - np.abs(ram_t), wc - np.abs(ram_w - wc)), top - ram_h)
    bone = body | in_ramus
    del ram_h, ram_w, ram_t, top
    depth = np.where(body, depth_body, F(-1e3))
    del depth_body
    np.maximum(depth, np.where(in_ramus, depth_ramus, F(-1e3)), out=depth)
    del depth_ramus, body, in_ramus
    cortex = bone & (depth < F(m.cortex))
    del depth
    canvas.paint(bone & ~cortex, Tissue.MARROW, Shade(c.marrow, 0.06, pits=0.35))  # trabecular marrow
    canvas.paint(cortex, Tissue.CORTEX, Shade(c.cortex, hi=0.3))

    # --- Teeth along the alveolar crest, and the oral air above the tongue.
    _paint_teeth(canvas, params, m, theta, u, v, t_half, height, in_arch, c.tooth)
    crown = F(params.crown_height_mm * max(m.scale_z, 0.7))
    gutter = F(2.0 + params.oral_air_mm)
    oral = in_arch & (u < -t_half - F(1.0)) & (u > -t_half - F(1.0) - gutter) \
        & (np.abs(theta) < F(np.radians(75))) & (v > height + F(0.3) * crown) & (v < height + crown + gutter)
    canvas.paint(oral, Tissue.AIR, F(0.0))
    del oral, theta, u, v, t_half, height, in_arch

    # --- Canal, vessels, nerves.
    tubes = {side: side_tubes(side, params, m, layout.z_cranial_base) for side in (-1, 1)}
    renderer = TubeRenderer(geometry.to_index, shape, geometry.spacing, (x, y, z), margin_mm=5.0)
    pv = F(0.6 * np.cbrt(np.prod(geometry.spacing)))  # partial-volume edge width
    bone_flat = bone.reshape(-1)
    for side, st in tubes.items():
        a = params.side(side)
        dist = renderer.distances(st.nerve)
        arc = st.nerve.arc_length[dist.nearest]
        in_canal = (arc >= st.canal_start_mm) & (arc <= st.canal_end_mm) & bone_flat[dist.voxels]
        r_canal = dist.radius(st.nerve) + F(canal_radius(a) - a.nerve_radius_mm)
        wall = in_canal & (dist.distance >= r_canal) & (dist.distance < r_canal + params.canal_wall_mm) \
            & (tex_lo.reshape(-1)[dist.voxels] > F(-0.8))  # the canal's cortical wall has gaps
        lumen = in_canal & (dist.distance < r_canal)
        canvas.paint_flat(dist.voxels[lumen], Tissue.CANAL, F(c.canal_fill))
        canvas.paint_flat(dist.voxels[wall], Tissue.CORTEX, F(c.cortex))
    flat_hi = tex_hi.reshape(-1)
    for side in (-1, 1):
        _paint_bone_tube(canvas, renderer, layout.zygoma[side], c, pv, flat_hi, 1.2)
        _paint_tube(canvas, renderer, layout.eam[side], Tissue.AIR, F(0.0), pv, flat_hi, 0.0)
    for st in tubes.values():
        for tube in st.distractors:
            _paint_tube(canvas, renderer, tube, Tissue.VESSEL, F(c.vessel), pv, flat_hi, 0.05)
        _paint_tube(canvas, renderer, st.lingual_nerve, Tissue.LINGUAL_NERVE, F(c.lingual_nerve), pv, flat_hi, 0.06)
        for tube in (st.artery, st.vein):
            _paint_tube(canvas, renderer, tube, Tissue.VESSEL, F(c.canal_vessel), pv, flat_hi, 0.05)
    for st in tubes.values():
        _paint_tube(canvas, renderer, st.nerve, Tissue.NERVE, F(c.nerve), pv, flat_hi, 0.06)
    labels = annotate(params, acquired, tubes, rng)
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
    image = canvas.image.reshape(acquired.shape[0], k, *shape[1:]).mean(axis=1)
    return Rendered(image, canvas.tissue[k // 2 :: k].copy(), labels, m, layout, tubes, length, in_bone)


def annotate(params: PatientParams, acquired: Geometry, tubes: dict[int, SideTubes],
             rng: np.random.Generator) -> np.ndarray:
    """The ground truth as the paper drew it: overlapping spherical brush strokes along each nerve,
    from the cranial base to the mental foramen, a little inside the bright edge (conservative at
    boundaries), with the hand's small wobble; a voxel is labelled when its centre is inside a sphere."""
    labels = np.zeros(acquired.shape, dtype=np.uint8)
    coords = acquired.anatomy_coords()
    renderer = TubeRenderer(acquired.to_index, acquired.shape, acquired.spacing, coords, margin_mm=4.0)
    for side, st in tubes.items():
        a = params.side(side)
        nerve = st.nerve
        arc = nerve.arc_length
        brush = a.annotation_inset * float(np.median(nerve.radius))
        centres = np.searchsorted(arc, np.arange(0.0, arc[-1], max(0.7 * brush, 0.3)))
        centres = centres[centres < len(arc)]
        wobble = rng.normal(scale=0.12, size=(len(centres), 3))
        beads = Tube(f"{nerve.name} annotation", nerve.points[centres] + wobble,
                     a.annotation_inset * nerve.radius[centres])
        dist = renderer.distances(beads)
        inside = dist.distance <= dist.radius(beads)
        labels.reshape(-1)[dist.voxels[inside]] = 1 if side < 0 else 2
    return labels


def _paint_skull(canvas: _Canvas, params: PatientParams, layout: HeadLayout, m: Mandible, coords, depth_in,
                 arch, tex_lo) -> None:
    """Brain and skull above the cranial base, the petromastoid blocks, the maxilla with its palate
    (and the midline suture), upper teeth, nasal cavity and maxillary sinuses.

    `arch` is the mandible's (θ, u, half thickness) per voxel: the maxillary arch follows it.
    """
    c = params.contrast
    x, y, z = coords
    theta, u, t_half = arch
    head = depth_in > 0
    above = (z > F(layout.z_cranial_base)) & (y > F(layout.y_fossa_front))
    marrow = Shade(c.marrow, pits=0.3)
    cortex = Shade(c.cortex, hi=0.3)
    skin_fat = F(params.subcutaneous_fat_mm * layout.scale)
    canvas.paint(head & above & (depth_in > skin_fat + F(2.0)), Tissue.BRAIN, Shade(c.brain, 0.05, 0.03))
    plate = head & above & (z < F(layout.z_top)) & (y < F(layout.y_fossa_back))
    canvas.paint(plate, Tissue.SKULL, cortex)
    canvas.paint(plate & (z > F(layout.z_cranial_base + 1.2)) & (z < F(layout.z_top - 1.2)), Tissue.SKULL, marrow)
    vault = head & above & (depth_in > skin_fat) & (depth_in < skin_fat + F(6.0))
    canvas.paint(vault, Tissue.SKULL, cortex)
    for side in (-1, 1):
        centre, radii = layout.temporal_bone[side]
        block = head & _ellipsoid(x, y, z, centre, radii)
        canvas.paint(block, Tissue.SKULL, cortex)
        canvas.paint(block & _ellipsoid(x, y, z, centre, radii - 1.5) & (tex_lo > F(0.2)), Tissue.AIR,
                     F(0.02))  # mastoid air cells
    # Maxilla: an alveolar ridge over the arch with the upper teeth, and the hard palate inside it.
    in_arch = np.abs(theta) <= F(np.radians(85))
    crown = F(params.crown_height_mm * layout.scale)
    z_ridge = F(layout.z_occlusal) + crown
    ridge = in_arch & (np.abs(u) < t_half * F(1.1)) & (z >= z_ridge) & (z < F(layout.z_palate + layout.palate_mm))
    palate = (np.abs(theta) <= F(np.radians(75))) & (u < 0) & (z >= F(layout.z_palate)) \
        & (z < F(layout.z_palate + layout.palate_mm))
    canvas.paint(ridge | palate, Tissue.SKULL, marrow)
    shell = (ridge & (np.abs(u) > t_half * F(1.1) - F(m.cortex))) \
        | (palate & ((z < F(layout.z_palate + 1.0)) | (z > F(layout.z_palate + layout.palate_mm - 1.0))))
    canvas.paint(shell, Tissue.SKULL, cortex)
    canvas.paint(palate & (np.abs(x) < F(0.6)), Tissue.SOFT, F(c.soft))  # the midline palatal suture
    upper = in_arch & (np.abs(u) < t_half * F(0.75)) & (z >= F(layout.z_occlusal)) & (z < z_ridge)
    canvas.paint(upper, Tissue.TOOTH, F(c.tooth))
    del in_arch
    nasal = (np.abs(x) < F(15.0 * layout.scale)) & (np.abs(x) > F(1.2)) & (z > F(layout.z_palate + layout.palate_mm)) \
        & (z < F(layout.z_cranial_base - 4.0)) & (y > F(layout.y_face + 8.0)) & (y < F(m.y_back + 8.0))
    canvas.paint(nasal & (tex_lo < F(0.8)), Tissue.AIR, F(0.01))
    for side in (-1, 1):
        centre, radii = layout.sinus[side]
        canvas.paint(head & _ellipsoid(x, y, z, centre, radii + 1.2), Tissue.SKULL, cortex)
        canvas.paint(_ellipsoid(x, y, z, centre, radii), Tissue.AIR, F(0.01))


def _paint_bone_tube(canvas: _Canvas, renderer: TubeRenderer, tube: Tube, c, pv: np.float32, texture: np.ndarray,
                     cortex_mm: float) -> None:
    """A tubular bone (the zygomatic arch): cortex over a core of marrow, edges blended."""
    dist = _paint_tube(canvas, renderer, tube, Tissue.SKULL, F(c.cortex), pv, texture, 0.3)
    r = dist.radius(tube)
    core = dist.distance < r - F(cortex_mm)
    canvas.paint_flat(dist.voxels[core], Tissue.SKULL, F(c.marrow))


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
