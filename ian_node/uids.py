"""The one DICOM UID checker: config values, received headers and spool paths all go through it."""

from __future__ import annotations

import re
import uuid

from pydicom.uid import generate_uid

_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


class UnsafeUIDError(ValueError):
    """A value that should be a DICOM UID is not one, so it must never become part of a path."""


def is_dicom_uid(value: str) -> bool:
    """True when ``value`` follows the DICOM UID grammar (PS3.5 9.1) in at most 64 characters."""
    return len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def checked_uid(value: object, what: str) -> str:
    """``value`` if it is a DICOM UID (digits and dots, at most 64 characters); else UnsafeUIDError."""
    if not isinstance(value, str) or not is_dicom_uid(value):
        # The value itself stays out of the message: it may be anything a peer chose to put there.
        if value is None:
            got = "missing"
        else:
            got = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
        raise UnsafeUIDError(f"{what} is not a valid DICOM UID ({got})")
    return str(value)


def derived_uid(prefix: str | None, namespace: str, *parts: object) -> str:
    """A UID that is the same every time for the same ``parts``: rebuilding a result gives the same UIDs.

    Under 2.25 from a name-based UUID (ISO/IEC 9834-8) when ``prefix`` is None, else under that
    organisation root. (pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources.)
    """
    text = "/".join(str(p) for p in parts)
    if prefix is None:
        return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, f'{namespace}:{text}').int}"
    return str(generate_uid(prefix=prefix, entropy_srcs=[namespace, text]))
