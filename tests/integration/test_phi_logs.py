"""No patient data in anything the commands print, log or answer; and what `serve` shows an operator by default.

Phantom studies get distinctive patient attributes, odd ones included (a name without '^', which
highdicom warns about quoting it, and one with a quote), and go through `ian-node -vv serve` (to a
dcmtk storescp), `ian-node -vv predict` and `train_benchmark -vv`. None of the values may appear in
their stdout, stderr or log files, in the HTTP API's answers or in /metrics. (That the filter redacts
such library warnings when they are emitted is tests/test_logging.py's part.)
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import tomllib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
import pytest
import requests

from ian_node.phantom.study import PhantomFiles, generate_phantom, write_phantom
from tests.integration import serve_process
from tests.integration.node_harness import SMALL_PHANTOM, untrained_checkpoint, wait_for
from tests.integration.peers import storescu, wait_for_port
from tests.integration.serve_process import Destination, NodeSetup, ServeProcess, ian_node_command

pytestmark = pytest.mark.integration

SUCCESS = 0x0000
#: Seconds a small job may take on a loaded 2-core CI machine, model loading included.
JOB_TIMEOUT = 90.0
REPO = Path(__file__).resolve().parents[2]
#: One intra-op thread: two OpenMP threads spinning against other processes are much slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class PatientData:
    """Distinctive values of one phantom patient; each contains ZQX or is an unlikely date."""

    name: str
    patient_id: str
    birth_date: str
    accession: str
    other_ids: str

    @classmethod
    def of(cls, index: int, name: str) -> PatientData:
        return cls(name, f"ZQXPID{index}4711", f"1899071{index}", f"ZQXACC{index}0815", f"ZQXOTHER{index}")

    def strings(self) -> tuple[str, ...]:
        return (self.name, *self.name.split("^"), self.patient_id, self.birth_date,
                f"{self.birth_date[:4]}-{self.birth_date[4:6]}-{self.birth_date[6:]}", self.accession,
                self.other_ids, "ZQX")


#: Patient 0 has a one-component name (highdicom warns); the others a quote, and the usual form.
PATIENTS = (PatientData.of(0, "ZQXNAMEPHI"), PatientData.of(1, "O'ZQXQUOTE"), PatientData.of(2, "ZQXFAMILY^ZQXGIVEN"))


def phi_phantom(folder: Path, index: int) -> PhantomFiles:
    """Small phantom patient ``index`` carrying ``PATIENTS[index]``."""
    phi = PATIENTS[index]
    phantom = generate_phantom(index, 11, SMALL_PHANTOM)
    study = replace(phantom.study, patient_name=phi.name, patient_id=phi.patient_id,
                    patient_birth_date=phi.birth_date, accession_number=phi.accession)
    with warnings.catch_warnings():  # the ground-truth SEG's person-name warning: not what is under test
        warnings.simplefilter("ignore")
        files = write_phantom(replace(phantom, study=study), folder)
    for path in files.instances:
        ds = pydicom.dcmread(path)
        ds.OtherPatientIDs = phi.other_ids
        ds.save_as(path, enforce_file_format=True)
    return files


def assert_no_patient_data(where: str, text: str) -> None:
    for phi in PATIENTS:
        for value in phi.strings():
            assert value not in text, f"{where} holds {value!r}:\n{_around(text, value)}"


def _around(text: str, value: str) -> str:
    at = text.find(value)
    return text[max(0, at - 300): at + 300]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("model") / "small.pt", size=32, attention=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomFiles:
    return phi_phantom(tmp_path_factory.mktemp("study"), 0)


def _api_url(setup: NodeSetup) -> str:
    api = tomllib.loads(setup.config_path.read_text())["api"]
    return f"http://127.0.0.1:{api['port']}"


def _send_and_wait_for_seg(setup: NodeSetup, dest: Destination, files: PhantomFiles,
                           describe: Callable[[], str]) -> None:
    proc, statuses = storescu(setup.port, files.instances)
    assert statuses == [SUCCESS] * len(files.instances), proc.stderr[-2000:]
    wait_for(lambda: dest.segs_for(files.series_uid), JOB_TIMEOUT, describe)


@pytest.fixture
def most_verbose_serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """ServeProcess runs `ian-node -v serve`; one more -v before it makes that -vv."""
    command = serve_process.ian_node_command
    monkeypatch.setattr(serve_process, "ian_node_command", lambda: [*command(), "-v"])
    yield


def test_serve_at_most_verbose_level_logs_and_answers_no_patient_data(
    tmp_path: Path, checkpoint: Path, study: PhantomFiles, most_verbose_serve: None
) -> None:
    setup = NodeSetup(tmp_path / "node", checkpoint)
    with Destination(setup.root / "pacs", setup.dest_port) as dest, ServeProcess(setup) as serve:
        _send_and_wait_for_seg(setup, dest, study, lambda: f"{setup.describe()}\n{serve.log_tail()}")
        job = setup.job_for(study.series_uid)
        api = _api_url(setup)
        answers = {route: requests.get(api + route, timeout=30) for route in
                   ("/health", "/metrics", "/jobs", f"/jobs?series={study.series_uid}", f"/jobs/{job.id}")}
        assert serve.stop() == 0, serve.log_tail()
    log = serve.log_path.read_text(errors="replace")
    # stdout and stderr both went to the log: debug lines of a library and of ours
    assert "DEBUG pynetdicom" in log and f"stored {study.instances[0].stem}" in log, log[-3000:]
    assert_no_patient_data("serve's stdout and stderr at -vv", log)
    for route, answer in answers.items():
        assert answer.status_code == 200, (route, answer.text)
        assert_no_patient_data(f"GET {route}", answer.text)
    assert study.series_uid in answers[f"/jobs/{job.id}"].text


def test_predict_at_most_verbose_level_prints_no_patient_data(
    tmp_path: Path, checkpoint: Path, study: PhantomFiles
) -> None:
    out = tmp_path / "seg.dcm"
    proc = subprocess.run([*ian_node_command(), "-vv", "predict", str(study.series_dir), "--out", str(out),
                           "--checkpoint", str(checkpoint), "--device", "cpu", "--crop", "half"],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file() and study.series_uid in proc.stdout and "DEBUG" in proc.stderr
    assert_no_patient_data("predict's stdout", proc.stdout)
    assert_no_patient_data("predict's stderr", proc.stderr)


def test_benchmark_at_most_verbose_level_prints_and_logs_no_patient_data(tmp_path: Path, study: PhantomFiles) -> None:
    data = tmp_path / "data"
    for index in range(len(PATIENTS)):  # folders named neutrally: paths are the operator's, and logged
        phi_phantom(data / f"study{index}", index)
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "training.benchmark", "--preset", "smoke", "--models", "ian_net",
                           "--data", str(data), "--out", str(out), "--threads", "1", "--no-progress", "-vv"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = sorted(out.rglob("*.log"))
    assert out / "benchmark.log" in logs and out / "runs" / "ian_net" / "repeat_0" / "train.log" in logs
    assert "DEBUG" in proc.stderr
    assert_no_patient_data("train_benchmark's stdout", proc.stdout)
    assert_no_patient_data("train_benchmark's stderr", proc.stderr)
    for path in logs:
        assert_no_patient_data(str(path.relative_to(out)), path.read_text(errors="replace"))


def test_serve_at_the_default_level_logs_startup_jobs_and_shutdown_only(tmp_path: Path, checkpoint: Path) -> None:
    setup = NodeSetup(tmp_path / "node", checkpoint)
    setup.write_config()
    files = phi_phantom(tmp_path / "study", 2)
    stdout, stderr = setup.root / "stdout.txt", setup.root / "stderr.txt"
    with Destination(setup.root / "pacs", setup.dest_port) as dest, stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen([*ian_node_command(), "serve", "--config", str(setup.config_path)],
                                stdout=out, stderr=err, cwd=setup.root, env=ENV)
        try:
            wait_for_port(setup.port, timeout=60)
            _send_and_wait_for_seg(setup, dest, files, lambda: f"{setup.describe()}\n{stderr.read_text()}")
            job = setup.job_for(files.series_uid)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, stderr.read_text()
    assert stdout.read_text() == ""
    lines = [line.split(" ", 2)[2] for line in stderr.read_text().splitlines()]  # without the time stamp
    notices = [line for line in lines if line.startswith("NOTICE ")]
    assert notices[:7] == [
        f"NOTICE ian_node.app.node: ian-node 0.1.0 listening: DICOM AE IANNODE on 127.0.0.1:{setup.port}, "
        "TLS off, calling-AE allow-list: empty (any calling AE)",
        f"NOTICE ian_node.app.node: HTTP API: {_api_url(setup)} (no token)",
        f"NOTICE ian_node.app.node: model: ian_net released-no-attention, sha256 {_sha256(checkpoint)[:12]}, "
        "on cpu [untrained test model]",
        "NOTICE ian_node.app.node: crop: half (each left-right half of the volume)",
        "NOTICE ian_node.app.node: results: SEG (empty frames omitted, an empty side kept with one empty frame), TID 1500 SR; a QA FAIL is sent, flagged",
        "NOTICE ian_node.app.node: selection: modalities MR, series description any, at least 5 slices, "
        "quiet period 1 s, unselected series: keep",
        f"NOTICE ian_node.app.node: storage: state {setup.state_path}, spool {setup.spool_dir} (keeps 64.0 MiB "
        "free: min_free_bytes 67108864, min_free_percent 0); export targets: pacs (dicom)",
    ], "\n".join(lines)
    assert notices[7] == f"NOTICE ian_node.jobs.worker: job {job.id} started: series {files.series_uid} v1"
    assert notices[8].startswith(f"NOTICE ian_node.jobs.worker: job {job.id} ended: series {files.series_uid} v1, ")
    # the verdicts, never a patient's data (the QA reasons are in the state, not the log)
    assert re.search(rf" s, exporting \({len(files.instances)} instances\); QA right (PASS|WARN|FAIL), "
                     r"left (PASS|WARN|FAIL)$", notices[8]), notices[8]
    assert notices[9].startswith("NOTICE ian_node.app.node: stopped on SIGTERM after ")
    assert len(notices) == 10, "\n".join(lines)
    # otherwise only warnings (none per instance), and no INFO or DEBUG line
    others = [line for line in lines if not line.startswith("NOTICE ")]
    assert all(line.startswith(("WARNING ", "ERROR ")) for line in others), "\n".join(others)
    assert len(others) < len(files.instances), "\n".join(others)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
