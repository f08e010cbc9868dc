"""Loading the configuration: the TOML file, then environment overrides, validated into sections.

Environment overrides
---------------------
``IAN_NODE_<SECTION>_<KEY>`` overrides ``[section] key``; for example ``IAN_NODE_DICOM_PORT=11113``
or ``IAN_NODE_SERIES_QUIET_PERIOD_S=2.5``. pydantic-settings reads them (``env_nested_delimiter="_"``,
split once after the section) and converts each value to its key's type:

- text, paths and choices are taken as written; for an optional key the empty string means "unset";
- integers, decimals and booleans (``true``/``false``/``1``/``0``/``yes``/``no``) are parsed;
- lists accept a comma-separated form (``IAN_NODE_SERIES_MODALITIES=MR,OT``) or a TOML inline
  array; lists of tables take a TOML inline array, e.g.
  ``IAN_NODE_EXPORT_TARGETS='[{name="pacs", kind="dicom", ae_title="PACS", host="10.0.0.2", port=104}]'``.

``IAN_NODE_CONFIG`` is reserved for the path of the TOML file (read by the CLI). Any other
``IAN_NODE_*`` variable that names no key is an error, so that a typo cannot go unnoticed.
Relative paths are relative to the working directory of the process.

The file is checked strictly (``port = "104"`` is an error: a TOML file has types); the environment
has only text, which is converted first. An error names the key (``dicom.port``), or the variable
(``IAN_NODE_DICOM_PORT``) when the value came from the environment.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_core import to_json
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError
from pydantic_settings.sources.utils import parse_env_vars

from ian_node.config.fields import ConfigError
from ian_node.config.sections import ENV_CONFIG_FILE, ENV_PREFIX, CallingAE, NodeConfig

_SECTION_TYPES: dict[str, Any] = typing.get_type_hints(NodeConfig)
_KEYS: dict[str, set[str]] = {s: {f.name for f in dataclasses.fields(t)} for s, t in _SECTION_TYPES.items()}


class _EnvironmentShape(BaseSettings):
    """How pydantic-settings reads IAN_NODE_<SECTION>_<KEY> (never instantiated: only its source is used)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="_", env_nested_max_split=1,
                                      env_parse_none_str="")


_Environment = create_model("_Environment", __base__=_EnvironmentShape,
                            **{name: (tp, None) for name, tp in _SECTION_TYPES.items()})


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
    source = _EnvironmentSource(os.environ if environ is None else environ)
    try:
        overrides = source()
    except SettingsError:
        if not source.errors:
            raise
    if source.errors:  # pydantic-settings lets an optional key's undecodable text through: ours says why
        raise source.errors[0]
    for section, values in overrides.items():
        if values:
            if not isinstance(raw.setdefault(section, {}), dict):
                raise ConfigError(section, "must be a table")
            raw[section].update({key: _typed(section, key, value) for key, value in values.items()})
    try:
        return TypeAdapter(NodeConfig).validate_json(to_json(raw, inf_nan_mode="constants"), strict=True)
    except ValidationError as exc:
        raise ConfigError.from_validation(exc, source.variable) from None


def _typed(section: str, key: str, value: Any) -> Any:
    """An environment variable's text converted to its key's type, or left as text for validation to refuse."""
    if not isinstance(value, str):
        return value
    try:
        return TypeAdapter(_SECTION_TYPES[section].__pydantic_fields__[key].annotation).validate_python(value)
    except ValidationError:
        return value


class _EnvironmentSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping, with TOML inline arrays for lists."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.errors: list[ConfigError] = []
        self.given = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX) and k != ENV_CONFIG_FILE}
        for name in sorted(self.given):
            section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
            if key not in _KEYS.get(section, ()):
                raise ConfigError(name, "names no configuration key (see ian_node/config/sections.py)")
        super().__init__(_Environment)

    def _load_env_vars(self) -> Mapping[str, str | None]:  # the hook pydantic-settings' dotenv source overrides too
        return parse_env_vars(self.given, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)

    def variable(self, loc: tuple[Any, ...]) -> str:
        """The variable that set the value at ``loc`` (section, key, ...), or "" if the file set it."""
        name = f"{ENV_PREFIX}{loc[0]}_{loc[1]}".upper() if len(loc) >= 2 else ""
        return name if name in self.given else ""

    def decode_complex_value(self, field_name: str, field: FieldInfo | None, value: Any) -> Any:
        # the source passes the text and the key, not the variable: find it to name it in an error
        name = next((n for n, v in self.given.items() if v == value and n.lower().endswith(f"_{field_name}")), "")
        if value.lstrip().startswith("["):
            try:
                return tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError as exc:
                self.errors.append(ConfigError(name, f"is not a TOML inline array: {exc}"))
                raise self.errors[-1] from None
        if field is not None and typing.get_args(field.annotation)[:1] in ((str,), (CallingAE,)):
            return [part.strip() for part in value.split(",") if part.strip()]
        self.errors.append(ConfigError(name, "must be a TOML inline array"))
        raise self.errors[-1]
