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

**How one C-STORE becomes durable, fast.** Done one after the other, the file's fsync, its
directory's fsync and the SQLite commit are three waits for the disk (about three times what a bare
"write + fsync" SCP pays). Here they overlap, and the answer waits for all three:

1. the header facts are read (:mod:`ian_node.receive.header`) and the file is created, empty, under its
   final name (:meth:`Spool.stage_instance`);
2. the row goes to the :class:`GroupCommitter`, whose thread hashes the data set (sha256), fsyncs
   the folders of the batch's new files (once per folder) and commits the rows of every association
   that arrived meanwhile in one transaction (one WAL fsync for the batch);
3. meanwhile the handler writes and fsyncs the file, then waits for the commit and answers success.

Because the row is committed before the file is durable, it is recorded *unconfirmed* (with a
token) and confirmed later, in a following transaction at no extra fsync; until then a job of an
earlier series version does not read it (:meth:`State.instances`). A crash (SIGKILL or power loss)
can leave an unconfirmed row naming a missing, empty or partial file. Start-up
(:func:`recover_unconfirmed`, run when the SCP is built, before the series timers or the worker
start) reads every unconfirmed row's file, confirms it when its file meta, size and sha256 match
(fsyncing it first), and otherwise drops the row and the file with a warning. Such an instance was
never acknowledged, so the sender still has it and will send it again.

An instance that *replaces* a stored copy (a re-send) is written the fully atomic way first (temp
file, fsync, rename, directory fsync) and recorded as confirmed, so a crash can never cost the copy
acknowledged before. Two associations sending the same SOP Instance UID at once are serialised by
:meth:`Spool.instance_lock`, which the retention purge takes too.

Measured (``benchmarks/node.py --only ingest --ingest-files 400 --repeats 10``, 130 KiB instances, a
2-vCPU VM, ext4 without a journal; ``docs/performance.md``, run D) against a bare pynetdicom SCP
that only writes and fsyncs each file: 0.96x on one association, 0.84x on four (0.80-0.89x over
the day). With four senders the process is CPU-bound, so the ratio follows CPU per instance: the
bare SCP spends 2.1-2.3 ms (nearly all pynetdicom), this one 0.6-0.7 ms more, mostly the committer
thread (sha256, the folder's fsync, the SQLite commit at about 1.3 rows per batch).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import queue
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
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
from ian_node.uids import is_dicom_uid
from ian_node.receive.header import HeaderError, read_header_facts
from ian_node.storage.spool import Spool, SpoolFullError, StagedInstance, fsync_dir
from ian_node.uids import UnsafeUIDError
from ian_node.storage.records import ReceivedInstance, RecordOutcome, StateFullError
from ian_node.storage.state import State

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


@dataclass(frozen=True)
class _Record:
    instance: ReceivedInstance
    dataset: bytes | None
    directory: Path | None
    future: Future[RecordOutcome]


_STOP = object()


class GroupCommitter:
    """Records received instances for every association, as many per SQLite transaction as arrived
    while the previous one was committing (group commit: one WAL fsync per batch, not per instance).
    The folders that hold the batch's new files are fsynced first, once per folder and batch.

    Confirmations of unconfirmed rows (:meth:`confirm`) ride along with the next batch; when nothing
    else comes for ``idle_confirm_s`` they are committed on their own.
    """

    def __init__(self, state: State, max_batch: int = 64, idle_confirm_s: float = 0.5) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._state = state
        self._max_batch = max_batch
        self._idle_confirm_s = idle_confirm_s
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._confirms: list[tuple[str, int]] = []
        self._running = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the committer is already running")
            self._running = True
            self._thread = threading.Thread(target=self._run, name="scp-group-commit", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Commit everything submitted so far (and pending confirmations), then end the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._running = False
            self._queue.put(_STOP)
        thread.join()

    def submit(
        self, instance: ReceivedInstance, dataset: bytes | None = None, directory: Path | None = None
    ) -> Future[RecordOutcome]:
        """Queue one instance; the future gives its outcome once committed (or the commit's error).

        With ``dataset``, the instance's size and sha256 are taken from it in the commit thread, so
        that hashing overlaps the submitter's write. With ``directory``, that folder is fsynced before
        the row is committed (the instance's file is new there); the future fails if it cannot be.
        """
        record = _Record(instance, dataset, directory, Future())
        with self._lock:  # nothing is queued behind the stop marker
            if not self._running:
                raise RuntimeError("the SCP's committer is not running")
            self._queue.put(record)
        return record.future

    def confirm(self, outcome: RecordOutcome) -> None:
        """The file of an unconfirmed row is durable: clear its token with the next transaction."""
        if outcome.confirm_token is not None:
            with self._lock:
                self._confirms.append((outcome.sop_instance_uid, outcome.confirm_token))

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self._idle_confirm_s)
            except queue.Empty:  # idle: commit the confirmations that are waiting, if any
                self._commit([])
                continue
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._commit([item for item in batch if isinstance(item, _Record)])
            if any(item is _STOP for item in batch):
                self._commit([])
                return

    def _commit(self, records: list[_Record]) -> None:
        with self._lock:
            confirms, self._confirms = self._confirms, []
        if not records and not confirms:
            return
        records = self._sync_directories(records)
        instances = [
            r.instance if r.dataset is None
            else replace(r.instance, size=len(r.dataset), sha256=hashlib.sha256(r.dataset).hexdigest())
            for r in records
        ]
        try:
            results = self._state.record_instances(instances, confirms)
        except Exception as exc:
            with self._lock:  # try the confirmations again with the next batch
                self._confirms[:0] = confirms
            if not records:
                logger.warning("could not record confirmations (retried later): %s", exc)
            for record in records:
                record.future.set_exception(exc)
            return
        for record, result in zip(records, results):
            if isinstance(result, Exception):
                record.future.set_exception(result)
            else:
                record.future.set_result(result)


    @staticmethod
    def _sync_directories(records: list[_Record]) -> list[_Record]:
        """Fsync each folder named in the batch once; the records whose folder failed fail."""
        failed: dict[Path, OSError] = {}
        for directory in {r.directory for r in records if r.directory is not None}:
            try:
                fsync_dir(directory)
            except OSError as exc:
                failed[directory] = exc
        if not failed:
            return records
        for record in records:
            if record.directory in failed:
                record.future.set_exception(failed[record.directory])
        return [r for r in records if r.directory not in failed]


def recover_unconfirmed(state: State, spool: Spool) -> tuple[int, int]:
    """Settle the rows a crash left unconfirmed: confirm those whose file is intact (now made
    durable), drop the others with their file. Returns (confirmed, dropped)."""
    kept = dropped = 0
    for inst in state.unconfirmed_instances():
        if spool.verify_instance(inst.path, inst.sop_instance_uid, inst.size, inst.sha256):
            state.confirm_instances([(inst.sop_instance_uid, inst.token)])
            kept += 1
            continue
        if state.drop_unconfirmed(inst.sop_instance_uid, inst.token):
            spool.remove([inst.path])
            dropped += 1
            logger.warning(
                "instance %s of series %s dropped: its file was not intact after a crash (it was never"
                " acknowledged, so the sender still has it)", inst.sop_instance_uid, inst.series_uid,
            )
    if kept or dropped:
        logger.info("unconfirmed instances after a crash: %d intact, %d dropped", kept, dropped)
    return kept, dropped


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
