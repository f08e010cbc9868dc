"""Pull mode: fetch a series from Orthanc (REST) or a DICOMweb server (WADO-RS) into the C-STORE path.

A pull is the HTTP twin of a C-STORE association. Each fetched instance is checked as the SCP checks
it (UIDs safe for paths, an accepted SOP class), written to the spool and recorded in the state; then,
since the whole series is known to be here, its quiet period is concluded at once: the same
selection rules decide, and a selected series becomes a job for its current version. An unchanged
series pulled again gets no second job (one job per series version, enforced by the state).

Sources are the node's own export targets, so a pull never reaches a server the operator did not
configure, and the result always goes back to where it came from (the state records the source
target with the series version; :mod:`ian_node.export.routing` sends there whatever that target's
match rules say, and to the other targets whose rules match):

- ``{"source": "orthanc", "series": "<Orthanc series ID>"}`` reads through the ``kind = "orthanc"``
  export target (``"target": "<name>"`` picks one when there are several) and the SEG is uploaded
  to it (``POST /instances``);
- ``{"source": "dicomweb", "url": ..., "study_uid": ..., "series_uid": ...}`` is accepted only when
  ``url`` is the URL of a ``kind = "stowrs"`` export target, whose credentials it uses; the SEG goes
  back by STOW-RS to that URL.

Either may add ``"roi": {"right": [[x_min, x_max], [y_min, y_max], [z_min, z_max]], "left": ...}``
(LPS mm): the job then crops each side to that box (crop mode ``box``) instead of the node's
configured crop. The boxes are stored with the job when it is created, so the worker never runs it
without them.

Instances are written to the spool while they are fetched but recorded in the state only once the
whole series is here, so a failed pull leaves no half series to settle. Like the SCP, a pull holds
each instance's :meth:`Spool.instance_lock` from before it writes the file until its row is
committed, so a retention purge of an earlier version of the series, which deletes files under the
same lock, cannot delete a file that the pull is about to record (it waits, then sees the new row
and keeps the file). A pull therefore holds the locks of the instances it has fetched until the
whole series is recorded; two pulls of one series take turns (a per-series lock taken first), so
they never wait on each other's instance locks. The series is settled after the locks are let go
(a purge of the pulled series itself takes them).
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread, dcmwrite
from pydicom.errors import InvalidDicomError

from ian_node.config import ConfigError, NodeConfig, OrthancTarget, StowRsTarget, check_box, check_box_pair
from ian_node.config.sections import BoxMm
from ian_node.net import http_session
from ian_node.receive.header import HeaderError, read_header_facts
from ian_node.storage.records import Job, ReceivedInstance, Series, Settlement
from ian_node.storage.spool import Spool
from ian_node.storage.state import State
from ian_node.uids import UnsafeUIDError, checked_uid, is_dicom_uid

logger = logging.getLogger(__name__)

#: Orthanc's resource IDs: five groups of eight hex digits (a SHA-1 of the DICOM UIDs).
ORTHANC_ID_RE = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}")
#: What a pull request may hold, per source.
PULL_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # source: (required keys, optional keys)
    "orthanc": (frozenset({"source", "series"}), frozenset({"target", "roi"})),
    "dicomweb": (frozenset({"source", "url", "study_uid", "series_uid"}), frozenset({"roi"})),
}


class PullError(Exception):
    """A pull that could not be done; ``status`` is the HTTP status the API answers with."""

    status = 500


class PullRequestError(PullError):
    """The request itself is wrong (unknown source, malformed ID, a server not configured)."""

    status = 400


class SourceNotFoundError(PullError):
    """The source answered that the series does not exist."""

    status = 404


class SourceRefusedError(PullError):
    """The fetched data cannot be taken (an SOP class not accepted, UIDs that do not match)."""

    status = 422


class SourceUnavailableError(PullError):
    """The source could not be reached or answered with an error."""

    status = 502


class PullCancelledError(PullError):
    """The node is stopping."""

    status = 503


@dataclass(frozen=True)
class OrthancPull:
    series: str
    target: str | None = None
    source: str = "orthanc"
    #: {"right": box, "left": box} in LPS mm for this job's crop; None: the node's configured crop.
    roi: Mapping[str, BoxMm] | None = None


@dataclass(frozen=True)
class DicomwebPull:
    url: str
    study_uid: str
    series_uid: str
    source: str = "dicomweb"
    roi: Mapping[str, BoxMm] | None = None


PullRequest = OrthancPull | DicomwebPull


@dataclass(frozen=True)
class PullOutcome:
    """What a pull did: the job of the series' current version (new or already there), or why none."""

    source: str
    series_uid: str
    series_version: int
    instances: int
    job: Job | None
    created: bool
    #: Set when the node's selection rules did not select the series (no job).
    skip_reason: str | None = None


def parse_pull_request(body: Any) -> PullRequest:
    """Validate the JSON body of ``POST /jobs``; PullRequestError names what is wrong."""
    if not isinstance(body, dict):
        raise PullRequestError(f"the body must be a JSON object, got {type(body).__name__}")
    source = body.get("source")
    if source not in PULL_KEYS:
        raise PullRequestError(f"source must be one of {', '.join(map(repr, PULL_KEYS))}, got {source!r}")
    required, optional = PULL_KEYS[source]
    missing = sorted(required - body.keys())
    if missing:
        raise PullRequestError(f"a {source} pull needs {', '.join(missing)}")
    unknown = sorted(body.keys() - required - optional)
    if unknown:
        raise PullRequestError(f"unknown key(s) {', '.join(unknown)} for a {source} pull "
                               f"(known: {', '.join(sorted(required | optional))})")
    for key, value in body.items():
        if key != "roi" and not isinstance(value, str):
            raise PullRequestError(f"{key} must be a string, got {type(value).__name__}")
    roi = parse_roi(body["roi"]) if "roi" in body else None
    if source == "orthanc":
        if ORTHANC_ID_RE.fullmatch(body["series"]) is None:
            raise PullRequestError("series must be an Orthanc series ID (five groups of eight hex digits)")
        return OrthancPull(series=body["series"], target=body.get("target"), roi=roi)
    for key in ("study_uid", "series_uid"):
        if not is_dicom_uid(body[key]):
            raise PullRequestError(f"{key} is not a DICOM UID")
    return DicomwebPull(url=body["url"], study_uid=body["study_uid"], series_uid=body["series_uid"], roi=roi)


def parse_roi(value: Any) -> dict[str, BoxMm]:
    """``{"right": box, "left": box}`` checked as the ``[crop]`` config checks its boxes; PullRequestError otherwise."""
    if not isinstance(value, dict) or set(value) != {"right", "left"}:
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise PullRequestError(f'roi must be {{"right": [[x_min, x_max], [y_min, y_max], [z_min, z_max]], '
                               f'"left": [...]}} in LPS mm, got {got}')
    try:
        boxes = {side: check_box(side, value[side]) for side in ("right", "left")}
        check_box_pair("left", boxes["right"], boxes["left"])
    except ConfigError as exc:
        raise PullRequestError(str(exc.within("roi"))) from None
    return boxes


def roi_crop_request(roi: Mapping[str, BoxMm]) -> dict[str, Any]:
    """The job's crop request for a pull's ``roi`` (the record `ian_node.storage.records.Job` describes)."""
    return {"mode": "box", "right": [list(r) for r in roi["right"]], "left": [list(r) for r in roi["left"]],
            "source": "api"}


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def _unavailable(what: str, exc: requests.RequestException) -> PullError:
    response = exc.response
    if response is not None and response.status_code == 404:
        return SourceNotFoundError(f"{what}: not found at the source (HTTP 404)")
    if response is not None:
        return SourceUnavailableError(f"{what}: the source answered HTTP {response.status_code}")
    return SourceUnavailableError(f"{what}: the source is unreachable ({type(exc).__name__})")


class OrthancClient:
    """The read side of Orthanc's REST API (the upload side is ``export.OrthancExport``)."""

    def __init__(self, config: OrthancTarget) -> None:
        self.url = config.url.rstrip("/")
        self._timeout = config.timeout_s
        self._session = http_session(config)

    def _get(self, path: str, what: str) -> requests.Response:
        try:
            response = self._session.get(self.url + path, timeout=self._timeout)
            response.raise_for_status()
        except requests.RequestException as exc:
            raise _unavailable(what, exc) from exc
        return response

    def series_instances(self, series_id: str) -> list[str]:
        """The Orthanc IDs of the instances of one series (``GET /series/{id}``)."""
        answer = self._get(f"/series/{series_id}", f"Orthanc series {series_id}").json()
        instances = answer.get("Instances") if isinstance(answer, dict) else None
        if not isinstance(instances, list) or not all(
            isinstance(i, str) and ORTHANC_ID_RE.fullmatch(i) for i in instances
        ):
            raise SourceUnavailableError(f"Orthanc series {series_id}: the answer lists no valid instance IDs")
        return instances

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file of one instance as Orthanc stores it (``GET /instances/{id}/file``)."""
        return self._get(f"/instances/{instance_id}/file", f"Orthanc instance {instance_id}").content


def dataset_bytes(part10: bytes) -> bytes:
    """The data set of a DICOM file without its preamble and file meta (what C-STORE transfers).

    The state compares instances by the hash of these bytes, so an instance pulled once and sent
    by C-STORE another time is recognised as the same.
    """
    if len(part10) < 132 or part10[128:132] != b"DICM":
        raise SourceRefusedError("a fetched object is not a DICOM file (no DICM prefix)")
    offset = 132
    while offset + 8 <= len(part10):
        group, _element = struct.unpack_from("<HH", part10, offset)
        if group != 0x0002:
            return part10[offset:]
        vr = part10[offset + 4: offset + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            (length,) = struct.unpack_from("<I", part10, offset + 8)
            offset += 12 + length
        else:
            (length,) = struct.unpack_from("<H", part10, offset + 6)
            offset += 8 + length
    raise SourceRefusedError("a fetched DICOM file has no data set after its file meta")


class Puller:
    """Runs pulls for the API: fetch, spool, record, then conclude the series at once."""

    def __init__(self, config: NodeConfig, state: State, spool: Spool,
                 settle: Callable[[Series, Mapping[str, Any] | None], Settlement], max_concurrent: int = 2) -> None:
        """``settle(series, crop_request)`` concludes a pulled series (``crop_request``: the pull's own crop)."""
        self._config = config
        self._state = state
        self._spool = spool
        self._settle = settle
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._pulling_changed = threading.Condition()  # _series_turn: the series being pulled now
        self._pulling: set[str] = set()
        self._cancel = threading.Event()
        self._sop_classes = frozenset(config.dicom.sop_classes)

    def cancel(self) -> None:
        """Make running pulls stop before their next instance (the node is stopping)."""
        self._cancel.set()

    def pull(self, request: PullRequest) -> PullOutcome:
        """Fetch the series, record it and queue its job; PullError says what went wrong."""
        if isinstance(request, OrthancPull):
            target = self._orthanc_target(request.target)
            client = OrthancClient(target)
            files = self._orthanc_files(client, request.series)
            origin_host = urlsplit(target.url).hostname or ""
            what = f"Orthanc series {request.series} via {target.name!r}"
            expected_series = None
        else:
            target = self._dicomweb_target(request.url)
            files = self._dicomweb_files(target, request)
            origin_host = urlsplit(target.url).hostname or ""
            what = f"DICOMweb series {request.series_uid} via {target.name!r}"
            expected_series = request.series_uid
        with self._slots, ExitStack() as held:  # held: the series' turn and its instance locks
            received = self._fetch_all(files, what, origin_host, expected_series, held)
            for instance in received:
                # the source is recorded with the series version, so that its result goes back there
                self._state.record_instance(replace(instance, pulled_from=target.name))
        crop_request = None if request.roi is None else roi_crop_request(request.roi)
        return self._conclude(request.source, received[0].series_uid, len(received), crop_request)

    # -- sources -----------------------------------------------------------------------------------

    def _orthanc_target(self, name: str | None) -> OrthancTarget:
        candidates = [t for t in self._config.export.targets if isinstance(t, OrthancTarget)]
        if name is not None:
            candidates = [t for t in candidates if t.name == name]
            if not candidates:
                raise PullRequestError(f"target {name!r} is not an export target of kind 'orthanc' on this node")
        if not candidates:
            raise PullRequestError("this node has no export target of kind 'orthanc' to pull from")
        if len(candidates) > 1:
            names = ", ".join(repr(t.name) for t in candidates)
            raise PullRequestError(f"several Orthanc targets ({names}): name one with \"target\"")
        return candidates[0]

    def _dicomweb_target(self, url: str) -> StowRsTarget:
        for target in self._config.export.targets:
            if isinstance(target, StowRsTarget) and _same_url(target.url, url):
                return target
        raise PullRequestError("url is not the URL of an export target of kind 'stowrs' on this node")

    def _orthanc_files(self, client: OrthancClient, series_id: str) -> Iterator[bytes]:
        instances = client.series_instances(series_id)  # fails early, before any slot is taken
        logger.info("pulling Orthanc series %s: %d instances", series_id, len(instances))
        return (client.instance_file(i) for i in instances)

    def _dicomweb_files(self, target: StowRsTarget, request: DicomwebPull) -> Iterator[bytes]:
        client = DICOMwebClient(url=target.url, session=http_session(target), timeout=target.timeout_s)
        client.set_http_retry_params(retry=False)
        what = f"DICOMweb series {request.series_uid}"

        def files() -> Iterator[bytes]:
            try:
                # "*": the instances as stored, so nothing is transcoded on the way.
                for ds in client.iter_series(request.study_uid, request.series_uid,
                                             media_types=(("application/dicom", "*"),)):
                    buffer = BytesIO()
                    dcmwrite(buffer, ds, enforce_file_format=True)
                    yield buffer.getvalue()
            except requests.RequestException as exc:
                raise _unavailable(what, exc) from exc

        logger.info("pulling DICOMweb series %s from %s", request.series_uid, target.name)
        return files()

    # -- the C-STORE path ----------------------------------------------------------------------------

    def _fetch_all(self, files: Iterator[bytes], what: str, origin_host: str,
                   expected_series: str | None, held: ExitStack) -> list[ReceivedInstance]:
        """Fetch and write every instance, each under its instance lock (kept in ``held``)."""
        received: list[ReceivedInstance] = []
        locked: set[str] = set()
        for data in files:
            if self._cancel.is_set():
                raise PullCancelledError(f"{what}: the node is stopping")
            instance = self._describe(data, what, origin_host)
            if expected_series is not None and instance.series_uid != expected_series:
                raise SourceRefusedError(f"{what}: instance {instance.sop_instance_uid} belongs to another series")
            if received and instance.series_uid != received[0].series_uid:
                raise SourceRefusedError(f"{what}: the instances belong to more than one series")
            if not received:
                held.enter_context(self._series_turn(instance.series_uid))
            if instance.sop_instance_uid not in locked:  # a source may list an instance twice
                held.enter_context(self._spool.instance_lock(instance.sop_instance_uid))
                locked.add(instance.sop_instance_uid)
            relpath = self._spool.write_instance(instance.series_uid, instance.sop_instance_uid, data)
            received.append(replace(instance, path=relpath))
        if not received:
            raise SourceNotFoundError(f"{what}: the series has no instances")
        return received

    @contextmanager
    def _series_turn(self, series_uid: str) -> Iterator[None]:
        """One pull of a series at a time: taken before any of its instance locks."""
        with self._pulling_changed:
            while series_uid in self._pulling:
                self._pulling_changed.wait()
            self._pulling.add(series_uid)
        try:
            yield
        finally:
            with self._pulling_changed:
                self._pulling.discard(series_uid)
                self._pulling_changed.notify_all()

    def _describe(self, data: bytes, what: str, origin_host: str) -> ReceivedInstance:
        """The header facts the state needs, checked as the SCP checks a C-STORE."""
        try:
            meta = dcmread(BytesIO(data), specific_tags=["SOPClassUID"]).file_meta  # the meta only, in effect
            syntax = checked_uid(meta.get("TransferSyntaxUID"), "TransferSyntaxUID")
            payload = dataset_bytes(data)
            facts = read_header_facts(payload, syntax)
        except UnsafeUIDError as exc:
            raise SourceRefusedError(f"{what}: {exc}") from exc
        except (InvalidDicomError, HeaderError, ValueError, TypeError, AttributeError, OSError) as exc:
            raise SourceRefusedError(f"{what}: cannot decode a fetched instance ({type(exc).__name__})") from exc
        if facts.sop_class_uid not in self._sop_classes:
            raise SourceRefusedError(f"{what}: instance {facts.sop_instance_uid} has SOP class "
                                     f"{facts.sop_class_uid}, which this node does not accept")
        return facts.received(
            transfer_syntax_uid=syntax, peer_host=origin_host, size=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
        )

    def _conclude(self, source: str, series_uid: str, count: int,
                  crop_request: Mapping[str, Any] | None) -> PullOutcome:
        """Settle the recorded series now: the pull knows it is complete."""
        series = self._state.series(series_uid)
        if series is None:  # purged between the two calls: nothing left to settle
            raise SourceRefusedError(f"series {series_uid} vanished while it was being recorded")
        settled = self._settle(series, crop_request)
        reason = settled.skip_reason
        job = settled.job
        created = job is not None
        if job is None and reason is None:
            current = [j for j in self._state.jobs_of_series(series_uid) if j.series_version == series.version]
            job = current[0] if current else None
        if reason is not None:
            logger.info("pulled series %s (%d instances) not selected: %s", series_uid, count, reason)
        elif not settled.applied:
            logger.info("pulled series %s: instances arrived meanwhile, its quiet period decides", series_uid)
        else:
            logger.info("pulled series %s v%d (%d instances): %s", series_uid, series.version, count,
                        f"job {job.id} queued" if created and job else "its job already exists")
        return PullOutcome(source=source, series_uid=series_uid, series_version=series.version,
                           instances=count, job=job, created=created, skip_reason=reason)


def pull_answer(outcome: PullOutcome, job_json: Callable[[Job], Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON the API answers for a pull (the job's fields at top level, as the plugin expects)."""
    answer: dict[str, Any] = dict(job_json(outcome.job)) if outcome.job is not None else {"id": None}
    answer.update(source=outcome.source, series_uid=outcome.series_uid, series_version=outcome.series_version,
                  instances=outcome.instances, created=outcome.created)
    if outcome.skip_reason is not None:
        answer["skip_reason"] = outcome.skip_reason
    return answer
