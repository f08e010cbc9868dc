"""Loading the configuration: the TOML file, then environment overrides, validated into sections.

Environment overrides
---------------------
``IAN_NODE_<SECTION>_<KEY>`` overrides ``[section] key``; for example ``IAN_NODE_DICOM_PORT=11113``
or ``IAN_NODE_SERIES_QUIET_PERIOD_S=2.5``. The value is read according to the key's type:

- text, paths and choices are taken as written; for an optional key the empty string means "unset";
- integers, decimals and booleans (``true``/``false``/``1``/``0``/``yes``/``no``) are parsed;
- lists accept a comma-separated form (``IAN_NODE_SERIES_MODALITIES=MR,OT``) or a TOML inline
  array; lists of tables take a TOML inline array, e.g.
  ``IAN_NODE_EXPORT_TARGETS='[{name="pacs", kind="dicom", ae_title="PACS", host="10.0.0.2", port=104}]'``.

``IAN_NODE_CONFIG`` is reserved for the path of the TOML file (read by the CLI). Any other
``IAN_NODE_*`` variable that names no key is an error, so that a typo cannot go unnoticed.
Relative paths are relative to the working directory of the process.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from ian_node.config.sections import (
    ENV_CONFIG_FILE,
    ENV_PREFIX,
    TARGET_CONFIG_TYPES,
    CallingAE,
    ConfigError,
    NodeConfig,
    TargetConfig,
)


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Read ``path`` (TOML; None: no file), apply ``IAN_NODE_*`` overrides and validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with Path(path).open("rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read the config file: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"the config file is not valid TOML: {exc}") from None
    _apply_environment(raw, os.environ if environ is None else environ)
    return _build(NodeConfig, raw, "")


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    hints = typing.get_type_hints(NodeConfig)
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_FILE:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        section_type = hints.get(section)
        key_types = typing.get_type_hints(section_type) if section_type else {}
        if key not in key_types:
            raise ConfigError(name, "names no configuration key (see ian_node/config/sections.py)")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(section, "must be a table")
        table[key] = _from_env(name, text, key_types[key])


def _from_env(name: str, text: str, tp: Any) -> Any:
    """Turn an environment string into the value a TOML file would hold for a key of type ``tp``."""
    args = typing.get_args(tp)
    if _is_optional(tp):
        return _UNSET if text == "" else _from_env(name, text, _strip_none(tp))
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, f"must be true or false, got {text!r}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(name, f"must be {'an integer' if tp is int else 'a number'}, got {text!r}") from None
    if typing.get_origin(tp) is tuple:
        if text.lstrip().startswith("["):
            try:
                return tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(name, f"is not a TOML inline array: {exc}") from None
        if args[0] is str or args[0] is CallingAE:
            return [part.strip() for part in text.split(",") if part.strip()]
        raise ConfigError(name, "must be a TOML inline array")
    return text


class _Unset:
    """An environment override that clears an optional key back to None."""


_UNSET = _Unset()


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_none(tp: Any) -> Any:
    rest = [a for a in typing.get_args(tp) if a is not type(None)]
    return rest[0] if len(rest) == 1 else functools.reduce(operator.or_, rest)


def _build(cls: Any, table: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, converting and checking every key."""
    if not isinstance(table, dict):
        raise ConfigError(where, f"must be a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(_join(where, unknown[0]), f"unknown key (known: {', '.join(sorted(known))})")
    values = {key: _convert(hints[key], value, _join(where, key)) for key, value in table.items()}
    try:
        return cls(**{k: v for k, v in values.items() if v is not _UNSET})
    except ConfigError as exc:
        raise exc.within(where) if where else exc from None
    except TypeError as exc:  # a required key is missing
        missing = re.findall(r"'(\w+)'", str(exc))
        raise ConfigError(_join(where, missing[0] if missing else ""), "is required") from None


def _convert(tp: Any, value: Any, key: str) -> Any:
    if value is _UNSET:
        if not _is_optional(tp):
            raise ConfigError(key, "cannot be empty")
        return _UNSET
    if _is_optional(tp):
        tp = _strip_none(tp)
    origin = typing.get_origin(tp)
    if typing.get_args(tp) == typing.get_args(TargetConfig):
        return _build_target(value, key)
    if dataclasses.is_dataclass(tp):
        if tp is CallingAE and isinstance(value, str):
            value = {"ae_title": value}
        return _build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {type(value).__name__}")
        item_type = typing.get_args(tp)[0]
        return tuple(_convert(item_type, item, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"must be a non-empty path, got {value!r}")
        return Path(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (str, int, float, bool):
        if type(value) is not tp:
            raise ConfigError(key, f"must be {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(key, f"has an unsupported type {tp!r}")  # a programming error in this module


def _build_target(value: Any, key: str) -> TargetConfig:
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a table, got {type(value).__name__}")
    kind = value.get("kind")
    if kind not in TARGET_CONFIG_TYPES:
        raise ConfigError(f"{key}.kind", f"must be one of {', '.join(map(repr, TARGET_CONFIG_TYPES))}, got {kind!r}")
    return _build(TARGET_CONFIG_TYPES[kind], value, key)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
