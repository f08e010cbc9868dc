"""Each job's crop in the state: the version 3 columns, their migration, and how claims and retries treat them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ian_node.storage.records import JobOutcome, JobState, ReceivedInstance, StateError
from ian_node.storage.schema import SCHEMA_VERSION
from ian_node.storage.state import State

SERIES = "1.2.826.0.1.3680043.8.498.20"
BOXES = {"right": [[-60.0, -5.0], [-40.0, 30.0], [-80.0, -20.0]], "left": [[5.0, 60.0], [-40.0, 30.0], [-80.0, -20.0]]}
API_REQUEST = {"mode": "box", **BOXES, "source": "api"}
CONFIG_REQUEST = {"mode": "auto", "right": None, "left": None, "source": "config"}
CROP_USED = {"right": {"mode": "auto", "box_mm": None, "confidence": 0.02},
             "left": {"mode": "auto", "box_mm": None, "confidence": 0.0}}
PROBLEM = "no mandible region found (right confidence 0.02, left confidence 0.00; threshold 0.50)"

#: The schema of version 2 (before issue 14), as a node of that version created it.
SCHEMA_V2 = """
CREATE TABLE series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    description TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    peer_host TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    awaiting_completion INTEGER NOT NULL DEFAULT 1,
    status TEXT NOT NULL DEFAULT 'receiving' CHECK (status IN ('receiving', 'selected', 'skipped')),
    status_reason TEXT,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL
);
CREATE TABLE instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL REFERENCES series (series_uid),
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    instance_number INTEGER,
    frames INTEGER NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    received_at REAL NOT NULL,
    times_received INTEGER NOT NULL DEFAULT 1,
    series_version INTEGER,
    unconfirmed INTEGER
);
CREATE INDEX instances_by_series ON instances (series_uid);
CREATE INDEX instances_unconfirmed ON instances (unconfirmed) WHERE unconfirmed IS NOT NULL;
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL REFERENCES series (series_uid),
    series_version INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'exporting', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result_path TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL,
    UNIQUE (series_uid, series_version)
);
CREATE INDEX jobs_by_state ON jobs (state, id);
CREATE TABLE deliveries (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    target TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    last_error TEXT,
    delivered_at REAL,
    PRIMARY KEY (job_id, target)
);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters VALUES ('instances_received', 0);
"""


def _instance(n: int, series: str = SERIES) -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=f"{series}.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.4", series_uid=series,
        study_uid="1.2.3", transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"instances/{series}/{series}.{n}.dcm",
        size=10, sha256="same", instance_number=n, modality="MR", calling_ae="PACS", peer_host="127.0.0.1",
    )


def _queued_job(state: State, series: str = SERIES, crop_request: dict | None = None) -> int:
    state.record_instance(_instance(1, series))
    settled = state.settle_series(series, state.series(series).last_received_at, None, crop_request=crop_request)
    assert settled.job is not None
    return settled.job.id


@pytest.fixture()
def state(tmp_path: Path) -> State:
    with State(tmp_path / "state.sqlite3") as st:
        yield st


def test_a_version_2_state_migrates_keeping_its_jobs_which_gain_empty_crop_columns(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_V2 + "PRAGMA user_version = 2;")
        db.execute("INSERT INTO series (series_uid, study_uid, modality, description, calling_ae, peer_host, status,"
                   " first_received_at, last_received_at) VALUES (?, '1.2.3', 'MR', '', 'PACS', '', 'selected', 1, 1)",
                   (SERIES,))
        db.execute("INSERT INTO jobs (series_uid, series_version, state, error, created_at, updated_at)"
                   " VALUES (?, 1, 'failed', 'old failure', 1, 1)", (SERIES,))
    with State(path) as state:
        (job,) = state.list_jobs()
        assert (job.state, job.error) == (JobState.FAILED, "old failure")
        assert (job.crop_request, job.crop, job.outcome, job.flag, job.voxels, job.timings) == (None,) * 6
        assert state.retry_job(job.id, API_REQUEST).crop_request == API_REQUEST
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            db.execute("UPDATE jobs SET outcome = 'maybe'")


def test_a_pull_crop_request_is_stored_with_the_new_job_and_survives_claims(state: State) -> None:
    job_id = _queued_job(state, crop_request=API_REQUEST)
    queued = state.job(job_id)
    assert queued.crop_request == API_REQUEST and queued.api_crop_request == API_REQUEST
    assert state.claim_next_job().api_crop_request == API_REQUEST


def test_a_configured_crop_request_is_not_the_jobs_own(state: State) -> None:
    job_id = _queued_job(state)
    assert state.job(job_id).crop_request is None
    state.claim_next_job()
    job = state.record_segmentation(job_id, crop_request=CONFIG_REQUEST, crop=CROP_USED, outcome=JobOutcome.SEGMENTED)
    assert job.crop_request == CONFIG_REQUEST and job.api_crop_request is None


def test_no_region_is_recorded_as_a_failed_job_with_its_crop_outcome_and_flag(state: State) -> None:
    job_id = _queued_job(state)
    state.claim_next_job()
    state.record_segmentation(job_id, crop_request=CONFIG_REQUEST, crop=CROP_USED, outcome=JobOutcome.NO_REGION,
                              flag=PROBLEM, timings={"load": 0.5, "localise": 0.25})
    job = state.fail_job(job_id, f"series {SERIES}: {PROBLEM}")
    assert (job.state, job.outcome, job.flag) == (JobState.FAILED, JobOutcome.NO_REGION, PROBLEM)
    assert job.crop == CROP_USED and job.timings == {"load": 0.5, "localise": 0.25} and job.voxels is None
    assert state.outcome_counts() == {JobOutcome.SEGMENTED: 0, JobOutcome.NO_REGION: 1,
                                      JobOutcome.SEGMENTED_NO_REGION: 0}


def test_retrying_a_no_region_job_with_boxes_requeues_it_with_them_and_clears_the_last_run(state: State) -> None:
    job_id = _queued_job(state)
    state.claim_next_job()
    state.record_segmentation(job_id, crop_request=CONFIG_REQUEST, crop=CROP_USED, outcome=JobOutcome.NO_REGION,
                              flag=PROBLEM)
    state.fail_job(job_id, PROBLEM)
    assert state.retry_job(job_id, API_REQUEST).state is JobState.QUEUED
    claimed = state.claim_next_job()
    assert claimed.api_crop_request == API_REQUEST
    assert (claimed.crop, claimed.outcome, claimed.flag, claimed.error) == (None, None, None, None)


def test_a_job_with_a_result_cannot_be_given_a_new_crop_by_a_retry(state: State) -> None:
    job_id = _queued_job(state)
    state.claim_next_job()
    state.record_segmentation(job_id, crop_request=CONFIG_REQUEST, crop=CROP_USED,
                              outcome=JobOutcome.SEGMENTED_NO_REGION, flag=PROBLEM, voxels={"right": 3, "left": 0})
    state.mark_job_exporting(job_id, "results/job-1.dcm", ["pacs"])
    state.delivery_failed(job_id, "pacs", "association rejected", retry_at=None)
    with pytest.raises(StateError, match="has a result"):
        state.retry_job(job_id, API_REQUEST)
    job = state.retry_job(job_id)  # a plain retry re-delivers the flagged result
    assert (job.state, job.outcome, job.flag, job.voxels) == (JobState.EXPORTING, JobOutcome.SEGMENTED_NO_REGION,
                                                              PROBLEM, {"right": 3, "left": 0})


def test_crop_can_be_recorded_only_on_a_running_job(state: State) -> None:
    job_id = _queued_job(state)
    with pytest.raises(StateError, match="is queued, expected running"):
        state.record_segmentation(job_id, crop_request=CONFIG_REQUEST, crop=None, outcome=JobOutcome.SEGMENTED)
