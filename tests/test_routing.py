"""Routing: which targets a result goes to, by the calling AE, modality and description of its series.

The rules on their own, then the exporter creating deliveries only for the targets a series is
routed to (real state and spool; the network paths are in tests/integration/test_routing_network.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from ian_node.config import ExportConfig
from ian_node.export.exporter import Exporter
from ian_node.export.routing import Route, routed_targets
from ian_node.export.targets import Origin
from ian_node.storage.records import JobState, ReceivedInstance, Series, SeriesState
from ian_node.storage.spool import Spool
from ian_node.storage.state import State


def _series(calling_ae: str = "MODALITY1", modality: str = "MR", description: str = "MRN 3D nerve") -> Series:
    return Series(series_uid="1.2.3", study_uid="1.2", modality=modality, description=description,
                  calling_ae=calling_ae, peer_host="127.0.0.1", version=1, awaiting_completion=False,
                  status=SeriesState.SELECTED, status_reason=None, first_received_at=0.0, last_received_at=0.0,
                  instance_count=5, slice_count=5)


@pytest.mark.parametrize(
    ("route", "series", "expected"),
    [
        (Route(), _series(), True),
        (Route(calling_aes=("MODALITY1",)), _series(), True),
        (Route(calling_aes=("MODALITY1",)), _series(calling_ae="MODALITY2"), False),
        (Route(calling_aes=("MODALITY1 ",)), _series(calling_ae=" MODALITY1"), True),  # padding is not part
        (Route(calling_aes=("modality1",)), _series(), False),  # AE titles are case-sensitive
        (Route(modalities=("mr",)), _series(), True),
        (Route(modalities=("CT",)), _series(), False),
        (Route(series_description="nerve|MRN"), _series(description="t1 mrn"), True),
        (Route(series_description="^MRN"), _series(description="T1 AX"), False),
        (Route(calling_aes=("MODALITY1",), modalities=("MR",), series_description="MRN"), _series(), True),
        (Route(calling_aes=("MODALITY1",), modalities=("CT",), series_description="MRN"), _series(), False),
        (Route(needs_sender=True), _series(calling_ae=""), False),
    ],
)
def test_every_given_rule_must_match_and_an_absent_rule_matches_all(
    route: Route, series: Series, expected: bool
) -> None:
    assert route.matches(series) is expected


def test_a_pulled_version_goes_back_to_its_source_whatever_its_rules_and_never_to_a_sender_target() -> None:
    routes = {"orthanc": Route(calling_aes=("MODALITY1",)), "mr": Route(modalities=("MR",)),
              "back": Route(needs_sender=True), "mod1": Route(calling_aes=("MODALITY1",))}
    names = ["orthanc", "mr", "back", "mod1", "plain"]
    assert routed_targets(names, routes, _series(calling_ae=""), pulled_from="orthanc") == ["orthanc", "mr", "plain"]
    assert routed_targets(names, routes, _series()) == ["orthanc", "mr", "back", "mod1", "plain"]
    assert routed_targets(names, routes, _series(calling_ae="OTHER")) == ["mr", "back", "plain"]


def test_a_bad_description_pattern_fails_when_the_route_is_made() -> None:
    with pytest.raises(Exception, match="unterminated|missing"):
        Route(series_description="(MRN")


class Recording:
    """A destination that confirms everything and remembers what it was sent."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[Origin] = []

    def send(self, path: Path, origin: Origin) -> None:
        self.sent.append(origin)


@pytest.fixture()
def state(tmp_path: Path) -> Iterator[State]:
    with State(tmp_path / "state.sqlite3") as st:
        yield st


def _running_job(state: State, spool: Spool, calling_ae: str, modality: str = "MR", pulled_from: str | None = None
                 ) -> int:
    series_uid = generate_uid(prefix=None)
    sop = generate_uid(prefix=None)
    state.record_instance(ReceivedInstance(
        sop_instance_uid=sop, sop_class_uid=str(MRImageStorage), series_uid=series_uid, study_uid="1.2",
        transfer_syntax_uid=str(ExplicitVRLittleEndian), path=spool.write_instance(series_uid, sop, b"DICM"),
        size=4, sha256="x", modality=modality, description="MRN", calling_ae=calling_ae, peer_host="127.0.0.1",
        pulled_from=pulled_from,
    ))
    series = state.series(series_uid)
    state.settle_series(series_uid, series.last_received_at, None)
    job = state.claim_next_job()
    assert job is not None and job.series_uid == series_uid
    return job.id


def _result() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid(prefix=None)
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_the_exporter_creates_deliveries_only_for_the_targets_a_series_is_routed_to(
    tmp_path: Path, state: State
) -> None:
    spool = Spool(tmp_path / "spool")
    targets = {n: Recording(n) for n in ("mod1", "ct", "all", "source")}
    routes = {"mod1": Route(calling_aes=("MODALITY1",)), "ct": Route(modalities=("CT",)),
              "source": Route(calling_aes=("NOBODY",))}
    exporter = Exporter(state, spool, targets, ExportConfig(), routes=routes)
    from_mod1 = _running_job(state, spool, "MODALITY1")
    from_mod2 = _running_job(state, spool, "MODALITY2")
    pulled = _running_job(state, spool, "", pulled_from="source")
    for job_id in (from_mod1, from_mod2, pulled):
        exporter.submit(job_id, _result())
    assert exporter.deliver_due() == 5
    assert [d.target for d in state.deliveries(from_mod1)] == ["all", "mod1"]
    assert [d.target for d in state.deliveries(from_mod2)] == ["all"]
    assert [d.target for d in state.deliveries(pulled)] == ["all", "source"]
    assert [o.calling_ae for o in targets["mod1"].sent] == ["MODALITY1"]
    assert targets["ct"].sent == []
    assert all(state.job(j).state is JobState.DONE for j in (from_mod1, from_mod2, pulled))


def test_a_result_no_target_is_routed_to_is_done_with_no_delivery(tmp_path: Path, state: State) -> None:
    spool = Spool(tmp_path / "spool")
    exporter = Exporter(state, spool, {"ct": Recording("ct")}, ExportConfig(), routes={"ct": Route(modalities=("CT",))})
    job_id = _running_job(state, spool, "MODALITY1")
    job = exporter.submit(job_id, _result())
    assert job.state is JobState.DONE and state.deliveries(job_id) == []
