"""The hostile corpus sent over the network to a real `ian-node serve`: every case gets its answer.

Each case of `hostile_corpus.CASES` is sent by a real SCU (dcmtk storescu, or pynetdicom sending the
raw bytes for cases no decoder would send), and must end in exactly the outcome it names: a DICOM
status, a refusal at negotiation, a skip reason, a job error that starts with "malformed dataset"
(never a Python exception name), or a valid SEG. The node stays up throughout, and a valid series
sent after all of them still gets its SEG. The outcomes are written as a table (`hostile-corpus.md`
in the test's folder, and printed).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.uid import BasicTextSRStorage
from pynetdicom import AE

from ian_node.phantom.study import generate_phantom, phantom_datasets
from ian_node.storage.records import JobState
from tests.integration.hostile_corpus import (
    CASES,
    JOB_ERROR,
    REFUSED,
    SEG,
    SKIP,
    STATUS,
    TRANSFER_SYNTAX,
    Case,
    fresh_series,
    write_series,
)
from tests.integration.node_harness import SMALL_PHANTOM, untrained_checkpoint, wait_for
from tests.integration.peers import echoscu, send_raw, storescu
from tests.integration.serve_process import NODE_AE, Destination, NodeSetup, ServeProcess, ian_node_command
from tests.tools import dciodvfy_errors

pytestmark = pytest.mark.integration

SUCCESS = 0x0000
#: The instance a byte-level or single-instance edit changes in a whole-series case.
EDITED = 2
#: Seconds for every outcome of the corpus on a loaded 2-core machine.
OUTCOME_TIMEOUT = 240.0


@dataclass
class Sent:
    case: Case
    series_uid: str
    #: The SOP Instance UIDs of the series (a job error must name one of them).
    instance_uids: tuple[str, ...]
    statuses: list[int]
    outcome: str = ""



def _refused_context(port: int) -> str:
    """Propose only Basic Text SR: the node must refuse that presentation context."""
    ae = AE(ae_title="SRSCU")
    ae.add_requested_context(BasicTextSRStorage, TRANSFER_SYNTAX)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    try:
        accepted = [c.abstract_syntax for c in assoc.accepted_contexts] if assoc.is_established else []
        assert BasicTextSRStorage not in accepted
        return "presentation context for Basic Text SR Storage refused"
    finally:
        if assoc.is_established:
            assoc.release()


def _send(case: Case, index: int, base: list, folder: Path, port: int) -> Sent:
    series = fresh_series(base, case.name)
    if case.edit is not None:
        series = case.edit(series) or series
    paths = write_series(series, folder / f"case{index:02d}")
    single = case.kind == STATUS
    edited = 0 if (single and case.raw is None) or len(paths) <= EDITED else EDITED
    if case.raw is not None:
        paths[edited].write_bytes(case.raw(paths[edited].read_bytes()))
    uids = tuple(str(ds.file_meta.MediaStorageSOPInstanceUID) for ds in series)
    if case.kind == REFUSED:
        return Sent(case, str(series[0].SeriesInstanceUID), uids, [], _refused_context(port))
    to_send = [paths[edited]] if single else paths
    if case.raw is not None or single:
        statuses = send_raw(port, to_send)
    else:
        _, statuses = storescu(port, to_send)
    return Sent(case, str(series[0].SeriesInstanceUID), uids, statuses)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeSetup, Destination, ServeProcess]]:
    checkpoint = untrained_checkpoint(tmp_path_factory.mktemp("model") / "small.pt", size=32, attention=False)
    setup = NodeSetup(tmp_path_factory.mktemp("node"), checkpoint)
    with Destination(setup.root / "pacs", setup.dest_port) as dest, ServeProcess(setup) as serve:
        yield setup, dest, serve
        assert serve.stop() == 0, serve.log_tail()


def _outcome(sent: Sent, setup: NodeSetup, dest: Destination) -> str | None:
    """The case's outcome once it is final (None while the node is still working on it)."""
    kind = sent.case.kind
    if kind == STATUS:
        return f"status 0x{sent.statuses[0]:04X}" if sent.statuses else "no status"
    if kind == REFUSED:
        return sent.outcome
    series = setup.series(sent.series_uid)
    job = setup.job_for(sent.series_uid)
    if series is not None and series.status == "skipped":
        return f"skipped: {series.status_reason}"
    if job is None or job.state in (JobState.QUEUED, JobState.RUNNING, JobState.EXPORTING):
        return None
    if job.state is JobState.FAILED:
        return f"job failed: {job.error}"
    return "SEG delivered" if dest.segs_for(sent.series_uid) else None


def _check(sent: Sent, outcome: str, dest: Destination, tmp_path: Path) -> None:
    case, expect = sent.case, sent.case.expect
    where = f"{case.name}: {outcome}"
    if case.kind == STATUS:
        assert sent.statuses == [expect], where
        return
    if case.kind == REFUSED:
        assert str(expect) in outcome, where
        return
    assert sent.statuses == [SUCCESS] * len(sent.statuses), f"{case.name}: statuses {sent.statuses}"
    if case.kind == SKIP:
        assert outcome.startswith("skipped: ") and str(expect) in outcome, where
    elif case.kind == JOB_ERROR:
        assert outcome.startswith("job failed: malformed dataset"), where
        assert str(expect) in outcome and any(uid in outcome for uid in sent.instance_uids), where
        assert not re.search(r"\b[A-Z]\w*(Error|Exception)\b", outcome), where
    else:
        assert case.kind == SEG and outcome == "SEG delivered", where
        (seg,) = dest.segs_for(sent.series_uid)
        path = tmp_path / f"{seg.SOPInstanceUID}.dcm"
        seg.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], where


def test_every_hostile_case_gets_its_status_skip_reason_job_error_or_seg_and_the_node_stays_up(
    node: tuple[NodeSetup, Destination, ServeProcess], tmp_path: Path
) -> None:
    setup, dest, serve = node
    base = phantom_datasets(generate_phantom(0, 7, SMALL_PHANTOM))[8:16]
    assert len(CASES) >= 30
    sent = [_send(case, i, base, tmp_path, setup.port) for i, case in enumerate(CASES)]
    assert serve.proc.poll() is None, serve.log_tail()

    outcomes: dict[str, str] = {}

    def all_final() -> bool:
        for s in sent:
            if s.case.name not in outcomes and (found := _outcome(s, setup, dest)) is not None:
                outcomes[s.case.name] = found
        return len(outcomes) == len(sent)

    wait_for(all_final, OUTCOME_TIMEOUT, lambda: f"pending: {[s.case.name for s in sent if s.case.name not in outcomes]}"
             f"\n{setup.describe()}\n{serve.log_tail()}")
    table = ["| case | sent | status | outcome |", "|---|---|---|---|"]
    for s in sent:
        statuses = ", ".join(f"0x{v:04X}" for v in sorted(set(s.statuses))) or "—"
        count = len(s.statuses) or 0
        table.append(f"| {s.case.name} | {count} instance(s) | {statuses} | {outcomes[s.case.name]} |")
    report = "\n".join(table)
    (tmp_path / "hostile-corpus.md").write_text(report + "\n")
    print(report)
    for s in sent:
        _check(s, outcomes[s.case.name], dest, tmp_path)

    # an operator sees every skipped series with its reason
    listing = subprocess.run([*ian_node_command(), "jobs", "skipped", "--config", str(setup.config_path)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    for s in sent:
        if s.case.kind == SKIP:
            assert f"series {s.series_uid} " in listing and outcomes[s.case.name][len("skipped: "):] in listing

    # the node is still up and still segments a valid series
    assert serve.proc.poll() is None and echoscu(setup.port).returncode == 0, serve.log_tail()
    control = fresh_series(base, "control after the corpus")
    _, statuses = storescu(setup.port, write_series(control, tmp_path / "control"))
    assert statuses == [SUCCESS] * len(control)
    wait_for(lambda: len(dest.segs_for(str(control[0].SeriesInstanceUID))) == 1, 120, setup.describe)
