"""The building blocks of the config sections: the error, the section decorator, and the domain checks.

pydantic converts and checks types and ranges; what it has no words for (AE titles, IP addresses,
storage SOP classes, regular expressions, files that must exist) is checked here, and every failure
becomes a :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, dataclass_transform

import pydantic
from pydantic import AfterValidator, ConfigDict, Field, ValidationError
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from ian_node.uids import is_dicom_uid


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
        from ian_node.config.targets import TARGET_CONFIG_TYPES  # the targets are built from these fields

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
def section(cls: type[T]) -> type[T]:
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


def check_ae_title(value: str) -> str:
    if not 1 <= len(value.strip()) <= 16 or len(value) > 16:
        raise ValueError(f"an AE title has 1 to 16 characters, got {value!r}")
    if not value.isascii() or "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f"an AE title has printable ASCII without backslash, got {value!r}")
    return value


def check_ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"must be an IP address (no host names), got {value!r}") from None
    return value


def check_existing_file(value: Path | None) -> Path | None:
    if value is not None and not value.is_file():
        raise ValueError(f"file {str(value)!r} does not exist")
    return value


def check_storage_sop_classes(value: tuple[str, ...]) -> tuple[str, ...]:
    for uid in value:
        if not is_dicom_uid(uid):
            raise ValueError(f"{uid!r} is not a DICOM UID")
        if not issubclass(uid_to_service_class(uid), StorageServiceClass):
            raise ValueError(f"{uid} is not a storage SOP class")
    return value


def check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"is not a regular expression: {exc}") from None
    return value


def check_unit_interval(value: float | None) -> float | None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"must be from 0 to 1, got {value}")
    return value


AeTitle = Annotated[str, AfterValidator(check_ae_title)]
IpAddress = Annotated[str, AfterValidator(check_ip)]
ExistingFile = Annotated[Path | None, AfterValidator(check_existing_file)]
ListenPort = Annotated[int, Field(ge=0, le=65535)]  # 0: any free port
Seconds = Annotated[float, Field(gt=0)]
AtLeastOne = Annotated[int, Field(ge=1)]
