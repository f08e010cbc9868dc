"""The crop through the running node: "no mandible region found", a retry with boxes, segmenting anyway,
the API's roi and its validation, metrics, `jobs list`, and the start-up refusal of an incompatible checkpoint."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from ian_node.app.cli import main
from ian_node.app.node import Node
from ian_node.config import CropConfig, DicomTarget, ExportConfig
from ian_node.net import free_port
from ian_node.phantom.study import PhantomFiles
from ian_node.segment.crop import NO_REGION, CropError
from ian_node.storage.records import Job, JobOutcome, JobState
from tests.crop_tools import constant_localiser, crop_checkpoint
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

JOB_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"checkpoint": crop_checkpoint(root / "landmarks.pt"), "empty": constant_localiser(root / "empty.pt", -20.0),
            "found": constant_localiser(root / "found.pt", 20.0)}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomFiles:
    return small_phantom(tmp_path_factory.mktemp("phantom"), 2)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    folder, port = tmp_path_factory.mktemp("pacs"), free_port()
    with storescp(folder, port):
        yield folder, port


def _config(root: Path, models: dict[str, Path], pacs: tuple[Path, int], **crop: object):
    target = DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=pacs[1])
    return node_config(root, models["checkpoint"], export=ExportConfig(targets=(target,)),
                       crop=CropConfig(localiser=models["empty"], **crop))


def _send_and_wait(node: Node, phantom: PhantomFiles, *states: JobState) -> Job:
    _, statuses = storescu(node.scp.port, list(phantom.instances))
    assert statuses == [0] * len(phantom.instances)
    return wait_for(lambda: next((j for j in node.state.jobs_of_series(phantom.series_uid) if j.state in states), None),
                    JOB_TIMEOUT, lambda: str(node.state.list_jobs()))


def _segs(pacs: tuple[Path, int]) -> list[Path]:
    """The SEGs the destination received (each job also sends its SR)."""
    return sorted(p for p in pacs[0].iterdir() if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG")


@pytest.fixture(scope="module")
def no_region_node(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path], phantom: PhantomFiles,
                   pacs: tuple[Path, int]) -> Iterator[tuple[Node, Job]]:
    """A node whose localiser never finds a mandible, after one job of `phantom` ended."""
    with running_node(_config(tmp_path_factory.mktemp("node"), models, pacs)) as node:
        yield node, _send_and_wait(node, phantom, JobState.FAILED, JobState.DONE)


def test_no_region_found_fails_the_job_with_the_reason_sends_nothing_and_the_api_shows_the_roi(
    no_region_node: tuple[Node, Job], pacs: tuple[Path, int], phantom: PhantomFiles
) -> None:
    node, job = no_region_node
    assert job.state is JobState.FAILED and _segs(pacs) == []
    detail = requests.get(f"{api_url(node)}/jobs/{job.id}", timeout=10).json()
    assert detail["state"] == "failed" and detail["outcome"] == "no_region" and detail["has_result"] is False
    assert detail["flag"].startswith(NO_REGION) and "threshold 0.50" in detail["flag"]
    assert detail["error"] == f"series {phantom.series_uid}: {detail['flag']}"
    assert detail["roi"] == {side: {"mode": "auto", "box_mm": None, "confidence": 0.0} for side in ("right", "left")}
    assert detail["roi_request"] == {"mode": "auto", "right": None, "left": None, "source": "config"}
    assert set(detail["timings"]) == {"load", "localise"} and detail["voxels"] is None
    listed = requests.get(f"{api_url(node)}/jobs?state=failed", timeout=10).json()["jobs"]
    assert [(j["id"], j["outcome"]) for j in listed] == [(job.id, "no_region")]
    metrics = requests.get(f"{api_url(node)}/metrics", timeout=10).text
    assert 'ian_node_job_outcomes{outcome="no_region"} 1.0' in metrics.splitlines()


def test_jobs_list_and_show_mark_a_job_with_no_region(
    no_region_node: tuple[Node, Job], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    node, job = no_region_node
    monkeypatch.setenv("IAN_NODE_STORAGE_STATE_PATH", str(node.config.storage.state_path))
    monkeypatch.delenv("IAN_NODE_CONFIG", raising=False)
    assert main(["jobs", "list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith(str(job.id)))
    assert "failed" in line and "[no region: not segmented]" in line and NO_REGION in line
    assert main(["jobs", "show", str(job.id)]) == 0
    shown = capsys.readouterr().out
    assert "outcome no_region" in shown and re.search(r"right crop auto: none, confidence 0\.00", shown)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"roi": {"right": [[0, 1], [0, 1], [0, 1]]}}, "roi must be"),
        ({"roi": {"right": [[-20, -1], [0, 1], [0, 1]], "left": [[1, 20], [0, 1], [1, 0]]}},
         "roi.left: the z range must have min < max"),
        ({"roi": {"right": [[-20, -1], [0, 1], [0, 1]], "left": [[1, 20], [0, 1], ["a", 1]]}},
         "roi.left: must be [[x_min, x_max]"),
        ({"roi": {"right": [[-20, 5], [0, 1], [0, 1]], "left": [[1, 20], [0, 1], [0, 1]]}}, "overlap"),
        ({"crop": "half"}, 'may hold only "roi"'),
    ],
)
def test_an_invalid_roi_in_a_retry_is_400_naming_the_problem(
    no_region_node: tuple[Node, Job], body: dict, message: str
) -> None:
    node, job = no_region_node
    response = post_json(f"{api_url(node)}/jobs/{job.id}/retry", body)
    assert response.status_code == 400 and message in response.json()["error"], response.text
    assert node.state.job(job.id).state is JobState.FAILED


@pytest.mark.parametrize(
    ("roi", "message"),
    [
        ("box", "roi must be"),
        ({"right": [[-20, -1], [0, 1], [0, 1]], "left": [[1, 20], [0, 1]]}, "roi.left: must be"),
        ({"right": [[1, 20], [0, 1], [0, 1]], "left": [[-20, -1], [0, 1], [0, 1]]}, "lower x"),
    ],
)
def test_an_invalid_roi_in_a_pull_is_400_before_anything_is_fetched(
    no_region_node: tuple[Node, Job], roi: object, message: str
) -> None:
    node, _ = no_region_node
    body = {"source": "orthanc", "series": "-".join(["0123abcd"] * 5), "roi": roi}
    response = post_json(f"{api_url(node)}/jobs", body)
    assert response.status_code == 400 and message in response.json()["error"], response.text


def test_retrying_a_no_region_job_with_boxes_segments_it_there_and_sends_the_seg(
    no_region_node: tuple[Node, Job], pacs: tuple[Path, int], phantom: PhantomFiles
) -> None:
    node, job = no_region_node
    boxes = json.loads(phantom.summary.read_text())["crop_boxes"]
    response = post_json(f"{api_url(node)}/jobs/{job.id}/retry", {"roi": boxes})
    assert response.status_code == 200, response.text
    assert response.json()["roi_request"] == {"mode": "box", **boxes, "source": "api"}
    done = wait_for(lambda: node.state.job(job.id).state is JobState.DONE and node.state.job(job.id), JOB_TIMEOUT,
                    lambda: str(node.state.job(job.id)))
    assert (done.outcome, done.error) == (JobOutcome.SEGMENTED, None)
    # the crop problem is gone; what flag remains is the tiny model's QA verdict, not the crop's
    assert done.flag is None or done.flag.startswith("QA "), done.flag
    assert done.crop == {side: {"mode": "box", "box_mm": boxes[side], "confidence": None} for side in boxes}
    assert set(done.voxels) == {"right", "left"} and "inference" in done.timings
    assert len(_segs(pacs)) == 1


def test_segment_when_not_found_sends_the_seg_made_in_the_halves_and_flags_the_job(
    tmp_path: Path, models: dict[str, Path], pacs: tuple[Path, int]
) -> None:
    phantom = small_phantom(tmp_path / "phantom", 3)
    before = len(_segs(pacs))
    with running_node(_config(tmp_path, models, pacs, segment_when_not_found=True)) as node:
        job = _send_and_wait(node, phantom, JobState.DONE, JobState.FAILED)
        detail = requests.get(f"{api_url(node)}/jobs/{job.id}", timeout=10).json()
    assert (detail["state"], detail["outcome"], detail["has_result"]) == ("done", "segmented_no_region", True)
    assert detail["flag"].startswith(NO_REGION) and detail["error"] is None
    assert {c["mode"] for c in detail["roi"].values()} == {"half"}
    assert {c["confidence"] for c in detail["roi"].values()} == {0.0}
    assert len(_segs(pacs)) == before + 1


def test_the_node_refuses_to_start_with_a_checkpoint_its_crop_cannot_reproduce(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    legacy = untrained_checkpoint(tmp_path / "legacy.pt", size=32, attention=False)  # trained on halves
    config = node_config(tmp_path, legacy, crop=CropConfig(localiser=models["found"]))
    node = Node(config)
    try:
        with pytest.raises(CropError, match="left-right halves.*crop mode 'half'"):
            node.start()
    finally:
        node.stop()
