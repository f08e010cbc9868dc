"""Export targets: one class per ``kind`` of destination, each confirming or raising DeliveryError.

Every target kind implements :class:`ExportTarget` and is registered in :data:`TARGET_KINDS` under
the literal ``kind`` of its config table.

Confirmation means: C-STORE status 0x0000 (or a 0xB0xx warning, which PS3.4 defines as stored),
STOW-RS HTTP 200 with no failed SOP, Orthanc REST HTTP 200 with status Success / AlreadyStored.

Anything else is one of two errors, and the exporter treats them differently:

- :class:`DeliveryRefused`: the destination answered and refused this result, so sending the same
  file again cannot help: a C-STORE failure status 0xAxxx or 0xCxxx (or 0x0122 / 0x0124, "refused"),
  an association rejected *permanently*, no presentation context accepted for the SOP class, a STOW-RS
  failed SOP, or an HTTP 4xx other than 408 and 429. The delivery fails at once, naming the reason;
  ``ian-node jobs retry`` sends it again once the operator has fixed the cause.
- :class:`DeliveryError` (the rest): transient, retried with backoff up to ``export.max_attempts``:
  no connection, a timeout or abort, an association rejected *transiently*, HTTP 5xx, 408 or 429.
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
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from ian_node.config import DicomTarget, OrthancTarget, SenderTarget, StowRsTarget, TargetConfig
from ian_node.net import http_session

logger = logging.getLogger(__name__)

#: C-STORE warnings that still mean "stored" (PS3.4 B.2.3): coercion, elements discarded.
_STORED_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})
#: C-STORE failures outside 0xAxxx / 0xCxxx that are refusals too (PS3.7 C.5): SOP class not
#: supported, not authorised. Other general failures (0x0110 processing failure, 0x0213 resource
#: limitation, ...) may pass, so they are retried.
_REFUSED_GENERAL = frozenset({0x0122, 0x0124})
#: HTTP 4xx answers that mean "later" rather than "no": 408 Request Timeout, 429 Too Many Requests.
_TRANSIENT_4XX = frozenset({408, 429})
#: A-ASSOCIATE-RJ result "rejected-permanent" (PS3.8 9.3.4); 0x02 is "rejected-transient".
_REJECTED_PERMANENT = 0x01
#: Seconds pynetdicom's DUL reactor sleeps between looks at an idle connection until the peer answers
#: the association request. Its own 0.001 s made waiting for a silent destination cost about 1.8 % of
#: a core for the whole ``timeout_s`` of every attempt (benchmarks/outage_cpu.py). The reactor gets its
#: own delay back once the answer is in, so a delivery waits at most this much longer, once.
_AWAITING_ANSWER_S = 0.05


class DeliveryError(Exception):
    """A target did not confirm the result; the message says what it answered. Retried (transient)."""


class DeliveryRefused(DeliveryError):
    """The destination answered and refused the result: not retried until an operator asks."""


@dataclass(frozen=True)
class Origin:
    """Who sent the source series: where "back to the sending AE" goes."""

    calling_ae: str


class ExportTarget(Protocol):
    """One destination. ``send`` returns only when the target confirmed; otherwise DeliveryError."""

    name: str

    def send(self, path: Path, origin: Origin) -> None: ...


class CStoreExport:
    """C-STORE SCU to a configured AE."""

    def __init__(self, config: DicomTarget, calling_ae_title: str) -> None:
        self.name = config.name
        self._config = config
        self._calling = calling_ae_title

    def send(self, path: Path, origin: Origin) -> None:
        cfg = self._config
        c_store(path, cfg.ae_title, cfg.host, cfg.port, self._calling, cfg.timeout_s)


class SenderExport:
    """C-STORE back to the AE that sent the series, at the address its ``senders`` table gives it.

    A modality's storage SCP rarely listens where its SCU connects from, so the address is configured
    per calling AE title. A series from an AE title that is not listed cannot be sent back: its
    delivery is refused at once, naming the AE title and the table to add it to.
    """

    def __init__(self, config: SenderTarget, calling_ae_title: str) -> None:
        self.name = config.name
        self._config = config
        self._calling = calling_ae_title
        self._senders = {s.ae_title.strip(): s for s in config.senders}

    def send(self, path: Path, origin: Origin) -> None:
        sender = self._senders.get(origin.calling_ae.strip())
        if sender is None:
            raise DeliveryRefused(
                f"the sending AE {origin.calling_ae.strip()!r} is not in the senders of target {self.name!r}"
                if origin.calling_ae.strip() else "the source series has no sending AE (it was not received by C-STORE)"
            )
        c_store(path, sender.ae_title, sender.host, sender.port, self._calling, self._config.timeout_s)


def c_store(path: Path, called: str, host: str, port: int, calling: str, timeout_s: float) -> None:
    """Send one file by C-STORE and return once the peer confirmed it; DeliveryError otherwise."""
    ds = dcmread(path)
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    syntaxes = [syntax] + ([s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s != syntax]
                           if not syntax.is_compressed else [])
    ae = AE(ae_title=calling)
    # every wait has a limit, in seconds: TCP connect, association negotiation, each DIMSE
    # message, and silence on an open connection
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(ds.SOPClassUID, syntaxes)
    where = f"{called}@{host}:{port}"
    assoc = ae.associate(host, port, ae_title=called, evt_handlers=_QUIET_WAIT_HANDLERS)
    if not assoc.is_established:
        raise _not_established(assoc, where, ds.SOPClassUID)
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    if "Status" not in status:
        raise DeliveryError(f"no C-STORE response from {where} (timeout or abort)")
    code = int(status.Status)
    if code in _STORED_WARNINGS:
        logger.warning("%s stored %s with warning 0x%04X", where, ds.SOPInstanceUID, code)
        return
    if code == 0x0000:
        return
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", ""))[1]
    comment = str(status.get("ErrorComment", "") or "").strip()
    answer = f"C-STORE status 0x{code:04X}" + (f" ({meaning})" if meaning else "") + (
        f": {comment[:200]}" if comment else "")
    if _is_refusal(code):
        raise DeliveryRefused(f"{where} refused the result: {answer}")
    raise DeliveryError(f"{where} answered {answer}")


def _slow_idle_polling(event: evt.Event) -> None:
    """Poll the new connection slowly until the peer answers (pynetdicom has no public setting).

    Runs in the reactor's thread as soon as the TCP connection is open. Should a later pynetdicom drop
    the attribute, this and :func:`_restore_idle_polling` do nothing.
    """
    dul = event.assoc.dul
    default = getattr(dul, "_run_loop_delay", None)
    if isinstance(default, float) and default < _AWAITING_ANSWER_S:
        dul._ian_node_default_delay = default
        dul._run_loop_delay = _AWAITING_ANSWER_S


def _restore_idle_polling(event: evt.Event) -> None:
    """The peer answered the association request: pynetdicom's own polling for the transfer."""
    dul = event.assoc.dul
    default = getattr(dul, "_ian_node_default_delay", None)
    if default is not None:
        dul._run_loop_delay = default


_QUIET_WAIT_HANDLERS = [(evt.EVT_CONN_OPEN, _slow_idle_polling), (evt.EVT_ACSE_RECV, _restore_idle_polling)]


def _is_refusal(code: int) -> bool:
    """Whether a C-STORE status says the peer will not take this data set (not "try later").

    0xA7xx (out of resources) is "try later": a PACS whose disk is full is retried with backoff, as
    this node asks of its own senders when it answers 0xA700.
    """
    if code >> 8 == 0xA7:
        return False
    return code_to_category(code) == "Failure" and (code >> 12 in (0xA, 0xC) or code in _REFUSED_GENERAL)


def _not_established(assoc: Association, where: str, sop_class: str) -> DeliveryError:
    """Why an association did not come up: a refusal when the peer answered "never", else transient."""
    answer = _rejection(assoc)
    if answer is not None:
        why = f"{answer.result_str}, source {answer.source_str}, reason {answer.reason_str}"
        if answer.result == _REJECTED_PERMANENT:
            return DeliveryRefused(f"{where} rejected the association: {why}")
        return DeliveryError(f"association with {where} rejected: {why}")
    if not assoc.accepted_contexts and assoc.rejected_contexts:
        return DeliveryRefused(f"{where} accepted no presentation context for SOP class {sop_class}")
    return DeliveryError(f"association with {where} not established (refused, unreachable or aborted)")


def _rejection(assoc: Association) -> A_ASSOCIATE | None:
    """The peer's A-ASSOCIATE-RJ, if it sent one.

    pynetdicom checks that the connection is open only after it has sent the request; when the peer
    rejects at once and closes (dcmtk's storescp --refuse does), its reactor may have closed the socket
    by then, and pynetdicom aborts as if the connection had failed, leaving the rejection unread in
    the reactor's queue (seen about one time in three on a loaded 2-core machine). It is read there.
    """
    if assoc.is_rejected:
        answer = assoc.acceptor.primitive
    else:
        answer = assoc.dul.peek_next_pdu()
    if isinstance(answer, A_ASSOCIATE) and answer.result in (0x01, 0x02):
        return answer
    return None


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
            raise _http_error("STOW-RS", exc) from exc
        failed = response.get("FailedSOPSequence")
        if failed:
            reasons = ", ".join(f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed)
            raise DeliveryRefused(f"STOW-RS refused {ds.SOPInstanceUID}: failure reason {reasons}")
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
            raise _http_error("Orthanc upload", exc) from exc
        if response.status_code != 200:
            raise _http_answer_error("Orthanc upload", response)
        try:
            status = response.json().get("Status")
        except ValueError:
            status = None
        if status not in ("Success", "AlreadyStored"):
            raise DeliveryError(f"Orthanc did not confirm the upload (status {status!r})")


def _http_error(what: str, exc: requests.RequestException) -> DeliveryError:
    """A failed HTTP exchange: refused when the server answered 4xx (but 408 / 429), else transient."""
    if exc.response is not None:
        return _http_answer_error(what, exc.response)
    return DeliveryError(f"{what} failed: {type(exc).__name__} (no answer)")


def _http_answer_error(what: str, response: requests.Response) -> DeliveryError:
    code = response.status_code
    text = " ".join(response.text.split())[:200]
    answer = f"HTTP {code} {response.reason or ''}".rstrip() + (f": {text}" if text else "")
    if 400 <= code < 500 and code not in _TRANSIENT_4XX:
        return DeliveryRefused(f"{what} refused: {answer}")
    return DeliveryError(f"{what} failed: {answer}")


#: Target constructors by the literal ``kind`` of their config table.
TARGET_KINDS: dict[str, Callable[..., ExportTarget]] = {
    "dicom": CStoreExport,
    "stowrs": StowRsExport,
    "orthanc": OrthancExport,
    "sender": SenderExport,
}


def build_targets(configs: tuple[TargetConfig, ...], calling_ae_title: str) -> dict[str, ExportTarget]:
    """One target per config entry, by name; ``calling_ae_title`` is the node's own AE title."""
    return {c.name: TARGET_KINDS[c.kind](c, calling_ae_title) for c in configs}
