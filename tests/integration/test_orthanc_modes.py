"""The node inside a real Orthanc workflow: our orthanc/plugin.py in Debian's Orthanc, push and pull modes.

A series stored in Orthanc becomes stable (StableAge 2 s), the plugin sends it to the node (push:
C-STORE through an Orthanc job; pull: the node's POST /jobs, then Orthanc REST), and the node's SEG
arrives back in Orthanc under the same study. The time from "stable" to "SEG in Orthanc" is printed
for each mode (not asserted).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from ian_node.app.node import Node
from ian_node.config import ApiConfig, DicomConfig, DicomTarget, ExportConfig, OrthancTarget, SeriesConfig
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
from tests.integration.orthanc_server import DICOMWEB_PLUGIN, PYTHON_PLUGIN, OrthancServer, orthanc_server
from tests.integration.peers import CT_SMALL, storescu
from tests.tools import dciodvfy_errors

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("dcmtk_nodelay")]

PLUGIN = Path(__file__).resolve().parents[2] / "orthanc" / "plugin.py"
STABLE_AGE_S = 2
TOKEN = "plugin-token-0123456789"


def plugin_config(ian_node: dict[str, object], **extra: object) -> dict[str, object]:
    return {
        "PythonScript": str(PLUGIN),
        "StableAge": STABLE_AGE_S,
        "UserMetadata": {"IanNodeTriggered": 4600},
        "IanNode": ian_node,
        **extra,
    }


def store_in_orthanc(orthanc: OrthancServer, files: list[Path]) -> None:
    _, statuses = storescu(orthanc.dicom_port, files, calling="MODALITY", called=orthanc.aet)
    assert statuses == [0] * len(files), statuses


def orthanc_id(orthanc: OrthancServer, uid: str, level: str) -> str:
    response = orthanc.post("/tools/lookup", data=uid)
    response.raise_for_status()
    (found,) = [item["ID"] for item in response.json() if item["Type"] == level]
    return found


def wait_stable(orthanc: OrthancServer, series_id: str) -> float:
    """The moment (perf_counter) Orthanc reports the series stable."""
    wait_for(lambda: orthanc.get(f"/series/{series_id}").json()["IsStable"], 30, f"series {series_id} stable",
             interval=0.02)
    return time.perf_counter()


def seg_series(orthanc: OrthancServer, study_id: str) -> list[dict]:
    series = orthanc.get(f"/studies/{study_id}/series").json()
    return [s for s in series if s["MainDicomTags"].get("Modality") == "SEG"]


def wait_seg(orthanc: OrthancServer, study_id: str, timeout: float = 120) -> tuple[dict, float]:
    (found,) = wait_for(lambda: seg_series(orthanc, study_id), timeout, f"a SEG in study {study_id}", interval=0.02)
    return found, time.perf_counter()


def check_seg(orthanc: OrthancServer, seg: dict, phantom: PhantomFiles, tmp_path: Path) -> None:
    """The SEG in Orthanc references the phantom series, sits in its study and passes dciodvfy."""
    (instance,) = seg["Instances"]
    path = tmp_path / "seg.dcm"
    path.write_bytes(orthanc.get(f"/instances/{instance}/file").content)
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == phantom.study_uid
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == phantom.series_uid
    assert dciodvfy_errors(path) == []


def report(capsys: pytest.CaptureFixture[str], mode: str, seconds: float) -> None:
    with capsys.disabled():
        print(f"\n[timing] {mode}: STABLE_SERIES -> SEG in Orthanc {seconds:.2f} s")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("model") / "untrained.pt")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> list[PhantomFiles]:
    root = tmp_path_factory.mktemp("phantoms")
    return [small_phantom(root / f"p{i}", patient=i) for i in range(2)]


# -- push mode ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def push_setup(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[tuple[OrthancServer, Node]]:
    node_port = free_port()
    extra = plugin_config(
        {"Mode": "push", "Modality": "ian-node", "TimeoutSeconds": 60},
        DicomModalities={"ian-node": ["IANNODE", "127.0.0.1", node_port]},
        OverwriteInstances=True,  # a modality re-sending a series makes it stabilise again
    )
    with orthanc_server(tmp_path_factory.mktemp("orthanc-push"), (PYTHON_PLUGIN, DICOMWEB_PLUGIN), extra,
                        verbose=True) as orthanc:
        back = DicomTarget(name="orthanc", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
        config = node_config(tmp_path_factory.mktemp("node-push"), checkpoint, dicom=DicomConfig(port=node_port),
                             export=ExportConfig(targets=(back,)))
        with running_node(config) as node:
            yield orthanc, node


@pytest.fixture(scope="module")
def pushed(push_setup: tuple[OrthancServer, Node], phantoms: list[PhantomFiles]) -> dict[str, object]:
    """Push mode end to end once: the phantom series in, the SEG back; what the tests below look at."""
    orthanc, _ = push_setup
    phantom = phantoms[0]
    store_in_orthanc(orthanc, list(phantom.instances))
    series_id = orthanc_id(orthanc, phantom.series_uid, "Series")
    study_id = orthanc_id(orthanc, phantom.study_uid, "Study")
    stable_at = wait_stable(orthanc, series_id)
    seg, arrived_at = wait_seg(orthanc, study_id)
    return {"series_id": series_id, "study_id": study_id, "seg": seg, "seconds": arrived_at - stable_at}


def test_push_mode_stable_mr_series_gets_a_seg_in_the_same_study(
    push_setup: tuple[OrthancServer, Node], pushed: dict, phantoms: list[PhantomFiles], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    orthanc, node = push_setup
    check_seg(orthanc, pushed["seg"], phantoms[0], tmp_path)
    (job,) = node.state.list_jobs()
    assert node.state.series(job.series_uid).calling_ae == orthanc.aet  # it came by C-STORE from Orthanc
    report(capsys, "push (C-STORE both ways)", pushed["seconds"])


def test_the_seg_coming_back_does_not_trigger_another_job(push_setup: tuple[OrthancServer, Node], pushed: dict) -> None:
    orthanc, node = push_setup
    seg_id = pushed["seg"]["ID"]
    wait_for(lambda: f"series {seg_id} not sent: modality 'SEG' not selected" in orthanc.log_text(), 30,
             "the plugin to consider and skip the SEG series")
    assert len(node.state.list_jobs()) == 1
    assert orthanc.get(f"/series/{seg_id}/metadata/IanNodeTriggered").status_code == 404


def test_a_non_mr_series_does_not_trigger(push_setup: tuple[OrthancServer, Node]) -> None:
    orthanc, node = push_setup
    store_in_orthanc(orthanc, [CT_SMALL])
    ct = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    series_id = orthanc_id(orthanc, ct.SeriesInstanceUID, "Series")
    wait_for(lambda: f"series {series_id} not sent: modality 'CT' not selected" in orthanc.log_text(), 30,
             "the plugin to consider and skip the CT series")
    assert node.state.series(ct.SeriesInstanceUID) is None


def test_the_same_series_stabilising_again_unchanged_gets_no_second_seg(
    push_setup: tuple[OrthancServer, Node], pushed: dict, phantoms: list[PhantomFiles]
) -> None:
    orthanc, node = push_setup
    series_id = pushed["series_id"]
    store_in_orthanc(orthanc, list(phantoms[0].instances))  # re-sent: Orthanc overwrites, series unstable
    wait_for(lambda: f"series {series_id} not sent: already sent unchanged" in orthanc.log_text(), 30,
             "the plugin to skip the unchanged series")
    assert len(seg_series(orthanc, pushed["study_id"])) == 1
    assert len(node.state.list_jobs()) == 1


# -- pull mode ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def pull_orthanc(tmp_path_factory: pytest.TempPathFactory, api_port: int) -> Iterator[OrthancServer]:
    extra = plugin_config({"Mode": "pull", "NodeUrl": f"http://127.0.0.1:{api_port}", "NodeToken": TOKEN,
                           "TimeoutSeconds": 60})
    with orthanc_server(tmp_path_factory.mktemp("orthanc-pull"), (PYTHON_PLUGIN, DICOMWEB_PLUGIN), extra,
                        verbose=True) as orthanc:
        yield orthanc


def pull_node(root: Path, checkpoint: Path, orthanc: OrthancServer, api_port: int = 0, password: str | None = None,
              **sections: object):  # type: ignore[no-untyped-def]
    target = OrthancTarget(name="orthanc", url=orthanc.url, username=orthanc.username,
                           password=orthanc.password if password is None else password)
    config = node_config(root, checkpoint, api=ApiConfig(port=api_port, token=TOKEN),
                         export=ExportConfig(targets=(target,)), **sections)
    return running_node(config)


def pull(node: Node, series_id: str) -> requests.Response:
    return post_json(f"{api_url(node)}/jobs", {"source": "orthanc", "series": series_id}, token=TOKEN)


def test_pull_mode_stable_mr_series_gets_a_seg_in_the_same_study(
    pull_orthanc: OrthancServer, api_port: int, checkpoint: Path, phantoms: list[PhantomFiles], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    orthanc, phantom = pull_orthanc, phantoms[0]
    with pull_node(tmp_path / "node", checkpoint, orthanc, api_port) as node:
        store_in_orthanc(orthanc, list(phantom.instances))
        series_id = orthanc_id(orthanc, phantom.series_uid, "Series")
        study_id = orthanc_id(orthanc, phantom.study_uid, "Study")
        stable_at = wait_stable(orthanc, series_id)
        seg, arrived_at = wait_seg(orthanc, study_id)
        check_seg(orthanc, seg, phantom, tmp_path)
        (job,) = node.state.list_jobs()
        series = node.state.series(job.series_uid)
        assert series.calling_ae == "" and series.peer_host == "127.0.0.1"  # it came by REST, not C-STORE
        recorded = {i.sha256 for i in node.state.instances(phantom.series_uid)}
        assert recorded == {hashlib.sha256(dataset_bytes(p.read_bytes())).hexdigest() for p in phantom.instances}
        # the SEG is in Orthanc; its delivery is confirmed once the SR that follows it is in too
        wait_for(lambda: [d.state for d in node.state.deliveries(job.id)] == ["delivered"], 30,
                 lambda: f"the delivery confirmed: {node.state.deliveries(job.id)}")
    report(capsys, "pull (Orthanc REST both ways)", arrived_at - stable_at)


def test_node_down_is_logged_by_the_plugin_and_the_retrigger_route_works_once_it_is_up(
    pull_orthanc: OrthancServer, api_port: int, checkpoint: Path, phantoms: list[PhantomFiles], tmp_path: Path,
) -> None:
    orthanc, phantom = pull_orthanc, phantoms[1]
    store_in_orthanc(orthanc, list(phantom.instances))
    series_id = orthanc_id(orthanc, phantom.series_uid, "Series")
    study_id = orthanc_id(orthanc, phantom.study_uid, "Study")
    wait_for(lambda: f"ian-node: series {series_id} failed: node unreachable" in orthanc.log_text(), 30,
             "the plugin to log that the node is unreachable")
    assert orthanc.get(f"/series/{series_id}/metadata/IanNodeTriggered").status_code == 404
    with pull_node(tmp_path / "node", checkpoint, orthanc, api_port):
        response = orthanc.post(f"/ian-node/series/{series_id}/segment")
        assert response.status_code == 200 and response.json()["queued"] is True
        seg, _ = wait_seg(orthanc, study_id)
    check_seg(orthanc, seg, phantom, tmp_path)
    assert orthanc.get(f"/series/{series_id}/metadata/IanNodeTriggered").status_code == 200


def test_retrigger_route_refuses_a_series_the_rules_do_not_send(pull_orthanc: OrthancServer) -> None:
    store_in_orthanc(pull_orthanc, [CT_SMALL])
    series_id = orthanc_id(pull_orthanc, pydicom.dcmread(CT_SMALL).SeriesInstanceUID, "Series")
    response = pull_orthanc.post(f"/ian-node/series/{series_id}/segment")
    assert response.status_code == 409 and "modality 'CT' not selected" in response.text
    assert pull_orthanc.post("/ian-node/series/00000000-00000000-00000000-00000000-00000000/segment").status_code == 404


def test_pulling_a_series_of_a_sop_class_the_node_does_not_accept_is_422_and_records_nothing(
    pull_orthanc: OrthancServer, checkpoint: Path, tmp_path: Path
) -> None:
    store_in_orthanc(pull_orthanc, [CT_SMALL])
    ct = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    with pull_node(tmp_path, checkpoint, pull_orthanc) as node:
        response = pull(node, orthanc_id(pull_orthanc, ct.SeriesInstanceUID, "Series"))
        assert response.status_code == 422 and "does not accept" in response.json()["error"]
        assert node.state.series(ct.SeriesInstanceUID) is None and node.state.instances_received() == 0


def test_pulling_a_series_the_node_rules_skip_is_422_with_the_reason(
    pull_orthanc: OrthancServer, checkpoint: Path, phantoms: list[PhantomFiles], tmp_path: Path
) -> None:
    phantom = phantoms[0]
    store_in_orthanc(pull_orthanc, list(phantom.instances))
    with pull_node(tmp_path, checkpoint, pull_orthanc, series=SeriesConfig(min_slices=1000)) as node:
        response = pull(node, orthanc_id(pull_orthanc, phantom.series_uid, "Series"))
        assert response.status_code == 422
        assert "fewer than the minimum of 1000" in response.json()["skip_reason"]
        assert node.state.series(phantom.series_uid).status == "skipped" and node.state.list_jobs() == []


def test_pulling_an_unknown_series_is_404_and_with_wrong_credentials_502(
    pull_orthanc: OrthancServer, checkpoint: Path, phantoms: list[PhantomFiles], tmp_path: Path
) -> None:
    with pull_node(tmp_path / "a", checkpoint, pull_orthanc) as node:
        assert pull(node, "00000000-00000000-00000000-00000000-00000000").status_code == 404
    store_in_orthanc(pull_orthanc, list(phantoms[0].instances))
    with pull_node(tmp_path / "b", checkpoint, pull_orthanc, password="wrong") as node:
        response = pull(node, orthanc_id(pull_orthanc, phantoms[0].series_uid, "Series"))
        assert response.status_code == 502 and "HTTP 401" in response.json()["error"]
