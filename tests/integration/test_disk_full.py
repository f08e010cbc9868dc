"""A full disk, for real: the spool on a size-limited tmpfs this test mounts, a real series from dcmtk's
storescu over loopback, the node in-process as `serve` wires it (ian_node.app.node.Node).

Below the spool's minimum free space (storage.min_free_bytes / storage.min_free_percent) new
instances get 0xA700 and leave nothing behind (no file, no temporary, no row); the node stays up, says
why once (one WARNING, metrics), still writes and delivers the results of series it holds, and takes
instances again as soon as space is freed, with no restart. The tmpfs is sized from the configured
minimum, so it holds only a few MiB of real data. Mounting needs root (CAP_SYS_ADMIN): elsewhere the
test skips, saying so.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pydicom
import pytest
import requests

from ian_node.config import DicomTarget, ExportConfig, SeriesConfig, StorageConfig
from ian_node.net import free_port
from ian_node.receive.counters import SpaceRefusals
from ian_node.storage.records import JobState
from tests.integration.node_harness import (  # noqa: F401 (dcmtk_nodelay is a fixture)
    api_url,
    dcmtk_nodelay,
    node_config,
    running_node,
    small_phantom,
    untrained_checkpoint,
    wait_for,
)
from tests.integration.peers import echoscu, storescu, tiny_tmpfs
from tests.integration.serve_process import DEST_AE, Destination

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("dcmtk_nodelay")]

SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700
#: Seconds a small job may take on a loaded 2-core CI machine.
JOB_TIMEOUT = 90.0
#: The tmpfs: the node's default minimum free space plus this much room for real data.
ROOM = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("model") / "small.pt", size=32, attention=False)


def _metrics(url: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {m[0]: float(m[1]) for m in re.findall(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.MULTILINE)}


def _space_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "refused with 0xA700" in r.getMessage()]


def _seg_of_whole_series(dest: Destination, series_uid: str, count: int) -> bool:
    """Whether a SEG referencing all ``count`` instances of the series has arrived."""
    return any(len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == count
               for seg in dest.segs_for(series_uid))


def test_a_spool_below_its_minimum_refuses_with_a700_leaves_nothing_and_resumes_once_space_is_freed(
    tmp_path: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ian_node")
    first, second = small_phantom(tmp_path / "first", patient=0), small_phantom(tmp_path / "second", patient=1)
    second_uid = str(pydicom.dcmread(second.instances[0]).SeriesInstanceUID)
    first_uid = str(pydicom.dcmread(first.instances[0]).SeriesInstanceUID)
    sop_uids = [str(pydicom.dcmread(p).SOPInstanceUID) for p in second.instances]
    size_kib = (StorageConfig().min_free_bytes + ROOM) // 1024
    with tiny_tmpfs(size_kib) as mount, Destination(tmp_path / "pacs", free_port()) as dest:
        target = DicomTarget(name="pacs", ae_title=DEST_AE, host="127.0.0.1", port=dest.port)
        # The service's default minimum (the harness's smaller one is replaced): 1 GiB, or 5 % of the file
        # system if that were more.
        storage = StorageConfig(spool_dir=mount / "data" / "spool", state_path=mount / "data" / "state.sqlite3")
        config = node_config(mount / "data", checkpoint, export=ExportConfig(targets=(target,)),
                             series=SeriesConfig(quiet_period_s=1.0), storage=storage)
        with running_node(config) as node:
            url, port = api_url(node), node.scp.port
            _, statuses = storescu(port, list(first.instances))
            assert statuses == [SUCCESS] * len(first.instances)

            # Fill the disk: leave room above the minimum for about half of the second series.
            space = node.spool.free_space()
            assert space.total_bytes == size_kib * 1024 and space.free_bytes - space.min_free_bytes > ROOM // 2
            half = sum(p.stat().st_size for p in second.instances) // 2
            ballast = mount / "ballast"
            ballast.write_bytes(bytes(space.free_bytes - space.min_free_bytes - half))

            _, statuses = storescu(port, list(second.instances))
            stored = statuses.count(SUCCESS)
            assert 0 < stored < len(statuses) == len(sop_uids)
            assert statuses == [SUCCESS] * stored + [OUT_OF_RESOURCES] * (len(statuses) - stored)
            refused = len(statuses) - stored

            # Nothing half-written: no row, no file, no temporary for any refused instance.
            assert {i.sop_instance_uid for i in node.state.instances(second_uid)} == set(sop_uids[:stored])
            assert all(node.state.instance_path(uid) is None for uid in sop_uids[stored:])
            series_folder = node.spool.root / "instances" / second_uid
            assert sorted(p.name for p in series_folder.iterdir()) == sorted(f"{u}.dcm" for u in sop_uids[:stored])
            assert list(mount.rglob(".partial-*")) == []

            # The node is up and says why: one WARNING for the burst, and the metrics.
            health = requests.get(f"{url}/health", timeout=10)
            assert health.status_code == 200 and health.json()["status"] == "ok"
            assert echoscu(port).returncode == 0
            (warning,) = _space_warnings(caplog)
            assert "the spool's file system has " in warning and " free (" in warning
            assert f"below the minimum of 1.0 GiB ({space.min_free_bytes} bytes: the larger of " in warning
            assert warning.endswith("such refusals are logged at most once a minute")
            metrics = _metrics(url)
            assert metrics['ian_node_refusals_total{reason="disk_full"}'] == refused
            assert metrics['ian_node_store_failures_total{status="0xA700"}'] == refused
            assert metrics["ian_node_spool_free_bytes"] < metrics["ian_node_spool_min_free_bytes"]
            assert metrics["ian_node_spool_min_free_bytes"] == space.min_free_bytes

            # Results are written into the space kept: the first series' SEG is delivered, disk still low.
            wait_for(lambda: dest.segs_for(first_uid), JOB_TIMEOUT, "the first series' SEG while the disk is low")
            assert node.spool.free_space().low

            # Space freed: the same series is taken whole, with no restart, and its SEG is delivered.
            ballast.unlink()
            _, statuses = storescu(port, list(second.instances))
            assert statuses == [SUCCESS] * len(sop_uids)
            assert node.state.series(second_uid).instance_count == len(sop_uids)
            wait_for(lambda: _seg_of_whole_series(dest, second_uid, len(sop_uids)), 2 * JOB_TIMEOUT,
                     lambda: f"the whole second series' SEG; jobs: {node.state.list_jobs()}")
            newest = wait_for(lambda: [j for j in node.state.jobs_of_series(second_uid)[-1:]
                                       if j.state is JobState.DONE], 30, "the newest job's delivery confirmed")[0]
            assert newest.series_version == node.state.series(second_uid).version
            notices = [r.getMessage() for r in caplog.records if "stored again" in r.getMessage()]
            assert notices and notices[0].startswith(f"C-STOREs are stored again after {refused} refused for lack")
            assert len(_space_warnings(caplog)) == 1
            metrics = _metrics(url)
            assert metrics["ian_node_spool_free_bytes"] >= metrics["ian_node_spool_min_free_bytes"]
            assert list(mount.rglob(".partial-*")) == []


def test_refusals_for_lack_of_space_are_logged_once_then_at_most_once_per_interval() -> None:
    now = [0.0]
    rule = SpaceRefusals(interval_s=60.0, clock=lambda: now[0])
    assert rule.stored() is None  # nothing refused yet: no line
    assert [rule.refused() for _ in range(3)] == [0, None, None]  # the first at WARNING, the burst not
    now[0] = 61.0
    assert rule.refused() == 2  # one more WARNING, counting the two not logged
    assert rule.stored() == 4 and rule.stored() is None  # the run ends: one line with its count
    now[0] = 70.0
    assert rule.refused() is None and rule.stored() is None  # a short run within the interval: no line
    now[0] = 125.0
    assert rule.refused() == 1  # ...its refusal is counted in the next WARNING
