"""The SQLite state: instances counted once, one job per series version, job and delivery transitions."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from ian_node.storage.records import DeliveryState, JobState, ReceivedInstance, SeriesState, StateError
from ian_node.storage.state import State

SERIES = "1.2.826.0.1.3680043.8.498.10"


class Clock:
    """A settable clock, so that retry times are exact."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def state(tmp_path: Path, clock: Clock) -> State:
    with State(tmp_path / "state.sqlite3", clock=clock) as st:
        yield st


def _instance(n: int, sha: str = "same", series: str = SERIES, frames: int = 1) -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=f"{series}.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.4", series_uid=series,
        study_uid="1.2.3", transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"instances/{series}/{series}.{n}.dcm",
        size=10, sha256=sha, frames=frames, instance_number=n, modality="MR", calling_ae="PACS", peer_host="127.0.0.1",
    )


def _queued_job(state: State, series: str = SERIES, count: int = 1) -> int:
    for n in range(count):
        state.record_instance(_instance(n, series=series))
    s = state.series(series)
    settled = state.settle_series(series, s.last_received_at, None)
    assert settled.job is not None
    return settled.job.id


def test_database_runs_in_wal_mode(state: State) -> None:
    with sqlite3.connect(state.path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_resent_instance_replaces_the_old_one_and_counts_once(state: State) -> None:
    first = state.record_instance(_instance(1))
    again = state.record_instance(_instance(1))
    assert first.new_instance and not again.new_instance and not again.changed
    series = state.series(SERIES)
    assert (series.instance_count, series.slice_count, series.version) == (1, 1, 1)
    assert state.instances(SERIES)[0].times_received == 2
    assert state.instances_received() == 2


def test_slices_count_frames_of_multiframe_instances(state: State) -> None:
    state.record_instance(_instance(1, frames=40))
    state.record_instance(_instance(2))
    assert state.series(SERIES).slice_count == 41


def test_settling_a_series_twice_creates_one_job(state: State) -> None:
    state.record_instance(_instance(1))
    seen = state.series(SERIES).last_received_at
    first = state.settle_series(SERIES, seen, None)
    second = state.settle_series(SERIES, seen, None)
    assert first.job is not None and first.job.series_version == 1
    assert second.applied and second.job is None
    assert len(state.list_jobs()) == 1


def test_settling_is_ignored_when_an_instance_arrived_after_the_timer_looked(state: State, clock: Clock) -> None:
    state.record_instance(_instance(1))
    seen = state.series(SERIES).last_received_at
    clock.now += 1
    state.record_instance(_instance(2))
    assert not state.settle_series(SERIES, seen, None).applied
    assert state.list_jobs() == [] and state.series(SERIES).awaiting_completion


def test_series_growing_after_its_job_gets_a_new_version_and_job(state: State, clock: Clock) -> None:
    _queued_job(state)
    clock.now += 1
    outcome = state.record_instance(_instance(2))
    assert outcome.series_version == 2
    clock.now += 1
    state.record_instance(_instance(3))  # still version 2: its job does not exist yet
    settled = state.settle_series(SERIES, state.series(SERIES).last_received_at, None)
    assert settled.job is not None and settled.job.series_version == 2
    assert [j.series_version for j in state.list_jobs()] == [2, 1]


def test_a_job_does_not_see_a_later_versions_row_until_its_file_is_confirmed(state: State) -> None:
    _queued_job(state)
    arriving = state.record_instance(replace(_instance(2), file_durable=False))  # its file is being written
    assert arriving.series_version == 2 and arriving.confirm_token is not None
    assert [i.sop_instance_uid for i in state.instances(SERIES, for_version=1)] == [f"{SERIES}.0"]
    assert len(state.instances(SERIES)) == 2
    state.confirm_instances([(arriving.sop_instance_uid, arriving.confirm_token)])
    assert len(state.instances(SERIES, for_version=1)) == 2


def test_identical_resend_after_the_job_creates_no_new_version(state: State) -> None:
    _queued_job(state)
    assert state.record_instance(_instance(0)).series_version == 1
    settled = state.settle_series(SERIES, state.series(SERIES).last_received_at, None)
    assert settled.applied and settled.job is None


def test_resend_with_changed_content_after_the_job_creates_a_new_version(state: State) -> None:
    _queued_job(state)
    assert state.record_instance(_instance(0, sha="different")).series_version == 2


def test_skipped_series_records_reason_and_purge_returns_its_files(state: State) -> None:
    state.record_instance(_instance(1))
    state.record_instance(_instance(2))
    settled = state.settle_series(SERIES, state.series(SERIES).last_received_at, "too few", purge=True)
    assert settled.applied and settled.job is None
    assert sorted(settled.purged) == sorted((i.sop_instance_uid, i.path) for i in (_instance(1), _instance(2)))
    series = state.series(SERIES)
    assert (series.status, series.status_reason, series.instance_count) == ("skipped", "too few", 0)


def test_listing_skipped_series_shows_each_with_its_reason(state: State) -> None:
    state.record_instance(_instance(1))
    state.settle_series(SERIES, state.series(SERIES).last_received_at, "ImageType LOCALIZER")
    state.record_instance(_instance(2, series=f"{SERIES}.2"))
    state.settle_series(f"{SERIES}.2", state.series(f"{SERIES}.2").last_received_at, None)
    skipped = state.list_series(SeriesState.SKIPPED)
    assert [(s.series_uid, s.status_reason) for s in skipped] == [(SERIES, "ImageType LOCALIZER")]
    assert {s.series_uid for s in state.list_series()} == {SERIES, f"{SERIES}.2"}


def test_claim_takes_queued_jobs_in_order(state: State) -> None:
    ids = [_queued_job(state, series=f"{SERIES}.{i}") for i in range(3)]
    claimed = [state.claim_next_job() for _ in range(3)]
    assert [j.id for j in claimed] == ids
    assert all(j.state is JobState.RUNNING and j.attempts == 1 for j in claimed)
    assert state.claim_next_job() is None


def test_concurrent_claims_never_hand_out_a_job_twice(state: State) -> None:
    ids = {_queued_job(state, series=f"{SERIES}.{i}") for i in range(40)}
    claimed: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        while (job := state.claim_next_job()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)


def test_job_with_no_targets_is_done_once_its_result_is_stored(state: State) -> None:
    job_id = _queued_job(state)
    state.claim_next_job()
    assert state.mark_job_exporting(job_id, "results/job-1.dcm", []).state is JobState.DONE


def test_job_is_done_only_when_every_target_confirmed(state: State, clock: Clock) -> None:
    job_id = _queued_job(state)
    state.claim_next_job()
    state.mark_job_exporting(job_id, "results/job-1.dcm", ["pacs", "orthanc"])
    assert {d.target for d in state.due_deliveries()} == {"pacs", "orthanc"}
    assert state.delivery_succeeded(job_id, "pacs").state is JobState.EXPORTING
    job = state.delivery_failed(job_id, "orthanc", "connection refused", retry_at=clock.now + 5)
    assert job.state is JobState.EXPORTING
    assert state.due_deliveries() == [] and state.next_delivery_at() == clock.now + 5
    clock.now += 5
    assert [d.target for d in state.due_deliveries()] == ["orthanc"]
    assert state.delivery_succeeded(job_id, "orthanc").state is JobState.DONE
    orthanc = [d for d in state.deliveries(job_id) if d.target == "orthanc"][0]
    assert (orthanc.state, orthanc.attempts, orthanc.delivered_at) == (DeliveryState.DELIVERED, 2, clock.now)


def test_delivery_failed_for_good_fails_the_job_and_retry_redelivers(state: State) -> None:
    job_id = _queued_job(state)
    state.claim_next_job()
    state.mark_job_exporting(job_id, "results/job-1.dcm", ["pacs"])
    job = state.delivery_failed(job_id, "pacs", "association rejected", retry_at=None)
    assert job.state is JobState.FAILED and "pacs: association rejected" in job.error
    assert state.deliveries(job_id)[0].state is DeliveryState.FAILED
    retried = state.retry_job(job_id)
    assert retried.state is JobState.EXPORTING and retried.error is None
    delivery = state.deliveries(job_id)[0]
    assert (delivery.state, delivery.attempts) == (DeliveryState.PENDING, 0)


def test_retry_of_a_job_that_failed_while_running_requeues_it(state: State) -> None:
    job_id = _queued_job(state)
    state.claim_next_job()
    assert state.fail_job(job_id, "SeriesGeometryError: slice 3 tilted").state is JobState.FAILED
    assert state.retry_job(job_id).state is JobState.QUEUED
    assert state.claim_next_job().id == job_id


def test_transition_from_the_wrong_state_raises_state_error(state: State) -> None:
    job_id = _queued_job(state)
    with pytest.raises(StateError, match="is queued, expected running"):
        state.mark_job_exporting(job_id, "results/job-1.dcm", [])
    with pytest.raises(StateError, match="expected failed"):
        state.retry_job(job_id)
    with pytest.raises(StateError, match="does not exist"):
        state.fail_job(999, "x")


def test_recover_after_a_crash_requeues_running_jobs_and_keeps_pending_work(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "state.sqlite3"
    with State(path, clock=clock) as before:
        running = _queued_job(before, series=f"{SERIES}.1")
        exporting = _queued_job(before, series=f"{SERIES}.2")
        before.claim_next_job()
        before.claim_next_job()
        before.mark_job_exporting(exporting, "results/job-2.dcm", ["pacs"])
        before.record_instance(_instance(1, series=f"{SERIES}.3"))
    with State(path, clock=clock) as after:  # a new process after the crash
        recovery = after.recover()
        assert recovery.requeued_jobs == (running,) and recovery.exporting_jobs == (exporting,)
        assert [s.series_uid for s in recovery.awaiting_series] == [f"{SERIES}.3"]
        assert after.job(running).state is JobState.QUEUED
        assert [d.job_id for d in after.due_deliveries()] == [exporting]


def test_recover_fails_a_job_that_was_interrupted_too_often(state: State) -> None:
    job_id = _queued_job(state)
    for _ in range(3):
        state.claim_next_job()
        state.recover(max_job_attempts=3)
    job = state.job(job_id)
    assert job.state is JobState.FAILED and "interrupted 3 times" in job.error


def test_state_written_by_another_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StateError, match="schema version 99"):
        State(path)
