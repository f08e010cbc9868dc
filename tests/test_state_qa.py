"""Each job's QA, its result files and the held state: the version 4 schema, its migration, hold and release."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ian_node.segment.qa import SideQA, Verdict
from ian_node.storage.records import DeliveryState, JobOutcome, JobState, StateError
from ian_node.storage.schema import MIGRATIONS, SCHEMA_VERSION
from ian_node.storage.state import State
from tests.test_state_crop import CONFIG_REQUEST, SCHEMA_V2, SERIES, _queued_job

QA = (SideQA("right", Verdict.PASS, (), 0, 0.0, 1, 41.5, 0.81, 0.9),
      SideQA("left", Verdict.FAIL, ("tract broken: 2 gaps, longest 11.0 mm",), 2, 11.0, 3, 18.0, 0.44, 0.9))
RESULTS = ["results/job-1.dcm", "results/job-1-sr.dcm"]


@pytest.fixture()
def state(tmp_path: Path) -> State:
    with State(tmp_path / "state.sqlite3") as st:
        yield st


def _segmented(state: State, qa: tuple[SideQA, ...] = QA) -> int:
    job_id = _queued_job(state)
    state.claim_next_job()
    state.record_segmentation(job_id, crop_request=CONFIG_REQUEST, crop=None, outcome=JobOutcome.SEGMENTED,
                              qa=[q.as_json() for q in qa])
    return job_id


def test_a_version_3_state_migrates_keeping_jobs_results_and_deliveries(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_V2 + MIGRATIONS[3] + "PRAGMA user_version = 3;")
        db.execute("INSERT INTO series (series_uid, study_uid, modality, description, calling_ae, peer_host, status,"
                   " first_received_at, last_received_at) VALUES (?, '1.2.3', 'MR', '', 'PACS', '', 'selected', 1, 1)",
                   (SERIES,))
        db.execute("INSERT INTO jobs (series_uid, series_version, state, result_path, created_at, updated_at, flag)"
                   " VALUES (?, 1, 'exporting', 'results/job-1.dcm', 1, 1, 'a flag')", (SERIES,))
        db.execute("INSERT INTO deliveries (job_id, target, state, next_attempt_at) VALUES (1, 'pacs', 'pending', 1)")
    with State(path) as state:
        (job,) = state.list_jobs()
        assert (job.state, job.flag, job.qa) == (JobState.EXPORTING, "a flag", None)
        assert job.result_paths == ("results/job-1.dcm",)
        assert [d.target for d in state.due_deliveries(2.0)] == ["pacs"]
        assert state.delivery_succeeded(job.id, "pacs").state is JobState.DONE
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        db.execute("PRAGMA foreign_keys = ON")
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            db.execute("INSERT INTO deliveries (job_id, target, state) VALUES (99, 'pacs', 'pending')")
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            db.execute("UPDATE jobs SET state = 'paused'")


def test_qa_is_recorded_per_side_and_cleared_when_the_job_runs_again(state: State) -> None:
    job_id = _segmented(state)
    job = state.job(job_id)
    assert [q["verdict"] for q in job.qa] == ["PASS", "FAIL"]
    assert job.qa[1]["reasons"] == ["tract broken: 2 gaps, longest 11.0 mm"] and job.qa[1]["longest_gap_mm"] == 11.0
    state.fail_job(job_id, "export crashed")
    state.retry_job(job_id)
    assert state.claim_next_job().qa is None


def test_qa_counts_are_by_side_and_verdict_over_every_job(state: State) -> None:
    _segmented(state)
    job_id = _queued_job(state, series=SERIES + ".2")
    state.claim_next_job()
    state.record_segmentation(job_id, crop_request=CONFIG_REQUEST, crop=None, outcome=JobOutcome.SEGMENTED,
                              qa=[QA[0].as_json(), {**QA[0].as_json(), "side": "left"}])
    assert state.qa_counts() == {("right", "PASS"): 2, ("left", "FAIL"): 1, ("left", "PASS"): 1}


def test_every_result_file_is_recorded_with_the_seg_first(state: State) -> None:
    job_id = _segmented(state)
    job = state.mark_job_exporting(job_id, RESULTS, ["pacs"])
    assert (job.state, job.result_path, job.result_paths) == (JobState.EXPORTING, RESULTS[0], tuple(RESULTS))


def test_a_held_job_keeps_its_deliveries_pending_but_not_due_until_released(state: State) -> None:
    job_id = _segmented(state)
    held = state.mark_job_exporting(job_id, RESULTS, ["pacs", "orthanc"], hold=True)
    assert held.state is JobState.HELD and held.finished_at is None
    assert state.due_deliveries(1e12) == [] and state.next_delivery_at() is None
    assert state.list_jobs(JobState.HELD) == [held]
    released = state.retry_job(job_id)
    assert released.state is JobState.EXPORTING
    assert sorted(d.target for d in state.due_deliveries()) == ["orthanc", "pacs"]
    state.delivery_succeeded(job_id, "pacs")
    assert state.delivery_succeeded(job_id, "orthanc").state is JobState.DONE


def test_a_held_job_stays_held_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with State(path) as before:
        job_id = _segmented(before)
        before.mark_job_exporting(job_id, RESULTS, ["pacs"], hold=True)
    with State(path) as after:
        recovery = after.recover()
        assert job_id not in recovery.exporting_jobs + recovery.requeued_jobs + recovery.failed_jobs
        assert after.job(job_id).state is JobState.HELD
        assert after.due_deliveries(1e12) == []
        assert [d.state for d in after.deliveries(job_id)] == [DeliveryState.PENDING]


def test_a_held_job_with_no_target_is_done_when_released(state: State) -> None:
    job_id = _segmented(state)
    assert state.mark_job_exporting(job_id, RESULTS, [], hold=True).state is JobState.HELD
    assert state.retry_job(job_id).state is JobState.DONE


def test_a_held_job_cannot_be_given_a_new_crop(state: State) -> None:
    job_id = _segmented(state)
    state.mark_job_exporting(job_id, RESULTS, ["pacs"], hold=True)
    with pytest.raises(StateError, match="has a result"):
        state.retry_job(job_id, {"mode": "auto", "right": None, "left": None, "source": "api"})
    assert state.job(job_id).state is JobState.HELD


def test_a_result_needs_a_file(state: State) -> None:
    job_id = _segmented(state)
    with pytest.raises(ValueError, match="at least one file"):
        state.mark_job_exporting(job_id, [], ["pacs"])
