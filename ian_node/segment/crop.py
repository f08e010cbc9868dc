"""The one definition of each side's crop, in four modes, used by the node, `predict` and training.

- ``auto``: the localiser finds the paper's crop (`ian_node.segment.localise`); the default.
- ``half``: the volume's left-right halves, whole y and z (the node's first crop), for comparison.
- ``box``: per-side LPS boxes given by the user (config, ``predict --roi``, ``POST /jobs``).
- ``oracle``: boxes from the ground truth or the landmarks, for training and evaluation (the
  paper's semi-automatic setting); given like ``box``, recorded as ``oracle``.

Whatever the mode, the answer is a `CropResult` that records the mode, the box used per side and the
localiser's confidence, so that a job record, the API and ``predict --report`` say what was cropped.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ian_node.segment.localise import locate
from ian_node.segment.reformat import PatientBox, default_rois
from ian_node.segment.volume import SeriesError, SeriesVolume, Side
from model.checkpoint import CheckpointMeta
from model.localiser import LoadedLocaliser

#: Crop definitions a checkpoint can be trained on: the paper's landmark crop, the nerve's bounding
#: box grown by fixed margins (training.data, for data without landmarks), or the volume's halves.
REGIONS: tuple[str, ...] = ("landmarks", "nerve-margins", "half")
#: The result state of a job whose localiser found no plausible mandible.
NO_REGION = "no mandible region found"


class CropMode(StrEnum):
    AUTO = "auto"
    HALF = "half"
    BOX = "box"
    ORACLE = "oracle"


class CropError(ValueError):
    """A crop request that cannot be served (no boxes for ``box``, no localiser for ``auto``)."""


@dataclass(frozen=True)
class CropRequest:
    """Which crop to use; `boxes` are required for ``box`` and ``oracle`` and ignored otherwise."""

    mode: CropMode = CropMode.AUTO
    boxes: Mapping[Side, PatientBox] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", CropMode(self.mode))
        if self.mode in (CropMode.BOX, CropMode.ORACLE):
            given = {Side(k) for k in (self.boxes or {})}
            if given != set(Side):
                raise CropError(f"crop mode {self.mode.value!r} needs a box for both sides (right and left), "
                                f"got {sorted(s.value for s in given) or 'none'}")
            object.__setattr__(self, "boxes", {Side(k): v for k, v in self.boxes.items()})


@dataclass(frozen=True)
class SideCrop:
    """One side's crop as used: the box in LPS mm (None when nothing plausible was found)."""

    mode: CropMode
    box: PatientBox | None
    confidence: float | None = None  # the localiser's, for ``auto``; None otherwise

    def as_json(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "box_mm": None if self.box is None else self.box.bounds.tolist(),
                "confidence": None if self.confidence is None else round(float(self.confidence), 4)}


@dataclass(frozen=True)
class CropResult:
    sides: dict[Side, SideCrop]
    seconds: float = 0.0
    #: Why the crop is not usable (`NO_REGION`), or "" when both sides have a box to segment.
    problem: str = ""
    localiser_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def found(self) -> bool:
        return not self.problem

    @property
    def rois(self) -> dict[Side, PatientBox]:
        """The boxes to reformat (only meaningful when `found`)."""
        return {side: crop.box for side, crop in self.sides.items() if crop.box is not None}

    def as_json(self) -> dict[str, Any]:
        """`{"right": {"mode", "box_mm", "confidence"}, "left": {...}}` as the job record and reports store it."""
        return {side.value: self.sides[side].as_json() for side in Side}


def resolve_crop(series: SeriesVolume, request: CropRequest, localiser: LoadedLocaliser | None = None,
                 min_confidence: float | None = None) -> CropResult:
    """Each side's box for `series` under `request`; `problem` is set when ``auto`` finds no mandible.

    `min_confidence` overrides the localiser's own threshold.
    """
    start = time.perf_counter()
    if request.mode is CropMode.HALF:
        sides = {side: SideCrop(CropMode.HALF, box) for side, box in default_rois(series).items()}
        return CropResult(sides, time.perf_counter() - start)
    if request.mode in (CropMode.BOX, CropMode.ORACLE):
        sides = {side: SideCrop(request.mode, request.boxes[side]) for side in Side}
        return CropResult(sides, time.perf_counter() - start)
    if localiser is None:
        raise CropError("crop mode 'auto' needs a localiser")
    found = locate(series, localiser)
    threshold = localiser.meta.min_confidence if min_confidence is None else min_confidence
    sides = {side: SideCrop(CropMode.AUTO, loc.box, loc.confidence) for side, loc in found.sides.items()}
    weak = [side.value for side, loc in found.sides.items() if loc.box is None or loc.confidence < threshold]
    problem = ""
    if weak:
        detail = ", ".join(f"{s} confidence {found.sides[Side(s)].confidence:.2f}" for s in weak)
        problem = f"{NO_REGION} ({detail}; threshold {threshold:.2f})"
    return CropResult(sides, found.seconds, problem, localiser.sha256)


#: What a checkpoint without crop metadata was trained on (every checkpoint before crops were recorded).
LEGACY_CROP: dict[str, str] = {"region": "half", "trained_with": "half", "samples": "nerve-only"}


def checkpoint_crop(meta: CheckpointMeta) -> dict[str, Any]:
    """The crop a checkpoint was trained on (`CheckpointMeta.crop`, or `LEGACY_CROP`)."""
    return dict(meta.crop) if meta.crop else dict(LEGACY_CROP)


def check_crop_compatible(meta: CheckpointMeta, mode: CropMode | str, localiser: LoadedLocaliser | None) -> None:
    """Refuse (CropError) a crop mode that cannot reproduce what the checkpoint was trained on.

    ``half`` and ``box``/``oracle`` are always allowed (half is kept for comparison; a box is the
    user's call). ``auto`` needs a localiser whose boxes follow the checkpoint's crop region; a
    checkpoint trained on halves has no region a localiser could find.
    """
    mode = CropMode(mode)
    crop = checkpoint_crop(meta)
    region = crop.get("region")
    if region not in REGIONS:
        raise CropError(f"checkpoint crop region {region!r} is not one this node can reproduce ({', '.join(REGIONS)})")
    if mode is not CropMode.AUTO:
        return
    if region == "half":
        raise CropError("the checkpoint was trained on the volume's left-right halves, which the localiser does "
                        "not reproduce: set crop mode 'half' (config [crop] mode, or --crop half)")
    if localiser is None:
        raise CropError("crop mode 'auto' needs a localiser, and none is configured")
    if localiser.meta.region != region:
        raise CropError(f"the checkpoint was trained on {region!r} crops but the localiser {localiser.path.name} "
                        f"finds {localiser.meta.region!r} crops: use a localiser trained with the same crop definition")


class NoRegionError(SeriesError):
    """No plausible mandible was found, so the network did not run: `crop` says what the localiser saw,
    `timings` the stages run so far."""

    def __init__(self, series_uid: str, crop: CropResult, timings: Mapping[str, float] | None = None) -> None:
        super().__init__(series_uid, crop.problem)
        self.crop = crop
        self.timings = dict(timings or {})
