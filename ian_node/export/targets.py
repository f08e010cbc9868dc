"""Export targets: one class per ``kind`` of destination, each confirming or raising DeliveryError.

Every target kind implements :class:`ExportTarget` and is registered in :data:`TARGET_KINDS` under
the literal ``kind`` of its config table.

Confirmation means: C-STORE status 0x0000 (or a 0xB0xx warning, which PS3.4 defines as stored),
STOW-RS HTTP 200 with no failed SOP, Orthanc REST HTTP 200 with status Success / AlreadyStored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from ian_node.config import DicomTarget, OrthancTarget, StowRsTarget, TargetConfig
from ian_node.net import http_session

logger = logging.getLogger(__name__)

#: C-STORE warnings that still mean "stored" (PS3.4 B.2.3): coercion, elements discarded.
_STORED_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})


class DeliveryError(Exception):
    """A target did not confirm the result; the message says what it answered."""


@dataclass(frozen=True)
class Origin:
    """Who sent the source series: where "back to the sending AE" goes."""

    calling_ae: str
    peer_host: str


class ExportTarget(Protocol):
    """One destination. ``send`` returns only when the target confirmed; otherwise DeliveryError."""

    name: str

    def send(self, path: Path, origin: Origin) -> None: ...


class CStoreExport:
    """C-STORE SCU to a configured AE, or back to the AE that sent the series."""

    def __init__(self, config: DicomTarget, calling_ae_title: str) -> None:
        self.name = config.name
        self._config = config
        self._calling = calling_ae_title

    def send(self, path: Path, origin: Origin) -> None:
        cfg = self._config
        called, host = (origin.calling_ae, origin.peer_host) if cfg.back_to_sender else (cfg.ae_title, cfg.host)
        if not called or not host:
            raise DeliveryError("the sending AE of the source series is unknown")
        ds = dcmread(path)
        syntax = UID(ds.file_meta.TransferSyntaxUID)
        syntaxes = [syntax] + ([s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s != syntax]
                               if not syntax.is_compressed else [])
        ae = AE(ae_title=self._calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = cfg.timeout_s
        ae.add_requested_context(ds.SOPClassUID, syntaxes)
        where = f"{called}@{host}:{cfg.port}"
        assoc = ae.associate(host, cfg.port, ae_title=called)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "not established (refused, unreachable or aborted)"
            raise DeliveryError(f"association with {where} {why}")
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        if "Status" not in status:
            raise DeliveryError(f"no C-STORE response from {where} (timeout or abort)")
        code = int(status.Status)
        if code in _STORED_WARNINGS:
            logger.warning("%s stored %s with warning 0x%04X", where, ds.SOPInstanceUID, code)
        elif code != 0x0000:
            raise DeliveryError(f"{where} answered C-STORE status 0x{code:04X}")


class StowRsExport:
    """STOW-RS through dicomweb-client (its own retries are off: the Exporter retries)."""

    def __init__(self, config: StowRsTarget, calling_ae_title: str = "") -> None:
        self.name = config.name
        self._client = DICOMwebClient(url=config.url, session=http_session(config), timeout=config.timeout_s)
        self._client.set_http_retry_params(retry=False)

    def send(self, path: Path, origin: Origin) -> None:
        ds = dcmread(path)
        try:
            response = self._client.store_instances([ds])
        except requests.RequestException as exc:
            raise DeliveryError(f"STOW-RS failed: {_http_reason(exc)}") from exc
        failed = response.get("FailedSOPSequence")
        if failed:
            reasons = ", ".join(f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed)
            raise DeliveryError(f"STOW-RS refused {ds.SOPInstanceUID}: failure reason {reasons}")
        stored = response.get("ReferencedSOPSequence")
        if stored is not None and ds.SOPInstanceUID not in {i.get("ReferencedSOPInstanceUID") for i in stored}:
            raise DeliveryError(f"STOW-RS response does not list {ds.SOPInstanceUID}")


class OrthancExport:
    """Orthanc REST upload: ``POST {url}/instances`` with the file as it is stored."""

    def __init__(self, config: OrthancTarget, calling_ae_title: str = "") -> None:
        self.name = config.name
        self._url = config.url.rstrip("/") + "/instances"
        self._timeout = config.timeout_s
        self._session = http_session(config)

    def send(self, path: Path, origin: Origin) -> None:
        try:
            response = self._session.post(
                self._url, data=path.read_bytes(), headers={"Content-Type": "application/dicom"},
                timeout=self._timeout,
            )
        except requests.RequestException as exc:
            raise DeliveryError(f"Orthanc upload failed: {_http_reason(exc)}") from exc
        if response.status_code != 200:
            raise DeliveryError(f"Orthanc answered HTTP {response.status_code}: {response.text[:200]}")
        try:
            status = response.json().get("Status")
        except ValueError:
            status = None
        if status not in ("Success", "AlreadyStored"):
            raise DeliveryError(f"Orthanc did not confirm the upload (status {status!r})")


def _http_reason(exc: requests.RequestException) -> str:
    if exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.text[:200]}"
    return type(exc).__name__


#: Target constructors by the literal ``kind`` of their config table.
TARGET_KINDS: dict[str, Callable[..., ExportTarget]] = {
    "dicom": CStoreExport,
    "stowrs": StowRsExport,
    "orthanc": OrthancExport,
}


def build_targets(configs: tuple[TargetConfig, ...], calling_ae_title: str) -> dict[str, ExportTarget]:
    """One target per config entry, by name; ``calling_ae_title`` is the node's own AE title."""
    return {c.name: TARGET_KINDS[c.kind](c, calling_ae_title) for c in configs}
