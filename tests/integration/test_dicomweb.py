"""DICOMweb mode against Orthanc's DICOMweb plugin: POST /jobs, WADO-RS in, STOW-RS of the SEG back."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmwrite

from ian_node.app.node import Node
from ian_node.config import ExportConfig, StowRsTarget
from ian_node.net import free_port
from ian_node.phantom.study import PhantomFiles
from ian_node.receive.pull import dataset_bytes
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
from tests.integration.orthanc_server import OrthancServer, orthanc_server
from tests.integration.peers import storescu
from tests.tools import dciodvfy_errors

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("dcmtk_nodelay")]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with orthanc_server(tmp_path_factory.mktemp("orthanc-web")) as server:
        yield server


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancServer) -> PhantomFiles:
    files = small_phantom(tmp_path_factory.mktemp("phantom"))
    _, statuses = storescu(orthanc.dicom_port, list(files.instances), called=orthanc.aet)
    assert statuses == [0] * len(files.instances)
    return files


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancServer) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("node")
    checkpoint = untrained_checkpoint(root / "untrained.pt")
    target = StowRsTarget(name="web", url=orthanc.dicomweb_url, username=orthanc.username, password=orthanc.password)
    with running_node(node_config(root, checkpoint, export=ExportConfig(targets=(target,)))) as running:
        yield running


@pytest.fixture(scope="module")
def web(orthanc: OrthancServer) -> DICOMwebClient:
    session = requests.Session()
    session.auth = orthanc.auth
    return DICOMwebClient(url=orthanc.dicomweb_url, session=session)


def _request(orthanc: OrthancServer, phantom: PhantomFiles, **changes: str) -> dict[str, str]:
    return {"source": "dicomweb", "url": orthanc.dicomweb_url, "study_uid": phantom.study_uid,
            "series_uid": phantom.series_uid, **changes}


def _segs(web: DICOMwebClient, study_uid: str) -> list[dict]:
    return web.search_for_series(study_uid, search_filters={"Modality": "SEG"})


def test_dicomweb_pull_fetches_by_wado_rs_and_stores_the_seg_back_by_stow_rs(
    node: Node, orthanc: OrthancServer, phantom: PhantomFiles, web: DICOMwebClient, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.perf_counter()
    response = post_json(f"{api_url(node)}/jobs", _request(orthanc, phantom, url=orthanc.dicomweb_url + "/"))
    assert response.status_code == 201, response.text
    answer = response.json()
    assert answer["created"] is True and answer["instances"] == len(phantom.instances)
    (seg_series,) = wait_for(lambda: _segs(web, phantom.study_uid), 120, "the SEG by QIDO-RS", interval=0.02)
    seconds = time.perf_counter() - started
    seg_uid = seg_series["0020000E"]["Value"][0]
    (seg,) = web.retrieve_series(phantom.study_uid, seg_uid)
    path = tmp_path / "seg.dcm"
    dcmwrite(path, seg, enforce_file_format=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == phantom.series_uid
    assert dciodvfy_errors(path) == []
    job = wait_for(lambda: node.state.job(answer["id"]).state == "done" and node.state.job(answer["id"]), 30, "done")
    assert [d.target for d in node.state.deliveries(job.id)] == ["web"]
    # The recorded instances are the phantom's, byte for byte in their data sets (as C-STORE would record them).
    recorded = {i.sha256 for i in node.state.instances(phantom.series_uid)}
    assert recorded == {hashlib.sha256(dataset_bytes(p.read_bytes())).hexdigest() for p in phantom.instances}
    assert node.state.series(phantom.series_uid).peer_host == "127.0.0.1"
    with capsys.disabled():
        print(f"\n[timing] dicomweb (WADO-RS in, STOW-RS out): POST /jobs -> SEG in Orthanc {seconds:.2f} s")


def test_pulling_the_same_unchanged_series_again_returns_its_job_without_a_new_one(
    node: Node, orthanc: OrthancServer, phantom: PhantomFiles, web: DICOMwebClient
) -> None:
    first = node.state.jobs_of_series(phantom.series_uid)
    assert len(first) == 1
    response = post_json(f"{api_url(node)}/jobs", _request(orthanc, phantom))
    assert response.status_code == 200, response.text
    assert response.json()["id"] == first[0].id and response.json()["created"] is False
    assert len(node.state.jobs_of_series(phantom.series_uid)) == 1
    assert len(_segs(web, phantom.study_uid)) == 1


def test_a_series_the_server_does_not_have_is_404(node: Node, orthanc: OrthancServer, phantom: PhantomFiles) -> None:
    response = post_json(f"{api_url(node)}/jobs", _request(orthanc, phantom, series_uid="1.2.3.4.5"))
    assert response.status_code == 404
    assert "not found" in response.json()["error"]


def test_an_unreachable_dicomweb_server_is_502(tmp_path: Path, phantom: PhantomFiles) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    checkpoint = untrained_checkpoint(tmp_path / "untrained.pt")
    config = node_config(tmp_path, checkpoint, export=ExportConfig(targets=(StowRsTarget(name="gone", url=url),)))
    with running_node(config) as running:
        response = post_json(f"{api_url(running)}/jobs", {"source": "dicomweb", "url": url,
                                                           "study_uid": phantom.study_uid,
                                                           "series_uid": phantom.series_uid})
    assert response.status_code == 502
    assert "unreachable" in response.json()["error"]
