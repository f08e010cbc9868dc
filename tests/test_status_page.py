"""The status page over real HTTP (uvicorn on loopback): access, login, CSRF, privacy, assets, pictures.

The node's parts are real: a SQLite state and a spool holding a phantom series, a job whose result is
the phantom's ground-truth SEG (stored by the real exporter), a worker with a small untrained
checkpoint, and an export target that nobody listens on (so its delivery fails, for the retry).
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import uvicorn
from fastapi import FastAPI
from PIL import Image

from ian_node.app.status import StatusSources, status_router
from ian_node.app.status.auth import SESSION_COOKIE
from ian_node.app.status.overlay import PLANES, SIDES, render_overlays
from ian_node.config import ApiConfig, CropConfig, DicomTarget, ExportConfig, ModelConfig, NodeConfig
from ian_node.export.exporter import Exporter
from ian_node.export.targets import build_targets
from ian_node.jobs.worker import Worker
from ian_node.net import free_port
from ian_node.phantom.study import PhantomConfig, PhantomFiles, generate_phantom, write_phantom
from ian_node.storage.records import DeliveryState, Job, JobOutcome, JobState, ReceivedInstance
from ian_node.storage.spool import Spool
from ian_node.storage.state import State
from tests.integration.node_harness import api_url, node_config, running_node, untrained_checkpoint, wait_for

TOKEN = "status-page-test-token-0123456789"
#: Small, but with nerves on both sides (the phantom's ground truth).
PHANTOM = PhantomConfig(shape=(24, 96, 96))
#: The job's per-side QA, as the worker records it (``SideQA.as_json``, abridged).
QA = [{"side": "left", "verdict": "WARN", "reasons": ["a gap of 6.1 mm along the tract"]},
      {"side": "right", "verdict": "PASS", "reasons": []}]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomFiles:
    return write_phantom(generate_phantom(0, 11, PHANTOM), tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("model") / "small.pt", size=32, attention=False)


@dataclass
class Served:
    url: str
    state: State
    spool: Spool
    job: Job
    phantom: PhantomFiles

    def login(self, session: requests.Session, token: str = TOKEN) -> requests.Response:
        return session.post(f"{self.url}/login", data={"token": token, "next": "/"}, allow_redirects=False,
                            headers={"Origin": self.url}, timeout=30)


def _store_series(state: State, spool: Spool, phantom: PhantomFiles) -> Job:
    """Record the phantom's instances as the SCP does, conclude the series, and claim its job."""
    for path in phantom.instances:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        data = path.read_bytes()
        state.record_instance(ReceivedInstance(
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, series_uid=ds.SeriesInstanceUID,
            study_uid=ds.StudyInstanceUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
            path=spool.write_instance(ds.SeriesInstanceUID, ds.SOPInstanceUID, data), size=len(data),
            sha256=hashlib.sha256(data).hexdigest(), instance_number=int(ds.InstanceNumber), modality="MR",
            description=str(ds.SeriesDescription), calling_ae="PACS", peer_host="127.0.0.1",
        ))
    series = state.series(phantom.series_uid)
    assert series is not None
    state.settle_series(series.series_uid, series.last_received_at, None)
    job = state.claim_next_job()
    assert job is not None
    return job


@contextmanager
def _uvicorn(app: FastAPI) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="status-page-test", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@contextmanager
def served(root: Path, phantom: PhantomFiles, checkpoint: Path, api: ApiConfig) -> Iterator[Served]:
    """The page of a node whose one job has a result whose only delivery failed (nobody listens)."""
    export = ExportConfig(targets=(DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=free_port(),
                                               timeout_s=2),), max_attempts=1)
    config = NodeConfig(api=api, export=export, crop=CropConfig(mode="half"),
                        model=ModelConfig(checkpoint=checkpoint, device="cpu"))
    state = State(root / "state.sqlite3")
    spool = Spool(root / "spool", min_free_bytes=0, min_free_percent=0.0)
    exporter = Exporter(state, spool, build_targets(export.targets, "IANNODE"), export)
    worker = Worker(state, spool, exporter, config.model, crop=config.crop)
    job = _store_series(state, spool, phantom)
    state.record_segmentation(job.id, crop_request={"mode": "half", "source": "config"}, crop=None,
                              outcome=JobOutcome.SEGMENTED, voxels={"right": 10, "left": 12},
                              timings={"inference": 0.5}, qa=QA)
    exporter.submit(job.id, pydicom.dcmread(phantom.seg))
    assert exporter.deliver_due() == 1
    app = FastAPI()
    app.include_router(status_router(StatusSources(config, state, spool, worker, exporter)))
    try:
        with _uvicorn(app) as url:
            yield Served(url, state, spool, state.job(job.id), phantom)
    finally:
        state.close()


@pytest.fixture(scope="module")
def open_page(tmp_path_factory: pytest.TempPathFactory, phantom: PhantomFiles, checkpoint: Path) -> Iterator[Served]:
    with served(tmp_path_factory.mktemp("open"), phantom, checkpoint, ApiConfig(port=0)) as page:
        yield page


@pytest.fixture(scope="module")
def locked_page(tmp_path_factory: pytest.TempPathFactory, phantom: PhantomFiles, checkpoint: Path) -> Iterator[Served]:
    with served(tmp_path_factory.mktemp("locked"), phantom, checkpoint, ApiConfig(port=0, token=TOKEN)) as page:
        yield page


def _get(url: str, session: requests.Session | None = None, **kwargs: object) -> requests.Response:
    return (session or requests).get(url, timeout=60, allow_redirects=False, **kwargs)  # type: ignore[arg-type]


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field in the page"
    return match.group(1)


def test_open_page_shows_the_node_queue_and_job_without_a_login(open_page: Served) -> None:
    response = _get(f"{open_page.url}/")
    assert response.status_code == 200, response.text
    html = response.text
    assert "IANNODE" in html and "ian_net" in html and "cpu" in html
    assert f'href="/ui/jobs/{open_page.job.id}"' in html
    assert "MENSE 3D ax nerve (phantom)" in html  # the series description
    study_date = str(pydicom.dcmread(open_page.phantom.instances[0]).StudyDate)
    assert f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}" in html
    assert "delivery failed" in html and 'data-state="failed"' in html
    assert response.headers["content-security-policy"].startswith("default-src 'none'")


def test_page_and_its_assets_reference_no_external_url(open_page: Served) -> None:
    pages = [_get(f"{open_page.url}{path}").text for path in ("/", f"/ui/jobs/{open_page.job.id}")]
    assets = re.findall(r'(?:src|href)="([^"]+)"', "".join(pages))
    assert assets and all(a.startswith("/") and not a.startswith("//") for a in assets), assets
    for name in ("status.css", "status.js"):
        response = _get(f"{open_page.url}/ui/static/{name}")
        assert response.status_code == 200
        pages.append(response.text)
    for text in pages:
        assert not re.search(r"https?://", text, re.IGNORECASE), re.search(r".{40}https?://.{40}", text)


def test_each_sides_qa_verdict_is_shown_with_its_reasons(open_page: Served) -> None:
    row = _get(f"{open_page.url}/").text
    assert re.search(r'qa-pass"[^>]*>R PASS<.*qa-warn"[^>]*>L WARN<', row, re.DOTALL), row
    job = _get(f"{open_page.url}/ui/jobs/{open_page.job.id}").text
    assert "a gap of 6.1 mm along the tract" in job


def test_job_page_lists_the_failed_delivery_with_its_error_and_a_retry_button(open_page: Served) -> None:
    html = _get(f"{open_page.url}/ui/jobs/{open_page.job.id}").text
    assert 'data-target="pacs" data-state="failed"' in html
    assert "not established" in html or "refused" in html.lower(), html
    assert "Retry failed deliveries" in html
    for side in SIDES:
        for plane in PLANES:
            assert f"/ui/jobs/{open_page.job.id}/overlay/{side}/{plane}.png" in html


def test_pictures_are_pngs_cached_next_to_the_result_and_drawn_again_when_missing(open_page: Served) -> None:
    url = f"{open_page.url}/ui/jobs/{open_page.job.id}/overlay/right/axial.png"
    first = _get(url)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    cached = open_page.spool.root / "results" / f"job-{open_page.job.id}-overlays"
    assert sorted(p.name for p in cached.iterdir()) == sorted(f"{s}-{p}.png" for s in SIDES for p in PLANES)
    (cached / "right-axial.png").unlink()
    again = _get(url)
    assert again.status_code == 200 and again.content == first.content
    assert (cached / "right-axial.png").read_bytes() == first.content
    assert _get(f"{open_page.url}/ui/jobs/{open_page.job.id}/overlay/right/oblique.png").status_code == 404
    assert _get(f"{open_page.url}/ui/jobs/999/overlay/right/axial.png").status_code == 404


def test_each_picture_outlines_its_side_in_the_sides_colour(phantom: PhantomFiles) -> None:
    pictures = render_overlays(list(phantom.instances), phantom.seg)
    assert set(pictures) == {(s, p) for s in SIDES for p in PLANES}
    colours = {"right": (0xFF, 0x9F, 0x1C), "left": (0x2E, 0xC4, 0xB6)}
    for (side, plane), png in pictures.items():
        with Image.open(io.BytesIO(png)) as image:
            rgb = np.asarray(image.convert("RGB")).astype(int)
        near = np.abs(rgb - np.array(colours[side])).sum(axis=2) < 40
        assert near.sum() >= 4, f"{side} {plane}: no outline in the side's colour"


def test_live_json_sections_carry_html_and_a_hash_that_follows_the_state(open_page: Served) -> None:
    live = _get(f"{open_page.url}/ui/live").json()
    assert set(live["sections"]) == {"node", "queue", "jobs"}
    page = _get(f"{open_page.url}/").text
    assert f'data-hash="{live["sections"]["jobs"]["hash"]}"' in page
    job_live = _get(f"{open_page.url}/ui/live?job={open_page.job.id}").json()
    assert set(job_live["sections"]) == {"job", "deliveries", "pictures"}
    assert _get(f"{open_page.url}/ui/live?job=999").status_code == 404


def test_retry_needs_the_csrf_token_and_this_origin_then_requeues_the_failed_delivery(open_page: Served) -> None:
    job_url = f"{open_page.url}/ui/jobs/{open_page.job.id}"
    csrf = _csrf(_get(job_url).text)
    retry = f"{job_url}/retry"
    headers = {"Origin": open_page.url}
    assert requests.post(retry, data={}, headers=headers, timeout=30, allow_redirects=False).status_code == 403
    assert requests.post(retry, data={"csrf": csrf + "x"}, headers=headers, timeout=30,
                         allow_redirects=False).status_code == 403
    evil = {"Origin": "http://evil.example"}
    assert requests.post(retry, data={"csrf": csrf}, headers=evil, timeout=30, allow_redirects=False).status_code == 403
    assert open_page.state.job(open_page.job.id).state is JobState.FAILED
    response = requests.post(retry, data={"csrf": csrf}, headers=headers, timeout=30, allow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"/ui/jobs/{open_page.job.id}?retried=1"
    assert open_page.state.job(open_page.job.id).state is JobState.EXPORTING
    (delivery,) = open_page.state.deliveries(open_page.job.id)
    assert (delivery.state, delivery.attempts) == (DeliveryState.PENDING, 0)
    # the job is no longer failed: a second retry is refused
    again = requests.post(retry, data={"csrf": csrf}, headers=headers, timeout=30, allow_redirects=False)
    assert again.status_code == 409


def test_with_a_token_every_page_route_needs_a_login(locked_page: Served) -> None:
    page = _get(f"{locked_page.url}/")
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/"
    job = _get(f"{locked_page.url}/ui/jobs/{locked_page.job.id}")
    assert job.status_code == 303 and job.headers["location"].startswith("/login?next=/ui/jobs/")
    assert _get(f"{locked_page.url}/ui/live").status_code == 401
    assert _get(f"{locked_page.url}/ui/jobs/{locked_page.job.id}/overlay/left/axial.png").status_code == 401
    form = _get(f"{locked_page.url}/login")
    assert form.status_code == 200 and 'type="password"' in form.text
    retry = requests.post(f"{locked_page.url}/ui/jobs/{locked_page.job.id}/retry", data={}, timeout=30,
                          headers={"Origin": locked_page.url}, allow_redirects=False)
    assert retry.status_code == 401


def test_login_sets_an_httponly_strict_signed_cookie_that_never_holds_the_token(locked_page: Served) -> None:
    session = requests.Session()
    wrong = locked_page.login(session, "not-the-token-at-all-000")
    assert wrong.status_code == 401 and SESSION_COOKIE not in session.cookies
    right = locked_page.login(session)
    assert right.status_code == 303 and right.headers["location"] == "/"
    cookie = right.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    value = session.cookies[SESSION_COOKIE]
    assert TOKEN not in value and TOKEN not in cookie
    assert _get(f"{locked_page.url}/", session).status_code == 200
    assert _get(f"{locked_page.url}/ui/live", session).status_code == 200
    forged = requests.Session()
    issued, nonce, mac = value.split(".")
    forged.cookies.set(SESSION_COOKIE, f"{int(issued) + 1}.{nonce}.{mac}")
    assert _get(f"{locked_page.url}/", forged).status_code == 303


def test_login_from_another_site_or_to_another_site_is_refused(locked_page: Served) -> None:
    session = requests.Session()
    evil = session.post(f"{locked_page.url}/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"},
                        timeout=30, allow_redirects=False)
    assert evil.status_code == 403 and SESSION_COOKIE not in session.cookies
    off_site = session.post(f"{locked_page.url}/login", data={"token": TOKEN, "next": "//evil.example/x"},
                            headers={"Origin": locked_page.url}, timeout=30, allow_redirects=False)
    assert off_site.status_code == 303 and off_site.headers["location"] == "/"


def test_the_csrf_token_is_bound_to_the_session(locked_page: Served) -> None:
    first, second = requests.Session(), requests.Session()
    locked_page.login(first)
    locked_page.login(second)
    job_url = f"{locked_page.url}/ui/jobs/{locked_page.job.id}"
    csrf_first = _csrf(_get(job_url, first).text)
    assert csrf_first != _csrf(_get(job_url, second).text)
    response = second.post(f"{job_url}/retry", data={"csrf": csrf_first}, headers={"Origin": locked_page.url},
                           timeout=30, allow_redirects=False)
    assert response.status_code == 403


@pytest.mark.parametrize(("token", "show", "login", "shown"), [
    (TOKEN, True, True, True),
    (TOKEN, False, True, False),
    (None, True, False, False),
])
def test_patient_identity_is_shown_only_when_configured_and_logged_in(
    tmp_path: Path, phantom: PhantomFiles, checkpoint: Path, token: str | None, show: bool, login: bool, shown: bool
) -> None:
    header = pydicom.dcmread(phantom.instances[0], stop_before_pixels=True)
    name, patient_id = str(header.PatientName), str(header.PatientID)
    with served(tmp_path, phantom, checkpoint, ApiConfig(port=0, token=token, show_patient_identity=show)) as page:
        session = requests.Session()
        if login:
            assert page.login(session).status_code == 303
        texts = {path: _get(f"{page.url}{path}", session).text
                 for path in ("/", f"/ui/jobs/{page.job.id}", "/ui/live", f"/ui/live?job={page.job.id}")}
    for path, text in texts.items():
        assert page.job.series_uid in text, path  # UIDs are always shown
        assert (name in text, patient_id in text) == (shown, shown), path


def test_the_nodes_app_serves_the_page_and_its_cookie_does_not_open_the_bearer_api(
    tmp_path: Path, checkpoint: Path
) -> None:
    with running_node(node_config(tmp_path, checkpoint, api=ApiConfig(port=0, token=TOKEN))) as node:
        url = api_url(node)
        browser = requests.Session()
        login = browser.post(f"{url}/login", data={"token": TOKEN}, headers={"Origin": url}, timeout=30,
                             allow_redirects=False)
        assert login.status_code == 303 and SESSION_COOKIE in browser.cookies
        assert _get(f"{url}/", browser).status_code == 200
        for path in ("/jobs", "/series", "/metrics"):
            assert _get(f"{url}{path}", browser).status_code == 401, path
        pull = browser.post(f"{url}/jobs", json={"source": "orthanc"}, headers={"Origin": url}, timeout=30)
        assert pull.status_code == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert _get(f"{url}/jobs", headers=bearer).status_code == 200
        assert _get(f"{url}/", headers=bearer).status_code == 303  # the page wants its own login
