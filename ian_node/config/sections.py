"""The node's configuration sections: frozen pydantic dataclasses, one per TOML table.

Every default lives in exactly one place: the field defaults below. pydantic converts and checks the
types, ranges and unknown keys; the validators here hold only the rules it cannot express (AE titles,
crop boxes, keys that go together). An invalid value raises :class:`ConfigError` naming the dotted key
and the reason, also when a section is built in code; no value is ever silently replaced by a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage

from ian_node.config.fields import (
    AeTitle,
    AtLeastOne,
    ConfigError,
    ExistingFile,
    IpAddress,
    ListenPort,
    Seconds,
    check_existing_file,
    check_regex,
    check_storage_sop_classes,
    check_unit_interval,
    section,
)
from ian_node.config.targets import ExportConfig

ENV_PREFIX = "IAN_NODE_"
ENV_CONFIG_FILE = "IAN_NODE_CONFIG"

#: Where spool and state go when nothing else is configured.
DEFAULT_DATA_DIR = Path("ian-node-data")

#: The free space the spool keeps on its file system unless configured (``storage.min_free_bytes``
#: and ``storage.min_free_percent``; :class:`ian_node.storage.spool.Spool` takes the same defaults).
DEFAULT_MIN_FREE_BYTES = 1024**3
DEFAULT_MIN_FREE_PERCENT = 5.0

#: The storage SOP classes the SCP always accepts; ``dicom.extra_sop_classes`` adds to these.
BASE_SOP_CLASSES: tuple[str, ...] = (str(MRImageStorage), str(EnhancedMRImageStorage))


# ---------------------------------------------------------------------------------------------
# Sections


@section
class CallingAE:
    """One allowed peer: its AE title and, optionally, the only IP address it may connect from."""

    ae_title: AeTitle
    host: IpAddress | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_title(cls, data: Any) -> Any:
        return {"ae_title": data} if isinstance(data, str) else data  # "PACS" is short for {ae_title = "PACS"}


@section
class DicomConfig:
    """The SCP: who we are, where we listen, whom we accept and for how long we wait."""

    ae_title: AeTitle = "IANNODE"
    bind: IpAddress = "127.0.0.1"
    port: ListenPort = 11112
    max_associations: AtLeastOne = 10
    #: Empty: any calling AE title is accepted.
    allowed_calling_aes: tuple[CallingAE, ...] = ()
    extra_sop_classes: Annotated[tuple[str, ...], AfterValidator(check_storage_sop_classes)] = ()
    acse_timeout_s: Seconds = 30.0
    dimse_timeout_s: Seconds = 60.0
    network_timeout_s: Seconds = 60.0

    @property
    def sop_classes(self) -> tuple[str, ...]:
        """Every storage SOP class the SCP accepts."""
        return BASE_SOP_CLASSES + tuple(u for u in self.extra_sop_classes if u not in BASE_SOP_CLASSES)


@section
class TlsConfig:
    """TLS for the SCP: on when ``cert`` is set; mutual (client certificates required) when ``ca`` is."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("cert" if self.cert is None else "key", "cert and key must be set together")
        if self.ca is not None and self.cert is None:
            raise ConfigError("ca", "a CA (mutual TLS) needs cert and key as well")
        for name in ("cert", "key", "ca"):  # after the pairing: a lone CA is a pairing mistake first
            try:
                check_existing_file(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(name, str(exc)) from None
        return self

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    @property
    def mutual(self) -> bool:
        return self.ca is not None


@section
class StorageConfig:
    """Where received files and the SQLite state live, and the free space the spool keeps.

    While the spool's file system has less free space than ``min_free_bytes`` or than
    ``min_free_percent`` of its size (whichever is more), new instances are refused (C-STORE 0xA700,
    out of resources); results are still written, into the space kept. Both 0: no minimum (writes go
    on until the disk is full, and are refused with 0xA700 then).
    """

    spool_dir: Path = DEFAULT_DATA_DIR / "spool"
    state_path: Path = DEFAULT_DATA_DIR / "state.sqlite3"
    min_free_bytes: Annotated[int, Field(ge=0)] = DEFAULT_MIN_FREE_BYTES
    min_free_percent: Annotated[float, Field(ge=0, lt=100)] = DEFAULT_MIN_FREE_PERCENT


@section
class ModelConfig:
    """The model the worker runs. ``checkpoint`` unset: the bundled phantom-trained model."""

    checkpoint: ExistingFile = None
    device: Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")] = "auto"
    batch_size: AtLeastOne = 8
    #: CPU threads for inference; unset: torch's default (all cores). On a host shared with a PACS
    #: or Orthanc, 1–2 threads give far steadier times than oversubscribed cores.
    threads: AtLeastOne | None = None


#: The crop modes the node serves (``ian_node.segment.crop.CropMode``); "oracle" is a box recorded as such.
CROP_MODES: tuple[str, ...] = ("auto", "half", "box", "oracle")

#: One side's crop box as configured: ((x_min, x_max), (y_min, y_max), (z_min, z_max)) in LPS mm.
BoxMm = tuple[tuple[float, float], tuple[float, float], tuple[float, float]]


def check_box(key: str, value: object) -> BoxMm:
    """A crop box from TOML or JSON ([[x_min, x_max], [y_min, y_max], [z_min, z_max]], LPS mm), checked.

    Shared by the ``[crop]`` section, ``POST /jobs`` and ``predict --roi``, so a box means the same everywhere.
    """
    expected = "[[x_min, x_max], [y_min, y_max], [z_min, z_max]] in LPS mm"
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise ConfigError(key, f"must be {expected}, got {value!r}")
    box = []
    for axis, pair in zip("xyz", value, strict=True):
        if not isinstance(pair, list | tuple) or len(pair) != 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in pair
        ):
            raise ConfigError(key, f"must be {expected}: the {axis} range is not two finite numbers, got {pair!r}")
        lo, hi = float(pair[0]), float(pair[1])
        if not lo < hi:
            raise ConfigError(key, f"the {axis} range must have min < max, got [{lo:g}, {hi:g}]")
        box.append((lo, hi))
    return (box[0], box[1], box[2])


def check_box_pair(key: str, right: BoxMm, left: BoxMm) -> None:
    """The two sides' boxes must not overlap, and the right one lies at lower x (LPS: patient right)."""
    if all(r[0] < lf[1] and lf[0] < r[1] for r, lf in zip(right, left, strict=True)):
        raise ConfigError(key, "the right and left boxes overlap (each voxel belongs to one side at most)")
    if sum(right[0]) >= sum(left[0]):
        raise ConfigError(key, "the right box must lie at lower x than the left one (LPS x grows to patient left)")


@section
class CropConfig:
    """Each side's crop before segmentation (issue 14; ``ian_node.segment.crop``).

    ``auto`` (default): the localiser finds the paper's crop; a series where it is not confident is
    not segmented and its job ends "no mandible region found", unless ``segment_when_not_found``
    (then the SEG is made in the localiser's boxes, or the halves where a side has none, and the job
    is flagged). ``half``: the volume's left-right halves. ``box``: the ``right`` and ``left`` boxes
    for every series; ``oracle`` is the same, recorded as oracle.
    """

    mode: Literal["auto", "half", "box", "oracle"] = "auto"
    right: tuple[tuple[float, ...], ...] | None = None
    left: tuple[tuple[float, ...], ...] | None = None
    #: The localiser checkpoint; unset: the bundled phantom-trained one.
    localiser: ExistingFile = None
    #: Per-side confidence below which no region is found; unset: the localiser's own threshold.
    min_confidence: Annotated[float | None, AfterValidator(check_unit_interval)] = None
    segment_when_not_found: bool = False

    @model_validator(mode="after")
    def _check_boxes(self) -> CropConfig:
        boxed = self.mode in ("box", "oracle")
        for side in ("right", "left"):
            value = getattr(self, side)
            if value is None and boxed:
                raise ConfigError(side, f"is required with mode {self.mode!r} (a box for each side)")
            if value is not None and not boxed:
                raise ConfigError(side, f"is used only with mode 'box' or 'oracle', not {self.mode!r}")
            if value is not None:
                check_box(side, value)
        if boxed:
            check_box_pair("left", self.right, self.left)  # type: ignore[arg-type] (checked: BoxMm)
        return self

    @property
    def boxes(self) -> dict[str, BoxMm] | None:
        """{"right": box, "left": box} for ``box`` and ``oracle``; None otherwise."""
        if self.right is None or self.left is None:
            return None
        return {"right": self.right, "left": self.left}  # type: ignore[dict-item] (checked: BoxMm)


@section
class ExpectedCount:
    """A series whose description matches ``series_description`` is complete with ``count`` instances."""

    #: A regular expression searched (case-insensitively) in Series Description.
    series_description: Annotated[str, AfterValidator(check_regex)]
    count: AtLeastOne


@section
class SeriesConfig:
    """When a series is complete, and which complete series become jobs."""

    quiet_period_s: Seconds = 10.0
    modalities: Annotated[tuple[str, ...], Field(min_length=1)] = ("MR",)
    #: A regular expression searched (case-insensitively) in Series Description; empty matches all.
    description_pattern: Annotated[str, AfterValidator(check_regex)] = ""
    #: Slices are frames: one per single-frame instance, NumberOfFrames per multi-frame instance.
    min_slices: Annotated[int, Field(ge=2)] = 5  # a volume has two slices
    #: Series with any of these ImageType values are skipped (localizers and scouts are not volumes).
    skip_image_types: tuple[str, ...] = ("LOCALIZER", "SCOUT")
    #: What happens to the files of a series that is not selected.
    retention: Literal["keep", "purge"] = "keep"
    #: Conclude a series as soon as its stated size is in (ImagesInAcquisition agreed by every instance,
    #: one multi-frame instance, or ``expected_counts``), before its quiet period (docs/routing.md).
    settle_on_stated_size: bool = True
    #: Never concluded on its stated size with fewer slices (frames) than this.
    stated_size_min_slices: Annotated[int, Field(ge=2)] = 10
    #: Instance counts by Series Description, for series that do not state their size (first match wins).
    expected_counts: tuple[ExpectedCount, ...] = ()

    @property
    def description_regex(self) -> re.Pattern[str]:
        return re.compile(self.description_pattern, re.IGNORECASE)


@section
class ApiConfig:
    """The HTTP API; with ``token`` set, every request needs ``Authorization: Bearer <token>``."""

    bind: IpAddress = "127.0.0.1"
    port: ListenPort = 8765
    token: Annotated[str, Field(min_length=16)] | None = None
    #: Show patient names and IDs on the status page to an authenticated user (never in logs or metrics).
    show_patient_identity: bool = False


@section
class QaConfig:
    """What a QA FAIL on either side does to the result (`ian_node.segment.qa`).

    ``send``: delivered anyway, the job flagged with the failed side and why. ``hold``: stored with its
    deliveries but not sent (job state ``held``, kept across restarts) until an operator releases it
    with ``ian-node jobs retry`` or ``POST /jobs/{id}/retry``.
    """

    on_fail: Literal["send", "hold"] = "send"


@section
class OutputConfig:
    """What each job sends (docs/seg.md): the SEG with its viewer-compatibility choices, its TID 1500 SR,
    and optionally the network's probabilities as a FRACTIONAL SEG."""

    #: Store only the frames where a segment has voxels (false: every source frame for every segment).
    omit_empty_frames: bool = True
    #: A side with no voxels (values of ``ian_node.segment.seg.EmptySegments``): ``empty_frame`` keeps
    #: its segment with one all-zero frame; ``omit`` leaves it out (the other side becomes segment 1,
    #: the job is flagged, and with both sides empty the job fails and nothing is sent).
    empty_segments: Literal["empty_frame", "omit"] = "empty_frame"
    #: Also send the per-side nerve probability as a FRACTIONAL (PROBABILITY) SEG, after the SEG and SR.
    probability_seg: bool = False


@section
class NodeConfig:
    dicom: DicomConfig = dataclasses.field(default_factory=DicomConfig)
    tls: TlsConfig = dataclasses.field(default_factory=TlsConfig)
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    crop: CropConfig = dataclasses.field(default_factory=CropConfig)
    series: SeriesConfig = dataclasses.field(default_factory=SeriesConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    api: ApiConfig = dataclasses.field(default_factory=ApiConfig)
    qa: QaConfig = dataclasses.field(default_factory=QaConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(NodeConfig))
