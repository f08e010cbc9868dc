"""The node's HTTP API: health, metrics, jobs, retry and the pull trigger (stdlib http.server).

Routes (JSON unless stated; errors are ``{"error": "..."}`` with a 4xx/5xx status):

- ``GET /health``: 200 ``{"status": "ok"}`` while the state answers, 503 otherwise. Always open, so
  that container health checks need no secret; it reveals nothing else.
- ``GET /metrics``: Prometheus text (``ian_node.app.metrics``).
- ``GET /jobs?state=&series=&limit=``: newest first. ``GET /jobs/{id}``: one job, its deliveries and
  a summary of its series. Every job shows its ``outcome`` (``segmented``; ``no_region``: the
  localiser found no mandible, nothing was sent and the job failed with "no mandible region found";
  ``segmented_no_region``: segmented and sent anyway, see ``crop.segment_when_not_found``), its
  ``flag`` (what an operator must know about the result, else null), ``roi`` (the crop used per side:
  mode, box_mm, confidence), ``roi_request`` (the crop asked for and by whom: ``"source": "api"`` or
  ``"config"``), and per-side ``voxels`` and stage ``timings``.
- ``POST /jobs/{id}/retry``: re-deliver a failed job's result, or re-run it (409 unless failed). A
  body ``{"roi": {"right": [[x_min, x_max], [y_min, y_max], [z_min, z_max]], "left": ...}}`` re-runs it
  with those boxes (LPS mm), e.g. after "no mandible region found" (409 when it has a result).
- ``POST /jobs``: the pull trigger (``ian_node.receive.pull``), answering 201 with the new job, 200 with
  the job that the series' unchanged version already has, 422 when the node's selection rules skip
  the series or its data cannot be taken, 404 when the source has no such series, 502 when the
  source fails. An optional ``"roi"`` (as for a retry) crops this job to those boxes; 400 when it is
  malformed, 409 when the series' version already has its job (retry that one with the ``roi``).

With ``api.token`` set, every route but ``/health`` needs ``Authorization: Bearer <token>``
(compared in constant time; 401 otherwise). The API listens on ``api.bind`` (127.0.0.1 by default).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from ian_node import __version__
from ian_node.app.metrics import CONTENT_TYPE, PullCounter, render_metrics
from ian_node.config import ApiConfig
from ian_node.export.exporter import Exporter
from ian_node.jobs.worker import Worker
from ian_node.receive.counters import ReceiveCounters
from ian_node.receive.pull import (
    Puller,
    PullError,
    PullRequestError,
    parse_pull_request,
    parse_roi,
    pull_answer,
    roi_crop_request,
)
from ian_node.storage.records import Delivery, Job, JobState, Series, SeriesState, StateError
from ian_node.storage.state import State

logger = logging.getLogger(__name__)

#: The largest request body accepted (a pull request is a few hundred bytes).
MAX_BODY_BYTES = 64 * 1024
MAX_LIST_LIMIT = 1000
#: The ``outcome`` label of ``ian_node_pulls_total`` for each failed pull's status.
_PULL_OUTCOMES = {400: "bad_request", 404: "not_found", 422: "refused", 502: "source_error", 503: "cancelled"}


class ApiError(Exception):
    """An answer other than success: the HTTP status and a message for the client."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class Response:
    status: HTTPStatus
    body: bytes
    content_type: str = "application/json"


def _json(status: HTTPStatus, payload: Any) -> Response:
    return Response(status, (json.dumps(payload, indent=1) + "\n").encode())


def job_json(job: Job) -> dict[str, Any]:
    """A job as the API shows it (times are seconds since the epoch, UTC)."""
    return {
        "id": job.id, "series_uid": job.series_uid, "series_version": job.series_version,
        "state": str(job.state), "attempts": job.attempts, "error": job.error,
        "has_result": job.result_path is not None, "created_at": job.created_at,
        "started_at": job.started_at, "finished_at": job.finished_at, "updated_at": job.updated_at,
        "outcome": None if job.outcome is None else str(job.outcome), "flag": job.flag,
        "roi": job.crop, "roi_request": job.crop_request, "voxels": job.voxels, "timings": job.timings,
    }


def delivery_json(delivery: Delivery) -> dict[str, Any]:
    return {
        "target": delivery.target, "state": str(delivery.state), "attempts": delivery.attempts,
        "next_attempt_at": delivery.next_attempt_at, "last_error": delivery.last_error,
        "delivered_at": delivery.delivered_at,
    }


def series_json(series: Series) -> dict[str, Any]:
    """A series without its description: free text that may name the patient."""
    return {
        "series_uid": series.series_uid, "study_uid": series.study_uid, "modality": series.modality,
        "version": series.version, "status": str(series.status), "status_reason": series.status_reason,
        "calling_ae": series.calling_ae, "peer_host": series.peer_host, "instances": series.instance_count,
        "slices": series.slice_count, "last_received_at": series.last_received_at,
    }


E = TypeVar("E", bound=StrEnum)

Handler = Callable[["NodeApi", dict[str, str], "_Request"], Response]


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes


class NodeApi:
    """The routes, independent of the HTTP server that carries them."""

    def __init__(self, config: ApiConfig, state: State, worker: Worker, exporter: Exporter, puller: Puller,
                 receive: ReceiveCounters | None = None) -> None:
        """``receive``: the SCP's refusal and store-failure counters, rendered in ``/metrics`` when given."""
        self.config = config
        self.state = state
        self.worker = worker
        self.exporter = exporter
        self.puller = puller
        self.receive = receive
        self.pulls = PullCounter()
        self._token = config.token.encode() if config.token is not None else None
        self._routes: list[tuple[str, re.Pattern[str], Handler, bool]] = [
            # (method, path, handler, needs the token)
            ("GET", re.compile(r"/health"), NodeApi.health, False),
            ("GET", re.compile(r"/metrics"), NodeApi.metrics, True),
            ("GET", re.compile(r"/jobs"), NodeApi.list_jobs, True),
            ("POST", re.compile(r"/jobs"), NodeApi.pull, True),
            ("GET", re.compile(r"/jobs/(?P<id>[^/]+)"), NodeApi.show_job, True),
            ("POST", re.compile(r"/jobs/(?P<id>[^/]+)/retry"), NodeApi.retry_job, True),
            ("GET", re.compile(r"/series"), NodeApi.list_series, True),
        ]

    def handle(self, request: _Request, authorization: str | None) -> Response:
        """Route one request; every failure becomes an ApiError with its status."""
        matches = [(m, route) for route in self._routes if (m := route[1].fullmatch(request.path))]
        if not matches:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no route {request.path}")
        for match, (method, _, handler, needs_token) in matches:
            if method == request.method:
                if needs_token:
                    self._authorize(authorization)
                return handler(self, match.groupdict(), request)
        allowed = ", ".join(sorted({route[0] for _, route in matches}))
        raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on {request.path}",
                       {"Allow": allowed})

    def _authorize(self, authorization: str | None) -> None:
        if self._token is None:
            return
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), self._token):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "a valid bearer token is required",
                           {"WWW-Authenticate": 'Bearer realm="ian-node"'})

    # -- routes ----------------------------------------------------------------------------------

    def health(self, _params: dict[str, str], _request: _Request) -> Response:
        try:
            self.state.job_counts()
        except Exception as exc:  # the state is the node: if it cannot be read, the node is not healthy
            logger.error("health check: the state cannot be read: %s", exc)
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "error", "reason": "the state cannot be read"})
        return _json(HTTPStatus.OK, {"status": "ok", "version": __version__})

    def metrics(self, _params: dict[str, str], _request: _Request) -> Response:
        text = render_metrics(self.state, self.worker.totals, self.pulls, self.receive)
        return Response(HTTPStatus.OK, text.encode(), CONTENT_TYPE)

    def list_jobs(self, _params: dict[str, str], request: _Request) -> Response:
        query = _single_values(request.query, {"state", "series", "limit"})
        limit = _int_param(query, "limit", 100, 1, MAX_LIST_LIMIT)
        state = _enum_param(query, "state", JobState)
        if "series" in query:
            jobs = [j for j in reversed(self.state.jobs_of_series(query["series"])) if state in (None, j.state)]
            jobs = jobs[:limit]
        else:
            jobs = self.state.list_jobs(state, limit)
        return _json(HTTPStatus.OK, {"jobs": [job_json(j) for j in jobs]})

    def show_job(self, params: dict[str, str], _request: _Request) -> Response:
        job = self._job(params["id"])
        answer = job_json(job)
        answer["deliveries"] = [delivery_json(d) for d in self.state.deliveries(job.id)]
        series = self.state.series(job.series_uid)
        if series is not None:
            answer["series"] = {k: v for k, v in series_json(series).items()
                                if k not in ("series_uid", "last_received_at")}
        return _json(HTTPStatus.OK, answer)

    def list_series(self, _params: dict[str, str], request: _Request) -> Response:
        """Recent series, e.g. ``?status=skipped`` for those the selection rules skipped, with reasons."""
        query = _single_values(request.query, {"status", "limit"})
        limit = _int_param(query, "limit", 100, 1, MAX_LIST_LIMIT)
        status = _enum_param(query, "status", SeriesState)
        return _json(HTTPStatus.OK, {"series": [series_json(s) for s in self.state.list_series(status, limit)]})

    def retry_job(self, params: dict[str, str], request: _Request) -> Response:
        job = self._job(params["id"])
        crop_request = None
        if request.body.strip():
            body = _json_body(request)
            if not isinstance(body, dict) or set(body) - {"roi"}:
                raise ApiError(HTTPStatus.BAD_REQUEST, 'a retry body may hold only "roi"')
            if "roi" in body:
                try:
                    crop_request = roi_crop_request(parse_roi(body["roi"]))
                except PullRequestError as exc:
                    raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        try:
            job = self.state.retry_job(job.id, crop_request)
        except StateError as exc:
            raise ApiError(HTTPStatus.CONFLICT, str(exc)) from None
        logger.info("job %d: retry requested through the API (now %s)", job.id, job.state)
        self.worker.wake()
        self.exporter.wake()
        return _json(HTTPStatus.OK, job_json(job))

    def pull(self, _params: dict[str, str], request: _Request) -> Response:
        body = _json_body(request)
        source = body.get("source") if isinstance(body, dict) else None
        label = source if source in ("orthanc", "dicomweb") else "invalid"
        try:
            pull = parse_pull_request(body)
            outcome = self.puller.pull(pull)
        except PullError as exc:
            self.pulls.add(label, _PULL_OUTCOMES.get(exc.status, "error"))
            if exc.status >= 500:
                logger.warning("pull failed: %s", exc)
            raise ApiError(HTTPStatus(exc.status), str(exc)) from None
        answer = pull_answer(outcome, job_json)
        if outcome.skip_reason is not None:
            self.pulls.add(label, "skipped")
            answer["error"] = f"the series is not selected: {outcome.skip_reason}"
            return _json(HTTPStatus.UNPROCESSABLE_ENTITY, answer)
        self.pulls.add(label, "queued" if outcome.created else "unchanged")
        if pull.roi is not None and not outcome.created:
            answer["error"] = ("the roi was not applied: " + (
                f"series {outcome.series_uid} v{outcome.series_version} already has job {outcome.job.id} "
                f"(retry it with the roi: POST /jobs/{outcome.job.id}/retry)" if outcome.job is not None else
                "instances of the series arrived meanwhile, so its quiet period creates the job"))
            return _json(HTTPStatus.CONFLICT, answer)
        return _json(HTTPStatus.CREATED if outcome.created else HTTPStatus.OK, answer)

    def _job(self, text: str) -> Job:
        if not text.isdigit() or len(text) > 18:
            raise ApiError(HTTPStatus.BAD_REQUEST, "a job id is a positive integer")
        job = self.state.job(int(text))
        if job is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"job {int(text)} does not exist")
        return job


def _json_body(request: _Request) -> Any:
    try:
        return json.loads(request.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {exc}") from None


def _single_values(query: dict[str, list[str]], known: set[str]) -> dict[str, str]:
    unknown = sorted(set(query) - known)
    if unknown:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown query parameter(s) {', '.join(unknown)} "
                                               f"(known: {', '.join(sorted(known))})")
    repeated = sorted(k for k, v in query.items() if len(v) > 1)
    if repeated:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"query parameter {repeated[0]} is given more than once")
    return {k: v[0] for k, v in query.items()}


def _enum_param(query: dict[str, str], name: str, enum: type[E]) -> E | None:
    """The query's ``name`` as one of ``enum``'s values (None when absent); 400 naming the valid ones."""
    if name not in query:
        return None
    try:
        return enum(query[name])
    except ValueError:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name} must be one of {', '.join(e.value for e in enum)}") from None


def _int_param(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    if name not in query:
        return default
    text = query[name]
    if not text.isdigit() or not low <= int(text) <= high:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name} must be an integer from {low} to {high}")
    return int(text)


class _HttpHandler(BaseHTTPRequestHandler):
    api: NodeApi  # set on the subclass the server makes
    server_version = f"ian-node/{__version__}"
    # Only for requests too malformed to reach a route (the stdlib answers those itself).
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s\n"

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        headers: dict[str, str] = {}
        try:
            url = urlsplit(self.path)
            body = self._body() if method in ("POST", "PUT") else b""
            request = _Request(method, url.path.rstrip("/") or "/", parse_qs(url.query, keep_blank_values=True), body)
            response = self.api.handle(request, self.headers.get("Authorization"))
        except ApiError as exc:
            headers = exc.headers
            response = _json(exc.status, {"error": str(exc)})
        except Exception:  # a bug or a broken state: say so without details, log them
            logger.exception("%s %s failed", method, self.path)
            response = _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error (see the node's log)"})
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)

    def _body(self) -> bytes:
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return b""
        if not length_text.isdigit():
            raise ApiError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number")
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is larger than {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        logger.debug("%s %s", self.address_string(), format % args)


class ApiServer:
    """The API on its own threads: ``start`` listens, ``stop`` waits for requests in flight."""

    def __init__(self, api: NodeApi) -> None:
        self.api = api
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The (IP, port) the API listens on; the real port when configured as 0."""
        if self._server is None:
            raise RuntimeError("the API is not running")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        return self.address[1]

    def start(self) -> None:
        handler = type("NodeApiHandler", (_HttpHandler,), {"api": self.api})
        family = socket.AF_INET6 if ":" in self.api.config.bind else socket.AF_INET
        server_class = type("NodeApiServer", (ThreadingHTTPServer,), {"address_family": family})
        server = server_class((self.api.config.bind, self.api.config.port), handler)
        server.daemon_threads = False  # stop() waits for requests in flight (a pull writes the state)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ian-node-api", daemon=True)
        self._thread.start()
        logger.info("HTTP API on http://%s:%d%s", self.api.config.bind, self.port,
                    " (bearer token required)" if self.api.config.token else "")
        if self.api.config.token is None and not ipaddress.ip_address(self.api.config.bind).is_loopback:
            logger.warning("the HTTP API listens on %s without a token: anyone who reaches it can trigger "
                           "pulls and retries (set api.token)", self.api.config.bind)

    def stop(self) -> None:
        if self._server is None:
            return
        self.api.puller.cancel()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10.0)
        self._server = None
        self._thread = None
