"""Synthetic MR neurography studies of the mandible with ground-truth IAN labels.

There is no patient data in this project, so the demo, the tests and the smoke benchmarks run on
these phantoms. Each is an axial 3D MENSE-like acquisition (nerve bright, cortical bone dark, marrow,
muscle and fat mid to bright) of a U-shaped mandible with both inferior alveolar nerves, bright
look-alikes next to them (canal vessels, lingual nerve, venous plexus, fat), a smooth bias field,
Rician noise and, on some patients, motion ghosts and metal-restoration artefacts, some of which
reach the canal. Patient `i` of seed `s` is always the same patient, whatever else is generated.

Modules: `phantom_params` draws a patient, `phantom_anatomy` lays out geometry, `phantom_render`
paints tissues, `phantom_artefacts` adds the acquisition effects; this module assembles a patient,
and writes it as an MR series plus a ground-truth SEG and a summary JSON.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from ian_node.phantom.anatomy import HALF_PI, acquisition_geometry, build_mandible, to_lps
from ian_node.phantom.artefacts import MetalObject, apply_metal, bias_field, motion_ghosting, point_spread, rician
from ian_node.phantom.head import crop_box, head_layout
from ian_node.phantom.mr_series import SeriesInfo, StudyInfo, build_mr_series
from ian_node.phantom.params import TOOTH_WIDTHS_MM, PatientParams, draw_patient
from ian_node.phantom.render import Rendered, Tissue, render
from ian_node.segment.reformat import PatientBox
from ian_node.segment.seg import build_segmentation
from ian_node.uids import derived_uid, is_dicom_uid

logger = logging.getLogger(__name__)

#: The phase-encode axis of the synthetic acquisition (array axis 1: rows, anterior-posterior).
PHASE_AXIS = 1


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
    if (not isinstance(value, tuple) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value)
            or not low <= value[0] <= value[1] <= high):
        raise ValueError(f"PhantomConfig.{name} must be a (min, max) pair within [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class PhantomConfig:
    """What kind of studies to generate. Ranges are (min, max) drawn uniformly per patient."""

    shape: tuple[int, int, int] = (64, 192, 192)  # slices, rows, columns (axial)
    pixel_spacing_mm: tuple[float, float] = (0.43, 0.6)  # column spacing (left-right)
    row_spacing_mm: tuple[float, float] | None = None  # anterior-posterior; None: square pixels
    slice_spacing_mm: tuple[float, float] = (0.8, 1.6)
    #: False: the bony anatomy is scaled to fill this (small) field of view; True: a life-size head,
    #: times a per-patient scale, placed in the field of view as a technologist would.
    life_size: bool = False
    head_scale: tuple[float, float] = (0.85, 1.15)
    #: Head centre off the field of view's centre, per axis (scaled with a fitted field of view). The
    #: `small` preset keeps the head near the centre, where the node's present midline crop works;
    #: the `paper` preset poses it like a patient (up to 20 mm).
    max_offset_mm: float = 5.0
    max_rotation_deg: float = 10.0  # head rotation about each axis
    supersample: int = 2  # slices rendered per acquired slice, averaged down (partial volume)
    nerve_diameter_mm: tuple[float, float] = (2.0, 3.0)
    noise_sigma: tuple[float, float] = (0.03, 0.065)  # per channel, in units of tissue signal (1.0 = brightest)
    #: The nerve's signal before bias and noise. The `paper` preset keeps it below its bright look-alikes
    #: (vessels 0.7-1.0, fat where suppression fails up to 0.85): on MENSE the IAN is conspicuous in
    #: its canal, not the brightest thing in a 220 mm head.
    nerve_signal: tuple[float, float] = (0.82, 1.0)
    bias_strength: tuple[float, float] = (0.08, 0.3)
    motion_probability: float = 0.3
    metal_probability: float = 0.7
    metal_reaches_canal_probability: float = 0.3
    oblique_probability: float = 0.4
    max_oblique_deg: float = 8.0
    intensity_scale: float = 1000.0  # stored value of signal 1.0
    uid_prefix: str | None = None  # an organisation root; None: UUID-derived 2.25 UIDs

    def __post_init__(self) -> None:
        if (not isinstance(self.shape, tuple) or len(self.shape) != 3
                or not all(isinstance(n, int) and not isinstance(n, bool) for n in self.shape)
                or self.shape[0] < 4 or min(self.shape[1:]) < 32):
            raise ValueError("PhantomConfig.shape must be 3 ints (slices >= 4, rows/columns >= 32), "
                             f"got {self.shape!r}")
        _check_range("pixel_spacing_mm", self.pixel_spacing_mm, 0.1, 5.0)
        if self.row_spacing_mm is not None:
            _check_range("row_spacing_mm", self.row_spacing_mm, 0.1, 5.0)
        _check_range("slice_spacing_mm", self.slice_spacing_mm, 0.1, 10.0)
        _check_range("head_scale", self.head_scale, 0.5, 1.5)
        if not 0.0 <= self.max_offset_mm <= 60.0:
            raise ValueError(f"PhantomConfig.max_offset_mm must be within [0, 60], got {self.max_offset_mm!r}")
        if not 0.0 <= self.max_rotation_deg <= 20.0:
            raise ValueError(f"PhantomConfig.max_rotation_deg must be within [0, 20], got {self.max_rotation_deg!r}")
        if not isinstance(self.supersample, int) or not 1 <= self.supersample <= 4:
            raise ValueError(f"PhantomConfig.supersample must be an int in 1..4, got {self.supersample!r}")
        _check_range("nerve_diameter_mm", self.nerve_diameter_mm, 0.5, 6.0)
        _check_range("noise_sigma", self.noise_sigma, 0.0, 1.0)
        _check_range("nerve_signal", self.nerve_signal, 0.1, 1.0)
        _check_range("bias_strength", self.bias_strength, 0.0, 2.0)
        for name in ("motion_probability", "metal_probability", "metal_reaches_canal_probability",
                     "oblique_probability"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"PhantomConfig.{name} must be within [0, 1], got {p!r}")
        if not 0.0 <= self.max_oblique_deg <= 30.0:
            raise ValueError(f"PhantomConfig.max_oblique_deg must be within [0, 30], got {self.max_oblique_deg!r}")
        if not 1.0 <= self.intensity_scale <= 20000.0:
            raise ValueError(f"PhantomConfig.intensity_scale must be within [1, 20000], got {self.intensity_scale!r}")


#: The paper's acquisition (220 x 220 mm field of view, 0.429 x 0.8 x 1.6 mm voxels: columns, rows,
#: slices) over the lower head, from below the chin to above the cranial base.
PAPER = PhantomConfig(shape=(88, 275, 512), pixel_spacing_mm=(0.4297, 0.4297), row_spacing_mm=(0.8, 0.8),
                      slice_spacing_mm=(1.6, 1.6), life_size=True, max_offset_mm=20.0,
                      metal_probability=0.8,  # 41 of the paper's 51 nerves had restorations nearby
                      nerve_signal=(0.55, 0.75), noise_sigma=(0.045, 0.08))
#: The demo's study: the paper's life-size head and 220 mm field of view at half its in-plane
#: resolution (0.86 × 1.6 × 1.6 mm), with the `small` preset's plainer contrast. A real-sized head in
#: a real field of view is what the crop localiser is made for; it generates in about 2 s.
DEMO = dataclasses.replace(PAPER, shape=(88, 138, 256), pixel_spacing_mm=(0.86, 0.86), row_spacing_mm=(1.6, 1.6),
                           nerve_signal=PhantomConfig.nerve_signal, noise_sigma=PhantomConfig.noise_sigma,
                           metal_probability=PhantomConfig.metal_probability)
#: Preset name → configuration. `small` (the default) keeps CPU tests fast; its bony anatomy is scaled
#: to fill a ~100 mm field of view, which the localiser does not handle (use crop `half` or `oracle`).
PRESETS: dict[str, PhantomConfig] = {"small": PhantomConfig(), "demo": DEMO, "paper": PAPER}


def phantom_preset(name: str) -> PhantomConfig:
    """The named acquisition preset (`small` or `paper`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown phantom preset {name!r}; valid: {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class Phantom:
    """One synthetic patient: the image volume, IAN labels (1 right, 2 left), tissue map, DICOM identity."""

    seed: int
    patient_index: int
    volume: hd.Volume  # uint16, (slices, rows, columns) -> LPS
    labels: np.ndarray  # uint8, same shape as the volume
    tissue: np.ndarray  # uint8 `Tissue` classes (for statistics), same shape
    study: StudyInfo
    series: SeriesInfo
    params: dict = field(repr=False)
    landmarks: dict[str, tuple[float, float, float]] = field(default_factory=dict, repr=False)  # LPS mm
    crop_boxes: dict[str, PatientBox] = field(default_factory=dict, repr=False)  # "right"/"left": the paper's crop
    uid_key: str = field(default="", repr=False)  # names this phantom's deterministic instance UIDs
    uid_prefix: str | None = None

    def uid(self, *parts: object) -> str:
        """A deterministic UID for a part of this study (e.g. `uid("mr", 3)`)."""
        return make_uid(self.uid_prefix, self.uid_key, *parts)


def make_uid(prefix: str | None, *parts: object) -> str:
    """The phantom's name-based UIDs (the same study every time for the same seed and patient)."""
    return derived_uid(prefix, "ian-node-phantom", *parts)


def _metal_objects(params: PatientParams, rendered: Rendered) -> list[MetalObject]:
    """Restorations on the chosen teeth: crowns, or crown plus implant reaching down to the nerve."""
    m = rendered.mandible
    widths = np.array(TOOTH_WIDTHS_MM) * params.tooth_scale * m.scale_xy
    grid = np.linspace(0, HALF_PI, 2048, dtype=np.float32)
    r = m.radius(grid)
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(r * np.sin(grid)), np.diff(r * np.cos(grid))))])
    crown = params.crown_height_mm * max(m.scale_z, 0.7)
    objects = []
    for spec in params.metals:
        centre_arc = float(np.sum(widths[: spec.tooth]) + widths[spec.tooth] / 2)
        theta = float(np.interp(centre_arc, arc, grid))
        height = float(m.height(np.float32(theta)))
        top = m.body_point(spec.side * np.degrees(theta), 0.0, height + crown / 2)
        bottom = top - np.array([0.0, 0.0, 1.0])
        if spec.reaches_canal:
            nerve = rendered.tubes[spec.side].nerve.points
            near = nerve[np.argmin(np.hypot(nerve[:, 0] - top[0], nerve[:, 1] - top[1]))]
            bottom = np.array([top[0], top[1], near[2] + 0.5])
        objects.append(MetalObject(tuple(top), tuple(bottom), spec.void_radius_mm, spec.rim_width_mm, spec.rim_gain))
    return objects


def _identity(seed: int, index: int, config: PhantomConfig, key: str, rng: np.random.Generator,
              params: PatientParams) -> tuple[StudyInfo, SeriesInfo]:
    sex = "F" if rng.random() < 0.6 else "M"  # the paper's cohort: 17 of 29 female
    age = int(rng.integers(18, 75))
    when = dt.date(2026, 1, 5) + dt.timedelta(days=index % 365)
    study = StudyInfo(
        patient_id=f"IANPH-{seed}-{index:04d}",
        patient_name=f"Phantom^S{seed}P{index:04d}",
        patient_sex=sex,
        patient_birth_date=f"{when.year - age}0101",
        study_uid=make_uid(config.uid_prefix, key, "study"),
        frame_of_reference_uid=make_uid(config.uid_prefix, key, "frame-of-reference"),
        study_date=when.strftime("%Y%m%d"),
        study_id=str(index + 1),
        accession_number=f"PH{seed % 100000:05d}{index:05d}",
    )
    series = SeriesInfo(series_uid=make_uid(config.uid_prefix, key, "series"), series_number=1,
                        series_description="MENSE 3D ax nerve (phantom)")
    return study, series


def generate_phantom(patient_index: int, seed: int, config: PhantomConfig | None = None) -> Phantom:
    """Generate patient `patient_index` of `seed`; the same arguments always give the same phantom."""
    config = config or PhantomConfig()
    for name, value in (("patient_index", patient_index), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    streams = np.random.SeedSequence([int(seed), int(patient_index), 0x1A2]).spawn(4)
    param_rng, texture_rng, noise_rng, identity_rng = (np.random.default_rng(s) for s in streams)
    params = draw_patient(
        param_rng, pixel_spacing=config.pixel_spacing_mm, row_spacing=config.row_spacing_mm,
        slice_spacing=config.slice_spacing_mm, nerve_diameter=config.nerve_diameter_mm,
        max_offset_mm=config.max_offset_mm, max_rotation_deg=config.max_rotation_deg, head_scale=config.head_scale,
        nerve_signal=config.nerve_signal,
        noise=config.noise_sigma, bias=config.bias_strength,
        motion_probability=config.motion_probability, metal_probability=config.metal_probability,
        metal_reaches_canal_probability=config.metal_reaches_canal_probability,
        oblique_probability=config.oblique_probability, max_oblique_deg=config.max_oblique_deg,
    )
    fov = np.array(config.shape) * np.array([params.slice_spacing_mm, params.row_spacing_mm, params.pixel_spacing_mm])
    offset = np.asarray(params.offset_mm)
    if config.life_size:
        mandible = build_mandible(params)
        layout = head_layout(params, mandible)
        # In plane the head sits anywhere within the offset; along the slab the technologist covers
        # chin to cranial base, so only a quarter of the offset applies.
        centre = layout.fov_centre() - offset * np.array([1.0, 1.0, 0.25])
    else:
        mandible = build_mandible(params, tuple(fov))
        layout = head_layout(params, mandible)
        centre = -offset * float(min(fov[1:]) / 220.0) * np.array([1.0, 1.0, 0.25])
    geometry = acquisition_geometry(params, config.shape, centre)
    fine = acquisition_geometry(params, config.shape, centre, config.supersample)
    rendered = render(params, fine, geometry, mandible, layout, texture_rng)
    del fine
    image, tissue = rendered.image, rendered.tissue
    coords = geometry.anatomy_coords()
    for metal in _metal_objects(params, rendered):
        void = apply_metal(image, coords, metal, geometry.to_index, params.contrast.nerve)
        tissue[void] = Tissue.METAL
    image = point_spread(image, geometry.spacing, params.psf_fwhm_mm)
    half_extent = float(np.max(np.array(config.shape) * np.array(geometry.spacing))) / 2
    image *= bias_field(coords, half_extent, np.asarray(params.bias_coefficients), params.bias_strength)
    del coords
    signal = (motion_ghosting(image, PHASE_AXIS, params.motion_amplitude_px, params.motion_period_lines,
                              params.motion_phase) if params.motion else image)
    magnitude = rician(signal, params.noise_sigma, noise_rng)
    stored = np.clip(np.rint(magnitude * np.float32(config.intensity_scale)), 0, 65535).astype(np.uint16)

    key = hashlib.sha256(repr((seed, patient_index, config)).encode()).hexdigest()[:32]
    study, series = _identity(int(seed), int(patient_index), config, key, identity_rng, params)
    volume = hd.Volume(stored, geometry.affine, coordinate_system="PATIENT",
                       frame_of_reference_uid=study.frame_of_reference_uid)
    summary = params.summary()
    summary["intensity_scale"] = config.intensity_scale
    summary["scale_xy"] = rendered.mandible.scale_xy
    summary["scale_z"] = rendered.mandible.scale_z
    summary["nerve_length_in_fov_mm"] = {"right": rendered.nerve_length_in_fov_mm[-1],
                                         "left": rendered.nerve_length_in_fov_mm[1]}
    summary["canal_in_bone_fraction"] = {"right": rendered.canal_in_bone_fraction[-1],
                                         "left": rendered.canal_in_bone_fraction[1]}
    landmarks = {name: to_lps(params, point) for name, point in rendered.layout.landmarks.items()}
    boxes = {name: crop_box(landmarks, side) for side, name in ((-1, "right"), (1, "left"))}
    return Phantom(
        int(seed), int(patient_index), volume, rendered.labels, tissue, study, series, summary,
        landmarks={k: tuple(float(v) for v in p) for k, p in landmarks.items()},
        crop_boxes={k: PatientBox(*b.reshape(-1)) for k, b in boxes.items()},
        uid_key=key, uid_prefix=config.uid_prefix,
    )


#: Tissue groups reported in the summary.
STAT_GROUPS: dict[str, tuple[Tissue, ...]] = {
    "vessel": (Tissue.VESSEL,),
    "lingual_nerve": (Tissue.LINGUAL_NERVE,),
    "fat": (Tissue.FAT,),
    "marrow": (Tissue.MARROW,),
    "muscle": (Tissue.MUSCLE,),
    "soft_tissue": (Tissue.SOFT,),
    "gland": (Tissue.GLAND,),
    "cortical_bone": (Tissue.CORTEX,),
    "skull": (Tissue.SKULL,),
    "brain": (Tissue.BRAIN,),
    "canal_fill": (Tissue.CANAL,),
}


def _stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"count": 0}
    p5, p95 = np.percentile(values, [5, 95])
    return {"count": int(values.size), "mean": float(values.mean()), "sd": float(values.std()),
            "p5": float(p5), "p95": float(p95)}


def intensity_statistics(phantom: Phantom) -> dict:
    """Stored-value statistics of the nerve against each tissue, contrast-to-noise ratios and overlap.

    CNR = (mean nerve - mean tissue) / noise SD, the noise SD being the per-channel Rician sigma.
    `nerve_within_<tissue>_p5_p95` is the fraction of nerve voxels whose value lies inside that
    tissue's 5th-95th percentile range: high values mean no threshold separates them.
    """
    image = np.asarray(phantom.volume.array)
    nerve_mask = (phantom.labels > 0) & (phantom.tissue != Tissue.METAL)
    nerve = image[nerve_mask]
    sigma = float(phantom.params["noise_sigma"]) * float(phantom.params["intensity_scale"])
    out: dict = {"nerve": _stats(nerve), "noise_sd": sigma, "cnr": {}, "nerve_within_p5_p95": {}}
    for name, classes in STAT_GROUPS.items():
        values = image[np.isin(phantom.tissue, classes) & (phantom.labels == 0)]
        out[name] = _stats(values)
        if values.size and nerve.size:
            out["cnr"][name] = (float(nerve.mean()) - float(values.mean())) / sigma
            lo, hi = out[name]["p5"], out[name]["p95"]
            out["nerve_within_p5_p95"][name] = float(np.mean((nerve >= lo) & (nerve <= hi)))
    return out


#: Series number and description of the ground-truth SEG written next to each phantom series.
GROUND_TRUTH_SERIES_NUMBER = 99
GROUND_TRUTH_DESCRIPTION = "IAN ground truth (phantom)"
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class PhantomFiles:
    """Where one phantom study was written."""

    patient_id: str
    study_uid: str
    series_uid: str
    root: Path
    series_dir: Path
    instances: tuple[Path, ...]
    seg: Path
    summary: Path


def phantom_datasets(phantom: Phantom) -> list[Dataset]:
    """The MR Image Storage instances of a phantom, in volume order, with deterministic UIDs."""
    datasets = build_mr_series(phantom.volume, phantom.study, phantom.series)
    for k, ds in enumerate(datasets):
        uid = phantom.uid("mr-instance", k)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
    return datasets


def ground_truth_segmentation(phantom: Phantom, datasets: list[Dataset]) -> hd.seg.Segmentation:
    """The phantom's labels as a SEG with MANUAL segments (the phantom stands in for an annotator).

    Its timestamps are the study's, so writing the same phantom twice gives identical bytes.
    """
    seg = build_segmentation(
        datasets, phantom.labels, algorithm=None, series_number=GROUND_TRUTH_SERIES_NUMBER,
        series_description=GROUND_TRUTH_DESCRIPTION, series_instance_uid=phantom.uid("seg-series"),
        sop_instance_uid=phantom.uid("seg-instance"),
        dimension_organization_uid=phantom.uid("seg-dimension-organization"), content_label="IAN_GT",
        content_creator_name="Phantom^GroundTruth",
    )
    seg.InstanceCreationDate = seg.ContentDate = seg.SeriesDate = phantom.study.study_date
    seg.InstanceCreationTime = seg.ContentTime = seg.SeriesTime = "100000"
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = f"{phantom.study.study_date}100000"
    return seg


def _uid_filename(uid: str) -> str:
    if not is_dicom_uid(uid):
        raise ValueError(f"not a valid UID for a file name: {uid!r}")
    return f"{uid}.dcm"


def phantom_summary(phantom: Phantom, seg_uid: str | None = None) -> dict:
    """JSON-friendly description of a phantom: geometry, label sizes, parameters, intensity statistics."""
    spacing = [float(v) for v in phantom.volume.spacing]
    voxel_mm3 = float(np.prod(spacing))
    sides = {}
    for name, label in (("right", 1), ("left", 2)):
        count = int(np.count_nonzero(phantom.labels == label))
        length = float(phantom.params["nerve_length_in_fov_mm"][name])
        diameter = 2 * float(np.sqrt(count * voxel_mm3 / (np.pi * length))) if length > 0 else 0.0
        sides[name] = {"label": label, "voxels": count, "volume_mm3": count * voxel_mm3,
                       "length_in_fov_mm": length, "mean_diameter_mm": diameter}
    return {
        "patient_id": phantom.study.patient_id,
        "seed": phantom.seed,
        "patient_index": phantom.patient_index,
        "study_uid": phantom.study.study_uid,
        "series_uid": phantom.series.series_uid,
        "seg_uid": seg_uid,
        "shape": [int(n) for n in phantom.volume.spatial_shape],
        "spacing_mm": spacing,
        "affine": np.asarray(phantom.volume.affine).tolist(),
        "nerves": sides,
        "landmarks": {name: list(point) for name, point in phantom.landmarks.items()},
        "crop_boxes": {name: box.bounds.tolist() for name, box in phantom.crop_boxes.items()},
        "intensity": intensity_statistics(phantom),
        "parameters": phantom.params,
    }


def write_phantom(phantom: Phantom, out_dir: Path | str) -> PhantomFiles:
    """Write `out_dir/series/<SOPInstanceUID>.dcm`, `out_dir/seg.dcm` and `out_dir/summary.json`."""
    root = Path(out_dir)
    series_dir = root / "series"
    series_dir.mkdir(parents=True, exist_ok=True)
    datasets = phantom_datasets(phantom)
    paths = []
    for ds in datasets:
        path = series_dir / _uid_filename(str(ds.SOPInstanceUID))
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    seg = ground_truth_segmentation(phantom, datasets)
    seg_path = root / "seg.dcm"
    dcmwrite(seg_path, seg, enforce_file_format=True)
    summary_path = root / "summary.json"
    summary_path.write_text(json.dumps(phantom_summary(phantom, str(seg.SOPInstanceUID)), indent=2))
    logger.info("wrote phantom study %s (%d instances, SEG %s) to %s", phantom.study.study_uid, len(paths),
                seg.SOPInstanceUID, root)
    return PhantomFiles(phantom.study.patient_id, phantom.study.study_uid, phantom.series.series_uid, root,
                        series_dir, tuple(paths), seg_path, summary_path)


def write_phantoms(out_dir: Path | str, patients: int, seed: int,
                   config: PhantomConfig | None = None) -> list[PhantomFiles]:
    """Generate and write patients 0..patients-1 of `seed`, one folder per patient ID, plus index.json."""
    if not isinstance(patients, int) or isinstance(patients, bool) or patients < 1:
        raise ValueError(f"patients must be a positive int, got {patients!r}")
    config = config or PhantomConfig()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(patients):
        started = time.perf_counter()
        phantom = generate_phantom(index, seed, config)
        folder = phantom.study.patient_id
        if not _SAFE_NAME_RE.match(folder):
            raise ValueError(f"patient ID {folder!r} is not a safe folder name")
        files = write_phantom(phantom, root / folder)
        written.append(files)
        logger.info("phantom %d/%d done in %.2f s", index + 1, patients, time.perf_counter() - started)
    index_doc = {
        "seed": seed,
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "patients": [{"patient_id": f.patient_id, "study_uid": f.study_uid, "series_uid": f.series_uid,
                      "series_dir": str(f.series_dir.relative_to(root)), "seg": str(f.seg.relative_to(root)),
                      "summary": str(f.summary.relative_to(root))} for f in written],
    }
    (root / "index.json").write_text(json.dumps(index_doc, indent=2))
    return written
