"""The SCP's refusal and store-failure counters as /metrics renders them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ian_node.app.metrics import NodeMetrics
from ian_node.receive.counters import ReceiveCounters, Refusal
from ian_node.storage.state import State


@pytest.fixture()
def state(tmp_path: Path) -> Iterator[State]:
    s = State(tmp_path / "state.sqlite3")
    yield s
    s.close()


def _samples(text: str, family: str) -> dict[str, float]:
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith(family + "{")}


def test_every_reason_and_failure_status_is_rendered_from_zero(state: State) -> None:
    text = NodeMetrics(state, receive=ReceiveCounters()).text()
    refusals = _samples(text, "ian_node_refusals_total")
    assert refusals == {f'ian_node_refusals_total{{reason="{r}"}}': 0 for r in Refusal}
    assert _samples(text, "ian_node_store_failures_total") == {
        f'ian_node_store_failures_total{{status="{s}"}}': 0 for s in ("0x0110", "0xA700", "0xA900", "0xC210")
    }
    assert "# TYPE ian_node_refusals_total counter" in text and "# TYPE ian_node_store_failures_total counter" in text


def test_counts_from_many_threads_add_up(state: State) -> None:
    counters = ReceiveCounters()

    def work() -> None:
        for _ in range(1000):
            counters.refused(Refusal.SOP_CLASS_NOT_CONFIGURED)
            counters.store_failed(0xC210)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counters.store_failed(0xC211)  # a status the SCP does not list is rendered once answered
    text = NodeMetrics(state, receive=counters).text()
    assert 'ian_node_refusals_total{reason="sop_class_not_configured"} 8000.0' in text.splitlines()
    assert 'ian_node_store_failures_total{status="0xC210"} 8000.0' in text.splitlines()
    assert 'ian_node_store_failures_total{status="0xC211"} 1.0' in text.splitlines()


def test_without_the_scp_the_families_are_declared_with_no_samples(state: State) -> None:
    text = NodeMetrics(state).text()
    assert "# TYPE ian_node_refusals_total counter" in text
    assert _samples(text, "ian_node_refusals_total") == {} and _samples(text, "ian_node_store_failures_total") == {}
    assert "ian_node_instances_received_total 0.0" in text.splitlines()
