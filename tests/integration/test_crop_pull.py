"""`POST /jobs` with a ``roi`` against Orthanc's DICOMweb: the job is created with its boxes and cropped by them."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from ian_node.app.node import Node
from ian_node.config import CropConfig, ExportConfig, StowRsTarget
from ian_node.phantom.study import PhantomFiles
from ian_node.storage.records import JobOutcome, JobState
from tests.crop_tools import constant_localiser, crop_checkpoint
from tests.integration.node_harness import (  # noqa: F401 (dcmtk_nodelay is a fixture)
    api_url,
    dcmtk_nodelay,
    node_config,
    post_json,
    running_node,
    small_phantom,
    wait_for,
)
from tests.integration.orthanc_server import OrthancServer, orthanc_server
from tests.integration.peers import storescu

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("dcmtk_nodelay")]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with orthanc_server(tmp_path_factory.mktemp("orthanc-crop")) as server:
        yield server


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancServer) -> PhantomFiles:
    files = small_phantom(tmp_path_factory.mktemp("phantom"), 4)
    _, statuses = storescu(orthanc.dicom_port, list(files.instances), called=orthanc.aet)
    assert statuses == [0] * len(files.instances)
    return files


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancServer) -> Iterator[Node]:
    """A node in mode auto whose localiser never finds a mandible: only a job's own boxes get it segmented."""
    root = tmp_path_factory.mktemp("node")
    target = StowRsTarget(name="web", url=orthanc.dicomweb_url, username=orthanc.username, password=orthanc.password)
    crop = CropConfig(localiser=constant_localiser(root / "empty.pt", -20.0))
    config = node_config(root, crop_checkpoint(root / "landmarks.pt"), export=ExportConfig(targets=(target,)),
                         crop=crop)
    with running_node(config) as running:
        yield running


def _request(orthanc: OrthancServer, phantom: PhantomFiles, **extra: object) -> dict[str, object]:
    return {"source": "dicomweb", "url": orthanc.dicomweb_url, "study_uid": phantom.study_uid,
            "series_uid": phantom.series_uid, **extra}


def test_a_pull_with_a_roi_creates_its_job_with_the_boxes_and_crops_by_them(
    node: Node, orthanc: OrthancServer, phantom: PhantomFiles
) -> None:
    boxes = json.loads(phantom.summary.read_text())["crop_boxes"]
    response = post_json(f"{api_url(node)}/jobs", _request(orthanc, phantom, roi=boxes))
    assert response.status_code == 201, response.text
    answer = response.json()
    assert answer["roi_request"] == {"mode": "box", **boxes, "source": "api"}
    job = wait_for(lambda: node.state.job(answer["id"]).state in (JobState.DONE, JobState.FAILED)
                   and node.state.job(answer["id"]), 120, lambda: str(node.state.job(answer["id"])))
    assert (job.state, job.outcome, job.flag) == (JobState.DONE, JobOutcome.SEGMENTED, None), job.error
    assert job.crop == {side: {"mode": "box", "box_mm": boxes[side], "confidence": None} for side in boxes}


def test_a_roi_for_a_series_version_that_already_has_its_job_is_409_pointing_at_a_retry(
    node: Node, orthanc: OrthancServer, phantom: PhantomFiles
) -> None:
    (existing,) = node.state.jobs_of_series(phantom.series_uid)
    boxes = json.loads(phantom.summary.read_text())["crop_boxes"]
    response = post_json(f"{api_url(node)}/jobs", _request(orthanc, phantom, roi=boxes))
    assert response.status_code == 409, response.text
    assert f"already has job {existing.id}" in response.json()["error"] and "/retry" in response.json()["error"]
    assert post_json(f"{api_url(node)}/jobs", _request(orthanc, phantom)).status_code == 200  # without: as before
    assert len(node.state.jobs_of_series(phantom.series_uid)) == 1
