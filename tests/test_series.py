"""Series completion: quiet-period timers (apscheduler) and the selection rules."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset

from ian_node.config import SeriesConfig
from ian_node.jobs.completion import SeriesTracker, skip_reason, volume_skip_reason
from ian_node.storage.records import Job, ReceivedInstance, Series
from ian_node.storage.spool import Spool
from ian_node.storage.state import State
from tests.test_volume import make_series

SERIES = "1.2.826.0.1.3680043.8.498.20"
QUIET = 0.3


def _series(**changes: object) -> Series:
    values: dict[str, object] = dict(
        series_uid=SERIES, study_uid="1.2", modality="MR", description="MRN 3D CRANIAL NERVES", calling_ae="A",
        peer_host="127.0.0.1", version=1, awaiting_completion=True, status="receiving", status_reason=None,
        first_received_at=0.0, last_received_at=0.0, instance_count=10, slice_count=10,
    )
    values.update(changes)
    return Series(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "rules", "expected"),
    [
        ({}, {}, None),
        ({"modality": "CT"}, {}, "modality 'CT' is not one of MR"),
        ({"description": "T1 AX"}, {"description_pattern": "mrn|neuro"}, "does not match 'mrn|neuro'"),
        ({"description": "mrn 3d"}, {"description_pattern": "MRN"}, None),
        ({"slice_count": 4}, {"min_slices": 5}, "4 slices, fewer than the minimum of 5"),
    ],
)
def test_selection_rules_give_the_reason_a_series_is_skipped(
    changes: dict[str, object], rules: dict[str, object], expected: str | None
) -> None:
    reason = skip_reason(_series(**changes), SeriesConfig(**rules))  # type: ignore[arg-type]
    assert reason == expected if expected is None else expected in reason


def _headers(**changes: object) -> list[Dataset]:
    """Headers of a 5-slice axial MR volume, the third changed by ``changes``."""
    datasets = make_series()
    for keyword, value in changes.items():
        setattr(datasets[2], keyword, value)
    return datasets


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "ImageType LOCALIZER"),
        ({"ImageType": ["DERIVED", "SECONDARY", "scout "]}, "ImageType SCOUT"),
        ({"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}, "not one volume"),
        ({"ImagePositionPatient": [0, 0, 0]}, "not one volume"),
        ({"PhotometricInterpretation": "RGB", "SamplesPerPixel": 3}, "cannot be segmented"),
        ({"BitsAllocated": 1}, "1-bit pixels"),
        ({"Rows": None}, None),  # broken, not a reason to skip: the job names the instance
    ],
)
def test_headers_that_can_never_be_one_volume_are_skipped_before_any_job(
    changes: dict[str, object], expected: str | None
) -> None:
    headers = _headers(**changes)
    if changes.get("Rows", 1) is None:
        del headers[2].Rows
    reason = volume_skip_reason(headers, SeriesConfig(min_slices=2))
    assert reason == expected if expected is None else expected in reason


class Node:
    """The real state, spool and tracker, fed as the SCP feeds them."""

    def __init__(self, root: Path, quiet: float = QUIET, **rules: object) -> None:
        self.state = State(root / "state.sqlite3")
        self.spool = Spool(root / "spool")
        self.jobs: list[Job] = []
        self.rules = SeriesConfig(quiet_period_s=quiet, min_slices=2, **rules)  # type: ignore[arg-type]
        self.tracker = SeriesTracker(self.state, self.spool, self.rules, on_job=self.jobs.append)

    def receive(self, n: int, series: str = SERIES, modality: str = "MR", notify: bool = True) -> None:
        sop = f"{series}.{n}"
        path = self.spool.write_instance(series, sop, b"DICM")
        outcome = self.state.record_instance(ReceivedInstance(
            sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", series_uid=series, study_uid="1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=path, size=4, sha256="x", modality=modality,
        ))
        if notify:
            self.tracker.instance_stored(outcome)

    def close(self) -> None:
        self.tracker.stop()
        self.state.close()


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    n.tracker.start()
    yield n
    n.close()


def _wait_until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_quiet_period_creates_exactly_one_job(node: Node) -> None:
    for n in range(3):
        node.receive(n)
    _wait_until(lambda: node.jobs)
    time.sleep(2 * QUIET)
    assert [(j.series_uid, j.series_version) for j in node.jobs] == [(SERIES, 1)]
    assert [j.id for j in node.state.list_jobs()] == [node.jobs[0].id]
    assert node.state.series(SERIES).status == "selected"


def test_each_new_instance_restarts_the_quiet_period(tmp_path: Path) -> None:
    quiet = 0.6  # long against the 0.1 s gaps, so that a loaded machine cannot fire a timer early
    n = Node(tmp_path, quiet=quiet)
    n.tracker.start()
    try:
        for i in range(5):
            n.receive(i)
            last = time.monotonic()
            time.sleep(0.1)
        assert n.jobs == []
        _wait_until(lambda: n.jobs)
        assert time.monotonic() - last >= quiet * 0.9
        assert len(n.jobs) == 1
    finally:
        n.close()


def test_series_growing_after_its_job_gets_a_new_version(node: Node) -> None:
    node.receive(0)
    node.receive(1)
    _wait_until(lambda: len(node.jobs) == 1)
    node.receive(2)
    _wait_until(lambda: len(node.jobs) == 2)
    assert [j.series_version for j in node.jobs] == [1, 2]


def test_unselected_series_keeps_its_files_by_default(node: Node) -> None:
    node.receive(0, modality="CT")
    node.receive(1, modality="CT")
    _wait_until(lambda: node.state.series(SERIES).status == "skipped")
    series = node.state.series(SERIES)
    assert "modality 'CT'" in series.status_reason and series.instance_count == 2
    assert len(list(node.spool.root.rglob("*.dcm"))) == 2 and node.jobs == []


def test_unselected_series_is_purged_when_retention_says_so(tmp_path: Path) -> None:
    n = Node(tmp_path, retention="purge")
    n.tracker.start()
    try:
        n.receive(0)  # one slice, fewer than min_slices
        _wait_until(lambda: n.state.series(SERIES).status == "skipped")
        _wait_until(lambda: not list(n.spool.root.rglob("*.dcm")))
        assert n.state.series(SERIES).instance_count == 0 and n.jobs == []
    finally:
        n.close()


def test_after_a_restart_a_series_left_open_gets_a_whole_quiet_period_to_resume(tmp_path: Path) -> None:
    quiet = 0.6
    before = Node(tmp_path, quiet=quiet)
    before.receive(0, notify=False)  # received long before the restart: the downtime must not count
    before.close()
    time.sleep(quiet)
    after = Node(tmp_path, quiet=quiet)
    started = time.monotonic()
    after.tracker.start()
    try:
        after.receive(1)  # the sender resumes right after the restart
        _wait_until(lambda: after.jobs)
        assert time.monotonic() - started >= quiet * 0.9
        assert [(j.series_uid, j.series_version, j.attempts) for j in after.jobs] == [(SERIES, 1, 0)]
        assert after.state.series(SERIES).instance_count == 2  # one version holds both instances
    finally:
        after.close()


def test_start_rearms_timers_of_series_left_open_by_a_crash(tmp_path: Path) -> None:
    before = Node(tmp_path)
    before.receive(0, notify=False)  # received, then the process died before any timer fired
    before.receive(1, notify=False)
    before.close()
    after = Node(tmp_path)
    after.tracker.start()
    try:
        _wait_until(lambda: after.jobs)
        assert [(j.series_uid, j.series_version) for j in after.jobs] == [(SERIES, 1)]
    finally:
        after.close()
