"""The one check that settings read back from JSON (a ledger, a run's config) name only known fields."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any


def reject_unknown_fields(cls: type, data: Mapping[str, Any], what: str) -> None:
    """Raise a ValueError naming every key of `data` that is not a field of the dataclass `cls`."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} settings {unknown}; valid: {', '.join(known)}")
