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
title, the maximum number of associations and, when configured, TLS (mutual with a CA), whose
handshake runs in the connection's own thread within the ACSE timeout. Unknown SOP classes are
refused in presentation-context negotiation. Every refusal (a rejected association, a refused
presentation context, a failed TLS handshake, a failed C-STORE) is logged once at WARNING, naming
the calling AE, the peer's address, the SOP class and the reason, and is counted in
:class:`ReceiveCounters` (the ``/metrics`` refusal and store-failure counters). The log names UIDs
and AE titles, never patient names or IDs.

Lack of space: while the spool's free space is below its minimum (``storage.min_free_bytes`` /
``storage.min_free_percent``, :class:`ian_node.storage.spool.Spool`), new instances get 0xA700 before
anything is written; freed space is noticed at the next C-STORE, with no restart. Such refusals come
in bursts, so they are logged by :class:`SpaceRefusals`' rule: one WARNING naming the free space and
the minimum, then at most one a minute with the count unlogged meanwhile, and one NOTICE when
instances are stored again. Each is counted (``disk_full`` refusals, ``0xA700`` store failures).

How an answer waits for durability, and what a crash leaves behind: :mod:`ian_node.receive.commit`.
Measured ingest rates: ``docs/performance.md``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from pydicom.uid import (
    JPEG2000,
    UID,
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
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from ian_node.config import DicomConfig, TlsConfig
from ian_node.logs import NOTICE
from ian_node.receive.commit import GroupCommitter, recover_unconfirmed
from ian_node.receive.counters import ReceiveCounters, Refusal, SpaceRefusals, Status
from ian_node.receive.header import HeaderError, read_header_facts
from ian_node.receive.tls import HandshakeInConnectionThread, server_ssl_context
from ian_node.storage.records import ReceivedInstance, RecordOutcome, StateFullError
from ian_node.storage.spool import Spool, SpoolBelowMinimumError, SpoolFullError, StagedInstance, size_text
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


class _Refused(Exception):
    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status


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
        self.counters = ReceiveCounters(space=spool.free_space)
        self._space_refusals = SpaceRefusals()
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
            (evt.EVT_REJECTED, self._log_rejection),
            (evt.EVT_ACCEPTED, self._log_refused_contexts),
            (evt.EVT_ABORTED, _log_abort),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
        ]
        tls: Any = None
        if self._ssl is not None:
            handlers.append((evt.EVT_CONN_OPEN, self._handshake))
            tls = HandshakeInConnectionThread(self._ssl)
        self._committer = GroupCommitter(self._state)
        self._committer.start()
        try:
            self._server = self._ae.start_server(
                (self._dicom.bind, self._dicom.port), block=False, evt_handlers=handlers, ssl_context=tls
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

    def _refuse(self, reason: Refusal, what: str, who: str, why: str) -> None:
        """The one WARNING line and the count of a refusal."""
        self.counters.refused(reason)
        logger.warning("%s refused: %s: %s (%s)", what, who, why, reason)

    def _handshake(self, event: evt.Event) -> None:
        """TLS handshake of a new connection, within the ACSE timeout (before the association starts)."""
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
        if not isinstance(sock, ssl.SSLSocket):
            return
        try:
            sock.settimeout(self._dicom.acse_timeout_s)
            sock.do_handshake()
            sock.settimeout(None)
            return
        except (ssl.SSLEOFError, ConnectionError) as exc:  # a port probe, or a peer that gave up
            logger.info("connection from %s closed during the TLS handshake (%s)", _address(event.address),
                        type(exc).__name__)
            reason = None
        except TimeoutError:
            reason = f"no TLS handshake within {self._dicom.acse_timeout_s:g} s"
        except (ssl.SSLError, OSError) as exc:
            reason = f"TLS handshake failed: {getattr(exc, 'reason', None) or type(exc).__name__}"
        if reason is not None:
            who = f"peer {_address(event.address)} (calling AE not yet known)"
            self._refuse(Refusal.TLS_HANDSHAKE_FAILED, "connection", who, reason)
        event.assoc.acse_timeout = 0  # no A-ASSOCIATE-RQ is awaited: the association ends at once
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _check_requestor(self, event: evt.Event) -> None:
        """Reject an association whose calling AE title (or its source address) is not allowed."""
        if not self._allowed:
            return
        requestor = event.assoc.requestor
        calling = requestor.primitive.calling_ae_title.strip()
        if calling not in self._allowed:
            refusal = (Refusal.CALLING_AE_NOT_ALLOWED, "calling AE title not on the allow-list")
        elif (hosts := self._allowed[calling]) is not None and _ip(requestor.address) not in hosts:
            allowed = ", ".join(sorted(str(h) for h in hosts))
            refusal = (Refusal.CALLING_AE_WRONG_HOST, f"calling AE allowed only from {allowed}")
        else:
            return
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
        evt.trigger(event.assoc, evt.EVT_REJECTED, {"refusal": refusal})  # logged by _log_rejection
        event.assoc.kill()

    def _log_rejection(self, event: evt.Event) -> None:
        """EVT_REJECTED: why the association was rejected (ours, or pynetdicom's own checks)."""
        assoc = event.assoc
        refusal: tuple[Refusal, str] | None = getattr(event, "refusal", None)
        if refusal is None:
            rejection = assoc.acceptor.primitive
            cause = (rejection.result_source, rejection.diagnostic) if rejection is not None else None
            if cause == (0x01, 0x07):
                called = assoc.requestor.primitive.called_ae_title.strip()
                refusal = (Refusal.CALLED_AE_MISMATCH, f"called AE {_quoted(called)} is not {_quoted(self._ae.ae_title)}")
            elif cause == (0x03, 0x02):
                refusal = (Refusal.TOO_MANY_ASSOCIATIONS,
                           f"the maximum of {self._ae.maximum_associations} association(s) is reached")
            else:
                result = rejection.result if rejection is not None else None
                refusal = (Refusal.ASSOCIATION_REJECTED, f"A-ASSOCIATE-RJ result {result}, source and diagnostic {cause}")
        proposed = assoc.requestor.primitive.presentation_context_definition_list
        who = f"{_peer(assoc)}, called AE {_quoted(assoc.requestor.primitive.called_ae_title.strip())}, " \
              f"{_sop_classes(cx.abstract_syntax for cx in proposed)}"
        self._refuse(refusal[0], "association", who, refusal[1])

    def _log_refused_contexts(self, event: evt.Event) -> None:
        """EVT_ACCEPTED: one line per reason for the presentation contexts refused, naming their SOP classes.

        One line per association and reason, not per context: dcmtk's storescu, for one, proposes
        every storage SOP class it knows (some 120 contexts) whatever it is about to send.
        """
        assoc = event.assoc
        if not assoc.rejected_contexts:
            return
        proposed = {cx.context_id: cx for cx in assoc.requestor.primitive.presentation_context_definition_list}
        groups: dict[int, list[PresentationContext]] = {}
        for context in assoc.rejected_contexts:
            groups.setdefault(context.result if context.result in _CONTEXT_REFUSALS else -1, []).append(context)
        for result, contexts in groups.items():
            reason, why = _CONTEXT_REFUSALS.get(result, (Refusal.CONTEXT_REJECTED, f"result {contexts[0].status}"))
            if reason is Refusal.NO_ACCEPTABLE_TRANSFER_SYNTAX:
                offered = {str(ts): None for cx in contexts for ts in proposed[cx.context_id].transfer_syntax}
                why += f" ({', '.join(_uid_name(ts) for ts in offered)})"
            what = f"presentation context {contexts[0].context_id}" if len(contexts) == 1 else \
                f"{len(contexts)} presentation contexts"
            self._refuse(reason, what, f"{_peer(assoc)}, {_sop_classes(cx.abstract_syntax for cx in contexts)}", why)

    def handle_store(self, event: evt.Event) -> int:
        """Store one instance durably and answer its C-STORE status."""
        calling = event.assoc.requestor.ae_title.strip()
        try:
            received = self._receive(event)
        except _Refused as refused:
            self.counters.store_failed(int(refused.status))
            level, note = logging.WARNING, ""
            if refused.status is Status.OUT_OF_RESOURCES:
                self.counters.refused(Refusal.DISK_FULL)
                unlogged = self._space_refusals.refused()
                if unlogged is None:
                    level = logging.DEBUG
                elif unlogged:
                    note = f" ({unlogged} more C-STORE(s) refused for lack of space since the last such line)"
                else:
                    note = "; until space is freed, such refusals are logged at most once a minute"
                space = self.counters.spool_space()  # a disk full for real (ENOSPC) names the space too
                if level == logging.WARNING and space and not isinstance(refused.__cause__, SpoolBelowMinimumError):
                    note = f" (the spool's file system has {size_text(space.free_bytes)} free, minimum " \
                           f"{size_text(space.min_free_bytes)}){note}"
            affected = str(event.request.AffectedSOPInstanceUID or "")
            logger.log(
                level, "C-STORE refused with 0x%04X: %s, SOP class %s, instance %s: %s%s",
                int(refused.status), _peer(event.assoc), _sop_class(str(event.context.abstract_syntax)),
                affected if is_dicom_uid(affected) else "(invalid UID)", refused, note,
            )
            return int(refused.status)
        if (run := self._space_refusals.stored()) is not None:
            space = self.counters.spool_space()
            logger.log(NOTICE, "C-STOREs are stored again after %d refused for lack of space%s", run,
                       f"; the spool's file system has {size_text(space.free_bytes)} free" if space else "")
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
            except SpoolBelowMinimumError as exc:  # nothing was written
                raise _Refused(Status.OUT_OF_RESOURCES, str(exc.strerror)) from exc
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
            facts = read_header_facts(dataset, syntax, check_structure=True)
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


#: Presentation-context result (PS3.8 9.3.3.2) -> the refusal it is, and why.
_CONTEXT_REFUSALS = {
    0x01: (Refusal.ROLE_NOT_ACCEPTED, "the SCP/SCU roles proposed are not accepted"),  # pynetdicom's only user rejection
    0x03: (Refusal.SOP_CLASS_NOT_CONFIGURED, "SOP class not configured (dicom.extra_sop_classes)"),
    0x04: (Refusal.NO_ACCEPTABLE_TRANSFER_SYNTAX, "none of the transfer syntaxes proposed is accepted"),
}


def _log_abort(event: evt.Event) -> None:
    """EVT_ABORTED: who the aborted association was with (pynetdicom's own line does not say)."""
    logger.info("association with %s aborted", _peer(event.assoc))


def _peer(assoc: Association) -> str:
    """``calling AE "STORESCU" at 127.0.0.1:40312``: the peer as every refusal names it."""
    requestor = assoc.requestor
    primitive = requestor.primitive
    calling = _quoted(primitive.calling_ae_title.strip()) if primitive is not None else "(not yet known)"
    try:
        where = _address((requestor.address, requestor.port))
    except ValueError:
        where = "(unknown address)"
    return f"calling AE {calling} at {where}"


def _quoted(text: str) -> str:
    """A peer's text, quoted and with anything unprintable escaped (a log line stays one line)."""
    return json.dumps(text)


def _uid_name(uid: str) -> str:
    """pydicom's name for a UID the peer sent (quoted when it is not a UID at all)."""
    return UID(uid).name if is_dicom_uid(uid) else _quoted(uid)


def _address(address: Any) -> str:
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sop_class(uid: str) -> str:
    """``CT Image Storage (1.2.840.10008.5.1.4.1.1.2)``, or the bare UID when pydicom does not know it."""
    name = _uid_name(uid)
    return f"{name} ({uid})" if name != uid and is_dicom_uid(uid) else name


def _sop_classes(uids: Iterable[Any], most: int = 10) -> str:
    """``SOP class X`` or ``SOP classes X, Y and 3 more``: the distinct classes, the first ``most`` named."""
    distinct = list(dict.fromkeys(str(uid) for uid in uids))
    if not distinct:
        return "no SOP class proposed"
    named = ", ".join(_sop_class(uid) for uid in distinct[:most])
    more = f" and {len(distinct) - most} more" if len(distinct) > most else ""
    return f"SOP class{'es' if len(distinct) > 1 else ''} {named}{more}"


def _ip(address: str) -> _IP | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
