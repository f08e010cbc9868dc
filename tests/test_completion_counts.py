"""Concluding a series on its stated size: before the quiet period when the size is trustworthy, never otherwise.

The state, spool and tracker are real and fed real MR headers as the SCP feeds them; the quiet
period is long (30 s) where a test shows a series concluded without waiting, so that the difference
cannot come from a timer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import Dataset, dcmwrite
from pydicom.uid import generate_uid

from ian_node.config import SeriesConfig
from ian_node.jobs.completion import SeriesTracker, SizeRules, headers_agree
from ian_node.receive.header import read_header_facts
from ian_node.receive.pull import dataset_bytes
from ian_node.storage.records import Job
from ian_node.storage.spool import Spool
from ian_node.storage.state import State
from tests.test_volume import make_series

LONG_QUIET = 30.0
SHORT_QUIET = 0.8
RULES = SizeRules(min_slices=4)


def _series(count: int = 5, **attributes: object) -> list[Dataset]:
    """A ``count``-slice MR volume whose instances carry ``attributes`` (e.g. ImagesInAcquisition)."""
    datasets = make_series(shape=(count, 8, 6), series_uid=generate_uid(prefix=None))
    for ds in datasets:
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
    return datasets


class Tracked:
    """State, spool and a started tracker; ``receive`` records and notifies as the SCP does."""

    def __init__(self, root: Path, quiet: float, sizes: SizeRules = RULES) -> None:
        self.state = State(root / "state.sqlite3")
        self.spool = Spool(root / "spool")
        self.jobs: list[Job] = []
        self.tracker = SeriesTracker(self.state, self.spool, SeriesConfig(quiet_period_s=quiet, min_slices=2),
                                     on_job=self.jobs.append, sizes=sizes)
        self.tracker.start()

    def receive(self, ds: Dataset) -> None:
        buffer = BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        data = buffer.getvalue()
        path = self.spool.write_instance(ds.SeriesInstanceUID, ds.SOPInstanceUID, data)
        facts = read_header_facts(dataset_bytes(data), ds.file_meta.TransferSyntaxUID)
        received = facts.received(transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, calling_ae="MOD",
                                  peer_host="127.0.0.1", path=path, size=len(data), sha256=str(hash(data)))
        self.tracker.instance_stored(self.state.record_instance(received))

    def close(self) -> None:
        self.tracker.stop()
        self.state.close()


@pytest.fixture()
def tracked(tmp_path: Path) -> Iterator[Tracked]:
    t = Tracked(tmp_path, LONG_QUIET)
    yield t
    t.close()


def _wait(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_series_stating_images_in_acquisition_is_concluded_without_its_quiet_period(tracked: Tracked) -> None:
    series = _series(5, ImagesInAcquisition=5, AcquisitionNumber=1)
    for ds in series[:4]:
        tracked.receive(ds)
    time.sleep(0.3)
    assert tracked.jobs == []  # four of five: not complete
    started = time.monotonic()
    tracked.receive(series[4])
    _wait(lambda: tracked.jobs)
    assert time.monotonic() - started < LONG_QUIET / 3
    assert [(j.series_uid, j.series_version) for j in tracked.jobs] == [(series[0].SeriesInstanceUID, 1)]


@pytest.mark.parametrize(
    "case",
    ["count too high", "one instance disagrees", "two acquisitions", "below the minimum", "no count"],
)
def test_wrong_or_partial_counts_fall_back_to_the_quiet_period(tmp_path: Path, case: str) -> None:
    if case == "count too high":
        series = _series(5, ImagesInAcquisition=6)
    elif case == "one instance disagrees":
        series = _series(5, ImagesInAcquisition=5)
        series[3].ImagesInAcquisition = 4
    elif case == "two acquisitions":  # ImagesInAcquisition is per acquisition: 5 here, 10 in the series
        series = _series(5, ImagesInAcquisition=5)
        for ds in series[::2]:
            ds.AcquisitionNumber = 2
    elif case == "below the minimum":
        series = _series(3, ImagesInAcquisition=3)
    else:
        series = _series(5)
    t = Tracked(tmp_path, SHORT_QUIET)
    try:
        for ds in series:
            t.receive(ds)
        last = time.monotonic()
        _wait(lambda: t.jobs)
        assert time.monotonic() - last >= SHORT_QUIET * 0.9
        assert [j.series_version for j in t.jobs] == [1]
    finally:
        t.close()


def test_an_extra_instance_after_the_early_conclusion_makes_a_new_version(tmp_path: Path) -> None:
    t = Tracked(tmp_path, SHORT_QUIET)
    try:
        series = _series(6, ImagesInAcquisition=5)
        for ds in series[:5]:
            t.receive(ds)
        _wait(lambda: t.jobs)
        t.receive(series[5])  # one more than stated: only the quiet period concludes version 2
        extra = time.monotonic()
        _wait(lambda: len(t.jobs) == 2)
        assert time.monotonic() - extra >= SHORT_QUIET * 0.9
        assert [j.series_version for j in t.jobs] == [1, 2]
        assert t.state.series(series[0].SeriesInstanceUID).instance_count == 6
    finally:
        t.close()


def test_a_series_sent_again_with_changes_is_concluded_once_when_all_of_it_is_in(tracked: Tracked) -> None:
    series = _series(5, ImagesInAcquisition=5)
    for ds in series:
        tracked.receive(ds)
    _wait(lambda: tracked.jobs)
    for ds in series:
        ds.SeriesDescription = "MRN corrected"  # a re-send with changed content: one new version
        tracked.receive(ds)
        if ds is not series[-1]:
            time.sleep(0.05)
            assert len(tracked.jobs) == 1
    _wait(lambda: len(tracked.jobs) == 2)
    time.sleep(0.3)
    assert [j.series_version for j in tracked.jobs] == [1, 2]


def test_one_enhanced_multiframe_instance_is_a_complete_series(tracked: Tracked) -> None:
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        _series(5), series_instance_uid=generate_uid(prefix=None), series_number=3,
        sop_instance_uid=generate_uid(prefix=None), instance_number=1,
    )
    tracked.receive(enhanced)
    _wait(lambda: tracked.jobs, timeout=LONG_QUIET / 3)
    assert tracked.jobs[0].series_uid == enhanced.SeriesInstanceUID


def test_a_configured_expected_count_concludes_a_series_without_a_stated_size(tmp_path: Path) -> None:
    t = Tracked(tmp_path, LONG_QUIET, SizeRules(min_slices=4, expected_counts=(("^mrn", 5),)))
    try:
        series = _series(5, SeriesDescription="MRN 3D nerve")
        for ds in series[:4]:
            t.receive(ds)
        time.sleep(0.3)
        assert t.jobs == []
        t.receive(series[4])
        _wait(lambda: t.jobs, timeout=LONG_QUIET / 3)
    finally:
        t.close()


def test_early_conclusion_can_be_turned_off(tmp_path: Path) -> None:
    t = Tracked(tmp_path, SHORT_QUIET, SizeRules(enabled=False, min_slices=4))
    try:
        for ds in _series(5, ImagesInAcquisition=5):
            t.receive(ds)
        last = time.monotonic()
        _wait(lambda: t.jobs)
        assert time.monotonic() - last >= SHORT_QUIET * 0.9
    finally:
        t.close()


def test_headers_agree_only_on_one_count_in_one_acquisition() -> None:
    assert headers_agree(_series(5, ImagesInAcquisition=5, AcquisitionNumber=1), 5)
    assert not headers_agree(_series(5, ImagesInAcquisition=5), 4)
    missing = _series(5, ImagesInAcquisition=5)
    del missing[2].ImagesInAcquisition
    assert not headers_agree(missing, 5)
