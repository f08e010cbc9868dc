"""The exporter's retry policy: capped, jittered backoff drawn per attempt; refusals are not retried.

Time and chance are injected (a settable clock and a scripted draw), so every retry time is exact.
The transient failures come from a real C-STORE to a loopback port where nothing listens.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from ian_node.config import DicomTarget, ExportConfig
from ian_node.export.exporter import Exporter, jittered_backoff
from ian_node.export.targets import CStoreExport, DeliveryRefused, Origin
from ian_node.net import free_port
from ian_node.storage.records import DeliveryState, JobState, ReceivedInstance
from ian_node.storage.spool import Spool
from ian_node.storage.state import State

SERIES = "1.2.826.0.1.3680043.8.498.77"
POLICY = ExportConfig(backoff_s=10.0, max_backoff_s=600.0, max_attempts=12)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Draws:
    """The jitter's random source, scripted: returns the given values in order, then fails."""

    def __init__(self, *values: float) -> None:
        self._values = list(values)

    def __call__(self) -> float:
        return self._values.pop(0)


class Refusing:
    """A destination that answers and refuses, as a C-STORE 0xC000 or an HTTP 400 reads to the exporter."""

    name = "pacs"

    def __init__(self) -> None:
        self.calls = 0

    def send(self, path: Path, origin: Origin) -> None:
        self.calls += 1
        raise DeliveryRefused("DEST@127.0.0.1:104 refused the result: C-STORE status 0xC000 (Cannot Understand)")


def _result() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid(prefix=None)
    ds.SeriesInstanceUID = generate_uid(prefix=None)
    ds.Modality = "MR"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def state(tmp_path: Path, clock: Clock) -> Iterator[State]:
    with State(tmp_path / "state.sqlite3", clock=clock) as st:
        yield st


def _running_job(state: State) -> int:
    state.record_instance(ReceivedInstance(
        sop_instance_uid=f"{SERIES}.1", sop_class_uid=MRImageStorage, series_uid=SERIES, study_uid="1.2.3",
        transfer_syntax_uid=ExplicitVRLittleEndian, path=f"instances/{SERIES}/{SERIES}.1.dcm", size=10, sha256="x",
        modality="MR", calling_ae="PACS", peer_host="127.0.0.1",
    ))
    series = state.series(SERIES)
    state.settle_series(SERIES, series.last_received_at, None)
    job = state.claim_next_job()
    assert job is not None
    return job.id


@pytest.mark.parametrize("attempts", range(1, 12))
def test_jittered_backoff_stays_between_half_the_capped_backoff_and_the_cap(attempts: int) -> None:
    base = POLICY.backoff(attempts)
    assert jittered_backoff(POLICY, attempts, lambda: 0.0) == base / 2
    assert jittered_backoff(POLICY, attempts, lambda: 0.5) == 0.75 * base
    assert jittered_backoff(POLICY, attempts, lambda: 0.999999) <= base <= POLICY.max_backoff_s
    draws = random.Random(attempts)
    for _ in range(1_000):
        wait = jittered_backoff(POLICY, attempts, draws.random)
        assert POLICY.backoff_s / 2 <= base / 2 <= wait <= base <= POLICY.max_backoff_s


def test_jittered_backoff_clamps_a_draw_outside_zero_to_one() -> None:
    assert jittered_backoff(POLICY, 3, lambda: -5.0) == 20.0
    assert jittered_backoff(POLICY, 3, lambda: 7.0) == 40.0


def test_jittered_backoff_reaches_the_cap_and_stays_there() -> None:
    waits = [jittered_backoff(POLICY, n, lambda: 1.0) for n in range(1, 20)]
    assert waits[:7] == [10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 600.0]
    assert set(waits[6:]) == {600.0}


def test_each_failed_attempt_is_rescheduled_with_its_own_draw(tmp_path: Path, state: State, clock: Clock) -> None:
    job_id = _running_job(state)
    config = ExportConfig(targets=(DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=free_port(),
                                               timeout_s=2),), backoff_s=10.0, max_backoff_s=30.0, max_attempts=5)
    target = CStoreExport(config.targets[0], "IANNODE")  # nothing listens on its port: a transient failure
    draws = Draws(0.0, 1.0, 0.25, 0.5)
    exporter = Exporter(state, Spool(tmp_path / "spool"), {"pacs": target}, config, clock=clock, draw=draws)
    exporter.submit(job_id, _result())

    expected = [5.0, 20.0, 30.0 / 2 + 0.25 * 15.0, 30.0 / 2 + 0.5 * 15.0]  # bases 10, 20, 30 (cap), 30
    for attempt, wait in enumerate(expected, start=1):
        assert exporter.deliver_due() == 1
        (delivery,) = state.deliveries(job_id)
        assert (delivery.state, delivery.attempts) == (DeliveryState.PENDING, attempt)
        assert delivery.next_attempt_at == pytest.approx(clock.now + wait)
        assert "not established" in delivery.last_error
        clock.now += wait - 0.001
        assert exporter.deliver_due() == 0  # not due a moment before its time
        clock.now += 0.001
    assert exporter.deliver_due() == 1  # the 5th attempt is the last: failed, no draw taken
    (delivery,) = state.deliveries(job_id)
    assert (delivery.state, delivery.attempts, delivery.next_attempt_at) == (DeliveryState.FAILED, 5, None)
    assert state.job(job_id).state is JobState.FAILED


def test_a_refusal_fails_the_delivery_at_once_with_the_reason_and_retry_sends_it_again(
    tmp_path: Path, state: State, clock: Clock
) -> None:
    job_id = _running_job(state)
    target = Refusing()
    exporter = Exporter(state, Spool(tmp_path / "spool"), {"pacs": target}, POLICY, clock=clock, draw=Draws())
    exporter.submit(job_id, _result())
    assert exporter.deliver_due() == 1
    (delivery,) = state.deliveries(job_id)
    assert (delivery.state, delivery.attempts, delivery.next_attempt_at) == (DeliveryState.FAILED, 1, None)
    assert "0xC000" in delivery.last_error
    job = state.job(job_id)
    assert job.state is JobState.FAILED and job.error == f"delivery failed: pacs: {delivery.last_error}"
    clock.now += 10 * POLICY.max_backoff_s
    assert exporter.deliver_due() == 0 and target.calls == 1

    state.retry_job(job_id)  # what `ian-node jobs retry` and POST /jobs/{id}/retry do
    assert exporter.deliver_due() == 1 and target.calls == 2
