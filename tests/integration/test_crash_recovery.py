"""SIGKILL of `ian-node serve` at each stage, then a restart: nothing acknowledged is lost, one SEG per series.

Each test kills a real `serve` subprocess (no clean-up runs), checks that the kill landed in the
stage it is about (from the SQLite state), restarts the node on the same state and spool, and counts
what dcmtk's storescp received (every received instance gets its own file there, so a duplicate
delivery would show as a second file).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from ian_node.phantom.study import PhantomConfig, generate_phantom, write_phantom
from ian_node.storage.records import DeliveryState, JobState
from ian_node.storage.state import State
from tests.integration.node_harness import small_phantom, untrained_checkpoint, wait_for
from tests.integration.peers import storescu
from tests.integration.serve_process import Destination, NodeSetup, ServeProcess, sent_statuses, storescu_command

pytestmark = pytest.mark.integration

SUCCESS = 0x0000
JOB_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("model") / "small.pt", size=32, attention=False)


def _wait_for_state(setup: NodeSetup, serve: ServeProcess, series_uid: str, *states: JobState,
                    timeout: float = JOB_TIMEOUT) -> None:
    def reached() -> bool:
        job = setup.job_for(series_uid)
        return job is not None and job.state in states

    wait_for(reached, timeout, lambda: f"{setup.describe()}\n--- serve log ---\n{serve.log_tail()}")


def test_sigkill_mid_receive_loses_no_acknowledged_instance(tmp_path: Path, checkpoint: Path) -> None:
    setup = NodeSetup(tmp_path, checkpoint, quiet_period_s=60.0)  # no job may start in this test
    files = list(small_phantom(tmp_path / "phantom", 30).instances)
    serve = ServeProcess(setup, "first").start()
    sender = subprocess.Popen(storescu_command(setup.port, files), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    output = []
    assert sender.stdout is not None
    for line in sender.stdout:
        output.append(line)
        if len(sent_statuses("".join(output))) >= 8:
            serve.kill()
            break
    rest, _ = sender.communicate(timeout=60)
    statuses = sent_statuses("".join(output) + rest)
    acknowledged = [pydicom.dcmread(f) for f, s in zip(files, statuses, strict=False) if s == SUCCESS]
    assert 8 <= len(acknowledged) < len(files), "the kill did not land while storescu was sending"

    with ServeProcess(setup, "second"):  # recovery runs before the port opens
        with State(setup.state_path) as state:
            stored = {i.sop_instance_uid: i for i in state.instances(acknowledged[0].SeriesInstanceUID)}
        for ds in acknowledged:
            back = pydicom.dcmread(setup.spool_dir / stored[ds.SOPInstanceUID].path)
            assert back.SOPInstanceUID == ds.SOPInstanceUID and back.PixelData == ds.PixelData
        assert not [p for p in setup.spool_dir.rglob("*") if p.name.startswith(".partial")]


def test_sigkill_after_acknowledged_instances_inside_the_quiet_period_still_delivers_one_seg(
    tmp_path: Path, checkpoint: Path
) -> None:
    setup = NodeSetup(tmp_path, checkpoint, quiet_period_s=3.0)
    phantom = small_phantom(tmp_path / "phantom", 31)
    uid = phantom.series_uid
    with Destination(tmp_path / "pacs", setup.dest_port) as dest:
        serve = ServeProcess(setup, "first").start()
        _, statuses = storescu(setup.port, list(phantom.instances))
        serve.kill()
        assert statuses == [SUCCESS] * len(phantom.instances)
        with State(setup.state_path) as state:  # the kill landed inside the quiet period
            series = state.series(uid)
            assert series.awaiting_completion and series.instance_count == len(phantom.instances)
            assert state.list_jobs() == []

        with ServeProcess(setup, "second") as serve:
            _wait_for_state(setup, serve, uid, JobState.DONE)
        (job,) = setup.jobs()
        assert (job.series_version, job.attempts) == (1, 1)
        assert len(dest.segs_for(uid)) == 1


def test_sigkill_mid_job_reruns_the_job_and_delivers_one_seg(tmp_path: Path, checkpoint: Path) -> None:
    setup = NodeSetup(tmp_path, checkpoint)
    phantom = small_phantom(tmp_path / "phantom", 32)
    uid = phantom.series_uid
    with Destination(tmp_path / "pacs", setup.dest_port) as dest:
        serve = ServeProcess(setup, "first").start()
        storescu(setup.port, list(phantom.instances))
        _wait_for_state(setup, serve, uid, JobState.RUNNING, JobState.EXPORTING, JobState.DONE)
        serve.kill()
        assert setup.job_for(uid).state is JobState.RUNNING, "the kill did not land while the job was running"
        assert dest.segs_for(uid) == []

        with ServeProcess(setup, "second") as serve:
            _wait_for_state(setup, serve, uid, JobState.DONE)
        (job,) = setup.jobs()
        assert job.attempts == 2  # the interrupted run and the re-run
        assert len(dest.segs_for(uid)) == 1


def test_sigkill_during_export_redelivers_the_same_seg_once(tmp_path: Path, checkpoint: Path) -> None:
    setup = NodeSetup(tmp_path, checkpoint, max_attempts=100, backoff_s=0.2, max_backoff_s=0.5)
    phantom = small_phantom(tmp_path / "phantom", 33)
    uid = phantom.series_uid
    serve = ServeProcess(setup, "first").start()  # the destination is down
    storescu(setup.port, list(phantom.instances))
    _wait_for_state(setup, serve, uid, JobState.EXPORTING)
    wait_for(lambda: setup.deliveries(setup.job_for(uid).id)[0].attempts >= 2, 30, setup.describe)
    serve.kill()
    job = setup.job_for(uid)
    (delivery,) = setup.deliveries(job.id)
    assert job.state is JobState.EXPORTING and delivery.state is DeliveryState.PENDING
    result_uid = pydicom.dcmread(setup.spool_dir / job.result_path, stop_before_pixels=True).SOPInstanceUID

    with Destination(tmp_path / "pacs", setup.dest_port) as dest:
        with ServeProcess(setup, "second") as serve:
            _wait_for_state(setup, serve, uid, JobState.DONE)
        (seg,) = dest.segs_for(uid)
    assert seg.SOPInstanceUID == result_uid
    (job,) = setup.jobs()
    assert job.attempts == 1  # the stored result was re-delivered, not re-computed


def test_a_job_killed_three_times_while_running_fails_with_its_reason_and_the_queue_goes_on(tmp_path: Path) -> None:
    """A poison series: whatever it does to the node (here: SIGKILL while its job runs), the third
    interruption fails its job on the next start, and the jobs queued behind it and after it run."""
    # A wider model input and a full-size phantom: the poison's job runs for several seconds (about
    # 7 s on one core), so each kill lands while it runs; the small series take about 3 s each.
    slow = untrained_checkpoint(tmp_path / "slow.pt", size=128, attention=False)
    setup = NodeSetup(tmp_path / "node", slow)
    poison = write_phantom(generate_phantom(36, 7, PhantomConfig()), tmp_path / "poison")
    behind, after = small_phantom(tmp_path / "behind", 37), small_phantom(tmp_path / "after", 38)
    with Destination(tmp_path / "pacs", setup.dest_port) as dest:
        serve = ServeProcess(setup, "run-1").start()
        storescu(setup.port, list(poison.instances))
        for run in (1, 2, 3):
            wait_for(lambda run=run: (job := setup.job_for(poison.series_uid)) is not None
                     and job.state is JobState.RUNNING and job.attempts == run, JOB_TIMEOUT,
                     lambda serve=serve: f"{setup.describe()}\n--- serve log ---\n{serve.log_tail()}")
            if run == 2:  # a series queued behind the poison while it runs
                storescu(setup.port, list(behind.instances))
                wait_for(lambda: setup.job_for(behind.series_uid) is not None, 30, setup.describe)
            serve.kill()
            job = setup.job_for(poison.series_uid)
            assert (job.state, job.attempts) == (JobState.RUNNING, run), "the kill did not land while the job ran"
            serve = ServeProcess(setup, f"run-{run + 1}").start()  # recovery runs before the port opens

        job = setup.job_for(poison.series_uid)
        assert (job.state, job.attempts, job.error) == (JobState.FAILED, 3, "interrupted 3 times while running")
        _wait_for_state(setup, serve, behind.series_uid, JobState.DONE)
        storescu(setup.port, list(after.instances))
        _wait_for_state(setup, serve, after.series_uid, JobState.DONE)
        serve.stop()
        assert dest.segs_for(poison.series_uid) == []
        assert len(dest.segs_for(behind.series_uid)) == 1 and len(dest.segs_for(after.series_uid)) == 1
    assert setup.job_for(behind.series_uid).attempts == 1  # never claimed until the poison was out of the way
