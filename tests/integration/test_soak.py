"""The quick soak campaign of benchmarks/soak.py: parallel load, SIGKILLs at every stage, an outage.

Eight dcmtk storescu senders (re-sending what was not acknowledged) against a real `ian-node serve`
that is SIGKILLed and restarted at least three times, mid-receive, inside a quiet period, mid-job and
mid-export, while its C-STORE destination is down for a while. The audit must find nothing
acknowledged lost and exactly one result per series version at the destination.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.integration

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def _soak() -> ModuleType:
    """benchmarks/soak.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("ian_node_bench_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quick_soak_loses_no_acknowledged_instance_and_delivers_one_result_per_series_version(tmp_path: Path) -> None:
    soak = _soak()
    audit = soak.run_campaign(soak.QUICK, tmp_path / "soak")
    soak.print_audit(audit)  # shown by pytest when the test fails (or with -s)
    instances, results, kills = audit["instances"], audit["results"], audit["kills"]
    summary = json.dumps({k: v for k, v in audit.items() if k != "campaign"}, indent=1, default=str)[:6000]

    assert audit["campaign"]["notes"] == [], summary
    assert instances["not_acknowledged"] == 0, summary
    assert instances["lost"] == 0, summary
    assert results["missing"] == 0, summary
    assert results["duplicated"] == 0, summary
    assert results["wrong_result"] == 0, summary
    assert results["series_without_complete_final_result"] == 0, summary
    assert kills["count"] >= 3, summary
    assert all(kills["hit"][stage] >= 1 for stage in soak.STAGES), summary
    assert audit["outage"].get("drain_s") is not None, summary
