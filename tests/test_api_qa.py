"""QA through the HTTP API and the metrics of a real running node: a held job, its verdicts, its release.

The node runs a real checkpoint whose head answers "no nerve" everywhere, so both sides FAIL, with
``[qa] on_fail = "hold"``; the series comes from dcmtk storescu and the results go to dcmtk storescp.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import requests

from ian_node.config import DicomTarget, ExportConfig, QaConfig
from ian_node.net import free_port
from ian_node.storage.records import JobState
from tests.integration.node_harness import (  # noqa: F401 (dcmtk_nodelay is a fixture)
    api_url,
    dcmtk_nodelay,
    node_config,
    running_node,
    small_phantom,
    wait_for,
)
from tests.integration.peers import storescp, storescu
from tests.integration.test_sr_delivery import blind_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("dcmtk_nodelay")]


def test_a_held_job_shows_its_verdicts_counts_in_the_metrics_and_is_delivered_on_retry(tmp_path: Path) -> None:
    port = free_port()
    target = DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=port, timeout_s=5)
    config = node_config(tmp_path, blind_checkpoint(tmp_path / "blind.pt"), export=ExportConfig(targets=(target,)),
                         qa=QaConfig(on_fail="hold"))
    phantom = small_phantom(tmp_path / "phantom", 2)
    with running_node(config) as node, storescp(tmp_path / "pacs", port):
        url = api_url(node)
        _, statuses = storescu(node.scp.port, list(phantom.instances))
        assert statuses == [0] * len(phantom.instances)
        job = wait_for(lambda: next((j for j in node.state.list_jobs() if j.state is JobState.HELD), None), 120,
                       lambda: str(node.state.list_jobs()))

        shown = requests.get(f"{url}/jobs/{job.id}", timeout=10).json()
        assert shown["state"] == "held" and [d["state"] for d in shown["deliveries"]] == ["pending"]
        assert [(q["side"], q["verdict"], q["reasons"]) for q in shown["qa"]] == [
            ("right", "FAIL", ["no nerve found"]), ("left", "FAIL", ["no nerve found"])]
        assert shown["flag"] == "QA FAIL right: no nerve found | QA FAIL left: no nerve found"
        metrics = requests.get(f"{url}/metrics", timeout=10).text.splitlines()
        assert 'ian_node_qa_verdicts{side="left",verdict="FAIL"} 1.0' in metrics
        assert 'ian_node_jobs{state="held"} 1.0' in metrics
        assert not any((tmp_path / "pacs").iterdir())

        released = requests.post(f"{url}/jobs/{job.id}/retry", timeout=10)
        assert released.status_code == 200 and released.json()["state"] == "exporting"
        wait_for(lambda: node.state.job(job.id).state is JobState.DONE, 30, lambda: str(node.state.job(job.id)))
    received = sorted(pydicom.dcmread(p).Modality for p in (tmp_path / "pacs").iterdir())
    assert received == ["SEG", "SR"]
