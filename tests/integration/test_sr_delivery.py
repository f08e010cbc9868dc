"""Every result of a job (the SEG, the TID 1500 SR, optionally the probability SEG) to every target.

Exporter level: a delivery sends all of a job's result files and is confirmed only when every one
is (real dcmtk storescp; a pynetdicom SCP that refuses one instance). Node level: a phantom series
sent by dcmtk storescu to `ian-node serve` comes back to a dcmtk storescp as a SEG and an SR that
references it.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, StoragePresentationContexts, evt

from ian_node.config import DicomTarget
from ian_node.net import free_port
from ian_node.storage.records import DeliveryState, JobState
from tests.integration.peers import make_mr_series, storescp
from tests.integration.test_export import Exporting, _result_for

pytestmark = pytest.mark.integration


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    return make_mr_series(tmp_path / "source", 1)[0]


class RefusingOne:
    """A pynetdicom storage SCP that stores everything but one SOP instance, which it refuses (0xC000)."""

    def __init__(self, refused: str) -> None:
        self.refused, self.stored, self.port = refused, [], free_port()
        self._ae = AE(ae_title="DEST")
        self._ae.supported_contexts = StoragePresentationContexts

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid == self.refused:
            return 0xC000
        self.stored.append(uid)
        return 0x0000

    def __enter__(self) -> RefusingOne:
        self._server = self._ae.start_server(("127.0.0.1", self.port), block=False,
                                             evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()


def test_every_result_file_of_a_job_reaches_storescp_in_one_delivery(tmp_path: Path, source: Path) -> None:
    port = free_port()
    ex = Exporting(tmp_path, source)
    results = [ex.result, _result_for(source), _result_for(source)]
    exporter = ex.exporter((DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=port),))
    with storescp(tmp_path / "received", port):
        job = exporter.submit(ex.job.id, results)
        assert [pydicom.dcmread(ex.spool.path(p)).SOPInstanceUID for p in job.result_paths] == \
            [r.SOPInstanceUID for r in results]
        assert exporter.deliver_due() == 1
    assert ex.job_state() is JobState.DONE
    received = sorted(pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "received").iterdir())
    assert received == sorted(r.SOPInstanceUID for r in results)


def test_a_delivery_is_not_confirmed_when_one_of_its_files_is_refused(tmp_path: Path, source: Path) -> None:
    ex = Exporting(tmp_path, source)
    second = _result_for(source)
    with RefusingOne(second.SOPInstanceUID) as scp:
        exporter = ex.exporter((DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=scp.port),))
        exporter.submit(ex.job.id, [ex.result, second])
        exporter.deliver_due()
    (delivery,) = ex.state.deliveries(ex.job.id)
    assert delivery.state is DeliveryState.FAILED and "0xC000" in delivery.last_error
    assert ex.job_state() is JobState.FAILED
    assert scp.stored == [ex.result.SOPInstanceUID]


def test_a_held_result_is_stored_but_not_sent_until_released(tmp_path: Path, source: Path) -> None:
    port = free_port()
    ex = Exporting(tmp_path, source)
    results = [ex.result, _result_for(source)]
    exporter = ex.exporter((DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=port),))
    with storescp(tmp_path / "received", port):
        assert exporter.submit(ex.job.id, results, hold=True).state is JobState.HELD
        assert exporter.deliver_due() == 0
        assert not (tmp_path / "received").exists() or not any((tmp_path / "received").iterdir())
        ex.state.retry_job(ex.job.id)
        assert exporter.deliver_due() == 1
    assert ex.job_state() is JobState.DONE
    assert len(list((tmp_path / "received").iterdir())) == 2
