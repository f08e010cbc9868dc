"""Routing over the network: dcmtk storescu sends from a calling AE into the node, dcmtk storescp
instances are the targets, and each result arrives only at the targets whose rules match.

One node (untrained small model, crop halves, 1 s quiet period) with:

- ``mod1``: C-STORE to storescp A, only for series from calling AE MODALITY1;
- ``nerve``: C-STORE to storescp B, only MR series whose description matches "nerve";
- ``ct``: C-STORE to storescp C, only CT (never an MR result);
- ``back``: ``kind = "sender"``: back to the sending AE, MODALITY1 mapped to storescp D;
- ``web``: STOW-RS to a real Orthanc, only for calling AE NOBODY: it gets the result of a series
  pulled from it (POST /jobs) and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from ian_node.app.node import Node
from ian_node.config import DicomTarget, ExportConfig, SenderAE, SenderTarget, StowRsTarget
from ian_node.net import free_port
from ian_node.phantom.study import PhantomFiles
from ian_node.storage.records import Job, JobState
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
from tests.integration.peers import storescp, storescu

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("dcmtk_nodelay")]

JOB_TIMEOUT = 120.0
DESTINATIONS = ("mod1", "nerve", "ct", "back")


@dataclass
class Routed:
    node: Node
    folders: dict[str, Path]
    orthanc: OrthancServer
    root: Path

    def studies_at(self, name: str) -> set[str]:
        """The StudyInstanceUIDs of the results a storescp target received."""
        return {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                for p in self.folders[name].iterdir() if p.is_file()}

    def finished(self, series_uid: str) -> Job:
        def done() -> Job | None:
            jobs = self.node.state.jobs_of_series(series_uid)
            return jobs[0] if jobs and jobs[0].state in (JobState.DONE, JobState.FAILED) else None
        return wait_for(done, JOB_TIMEOUT, lambda: str(self.node.state.jobs_of_series(series_uid)))


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    root = tmp_path_factory.mktemp("routing")
    ports = {name: free_port() for name in DESTINATIONS}
    folders = {name: root / name for name in DESTINATIONS}
    with orthanc_server(root / "orthanc") as orthanc, \
            storescp(folders["mod1"], ports["mod1"], "DEST_A"), storescp(folders["nerve"], ports["nerve"], "DEST_B"), \
            storescp(folders["ct"], ports["ct"], "DEST_C"), storescp(folders["back"], ports["back"], "MODALITY1"):
        targets = (
            DicomTarget(name="mod1", ae_title="DEST_A", host="127.0.0.1", port=ports["mod1"],
                        match_calling_ae=("MODALITY1",)),
            DicomTarget(name="nerve", ae_title="DEST_B", host="127.0.0.1", port=ports["nerve"],
                        match_modality=("MR",), match_series_description="nerve"),
            DicomTarget(name="ct", ae_title="DEST_C", host="127.0.0.1", port=ports["ct"], match_modality=("CT",)),
            SenderTarget(name="back", senders=(SenderAE(ae_title="MODALITY1", host="127.0.0.1", port=ports["back"]),)),
            StowRsTarget(name="web", url=orthanc.dicomweb_url, username=orthanc.username, password=orthanc.password,
                         match_calling_ae=("NOBODY",)),
        )
        checkpoint = untrained_checkpoint(root / "small.pt", size=32, attention=False)
        config = node_config(root / "node", checkpoint, export=ExportConfig(targets=targets, max_attempts=2,
                                                                          backoff_s=0.2, max_backoff_s=0.2))
        with running_node(config) as node:
            yield Routed(node, folders, orthanc, root)


def _send(routed: Routed, patient: int, calling: str) -> PhantomFiles:
    files = small_phantom(routed.root / f"phantom-{patient}", patient)
    _, statuses = storescu(routed.node.scp.port, list(files.instances), calling=calling)
    assert statuses == [0] * len(files.instances)
    return files


def test_a_series_from_modality1_reaches_its_rule_targets_and_goes_back_to_the_sender(routed: Routed) -> None:
    files = _send(routed, 0, "MODALITY1")
    job = routed.finished(files.series_uid)
    assert job.state is JobState.DONE, job.error
    assert sorted(d.target for d in routed.node.state.deliveries(job.id)) == ["back", "mod1", "nerve"]
    for name in ("mod1", "nerve", "back"):
        assert files.study_uid in routed.studies_at(name), name
    assert files.study_uid not in routed.studies_at("ct")


def test_a_series_from_an_unmapped_sender_is_refused_back_and_delivered_by_the_other_rules(routed: Routed) -> None:
    files = _send(routed, 1, "MODALITY2")
    job = routed.finished(files.series_uid)
    deliveries = {d.target: d for d in routed.node.state.deliveries(job.id)}
    assert sorted(deliveries) == ["back", "nerve"]
    assert deliveries["back"].attempts == 1  # refused, not retried
    assert "'MODALITY2' is not in the senders of target 'back'" in deliveries["back"].last_error
    assert job.state is JobState.FAILED and "MODALITY2" in job.error
    assert files.study_uid in routed.studies_at("nerve")
    assert all(files.study_uid not in routed.studies_at(n) for n in ("mod1", "ct", "back"))


def test_a_pulled_series_goes_back_to_its_source_whatever_its_rules(routed: Routed) -> None:
    files = small_phantom(routed.root / "phantom-2", 2)
    _, statuses = storescu(routed.orthanc.dicom_port, list(files.instances), called=routed.orthanc.aet)
    assert statuses == [0] * len(files.instances)
    request = {"source": "dicomweb", "url": routed.orthanc.dicomweb_url, "study_uid": files.study_uid,
               "series_uid": files.series_uid}
    response = post_json(f"{api_url(routed.node)}/jobs", request)
    assert response.status_code == 201, response.text
    job = routed.finished(files.series_uid)
    assert job.state is JobState.DONE, job.error
    assert sorted(d.target for d in routed.node.state.deliveries(job.id)) == ["nerve", "web"]
    seg_uid = pydicom.dcmread(routed.node.spool.path(job.result_path), stop_before_pixels=True).SOPInstanceUID
    assert routed.orthanc.find_instance(seg_uid) is not None
    assert files.study_uid in routed.studies_at("nerve")
    assert all(files.study_uid not in routed.studies_at(n) for n in ("mod1", "ct", "back"))
