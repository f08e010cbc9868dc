"""The ``[export]`` section and its targets, one frozen dataclass per ``kind``, each with match rules."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from ian_node.config.fields import (
    AeTitle,
    AtLeastOne,
    ConfigError,
    IpAddress,
    Seconds,
    check_ae_title,
    check_regex,
    section,
)


@section
class _Routed:
    """Every target's match rules (ian_node.export.routing); an absent rule matches every series."""

    #: Only series sent by C-STORE from one of these calling AE titles.
    match_calling_ae: tuple[AeTitle, ...] = ()
    #: Only series of one of these modalities (case-insensitive).
    match_modality: tuple[str, ...] = ()
    #: Only series whose description this regular expression finds (searched, case-insensitive).
    match_series_description: Annotated[str, AfterValidator(check_regex)] = ""


@section
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
            check_ae_title(self.ae_title)
        except ValueError as exc:
            raise ConfigError("ae_title", str(exc)) from None
        return self


@section
class SenderAE:
    """Where a sending AE title's storage SCP listens, for results sent back to it."""

    ae_title: AeTitle
    host: IpAddress
    port: Annotated[int, Field(ge=1, le=65535)] = 104


@section
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


@section
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


@section
class StowRsTarget(_HttpTarget):
    """STOW-RS to a DICOMweb base URL (``url`` is the service root, e.g. ``.../dicom-web``)."""

    kind: Literal["stowrs"] = "stowrs"


@section
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


@section
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
