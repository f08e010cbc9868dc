"""The node's HTTP API (FastAPI): health, metrics, jobs, retry and the pull trigger.

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
  ``"config"``), per-side ``voxels`` and stage ``timings``, and ``qa`` (per side: verdict PASS / WARN /
  FAIL, reasons, gaps, longest_gap_mm, components, length_mm, mean_probability, localiser_confidence;
  null before the job is segmented). A job ``held`` by ``[qa] on_fail = "hold"`` waits for a retry.
- ``GET /series?status=&limit=``: recent series, e.g. those the selection rules skipped, with reasons.
- ``POST /jobs/{id}/retry``: re-deliver a failed job's result, re-run it, or release a held one (its
  SEG and SR then go out; 409 unless failed or held). A
  body ``{"roi": {"right": [[x_min, x_max], [y_min, y_max], [z_min, z_max]], "left": ...}}`` re-runs it
  with those boxes (LPS mm), e.g. after "no mandible region found" (409 when it has a result).
- ``POST /jobs``: the pull trigger (``ian_node.receive.pull``), answering 201 with the new job, 200 with
  the job that the series' unchanged version already has, 422 when the node's selection rules skip
  the series or its data cannot be taken, 404 when the source has no such series, 502 when the
  source fails. An optional ``"roi"`` (as for a retry) crops this job to those boxes; 400 when it is
  malformed, 409 when the series' version already has its job (retry that one with the ``roi``).
- ``GET /docs`` (Swagger UI, its assets served by the node itself: no CDN) and ``GET /openapi.json``.

With ``api.token`` set, every route but ``/health`` needs ``Authorization: Bearer <token>``
(compared in constant time; 401 otherwise). :func:`create_app` builds the application; ``/`` is left
free for a router that an embedding module adds with ``app.include_router(router,
dependencies=token_dependencies(config))``. :mod:`ian_node.app.server` runs it.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path as FilePath
from typing import Annotated, Any

import fastapi_offline
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.routing import Match

from ian_node import __version__
from ian_node.app.metrics import CONTENT_TYPE, NodeMetrics
from ian_node.config import ApiConfig
from ian_node.export.exporter import Exporter
from ian_node.jobs.worker import Worker
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
#: Job ids are SQLite integers; anything longer is not one.
MAX_JOB_ID = 10**18 - 1
#: The ``outcome`` label of ``ian_node_pulls_total`` for each failed pull's status.
_PULL_OUTCOMES = {400: "bad_request", 404: "not_found", 422: "refused", 502: "source_error", 503: "cancelled"}
#: Swagger UI's script, style sheet and icon, as the fastapi-offline package ships them.
_SWAGGER_FILES = FilePath(fastapi_offline.__file__).parent / "static"
_SWAGGER_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}


@dataclass(frozen=True)
class NodeApi:
    """The parts of the node that the routes read and drive."""

    state: State
    worker: Worker
    exporter: Exporter
    puller: Puller
    metrics: NodeMetrics


class ApiError(Exception):
    """An answer other than success: the HTTP status and a message for the client."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class JsonAnswer(JSONResponse):
    """JSON as the API has always written it: indented by one space, ending with a newline."""

    def render(self, content: Any) -> bytes:
        return (json.dumps(content, indent=1) + "\n").encode()


def _json(status: HTTPStatus, payload: Any, headers: dict[str, str] | None = None) -> JsonAnswer:
    return JsonAnswer(payload, status_code=status, headers=headers)


def job_json(job: Job) -> dict[str, Any]:
    """A job as the API shows it (times are seconds since the epoch, UTC)."""
    return {
        "id": job.id, "series_uid": job.series_uid, "series_version": job.series_version,
        "state": str(job.state), "attempts": job.attempts, "error": job.error,
        "has_result": job.result_path is not None, "created_at": job.created_at,
        "started_at": job.started_at, "finished_at": job.finished_at, "updated_at": job.updated_at,
        "outcome": None if job.outcome is None else str(job.outcome), "flag": job.flag,
        "roi": job.crop, "roi_request": job.crop_request, "voxels": job.voxels, "timings": job.timings,
        "qa": job.qa,
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


# -- the token, the query and the body ---------------------------------------------------------------

_BEARER = HTTPBearer(auto_error=False, description="api.token")


class _TokenCheck:
    """A dependency that answers 401 unless the request presents the token (compared in constant time)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def __call__(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        presented = (credentials.credentials.strip() if credentials is not None else "").encode()
        if credentials is None or not hmac.compare_digest(presented, self._token):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "a valid bearer token is required",
                           {"WWW-Authenticate": 'Bearer realm="ian-node"'})


def token_dependencies(config: ApiConfig) -> list[Any]:
    """The dependencies that make a route need the bearer token (none when no token is configured)."""
    return [] if config.token is None else [Depends(_TokenCheck(config.token))]


def _single_query_values(request: Request) -> None:
    """A query parameter given twice is an error, not a silent choice of one."""
    keys = request.query_params.keys()
    repeated = sorted({k for k in keys if len(request.query_params.getlist(k)) > 1})
    if repeated:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"query parameter {repeated[0]} is given more than once")


class JobsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: JobState | None = None
    series: str | None = Field(None, description="only the jobs of this SeriesInstanceUID")
    limit: int = Field(100, ge=1, le=MAX_LIST_LIMIT)


class SeriesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: SeriesState | None = None
    limit: int = Field(100, ge=1, le=MAX_LIST_LIMIT)


JobId = Annotated[int, Path(ge=0, le=MAX_JOB_ID, description="the job's id")]


async def _body(request: Request) -> bytes:
    """The request body, refused once it grows past :data:`MAX_BODY_BYTES`."""
    length = request.headers.get("Content-Length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length.isdigit() else HTTPStatus.BAD_REQUEST,
                       f"the body is larger than {MAX_BODY_BYTES} bytes" if length.isdigit()
                       else "Content-Length is not a number")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is larger than {MAX_BODY_BYTES} bytes")
    return body


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {exc}") from None


_ROI_SCHEMA = {"type": "object", "description": "per side (right, left): [[x_min, x_max], [y_min, y_max], "
               "[z_min, z_max]] in LPS mm", "additionalProperties": {"type": "array"}}
_PULL_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["source"], "properties": {
        "source": {"type": "string", "enum": ["orthanc", "dicomweb"]},
        "series": {"type": "string", "description": "Orthanc series ID (source orthanc)"},
        "url": {"type": "string", "description": "the DICOMweb service (source dicomweb)"},
        "study_uid": {"type": "string"}, "series_uid": {"type": "string"}, "roi": _ROI_SCHEMA}}}}}}
_RETRY_BODY = {"requestBody": {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"roi": _ROI_SCHEMA}}}}}}


# -- the routes --------------------------------------------------------------------------------------

def _add_routes(app: FastAPI, api: NodeApi, dependencies: list[Any]) -> None:
    """The API's routes, straight on the app: its route list is then the one that 405's Allow reads."""

    def existing_job(job_id: int) -> Job:
        job = api.state.job(job_id)
        if job is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"job {job_id} does not exist")
        return job

    @app.get("/metrics", dependencies=dependencies, response_class=Response,
             summary="Prometheus metrics (text format 0.0.4)")
    def metrics() -> Response:
        return Response(api.metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/jobs", dependencies=dependencies, summary="Jobs, newest first")
    def list_jobs(query: Annotated[JobsQuery, Query()]) -> JsonAnswer:
        if query.series is not None:
            jobs = [j for j in reversed(api.state.jobs_of_series(query.series)) if query.state in (None, j.state)]
            jobs = jobs[:query.limit]
        else:
            jobs = api.state.list_jobs(query.state, query.limit)
        return _json(HTTPStatus.OK, {"jobs": [job_json(j) for j in jobs]})

    @app.get("/jobs/{job_id}", dependencies=dependencies, summary="One job, its deliveries and its series")
    def show_job(job_id: JobId) -> JsonAnswer:
        job = existing_job(job_id)
        answer = job_json(job)
        answer["deliveries"] = [delivery_json(d) for d in api.state.deliveries(job.id)]
        series = api.state.series(job.series_uid)
        if series is not None:
            answer["series"] = {k: v for k, v in series_json(series).items()
                                if k not in ("series_uid", "last_received_at")}
        return _json(HTTPStatus.OK, answer)

    @app.get("/series", dependencies=dependencies,
             summary="Recent series, e.g. ?status=skipped with the reasons")
    def list_series(query: Annotated[SeriesQuery, Query()]) -> JsonAnswer:
        series = api.state.list_series(query.status, query.limit)
        return _json(HTTPStatus.OK, {"series": [series_json(s) for s in series]})

    @app.post("/jobs/{job_id}/retry", dependencies=dependencies,
              summary="Re-deliver or re-run a failed job, or release a held one",
              openapi_extra=_RETRY_BODY)
    def retry_job(job_id: JobId, body: Annotated[bytes, Depends(_body)]) -> JsonAnswer:
        job = existing_job(job_id)
        crop_request = None
        if body.strip():
            request = _parse_json(body)
            if not isinstance(request, dict) or set(request) - {"roi"}:
                raise ApiError(HTTPStatus.BAD_REQUEST, 'a retry body may hold only "roi"')
            if "roi" in request:
                try:
                    crop_request = roi_crop_request(parse_roi(request["roi"]))
                except PullRequestError as exc:
                    raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        try:
            job = api.state.retry_job(job.id, crop_request)
        except StateError as exc:
            raise ApiError(HTTPStatus.CONFLICT, str(exc)) from None
        logger.info("job %d: retry requested through the API (now %s)", job.id, job.state)
        api.worker.wake()
        api.exporter.wake()
        return _json(HTTPStatus.OK, job_json(job))

    @app.post("/jobs", dependencies=dependencies, summary="Pull a series from Orthanc or DICOMweb and queue its job",
              status_code=HTTPStatus.CREATED, openapi_extra=_PULL_BODY)
    def pull(body: Annotated[bytes, Depends(_body)]) -> JsonAnswer:
        request = _parse_json(body)
        source = request.get("source") if isinstance(request, dict) else None
        label = source if source in ("orthanc", "dicomweb") else "invalid"
        try:
            pull = parse_pull_request(request)
            outcome = api.puller.pull(pull)
        except PullError as exc:
            api.metrics.pulls.labels(source=label, outcome=_PULL_OUTCOMES.get(exc.status, "error")).inc()
            if exc.status >= 500:
                logger.warning("pull failed: %s", exc)
            raise ApiError(HTTPStatus(exc.status), str(exc)) from None
        answer = pull_answer(outcome, job_json)
        if outcome.skip_reason is not None:
            api.metrics.pulls.labels(source=label, outcome="skipped").inc()
            answer["error"] = f"the series is not selected: {outcome.skip_reason}"
            return _json(HTTPStatus.UNPROCESSABLE_ENTITY, answer)
        api.metrics.pulls.labels(source=label, outcome="queued" if outcome.created else "unchanged").inc()
        if pull.roi is not None and not outcome.created:
            answer["error"] = ("the roi was not applied: " + (
                f"series {outcome.series_uid} v{outcome.series_version} already has job {outcome.job.id} "
                f"(retry it with the roi: POST /jobs/{outcome.job.id}/retry)" if outcome.job is not None else
                "instances of the series arrived meanwhile, so its quiet period creates the job"))
            return _json(HTTPStatus.CONFLICT, answer)
        return _json(HTTPStatus.CREATED if outcome.created else HTTPStatus.OK, answer)


def _add_docs(app: FastAPI, guarded: list[Any]) -> None:
    """The OpenAPI schema and Swagger UI, with Swagger's files served from the fastapi-offline package."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guarded)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title=f"{app.title} - API", swagger_js_url="/docs/swagger-ui-bundle.js",
            swagger_css_url="/docs/swagger-ui.css", swagger_favicon_url="/docs/favicon.png",
            swagger_ui_parameters={"validatorUrl": None})  # the default validator is an outside server

    @app.get("/docs/{name}", include_in_schema=False, dependencies=guarded)
    def asset(name: str) -> FileResponse:
        if name not in _SWAGGER_ASSETS:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no route /docs/{name}")
        return FileResponse(_SWAGGER_FILES / name, media_type=_SWAGGER_ASSETS[name])


# -- the application ---------------------------------------------------------------------------------

def create_app(node_api: NodeApi, config: ApiConfig) -> FastAPI:
    """The API as an ASGI application; ``/`` is free for a router added with ``include_router``."""
    app = FastAPI(title="ian-node", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=JsonAnswer, description=(__doc__ or "").split("\n\n", 1)[0])
    guarded = token_dependencies(config)

    @app.get("/health", summary="Whether the node's state answers (never needs the token)")
    def health() -> JsonAnswer:
        try:
            node_api.state.job_counts()
        except Exception as exc:  # the state is the node: if it cannot be read, the node is not healthy
            logger.error("health check: the state cannot be read: %s", exc)
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "error", "reason": "the state cannot be read"})
        return _json(HTTPStatus.OK, {"status": "ok", "version": __version__})

    _add_routes(app, node_api, [*guarded, Depends(_single_query_values)])
    _add_docs(app, guarded)
    _add_error_answers(app)
    return app


def _add_error_answers(app: FastAPI) -> None:
    """Every failure as ``{"error": ...}``: ours, the router's (404, 405), validation (400) and bugs (500)."""

    @app.exception_handler(ApiError)
    def api_error(_request: Request, exc: ApiError) -> JsonAnswer:
        return _json(exc.status, {"error": str(exc)}, exc.headers)

    @app.exception_handler(HTTPException)
    def http_error(request: Request, exc: HTTPException) -> JsonAnswer:
        if exc.status_code == HTTPStatus.NOT_FOUND:
            return _json(HTTPStatus.NOT_FOUND, {"error": f"no route {request.url.path}"})
        headers = dict(exc.headers or {})
        if exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
            allowed = {m for r in app.router.routes if r.matches(request.scope)[0] is not Match.NONE
                       for m in getattr(r, "methods", None) or ()}
            headers["Allow"] = ", ".join(sorted(allowed))
            return _json(HTTPStatus.METHOD_NOT_ALLOWED,
                         {"error": f"{request.method} is not allowed on {request.url.path}"}, headers)
        return _json(HTTPStatus(exc.status_code), {"error": str(exc.detail)}, headers)

    @app.exception_handler(RequestValidationError)
    def invalid_request(_request: Request, exc: RequestValidationError) -> JsonAnswer:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                             for e in exc.errors())
        return _json(HTTPStatus.BAD_REQUEST, {"error": problems})

    @app.middleware("http")
    async def every_answer(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        try:
            response = await call_next(request)
        except Exception:  # a bug or a broken state: say so without details, log them
            logger.exception("%s %s failed", request.method, request.url.path)
            response = _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error (see the node's log)"})
        response.headers["Cache-Control"] = "no-store"
        return response
