"""The status page's routes, as one FastAPI router that the API's app includes.

HTML (server-rendered with Jinja2, autoescaped) and bundled assets only: no external URL, and a
Content-Security-Policy of ``'self'`` so that none could load. Routes:

- ``GET /``: the node, the queue and the recent jobs. ``GET /ui/jobs/{id}``: one job, its
  deliveries (with a retry button when it failed) and its overlay pictures.
- ``GET /ui/jobs/{id}/overlay/{side}/{plane}.png``: one picture (:mod:`.overlay`).
- ``GET /ui/live[?job=id]``: the page's live sections as rendered HTML with a hash each; the page's
  script polls it every few seconds and swaps the sections that changed.
- ``POST /ui/jobs/{id}/retry``: the API's retry (``State.retry_job``, then wake the worker and the
  exporter); a form POST with the CSRF token, answered with a redirect to the job page.
- ``GET /login``, ``POST /login``, ``POST /logout`` and ``GET /ui/static/{name}``.

Access: see :mod:`.auth`. With ``api.token`` set, a request without a valid session is sent to the
login form (pages) or answered 401 (live JSON, pictures).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ian_node.app.status.auth import CSRF_FIELD, SESSION_COOKIE, SESSION_MAX_AGE_S, PageAuth, Session, same_origin
from ian_node.app.status.overlay import PLANES, SIDE_COLOURS, SIDES, OverlayCache, OverlayUnavailable
from ian_node.app.status.views import HeaderCache, PageView, StatusSources
from ian_node.storage.records import Job, StateError

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_STATIC = {"status.css": "text/css; charset=utf-8", "status.js": "text/javascript; charset=utf-8",
           "favicon.svg": "image/svg+xml"}
#: Seconds between the page's polls of ``/ui/live``.
POLL_S = 3
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _when(epoch: float | None) -> str:
    return "" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours < 48 else f"{hours // 24} d {hours % 24} h"


def _uptime(seconds: float) -> str:
    """Coarse (whole minutes), so that the live section changes once a minute, not on every poll."""
    return "under a minute" if seconds < 60 else _duration(seconds // 60 * 60).replace(" 0 s", "")


def _short_uid(uid: str) -> str:
    return uid if len(uid) <= 22 else "…" + uid[-20:]


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=_when, duration=_duration, uptime=_uptime, short_uid=_short_uid)
    env.globals.update(SIDE_COLOURS=SIDE_COLOURS, POLL_S=POLL_S)
    return env


def _hash(html: str) -> str:
    return hashlib.sha256(html.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Visit:
    """Who is asking: their session (None when the page is open or they are not logged in)."""

    session: Session | None
    allowed: bool


class StatusPage:
    """The page's state for one node: its sessions, templates, caches; ``router`` carries its routes."""

    def __init__(self, sources: StatusSources) -> None:
        self.sources = sources
        self.auth = PageAuth(sources.config.api.token)
        self.env = _environment()
        self.headers = HeaderCache(sources.state, sources.spool)
        self.overlays = OverlayCache(sources.state, sources.spool)
        self.router = APIRouter(include_in_schema=False)
        r = self.router
        r.add_api_route("/", self.status_page, methods=["GET"], response_class=HTMLResponse)
        r.add_api_route("/login", self.login_form, methods=["GET"], response_class=HTMLResponse)
        r.add_api_route("/login", self.login, methods=["POST"])
        r.add_api_route("/logout", self.logout, methods=["POST"])
        r.add_api_route("/ui/live", self.live, methods=["GET"])
        r.add_api_route("/ui/jobs/{job_id}", self.job_page, methods=["GET"], response_class=HTMLResponse)
        r.add_api_route("/ui/jobs/{job_id}/retry", self.retry, methods=["POST"])
        r.add_api_route("/ui/jobs/{job_id}/overlay/{side}/{plane}.png", self.picture, methods=["GET"])
        r.add_api_route("/ui/static/{name}", self.static, methods=["GET"])

    # -- access ------------------------------------------------------------------------------------

    def _visit(self, request: Request) -> _Visit:
        session = self.auth.session(request.cookies.get(SESSION_COOKIE))
        return _Visit(session, allowed=not self.auth.required or session is not None)

    def _view(self, visit: _Visit) -> PageView:
        identity = self.sources.config.api.show_patient_identity
        return PageView(self.sources, self.headers, identity=identity and self.auth.required and visit.session is not None)

    def _to_login(self, request: Request) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='/?=')}", status_code=303)

    def _html(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(self.env.get_template(template).render(**context), status, headers=_SECURITY_HEADERS)

    def _context(self, visit: _Visit, **extra: Any) -> dict[str, Any]:
        return {"csrf": self.auth.csrf_token(visit.session), "csrf_field": CSRF_FIELD,
                "auth_required": self.auth.required, "logged_in": visit.session is not None,
                "node": self._view(visit).node(), **extra}

    # -- pages ---------------------------------------------------------------------------------------

    def status_page(self, request: Request) -> Response:
        visit = self._visit(request)
        if not visit.allowed:
            return self._to_login(request)
        sections = self._sections(visit, None)
        return self._html("status.html", **self._context(visit, sections=sections, live_url="/ui/live"))

    def job_page(self, request: Request, job_id: int) -> Response:
        visit = self._visit(request)
        if not visit.allowed:
            return self._to_login(request)
        job = self.sources.state.job(job_id)
        if job is None:
            return self._html("missing.html", 404, **self._context(visit, job_id=job_id))
        notice = "Retry requested." if request.query_params.get("retried") else ""
        return self._html("job.html", **self._context(
            visit, job_id=job.id, sections=self._sections(visit, job), live_url=f"/ui/live?job={job.id}",
            notice=notice))

    def _sections(self, visit: _Visit, job: Job | None) -> dict[str, dict[str, str]]:
        """The live parts of a page, rendered: {name: {"html", "hash"}}."""
        view = self._view(visit)
        context = {"csrf": self.auth.csrf_token(visit.session), "csrf_field": CSRF_FIELD}
        if job is None:
            parts = {"node": ("_node.html", {"node": view.node()}),
                     "queue": ("_queue.html", {"queue": view.queue()}),
                     "jobs": ("_jobs.html", {"jobs": view.recent_jobs(), "identity": view.identity,
                                             "ae_title": self.sources.config.dicom.ae_title})}
        else:
            parts = {"job": ("_job.html", {"job": view.job(job), "identity": view.identity}),
                     "deliveries": ("_deliveries.html", {"job": view.job(job), "deliveries": view.deliveries(job),
                                                         "retryable": view.retryable(job)}),
                     "pictures": ("_pictures.html", {"job": view.job(job), "sides": SIDES, "planes": PLANES})}
        rendered = {}
        for name, (template, values) in parts.items():
            html = self.env.get_template(template).render(**context, **values)
            rendered[name] = {"html": html, "hash": _hash(html)}
        return rendered

    def live(self, request: Request, job: int | None = None) -> Response:
        visit = self._visit(request)
        if not visit.allowed:
            return JSONResponse({"error": "log in first"}, 401, headers={"Cache-Control": "no-store"})
        record = None
        if job is not None:
            record = self.sources.state.job(job)
            if record is None:
                return JSONResponse({"error": f"job {job} does not exist"}, 404, headers={"Cache-Control": "no-store"})
        return JSONResponse({"time": time.time(), "sections": self._sections(visit, record)},
                            headers={"Cache-Control": "no-store"})

    def picture(self, request: Request, job_id: int, side: str, plane: str) -> Response:
        visit = self._visit(request)
        if not visit.allowed:
            return Response("log in first\n", 401, media_type="text/plain")
        if side not in SIDES or plane not in PLANES:
            return Response(f"no picture {side}/{plane}\n", 404, media_type="text/plain")
        job = self.sources.state.job(job_id)
        if job is None:
            return Response(f"job {job_id} does not exist\n", 404, media_type="text/plain")
        try:
            path = self.overlays.picture(job, side, plane)
        except OverlayUnavailable as exc:
            return Response(f"{exc}\n", 404, media_type="text/plain")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=300",
                                                                   "X-Content-Type-Options": "nosniff"})

    def static(self, name: str) -> Response:
        if name not in _STATIC:
            return Response("not found\n", 404, media_type="text/plain")
        return FileResponse(_HERE / "static" / name, media_type=_STATIC[name],
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    # -- actions -------------------------------------------------------------------------------------

    async def retry(self, request: Request, job_id: int) -> Response:
        visit = self._visit(request)
        refusal = await self._refuse_post(request, visit)
        if refusal is not None:
            return refusal
        try:
            job = await run_in_threadpool(self.sources.state.retry_job, job_id)
        except StateError as exc:
            return self._html("missing.html", 409, **self._context(visit, job_id=job_id, problem=str(exc)))
        logger.info("job %d: retry requested on the status page (now %s)", job.id, job.state)
        self.sources.worker.wake()
        self.sources.exporter.wake()
        return RedirectResponse(f"/ui/jobs/{job.id}?retried=1", status_code=303)

    async def _refuse_post(self, request: Request, visit: _Visit) -> Response | None:
        """A page POST needs this host's Origin, a session when the node has a token, and the CSRF token."""
        if not same_origin(request.headers):
            return Response("cross-site request refused\n", 403, media_type="text/plain")
        if not visit.allowed:
            return Response("log in first\n", 401, media_type="text/plain")
        form = await request.form()
        presented = form.get(CSRF_FIELD)
        if not self.auth.csrf_matches(visit.session, presented if isinstance(presented, str) else None):
            return Response("missing or wrong CSRF token: reload the page\n", 403, media_type="text/plain")
        return None

    def login_form(self, request: Request, next: str = "/") -> Response:  # noqa: A002 (the query's name)
        if not self.auth.required:
            return RedirectResponse("/", status_code=303)
        return self._html("login.html", **self._context(_Visit(None, False), next=_local(next), failed=False))

    async def login(self, request: Request) -> Response:
        if not same_origin(request.headers):
            return Response("cross-site request refused\n", 403, media_type="text/plain")
        if not self.auth.required:
            return RedirectResponse("/", status_code=303)
        form = await request.form()
        token, target = form.get("token"), form.get("next")
        target = _local(target if isinstance(target, str) else "/")
        if not isinstance(token, str) or not self.auth.token_matches(token):
            logger.warning("status page: a login with a wrong token from %s",
                           request.client.host if request.client else "?")
            return self._html("login.html", 401, **self._context(_Visit(None, False), next=target, failed=True))
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, self.auth.new_session(), max_age=SESSION_MAX_AGE_S, path="/",
                            httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    async def logout(self, request: Request) -> Response:
        refusal = await self._refuse_post(request, self._visit(request))
        if refusal is not None:
            return refusal
        response = RedirectResponse("/login" if self.auth.required else "/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response


def _local(target: str) -> str:
    """A redirect target on this host only (a path), so that ``next`` cannot send the user elsewhere."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def status_router(sources: StatusSources) -> APIRouter:
    """The status page's routes for one node (include them in the API's app)."""
    return StatusPage(sources).router
