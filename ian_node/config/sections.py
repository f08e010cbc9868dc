"""The node's configuration sections: frozen pydantic dataclasses, one per TOML table.

Every default lives in exactly one place: the field defaults below. pydantic converts and checks the
types, ranges and unknown keys; the validators here hold only the rules it cannot express (AE titles,
crop boxes, keys that go together). An invalid value raises :class:`ConfigError` naming the dotted key
and the reason, also when a section is built in code; no value is ever silently replaced by a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, dataclass_transform

import pydantic
from pydantic import AfterValidator, ConfigDict, Field, ValidationError, model_validator
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from ian_node.uids import is_dicom_uid

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


class ConfigError(ValueError):
    """An invalid configuration value; ``key`` is the dotted key (``dicom.port``)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason

    def within(self, prefix: str) -> ConfigError:
        """The same error with its key placed under ``prefix``."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.reason)

    @classmethod
    def from_validation(cls, exc: ValidationError, name: Callable[[tuple[Any, ...]], str] | None = None) -> ConfigError:
        """The first of pydantic's errors as a ConfigError; ``name`` may rename a location (an environment variable)."""
        err = exc.errors(include_url=False)[0]
        at, ctx, kind = err["loc"], err.get("ctx", {}), err["type"]
        # an export target's location holds its kind after the index (export.targets.0.dicom.host): drop it
        loc = tuple(p for i, p in enumerate(at) if not (i and isinstance(at[i - 1], int) and p in TARGET_CONFIG_TYPES))
        if isinstance(ctx.get("error"), ConfigError):  # a section's validator: its key is relative to the section
            return cls(_dotted(loc + (ctx["error"].key,), name), ctx["error"].reason)
        if kind == "union_tag_invalid":
            return cls(_dotted(loc + ("kind",), name), f"must be one of {ctx['expected_tags']}, got {ctx['tag']!r}")
        reason = {"missing": "is required", "union_tag_not_found": "is required",
                  "unexpected_keyword_argument": "unknown key", "extra_forbidden": "unknown key"}.get(kind)
        loc += ("kind",) if kind == "union_tag_not_found" else ()
        if reason is None:
            reason = re.sub(r"^\w+ should", "must", err["msg"].removeprefix("Value error, "))
            if kind != "value_error" and not isinstance(err["input"], dict | list | tuple):
                reason += f", got {err['input']!r}"
        return cls(_dotted(loc, name), reason)


def _dotted(loc: tuple[Any, ...], name: Callable[[tuple[Any, ...]], str] | None) -> str:
    key = (name and name(loc)) or ""
    for part in loc[2 if key else 0:]:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
    return key


T = TypeVar("T")


@dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(Field, dataclasses.field))
def _section(cls: type[T]) -> type[T]:
    """A frozen, keyword-only pydantic dataclass that forbids unknown keys and raises ConfigError when built in code."""
    cls = pydantic.dataclasses.dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))(cls)
    validate = cls.__init__

    def __init__(self: T, *args: Any, **kwargs: Any) -> None:
        try:
            validate(self, *args, **kwargs)
        except ValidationError as exc:
            raise ConfigError.from_validation(exc) from None

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


# ---------------------------------------------------------------------------------------------
# Domain checks pydantic has no words for (a ValueError names the reason; pydantic adds the key)


def _ae_title(value: str) -> str:
    if not 1 <= len(value.strip()) <= 16 or len(value) > 16:
        raise ValueError(f"an AE title has 1 to 16 characters, got {value!r}")
    if not value.isascii() or "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f"an AE title has printable ASCII without backslash, got {value!r}")
    return value


def _ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"must be an IP address (no host names), got {value!r}") from None
    return value


def _existing_file(value: Path | None) -> Path | None:
    if value is not None and not value.is_file():
        raise ValueError(f"file {str(value)!r} does not exist")
    return value


def _storage_sop_classes(value: tuple[str, ...]) -> tuple[str, ...]:
    for uid in value:
        if not is_dicom_uid(uid):
            raise ValueError(f"{uid!r} is not a DICOM UID")
        if not issubclass(uid_to_service_class(uid), StorageServiceClass):
            raise ValueError(f"{uid} is not a storage SOP class")
    return value


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"is not a regular expression: {exc}") from None
    return value


def _unit_interval(value: float | None) -> float | None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"must be from 0 to 1, got {value}")
    return value


AeTitle = Annotated[str, AfterValidator(_ae_title)]
IpAddress = Annotated[str, AfterValidator(_ip)]
ExistingFile = Annotated[Path | None, AfterValidator(_existing_file)]
ListenPort = Annotated[int, Field(ge=0, le=65535)]  # 0: any free port
Seconds = Annotated[float, Field(gt=0)]
AtLeastOne = Annotated[int, Field(ge=1)]


# ---------------------------------------------------------------------------------------------
# Sections


@_section
class CallingAE:
    """One allowed peer: its AE title and, optionally, the only IP address it may connect from."""

    ae_title: AeTitle
    host: IpAddress | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_title(cls, data: Any) -> Any:
        return {"ae_title": data} if isinstance(data, str) else data  # "PACS" is short for {ae_title = "PACS"}


@_section
class DicomConfig:
    """The SCP: who we are, where we listen, whom we accept and for how long we wait."""

    ae_title: AeTitle = "IANNODE"
    bind: IpAddress = "127.0.0.1"
    port: ListenPort = 11112
    max_associations: AtLeastOne = 10
    #: Empty: any calling AE title is accepted.
    allowed_calling_aes: tuple[CallingAE, ...] = ()
    extra_sop_classes: Annotated[tuple[str, ...], AfterValidator(_storage_sop_classes)] = ()
    acse_timeout_s: Seconds = 30.0
    dimse_timeout_s: Seconds = 60.0
    network_timeout_s: Seconds = 60.0

    @property
    def sop_classes(self) -> tuple[str, ...]:
        """Every storage SOP class the SCP accepts."""
        return BASE_SOP_CLASSES + tuple(u for u in self.extra_sop_classes if u not in BASE_SOP_CLASSES)


@_section
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
                _existing_file(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(name, str(exc)) from None
        return self

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    @property
    def mutual(self) -> bool:
        return self.ca is not None


@_section
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


@_section
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


@_section
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
    min_confidence: Annotated[float | None, AfterValidator(_unit_interval)] = None
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


@_section
class ExpectedCount:
    """A series whose description matches ``series_description`` is complete with ``count`` instances."""

    #: A regular expression searched (case-insensitively) in Series Description.
    series_description: Annotated[str, AfterValidator(_regex)]
    count: AtLeastOne


@_section
class SeriesConfig:
    """When a series is complete, and which complete series become jobs."""

    quiet_period_s: Seconds = 10.0
    modalities: Annotated[tuple[str, ...], Field(min_length=1)] = ("MR",)
    #: A regular expression searched (case-insensitively) in Series Description; empty matches all.
    description_pattern: Annotated[str, AfterValidator(_regex)] = ""
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


@_section
class _Routed:
    """Every target's match rules (ian_node.export.routing); an absent rule matches every series."""

    #: Only series sent by C-STORE from one of these calling AE titles.
    match_calling_ae: tuple[AeTitle, ...] = ()
    #: Only series of one of these modalities (case-insensitive).
    match_modality: tuple[str, ...] = ()
    #: Only series whose description this regular expression finds (searched, case-insensitive).
    match_series_description: Annotated[str, AfterValidator(_regex)] = ""


@_section
class DicomTarget(_Routed):
    """C-STORE to a fixed AE (results back to the sending AE: the ``sender`` kind)."""

    kind: Literal["dicom"] = "dicom"
    name: str
    ae_title: str = ""
    host: str = ""
    port: Annotated[int, Field(ge=1, le=65535)] = 104
    timeout_s: Seconds = 30.0

    @model_validator(mode="after")
    def _check_peer(self) -> DicomTarget:
        for name in ("ae_title", "host"):
            if not getattr(self, name):
                raise ConfigError(name, "is required (results back to the sending AE: kind = \"sender\")")
        try:
            _ae_title(self.ae_title)
        except ValueError as exc:
            raise ConfigError("ae_title", str(exc)) from None
        return self


@_section
class SenderAE:
    """Where a sending AE title's storage SCP listens, for results sent back to it."""

    ae_title: AeTitle
    host: IpAddress
    port: Annotated[int, Field(ge=1, le=65535)] = 104


@_section
class SenderTarget(_Routed):
    """C-STORE back to the AE that sent the series, at the address ``senders`` gives its AE title."""

    kind: Literal["sender"] = "sender"
    name: str
    senders: Annotated[tuple[SenderAE, ...], Field(min_length=1)]
    timeout_s: Seconds = 30.0

    @model_validator(mode="after")
    def _check_senders(self) -> SenderTarget:
        titles = [s.ae_title.strip() for s in self.senders]
        for i, title in enumerate(titles):
            if title in titles[:i]:
                raise ConfigError(f"senders[{i}].ae_title", f"{title!r} is listed twice")
        return self


@_section
class _HttpTarget(_Routed):
    name: str
    url: Annotated[str, Field(pattern=r"^https?://[^/\s]+")]
    username: str | None = None
    password: str | None = None
    token: str | None = None
    timeout_s: Seconds = 30.0

    @model_validator(mode="after")
    def _check_credentials(self) -> Any:
        if (self.username is None) != (self.password is None):
            raise ConfigError("password", "username and password must be set together")
        if self.token is not None and self.username is not None:
            raise ConfigError("token", "use either a bearer token or username/password, not both")
        return self


@_section
class StowRsTarget(_HttpTarget):
    """STOW-RS to a DICOMweb base URL (``url`` is the service root, e.g. ``.../dicom-web``)."""

    kind: Literal["stowrs"] = "stowrs"


@_section
class OrthancTarget(_HttpTarget):
    """Orthanc REST upload: ``POST {url}/instances``."""

    kind: Literal["orthanc"] = "orthanc"


TargetConfig = DicomTarget | StowRsTarget | OrthancTarget | SenderTarget
#: The literal ``kind`` of each export target table.
TARGET_CONFIG_TYPES: dict[str, type[DicomTarget] | type[StowRsTarget] | type[OrthancTarget] | type[SenderTarget]] = {
    "dicom": DicomTarget,
    "stowrs": StowRsTarget,
    "orthanc": OrthancTarget,
    "sender": SenderTarget,
}


@_section
class ExportConfig:
    """Where results go, and how failed deliveries are retried (exponential backoff)."""

    targets: tuple[Annotated[TargetConfig, Field(discriminator="kind")], ...] = ()
    #: With backoff_s 10 doubling to max_backoff_s 600 (jittered into [b/2, b]): 70-140 minutes of retries.
    max_attempts: AtLeastOne = 20
    backoff_s: Seconds = 10.0
    max_backoff_s: float = 600.0

    @model_validator(mode="after")
    def _check(self) -> ExportConfig:
        names = [t.name for t in self.targets]
        for i, name in enumerate(names):
            if not name or not name.isprintable():
                raise ConfigError(f"targets[{i}].name", f"must be non-empty printable text, got {name!r}")
            if name in names[:i]:
                raise ConfigError(f"targets[{i}].name", f"{name!r} is used by another target")
        if self.max_backoff_s < self.backoff_s:
            raise ConfigError("max_backoff_s", f"must be at least backoff_s ({self.backoff_s})")
        return self

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        return min(self.backoff_s * 2.0 ** max(attempts - 1, 0), self.max_backoff_s)


@_section
class ApiConfig:
    """The HTTP API; with ``token`` set, every request needs ``Authorization: Bearer <token>``."""

    bind: IpAddress = "127.0.0.1"
    port: ListenPort = 8765
    token: Annotated[str, Field(min_length=16)] | None = None
    #: Show patient names and IDs on the status page to an authenticated user (never in logs or metrics).
    show_patient_identity: bool = False


@_section
class QaConfig:
    """What a QA FAIL on either side does to the result (`ian_node.segment.qa`).

    ``send``: delivered anyway, the job flagged with the failed side and why. ``hold``: stored with its
    deliveries but not sent (job state ``held``, kept across restarts) until an operator releases it
    with ``ian-node jobs retry`` or ``POST /jobs/{id}/retry``.
    """

    on_fail: Literal["send", "hold"] = "send"


@_section
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


@_section
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
