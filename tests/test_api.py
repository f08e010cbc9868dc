"""The HTTP API of a real running node: health, metrics, jobs, retry, token, and request validation."""

from __future__ import annotations

import hmac
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from fastapi.routing import APIRoute

from ian_node.app.api import MAX_BODY_BYTES
from ian_node.app.node import Node
from ian_node.app.server import ApiStartError
from ian_node.config import ApiConfig, DicomTarget, ExportConfig
from ian_node.net import free_port
from ian_node.storage.records import JobState, ReceivedInstance
from tests.integration.node_harness import (  # noqa: F401 (dcmtk_nodelay is a fixture)
    api_url,
    dcmtk_nodelay,
    node_config,
    post_json,
    running_node,
    small_phantom,
    untrained_checkpoint,
    wait_for,
)
from tests.integration.peers import storescp, storescu

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("dcmtk_nodelay")]

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("model") / "untrained.pt")


@pytest.fixture(scope="module")
def destination_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, destination_port: int) -> Iterator[Node]:
    """A node whose one job ran but whose delivery failed for good (nothing listened at the destination)."""
    root = tmp_path_factory.mktemp("node")
    target = DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=destination_port, timeout_s=2)
    config = node_config(root, checkpoint, export=ExportConfig(targets=(target,), max_attempts=1))
    phantom = small_phantom(root / "phantom")
    with running_node(config) as running:
        _, statuses = storescu(running.scp.port, list(phantom.instances))
        assert statuses == [0] * len(phantom.instances)
        wait_for(lambda: [j for j in running.state.list_jobs() if j.state is JobState.FAILED], 120,
                 "the job to fail its only delivery")
        yield running


@pytest.fixture(scope="module")
def url(node: Node) -> str:
    return api_url(node)


def test_health_answers_ok_without_a_token(url: str) -> None:
    response = requests.get(f"{url}/health", timeout=10)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


_SAMPLE_RE = re.compile(r'^([a-z_]+)(\{([a-z_]+="[^"]*",?)*\})? (-?[0-9.e+-]+)$')


def _samples(text: str) -> dict[str, float]:
    """Prometheus samples by their full name with labels; every line must be well formed."""
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        match = _SAMPLE_RE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        name = match.group(1)
        assert any(name == t or name in (f"{t}_sum", f"{t}_count", f"{t}_bucket") for t in typed), \
            f"{name} has no TYPE line"
        samples[line.rsplit(" ", 1)[0]] = float(match.group(4))
    return samples


def test_metrics_count_instances_jobs_deliveries_the_backlog_and_stage_timings(url: str) -> None:
    response = requests.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = _samples(response.text)
    assert samples["ian_node_instances_received_total"] == 24
    assert samples['ian_node_jobs{state="failed"}'] == 1
    assert samples['ian_node_jobs{state="queued"}'] == 0
    assert samples['ian_node_deliveries{state="failed"}'] == 1
    assert samples['ian_node_stage_seconds_count{stage="total"}'] == 1
    assert samples['ian_node_stage_seconds_sum{stage="total"}'] > 0
    assert samples['ian_node_stage_seconds_sum{stage="inference"}'] > 0
    assert "# TYPE ian_node_stage_seconds histogram" in response.text
    assert samples['ian_node_stage_seconds_bucket{le="+Inf",stage="total"}'] == 1
    assert samples['ian_node_stage_seconds_bucket{le="0.01",stage="total"}'] == 0
    assert samples['ian_node_delivery_backlog{state="failed",target="pacs"}'] == 1
    assert not [name for name in samples if name.endswith("_created") or "_created{" in name]


def test_jobs_list_and_detail_show_the_job_its_deliveries_and_series(url: str, node: Node) -> None:
    listed = requests.get(f"{url}/jobs", timeout=10).json()["jobs"]
    assert [j["state"] for j in listed] == ["failed"]
    job = listed[0]
    detail = requests.get(f"{url}/jobs/{job['id']}", timeout=10).json()
    assert detail["series_uid"] == job["series_uid"] and detail["has_result"] is True
    assert [d["target"] for d in detail["deliveries"]] == ["pacs"]
    assert detail["deliveries"][0]["state"] == "failed" and "not established" in detail["deliveries"][0]["last_error"]
    assert detail["series"]["instances"] == 24 and detail["series"]["calling_ae"] == "STORESCU"
    assert "description" not in detail["series"]
    by_series = requests.get(f"{url}/jobs", params={"series": job["series_uid"]}, timeout=10).json()["jobs"]
    assert [j["id"] for j in by_series] == [job["id"]]
    assert requests.get(f"{url}/jobs", params={"state": "done"}, timeout=10).json()["jobs"] == []


def test_series_listing_shows_skipped_series_with_their_reasons_and_no_description(url: str, node: Node) -> None:
    skipped = ReceivedInstance(
        sop_instance_uid="1.2.826.0.1.3680043.8.498.77.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        series_uid="1.2.826.0.1.3680043.8.498.77", study_uid="1.2.3", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path="instances/x/y.dcm", size=1, sha256="0", modality="MR", description="PATIENT FREE TEXT",
    )
    node.state.record_instance(skipped)
    series = node.state.series(skipped.series_uid)
    node.state.settle_series(series.series_uid, series.last_received_at, "ImageType LOCALIZER: not a volume")
    listed = requests.get(f"{url}/series", params={"status": "skipped"}, timeout=10).json()["series"]
    assert [(s["series_uid"], s["status_reason"]) for s in listed] == [
        (skipped.series_uid, "ImageType LOCALIZER: not a volume")]
    assert "description" not in listed[0] and "PATIENT FREE TEXT" not in str(listed)
    everything = requests.get(f"{url}/series", timeout=10).json()["series"]
    assert {s["status"] for s in everything} >= {"skipped", "selected"}


@pytest.mark.parametrize("path, status", [
    ("/jobs/999", 404), ("/jobs/abc", 400), ("/jobs?state=nonsense", 400), ("/jobs?limit=0", 400),
    ("/jobs?colour=red", 400), ("/nowhere", 404), ("/series?status=nonsense", 400),
])
def test_bad_job_queries_get_a_clear_client_error(url: str, path: str, status: int) -> None:
    response = requests.get(f"{url}{path}", timeout=10)
    assert response.status_code == status
    assert response.json()["error"]


def test_wrong_method_is_405_with_the_allowed_ones(url: str) -> None:
    response = requests.delete(f"{url}/jobs", timeout=10)
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, POST"


def test_retry_redelivers_a_failed_result_and_refuses_a_job_that_is_not_failed(
    url: str, node: Node, destination_port: int, tmp_path: Path
) -> None:
    job = node.state.list_jobs()[0]
    with storescp(tmp_path / "received", destination_port):
        response = requests.post(f"{url}/jobs/{job.id}/retry", timeout=10)
        assert response.status_code == 200 and response.json()["state"] == "exporting"
        wait_for(lambda: node.state.job(job.id).state is JobState.DONE, 30, "the retried delivery")
    received = sorted(pydicom.dcmread(p).Modality for p in (tmp_path / "received").iterdir())
    assert received == ["SEG", "SR"]  # the job's SEG and its TID 1500 SR, in one delivery
    again = requests.post(f"{url}/jobs/{job.id}/retry", timeout=10)
    assert again.status_code == 409 and "expected failed" in again.json()["error"]


def test_invalid_json_body_is_400_naming_the_problem(url: str) -> None:
    response = requests.post(f"{url}/jobs", data=b"{not json", headers={"Content-Type": "application/json"},
                             timeout=10)
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


@pytest.mark.parametrize("payload, message", [
    ([], "must be a JSON object"),
    ({"source": "ftp"}, "source must be one of"),
    ({"source": "orthanc"}, "needs series"),
    ({"source": "orthanc", "series": "../../etc"}, "Orthanc series ID"),
    ({"source": "orthanc", "series": "0" * 8 + "-00000000" * 4, "colour": "red"}, "unknown key(s) colour"),
    ({"source": "orthanc", "series": 5}, "series must be a string"),
    ({"source": "orthanc", "series": "0" * 8 + "-00000000" * 4}, "no export target of kind 'orthanc'"),
    ({"source": "dicomweb", "url": "http://127.0.0.1:9/dicom-web", "study_uid": "1.2", "series_uid": "1.2.3"},
     "not the URL of an export target of kind 'stowrs'"),
    ({"source": "dicomweb", "url": "http://x", "study_uid": "1.2", "series_uid": "1..3"}, "series_uid is not a DICOM UID"),
])
def test_invalid_pull_request_is_400_naming_the_problem(url: str, payload: object, message: str) -> None:
    response = post_json(f"{url}/jobs", payload)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_token_is_required_on_every_route_but_health_when_configured(tmp_path: Path, checkpoint: Path) -> None:
    config = node_config(tmp_path, checkpoint, api=ApiConfig(port=0, token=TOKEN))
    with running_node(config) as running:
        url = api_url(running)
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        for method, path in (("GET", "/jobs"), ("GET", "/metrics"), ("POST", "/jobs"), ("POST", "/jobs/1/retry"),
                             ("GET", "/series")):
            anonymous = requests.request(method, f"{url}{path}", timeout=10)
            assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"].startswith("Bearer")
            wrong = requests.request(method, f"{url}{path}", headers={"Authorization": f"Bearer {TOKEN}x"}, timeout=10)
            assert wrong.status_code == 401
        good = requests.get(f"{url}/jobs", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert good.status_code == 200 and good.json() == {"jobs": []}


def test_api_listens_on_loopback_by_default(node: Node) -> None:
    assert ApiConfig().bind == "127.0.0.1"
    assert node.api.address[0] == "127.0.0.1"


@pytest.fixture(scope="module")
def token_node(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[Node]:
    config = node_config(tmp_path_factory.mktemp("token-node"), checkpoint, api=ApiConfig(port=0, token=TOKEN))
    with running_node(config) as running:
        yield running


#: One request per route of the API (a path parameter filled in), /health aside.
_PROTECTED = [("GET", "/metrics"), ("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/1"),
              ("POST", "/jobs/1/retry"), ("GET", "/series"), ("GET", "/openapi.json"), ("GET", "/docs"),
              ("GET", "/docs/swagger-ui-bundle.js")]


def test_every_route_but_health_answers_401_without_the_token(token_node: Node) -> None:
    routes = [(method, route.path_regex) for route in token_node.api.app.routes if isinstance(route, APIRoute)
              and route.path != "/health" for method in route.methods]
    assert len(routes) == len(_PROTECTED) and all(  # a new route must be added to _PROTECTED
        any(m == method and pattern.fullmatch(path) for m, path in _PROTECTED) for method, pattern in routes)
    url = api_url(token_node)
    for method, path in _PROTECTED:
        for headers in ({}, {"Authorization": f"Bearer {TOKEN[:-1]}"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}):
            answer = requests.request(method, f"{url}{path}", headers=headers, json={"source": "orthanc"}, timeout=10)
            assert answer.status_code == 401, (method, path, headers, answer.text)
            assert answer.json() == {"error": "a valid bearer token is required"}
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


def test_docs_page_loads_only_the_nodes_own_files_and_the_schema_lists_every_route(token_node: Node) -> None:
    url, auth = api_url(token_node), {"Authorization": f"Bearer {TOKEN}"}
    page = requests.get(f"{url}/docs", headers=auth, timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    references = re.findall(r"""(?:src|href|url)\s*[=:]\s*["']([^"']+)["']""", page.text)
    assert len(references) == 4 and all(r.startswith("/") for r in references), references  # no CDN
    for reference in references:
        assert requests.get(f"{url}{reference}", headers=auth, timeout=10).status_code == 200, reference
    assert "SwaggerUIBundle" in requests.get(f"{url}/docs/swagger-ui-bundle.js", headers=auth, timeout=10).text
    schema = requests.get(f"{url}/openapi.json", headers=auth, timeout=10).json()
    assert set(schema["paths"]) == {"/health", "/metrics", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/retry",
                                    "/series"}
    assert set(schema["paths"]["/jobs"]) == {"get", "post"}
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" not in schema["paths"]["/health"]["get"] and schema["paths"]["/jobs"]["get"]["security"]
    assert requests.get(f"{url}/docs/index.html", headers=auth, timeout=10).status_code == 404


def test_a_body_larger_than_the_limit_is_413(url: str) -> None:
    response = requests.post(f"{url}/jobs", data=b" " * (MAX_BODY_BYTES + 1), timeout=10)
    assert response.status_code == 413 and str(MAX_BODY_BYTES) in response.json()["error"]


def test_a_port_in_use_stops_the_start_with_an_error_naming_it(tmp_path: Path, checkpoint: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = Node(node_config(tmp_path, checkpoint, api=ApiConfig(port=port)))
        try:
            with pytest.raises(ApiStartError, match=rf"127\.0\.0\.1 port {port} \(api\.bind, api\.port\): .*in use"):
                node.start()
            assert node.worker.totals.jobs == 0 and node.state.list_jobs() == []
        finally:
            node.stop()


def test_the_token_is_compared_with_hmac_compare_digest(token_node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    url = api_url(token_node)
    wrong = requests.get(f"{url}/jobs", headers={"Authorization": f"Bearer {TOKEN[:-1]}x"}, timeout=10)
    right = requests.get(f"{url}/jobs", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert (wrong.status_code, right.status_code) == (401, 200)
    assert calls == [(f"{TOKEN[:-1]}x".encode(), TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


def test_a_failing_route_is_500_without_details_and_health_is_503(tmp_path: Path, checkpoint: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    with running_node(node_config(tmp_path, checkpoint)) as running:
        url = api_url(running)
        running.state.close()  # every query now raises
        answer = requests.get(f"{url}/jobs", timeout=10)
        assert answer.status_code == 500 and answer.json() == {"error": "internal error (see the node's log)"}
        assert answer.headers["Cache-Control"] == "no-store"
        assert requests.get(f"{url}/health", timeout=10).status_code == 503
    assert any(r.name == "ian_node.app.api" and "GET /jobs failed" in r.getMessage() and r.exc_info
               for r in caplog.records)
