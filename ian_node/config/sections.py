"""The node's configuration sections: typed, validated dataclasses, one per TOML table.

Every default lives in exactly one place: the field defaults of the dataclasses below. An invalid
value raises :class:`ConfigError` naming the key and the reason; no value is ever silently replaced
by a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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

_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


class ConfigError(ValueError):
    """An invalid configuration value; ``key`` is the dotted key (``dicom.port``)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason

    def within(self, prefix: str) -> ConfigError:
        """The same error with its key placed under ``prefix``."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.reason)


# ---------------------------------------------------------------------------------------------
# Field checks (each raises ConfigError naming the key relative to its section)


def _check_ae_title(key: str, value: str) -> None:
    if not 1 <= len(value.strip()) <= 16 or len(value) > 16:
        raise ConfigError(key, f"an AE title has 1 to 16 characters, got {value!r}")
    if not value.isascii() or "\\" in value or any(ord(c) < 32 for c in value):
        raise ConfigError(key, f"an AE title has printable ASCII without backslash, got {value!r}")


def _check_port(key: str, value: int, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigError(key, f"must be a TCP port between {low} and 65535, got {value}")


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(key, f"must be greater than 0, got {value}")


def _check_ip(key: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(key, f"must be an IP address (no host names), got {value!r}") from None


def _check_file(key: str, value: Path | None) -> None:
    if value is not None and not value.is_file():
        raise ConfigError(key, f"file {str(value)!r} does not exist")


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True, kw_only=True)
class CallingAE:
    """One allowed peer: its AE title and, optionally, the only IP address it may connect from."""

    ae_title: str
    host: str | None = None

    def __post_init__(self) -> None:
        _check_ae_title("ae_title", self.ae_title)
        if self.host is not None:
            _check_ip("host", self.host)


@dataclass(frozen=True, kw_only=True)
class DicomConfig:
    """The SCP: who we are, where we listen, whom we accept and for how long we wait."""

    ae_title: str = "IANNODE"
    bind: str = "127.0.0.1"
    port: int = 11112
    max_associations: int = 10
    #: Empty: any calling AE title is accepted.
    allowed_calling_aes: tuple[CallingAE, ...] = ()
    extra_sop_classes: tuple[str, ...] = ()
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _check_ae_title("ae_title", self.ae_title)
        _check_ip("bind", self.bind)
        _check_port("port", self.port, allow_zero=True)
        if self.max_associations < 1:
            raise ConfigError("max_associations", f"must be at least 1, got {self.max_associations}")
        for uid in self.extra_sop_classes:
            if not is_dicom_uid(uid):
                raise ConfigError("extra_sop_classes", f"{uid!r} is not a DICOM UID")
            if not issubclass(uid_to_service_class(uid), StorageServiceClass):
                raise ConfigError("extra_sop_classes", f"{uid} is not a storage SOP class")
        for name in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s"):
            _check_positive(name, getattr(self, name))

    @property
    def sop_classes(self) -> tuple[str, ...]:
        """Every storage SOP class the SCP accepts."""
        return BASE_SOP_CLASSES + tuple(u for u in self.extra_sop_classes if u not in BASE_SOP_CLASSES)


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """TLS for the SCP: on when ``cert`` is set; mutual (client certificates required) when ``ca`` is."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("cert" if self.cert is None else "key", "cert and key must be set together")
        if self.ca is not None and self.cert is None:
            raise ConfigError("ca", "a CA (mutual TLS) needs cert and key as well")
        for name in ("cert", "key", "ca"):
            _check_file(name, getattr(self, name))

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    @property
    def mutual(self) -> bool:
        return self.ca is not None


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """Where received files and the SQLite state live, and the free space the spool keeps.

    While the spool's file system has less free space than ``min_free_bytes`` or than
    ``min_free_percent`` of its size (whichever is more), new instances are refused (C-STORE 0xA700,
    out of resources); results are still written, into the space kept. Both 0: no minimum (writes go
    on until the disk is full, and are refused with 0xA700 then).
    """

    spool_dir: Path = DEFAULT_DATA_DIR / "spool"
    state_path: Path = DEFAULT_DATA_DIR / "state.sqlite3"
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES
    min_free_percent: float = DEFAULT_MIN_FREE_PERCENT

    def __post_init__(self) -> None:
        if self.min_free_bytes < 0:
            raise ConfigError("min_free_bytes", f"must be 0 or more, got {self.min_free_bytes}")
        if not 0 <= self.min_free_percent < 100:
            raise ConfigError("min_free_percent", f"must be from 0 to below 100, got {self.min_free_percent}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model the worker runs. ``checkpoint`` unset: the bundled phantom-trained model."""

    checkpoint: Path | None = None
    device: str = "auto"
    batch_size: int = 8
    #: CPU threads for inference; unset: torch's default (all cores). On a host shared with a PACS
    #: or Orthanc, 1–2 threads give far steadier times than oversubscribed cores.
    threads: int | None = None

    def __post_init__(self) -> None:
        _check_file("checkpoint", self.checkpoint)
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads", f"must be at least 1, got {self.threads}")
        if _DEVICE_RE.fullmatch(self.device) is None:
            raise ConfigError("device", f"must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be at least 1, got {self.batch_size}")


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


@dataclass(frozen=True, kw_only=True)
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
    localiser: Path | None = None
    #: Per-side confidence below which no region is found; unset: the localiser's own threshold.
    min_confidence: float | None = None
    segment_when_not_found: bool = False

    def __post_init__(self) -> None:
        if self.mode not in CROP_MODES:
            raise ConfigError("mode", f"must be one of {', '.join(map(repr, CROP_MODES))}, got {self.mode!r}")
        boxed = self.mode in ("box", "oracle")
        for side in ("right", "left"):
            value = getattr(self, side)
            if value is None:
                if boxed:
                    raise ConfigError(side, f"is required with mode {self.mode!r} (a box for each side)")
                continue
            if not boxed:
                raise ConfigError(side, f"is used only with mode 'box' or 'oracle', not {self.mode!r}")
            object.__setattr__(self, side, check_box(side, list(value)))
        if boxed:
            check_box_pair("left", self.right, self.left)  # type: ignore[arg-type]
        _check_file("localiser", self.localiser)
        if self.min_confidence is not None and not 0.0 <= self.min_confidence <= 1.0:
            raise ConfigError("min_confidence", f"must be from 0 to 1, got {self.min_confidence}")

    @property
    def boxes(self) -> dict[str, BoxMm] | None:
        """{"right": box, "left": box} for ``box`` and ``oracle``; None otherwise."""
        if self.right is None or self.left is None:
            return None
        return {"right": self.right, "left": self.left}  # type: ignore[dict-item] (checked: BoxMm)


@dataclass(frozen=True, kw_only=True)
class SeriesConfig:
    """When a series is complete, and which complete series become jobs."""

    quiet_period_s: float = 10.0
    modalities: tuple[str, ...] = ("MR",)
    #: A regular expression searched (case-insensitively) in Series Description; empty matches all.
    description_pattern: str = ""
    #: Slices are frames: one per single-frame instance, NumberOfFrames per multi-frame instance.
    min_slices: int = 5
    #: Series with any of these ImageType values are skipped (localizers and scouts are not volumes).
    skip_image_types: tuple[str, ...] = ("LOCALIZER", "SCOUT")
    #: What happens to the files of a series that is not selected.
    retention: Literal["keep", "purge"] = "keep"

    def __post_init__(self) -> None:
        _check_positive("quiet_period_s", self.quiet_period_s)
        if not self.modalities:
            raise ConfigError("modalities", "must name at least one modality")
        try:
            re.compile(self.description_pattern)
        except re.error as exc:
            raise ConfigError("description_pattern", f"is not a regular expression: {exc}") from None
        if self.min_slices < 2:
            raise ConfigError("min_slices", f"must be at least 2 (a volume has two slices), got {self.min_slices}")

    @property
    def description_regex(self) -> re.Pattern[str]:
        return re.compile(self.description_pattern, re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class DicomTarget:
    """C-STORE to a fixed AE, or (``back_to_sender``) to the AE that sent the series, on ``port``."""

    kind: Literal["dicom"] = "dicom"
    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 104
    back_to_sender: bool = False
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _check_port("port", self.port, allow_zero=False)
        _check_positive("timeout_s", self.timeout_s)
        if not self.back_to_sender:
            for name in ("ae_title", "host"):
                if not getattr(self, name):
                    raise ConfigError(name, "is required unless back_to_sender is true")
            _check_ae_title("ae_title", self.ae_title)


@dataclass(frozen=True, kw_only=True)
class _HttpTarget:
    name: str
    url: str
    username: str | None = None
    password: str | None = None
    token: str | None = None
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not re.match(r"https?://[^/\s]+", self.url):
            raise ConfigError("url", f"must be an http:// or https:// URL, got {self.url!r}")
        if (self.username is None) != (self.password is None):
            raise ConfigError("password", "username and password must be set together")
        if self.token is not None and self.username is not None:
            raise ConfigError("token", "use either a bearer token or username/password, not both")
        _check_positive("timeout_s", self.timeout_s)


@dataclass(frozen=True, kw_only=True)
class StowRsTarget(_HttpTarget):
    """STOW-RS to a DICOMweb base URL (``url`` is the service root, e.g. ``.../dicom-web``)."""

    kind: Literal["stowrs"] = "stowrs"


@dataclass(frozen=True, kw_only=True)
class OrthancTarget(_HttpTarget):
    """Orthanc REST upload: ``POST {url}/instances``."""

    kind: Literal["orthanc"] = "orthanc"


TargetConfig = DicomTarget | StowRsTarget | OrthancTarget
#: The literal ``kind`` of each export target table.
TARGET_CONFIG_TYPES: dict[str, type[DicomTarget] | type[StowRsTarget] | type[OrthancTarget]] = {
    "dicom": DicomTarget,
    "stowrs": StowRsTarget,
    "orthanc": OrthancTarget,
}


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Where results go, and how failed deliveries are retried (exponential backoff)."""

    targets: tuple[TargetConfig, ...] = ()
    #: With backoff_s 10 doubling to max_backoff_s 600 (jittered into [b/2, b]): 70-140 minutes of retries.
    max_attempts: int = 20
    backoff_s: float = 10.0
    max_backoff_s: float = 600.0

    def __post_init__(self) -> None:
        names = [t.name for t in self.targets]
        for i, name in enumerate(names):
            if not name or not name.isprintable():
                raise ConfigError(f"targets[{i}].name", f"must be non-empty printable text, got {name!r}")
            if name in names[:i]:
                raise ConfigError(f"targets[{i}].name", f"{name!r} is used by another target")
        if self.max_attempts < 1:
            raise ConfigError("max_attempts", f"must be at least 1, got {self.max_attempts}")
        _check_positive("backoff_s", self.backoff_s)
        if self.max_backoff_s < self.backoff_s:
            raise ConfigError("max_backoff_s", f"must be at least backoff_s ({self.backoff_s})")

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        return min(self.backoff_s * 2.0 ** max(attempts - 1, 0), self.max_backoff_s)


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    """The HTTP API; with ``token`` set, every request needs ``Authorization: Bearer <token>``."""

    bind: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None

    def __post_init__(self) -> None:
        _check_ip("bind", self.bind)
        _check_port("port", self.port, allow_zero=True)
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("token", "must have at least 16 characters")


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    dicom: DicomConfig = field(default_factory=DicomConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    api: ApiConfig = field(default_factory=ApiConfig)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(NodeConfig))
