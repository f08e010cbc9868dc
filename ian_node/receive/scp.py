"""The DICOM listener: C-ECHO, and C-STORE of MR images into the spool and the state.

A C-STORE is answered with success only after the instance's file is durable in the spool and its
row is committed in SQLite (``synchronous=FULL``), so an acknowledged instance survives SIGKILL and
power loss. Otherwise the peer gets a failure status it can act on:

- ``0xA700`` out of resources: the disk (spool or state) is full;
- ``0xA900`` data set does not match SOP class;
- ``0xC210`` cannot understand: the header cannot be decoded, or a SOP/series/study UID is missing
  or malformed (such a UID is never used in a path);
- ``0x0110`` processing failure: any other local error.

Association checks: the calling AE allow-list (with an optional source IP per AE), the called AE
title, the maximum number of associations and, when configured, TLS (mutual with a CA).
Unknown SOP classes are refused in presentation-context negotiation. The log names UIDs and AE
titles, never patient names or IDs.

How an answer waits for durability, and what a crash leaves behind: :mod:`ian_node.receive.commit`.
Measured ingest rates: ``docs/performance.md``.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from enum import IntEnum

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from ian_node.config import ConfigError, DicomConfig, TlsConfig
from ian_node.receive.commit import GroupCommitter, recover_unconfirmed
from ian_node.receive.header import HeaderError, read_header_facts
from ian_node.storage.records import ReceivedInstance, RecordOutcome, StateFullError
from ian_node.storage.spool import Spool, SpoolFullError, StagedInstance
from ian_node.storage.state import State
from ian_node.uids import UnsafeUIDError, is_dicom_uid

logger = logging.getLogger(__name__)

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Every transfer syntax the SCP accepts for the storage SOP classes; files are stored as received.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


class Status(IntEnum):
    """The C-STORE statuses this SCP answers (PS3.4 B.2.3, PS3.7 C.4)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC210


class _Refused(Exception):
    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The SCP's TLS context (None when TLS is off); client certificates required when a CA is set."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("tls.cert", f"cannot load certificate and key: {exc}") from None
    if tls.mutual:
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=str(tls.ca))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError("tls.ca", f"cannot load the CA certificates: {exc}") from None
    return ctx


class StorageSCP:
    """The node's listener; ``on_stored`` is called after each committed instance (the series timers).

    Building it settles what a crashed run left unconfirmed (:func:`recover_unconfirmed`), so that
    nothing downstream ever sees a row whose file may be bad.
    """

    def __init__(
        self,
        dicom: DicomConfig,
        tls: TlsConfig,
        state: State,
        spool: Spool,
        on_stored: Callable[[RecordOutcome], None] | None = None,
    ) -> None:
        self._dicom = dicom
        self._ssl = server_ssl_context(tls)
        self._state = state
        self._spool = spool
        self._on_stored = on_stored
        # AE title -> the IPs it may connect from (None: any); an empty map allows every AE.
        self._allowed: dict[str, frozenset[_IP] | None] = {}
        for entry in dicom.allowed_calling_aes:
            title = entry.ae_title.strip()
            hosts = self._allowed.get(title, frozenset())
            if entry.host is None or hosts is None:
                self._allowed[title] = None
            else:
                self._allowed[title] = hosts | {ipaddress.ip_address(entry.host)}
        self._sop_classes = frozenset(dicom.sop_classes)
        self._server: ThreadedAssociationServer | None = None
        self._committer: GroupCommitter | None = None
        recover_unconfirmed(state, spool)

        ae = AE(ae_title=dicom.ae_title)
        ae.maximum_associations = dicom.max_associations
        ae.acse_timeout = dicom.acse_timeout_s
        ae.dimse_timeout = dicom.dimse_timeout_s
        ae.network_timeout = dicom.network_timeout_s
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        for sop_class in dicom.sop_classes:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        self._ae = ae

    @property
    def port(self) -> int:
        """The TCP port the server listens on (the real one when configured as 0)."""
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Listen in background threads (one per association)."""
        handlers = [
            (evt.EVT_REQUESTED, self._check_requestor),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
        ]
        self._committer = GroupCommitter(self._state)
        self._committer.start()
        try:
            self._server = self._ae.start_server(
                (self._dicom.bind, self._dicom.port), block=False, evt_handlers=handlers, ssl_context=self._ssl
            )
        except BaseException:
            self._committer.stop()
            self._committer = None
            raise
        mode = ""
        if self._ssl is not None:
            mode = " with mutual TLS" if self._ssl.verify_mode == ssl.CERT_REQUIRED else " with TLS"
        logger.info("listening as %s on %s:%d%s", self._dicom.ae_title, self._dicom.bind, self.port, mode)

    def stop(self) -> None:
        """Stop listening, then commit what was received (pending confirmations included)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._committer is not None:
            self._committer.stop()
            self._committer = None

    def _check_requestor(self, event: evt.Event) -> None:
        """Reject an association whose calling AE title (or its source address) is not allowed."""
        if not self._allowed:
            return
        requestor = event.assoc.requestor
        calling = requestor.primitive.calling_ae_title.strip()
        if calling not in self._allowed:
            reason = "calling AE title not on the allow-list"
        elif (hosts := self._allowed[calling]) is not None and _ip(requestor.address) not in hosts:
            reason = f"calling AE not allowed from {requestor.address}"
        else:
            return
        logger.warning("association from %s@%s rejected: %s", calling, requestor.address, reason)
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
        evt.trigger(event.assoc, evt.EVT_REJECTED, {})
        event.assoc.kill()

    def handle_store(self, event: evt.Event) -> int:
        """Store one instance durably and answer its C-STORE status."""
        calling = event.assoc.requestor.ae_title.strip()
        try:
            received = self._receive(event)
        except _Refused as refused:
            affected = str(event.request.AffectedSOPInstanceUID or "")
            logger.warning(
                "C-STORE of %s from %s refused with 0x%04X: %s",
                affected if is_dicom_uid(affected) else "(invalid UID)", calling, int(refused.status), refused,
            )
            return int(refused.status)
        logger.debug("stored %s of series %s from %s", received.sop_instance_uid, received.series_uid, calling)
        return int(Status.SUCCESS)

    def _receive(self, event: evt.Event) -> ReceivedInstance:
        dataset = event.encoded_dataset(include_meta=False)  # a copy: taken once
        header = self._describe(event, dataset)
        uid = header.sop_instance_uid
        committer = self._committer
        if committer is None:
            raise _Refused(Status.PROCESSING_FAILURE, f"cannot record {uid}: the SCP is stopping")
        with self._spool.instance_lock(uid):
            try:
                staged = self._spool.stage_instance(header.series_uid, uid, (event.encoded_dataset(),))
            except SpoolFullError as exc:
                raise _Refused(Status.OUT_OF_RESOURCES, f"spool full writing {uid}: {exc}") from exc
            except OSError as exc:
                raise _Refused(Status.PROCESSING_FAILURE, f"cannot write {uid}: {exc}") from exc
            # The row goes to the committer before the file is written, so that the folder's fsync
            # and the commit overlap the write and the file's fsync; it is recorded unconfirmed.
            received = replace(header, path=staged.relpath, file_durable=staged.durable)
            try:
                recorded = committer.submit(received, dataset, staged.directory)
            except RuntimeError as exc:
                staged.discard()
                raise _Refused(Status.PROCESSING_FAILURE, f"cannot record {uid}: {exc}") from exc
            try:
                staged.write_durably()
            except OSError as exc:
                self._abandon(staged, recorded)
                status = Status.OUT_OF_RESOURCES if isinstance(exc, SpoolFullError) else Status.PROCESSING_FAILURE
                raise _Refused(status, f"cannot make {uid} durable: {exc}") from exc
            try:
                outcome = recorded.result()
            except Exception as exc:
                staged.discard()  # no row names the new file
                if isinstance(exc, StateFullError):
                    raise _Refused(Status.OUT_OF_RESOURCES, f"state full recording {uid}: {exc}") from exc
                if isinstance(exc, OSError):
                    raise _Refused(Status.PROCESSING_FAILURE, f"cannot make {uid} durable: {exc}") from exc
                raise _Refused(Status.PROCESSING_FAILURE, f"cannot record {uid}: {exc}") from exc
            committer.confirm(outcome)
        if self._on_stored is not None:
            try:
                self._on_stored(outcome)
            except Exception:  # the instance is durable: the peer still gets success
                logger.exception("series %s: after-store notification failed", outcome.series_uid)
        return received

    def _abandon(self, staged: StagedInstance, recorded: Future[RecordOutcome]) -> None:
        """The new file could not be made durable: take its row back, then remove the file."""
        try:
            outcome = recorded.result()
        except Exception:
            outcome = None  # no row (if the commit's outcome is unknown, recovery finds no file)
        if outcome is not None and outcome.confirm_token is not None:
            try:
                self._state.drop_unconfirmed(outcome.sop_instance_uid, outcome.confirm_token)
            except Exception:
                logger.exception("could not take back the row of %s (recovery will)", outcome.sop_instance_uid)
        staged.discard()

    def _describe(self, event: evt.Event, dataset: bytes) -> ReceivedInstance:
        """The header facts the state needs, checked (anything wrong is 0xC210 or 0xA900); no file yet."""
        syntax = str(event.context.transfer_syntax)
        try:
            facts = read_header_facts(dataset, syntax)
        except (HeaderError, UnsafeUIDError) as exc:
            raise _Refused(Status.CANNOT_UNDERSTAND, str(exc)) from exc
        context_class = event.context.abstract_syntax
        if facts.sop_class_uid != context_class or facts.sop_class_uid not in self._sop_classes:
            raise _Refused(
                Status.DATASET_MISMATCH,
                f"{facts.sop_instance_uid} has SOP class {facts.sop_class_uid}, sent as {context_class}",
            )
        if facts.sop_instance_uid != event.request.AffectedSOPInstanceUID:
            raise _Refused(Status.CANNOT_UNDERSTAND, f"{facts.sop_instance_uid} differs from the command's UID")
        requestor = event.assoc.requestor
        return facts.received(
            transfer_syntax_uid=syntax, calling_ae=requestor.ae_title.strip(), peer_host=str(requestor.address)
        )


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: the node is up."""
    return int(Status.SUCCESS)


def _ip(address: str) -> _IP | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
