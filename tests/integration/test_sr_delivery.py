"""Every result of a job (the SEG, the TID 1500 SR, optionally the probability SEG) to every target.

Exporter level: a delivery sends all of a job's result files and is confirmed only when every one
is (real dcmtk storescp; a pynetdicom SCP that refuses one instance). Node level: a phantom series
sent by dcmtk storescu to `ian-node serve` comes back to a dcmtk storescp as a SEG and an SR that
references it; with ``[output] probability_seg = true`` the same delivery also brings the FRACTIONAL
probability SEG; with ``[qa] on_fail = "hold"`` a model that finds no nerve gets its result held (across
a SIGKILL and restart) until `ian-node jobs retry` releases it.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import torch
from pydicom import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from pynetdicom import AE, StoragePresentationContexts, evt

from ian_node.config import DicomTarget
from ian_node.net import free_port
from ian_node.storage.records import DeliveryState, Job, JobState
from model import registry
from model.checkpoint import CheckpointMeta, InputContract, save_checkpoint
from tests.integration.node_harness import small_phantom, untrained_checkpoint, wait_for
from tests.integration.peers import make_mr_series, storescp, storescu
from tests.integration.serve_process import Destination, NodeSetup, ServeProcess, ian_node_command
from tests.integration.test_export import Exporting, _result_for

pytestmark = pytest.mark.integration

#: Seconds a small job may take on a loaded 2-core machine, model loading included.
JOB_TIMEOUT = 120.0


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


# -- the node over the network --------------------------------------------------------------------

class HoldingSetup(NodeSetup):
    """`NodeSetup` with ``[qa] on_fail = "hold"`` in its ian-node.toml."""

    def write_config(self) -> Path:
        path = super().write_config()
        path.write_text(path.read_text() + '\n[qa]\non_fail = "hold"\n')
        return path


def blind_checkpoint(path: Path) -> Path:
    """A real checkpoint whose head answers "no nerve" everywhere (zero weights, bias -20): both sides FAIL."""
    torch.manual_seed(0)
    net = registry.build("ian_net", width=0.125, attention=False)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(-20.0)
    meta = CheckpointMeta(architecture="ian_net", width=0.125, options={"attention": False}, variant=net.variant,
                          input=InputContract(size=32, in_channels=1), label="blind test model", training={"epochs": 0})
    save_checkpoint(path, net, meta)
    return path


def _results(dest: Destination, series_uid: str) -> tuple[Dataset, Dataset] | None:
    """The SEG of `series_uid` at the destination and the SR that references it, once both are in."""
    segs = dest.segs_for(series_uid)
    if len(segs) != 1:
        return None
    for path in dest.files():
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # storescp may still be writing it
            continue
        evidence = {str(i.ReferencedSOPInstanceUID) for s in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                    for series in s.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
        if ds.SOPClassUID == Comprehensive3DSRStorage and segs[0].SOPInstanceUID in evidence:
            return segs[0], ds
    return None


def _job(setup: NodeSetup, series_uid: str, *states: JobState) -> Job | None:
    job = setup.job_for(series_uid)
    return job if job is not None and job.state in states else None


def test_a_series_from_storescu_comes_back_to_storescp_as_a_seg_and_its_sr(tmp_path: Path) -> None:
    setup = NodeSetup(tmp_path, untrained_checkpoint(tmp_path / "small.pt", size=32, attention=False))
    phantom = small_phantom(tmp_path / "phantom", 4)
    with Destination(tmp_path / "pacs", setup.dest_port) as dest, ServeProcess(setup) as serve:
        _, statuses = storescu(setup.port, list(phantom.instances))
        assert statuses == [0] * len(phantom.instances)
        seg, sr = wait_for(lambda: _results(dest, phantom.series_uid), JOB_TIMEOUT,
                           lambda: f"{setup.describe()}\n{serve.log_tail()}")
        job = wait_for(lambda: _job(setup, phantom.series_uid, JobState.DONE), 15, setup.describe)
    assert seg.SOPClassUID == SegmentationStorage and sr.StudyInstanceUID == seg.StudyInstanceUID
    assert len(dest.files()) == 2  # one delivery: the SEG and the SR, each once
    assert [q["side"] for q in job.qa] == ["right", "left"]
    verdicts = ", ".join(f"{q['side']} {q['verdict']}" for q in job.qa)
    assert f"QA {verdicts}" in serve.log_path.read_text()


def test_a_failed_result_is_held_across_a_restart_until_jobs_retry_releases_it(tmp_path: Path) -> None:
    setup = HoldingSetup(tmp_path, blind_checkpoint(tmp_path / "blind.pt"))
    phantom = small_phantom(tmp_path / "phantom", 5)
    with Destination(tmp_path / "pacs", setup.dest_port) as dest:
        serve = ServeProcess(setup).start()
        try:
            _, statuses = storescu(setup.port, list(phantom.instances))
            assert statuses == [0] * len(phantom.instances)
            held = wait_for(lambda: _job(setup, phantom.series_uid, JobState.HELD, JobState.DONE, JobState.FAILED),
                            JOB_TIMEOUT, lambda: f"{setup.describe()}\n{serve.log_tail()}")
            assert held.state is JobState.HELD, setup.describe()
            assert [q["verdict"] for q in held.qa] == ["FAIL", "FAIL"]
            assert held.flag == "QA FAIL right: no nerve found | QA FAIL left: no nerve found"
            serve.kill()
            serve.restart()
            time.sleep(3.0)  # more than the exporter's poll: a recovered node would have delivered by now
            assert setup.job_for(phantom.series_uid).state is JobState.HELD and dest.files() == []
            retry = subprocess.run([*ian_node_command(), "jobs", "retry", str(held.id), "--config",
                                    str(setup.config_path)], capture_output=True, text=True, timeout=60)
            assert retry.returncode == 0, retry.stderr
            seg, sr = wait_for(lambda: _results(dest, phantom.series_uid), 30,
                               lambda: f"{setup.describe()}\n{serve.log_tail()}")
            wait_for(lambda: _job(setup, phantom.series_uid, JobState.DONE), 15, setup.describe)
        finally:
            serve.stop()
    assert len(dest.files()) == 2 and sr.Modality == "SR" and seg.Modality == "SEG"
    assert setup.job_for(phantom.series_uid).attempts == 1  # released, never re-computed


class ProbabilitySetup(NodeSetup):
    """`NodeSetup` with ``[output] probability_seg = true`` in its ian-node.toml."""

    def write_config(self) -> Path:
        path = super().write_config()
        path.write_text(path.read_text() + "\n[output]\nprobability_seg = true\n")
        return path


def test_with_probability_seg_on_a_job_delivers_its_seg_sr_and_fractional_seg_to_storescp(tmp_path: Path) -> None:
    setup = ProbabilitySetup(tmp_path, untrained_checkpoint(tmp_path / "small.pt", size=32, attention=False))
    phantom = small_phantom(tmp_path / "phantom", 6)
    with Destination(tmp_path / "pacs", setup.dest_port) as dest, ServeProcess(setup) as serve:
        _, statuses = storescu(setup.port, list(phantom.instances))
        assert statuses == [0] * len(phantom.instances)
        job = wait_for(lambda: _job(setup, phantom.series_uid, JobState.DONE, JobState.FAILED), JOB_TIMEOUT,
                       lambda: f"{setup.describe()}\n{serve.log_tail()}")
    assert job.state is JobState.DONE, job.error
    assert len(job.result_paths) == 3 and len(dest.files()) == 3  # one delivery: each file once
    received = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, dest.files())}
    seg, sr, probability = (received[str(pydicom.dcmread(setup.spool_dir / p).SOPInstanceUID)]
                            for p in job.result_paths)
    assert (seg.Modality, seg.SegmentationType, sr.SOPClassUID) == ("SEG", "BINARY", Comprehensive3DSRStorage)
    fractional = hd.seg.Segmentation.from_dataset(probability)
    assert (fractional.SegmentationType, fractional.SegmentationFractionalType) == ("FRACTIONAL", "PROBABILITY")
    assert fractional.StudyInstanceUID == seg.StudyInstanceUID
    assert {str(s.SeriesInstanceUID) for s in fractional.ReferencedSeriesSequence} == {phantom.series_uid}
