"""training.environment: the deterministic mode (what it switches, what it records, what it restores) and the
environment record every run carries."""

from __future__ import annotations

import json
import platform
import warnings

import pytest
import torch
import torch.nn.functional as F

from training.benchmark import _protocol, parser
from training.environment import Determinism, RunEnvironment
from training.loop import TrainConfig, train
from training.presets import Runtime
from training.runner import train_config

from .test_loop import Disks, _model


def _unpool() -> None:
    """IAN-Net's decoder step: max_unpool2d, which torch flags as nondeterministic on every device."""
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    F.max_unpool2d(pooled, indices, 2, 2).sum().backward()


def test_determinism_switches_torch_to_deterministic_algorithms_and_restores_it():
    assert not torch.are_deterministic_algorithms_enabled()
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    with Determinism(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled()
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == before


def test_disabled_determinism_changes_nothing_and_records_nothing():
    with Determinism(False) as d:
        assert not torch.are_deterministic_algorithms_enabled()
        _unpool()
    assert d.ops == set()


def test_an_op_without_a_deterministic_implementation_is_recorded_where_strict_mode_would_abort():
    torch.use_deterministic_algorithms(True)  # warn_only=False: what the run would meet without the record
    try:
        with pytest.raises(RuntimeError, match="max_unpooling2d_forward_out does not have a deterministic"):
            _unpool()
    finally:
        torch.use_deterministic_algorithms(False)
    with Determinism(True) as d:
        _unpool()
        _unpool()
    assert d.ops == {"max_unpooling2d_forward_out"}


def test_each_block_records_the_ops_it_met_even_after_an_earlier_block_met_them():
    for _ in range(2):
        with Determinism(True) as d:
            _unpool()
        assert d.ops == {"max_unpooling2d_forward_out"}


def test_other_warnings_still_reach_the_caller_inside_a_deterministic_block():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with Determinism(True):
            warnings.warn("something else", UserWarning, stacklevel=1)
            _unpool()
    assert [str(w.message) for w in seen] == ["something else"]


def test_run_environment_names_the_cpu_versions_threads_and_mode():
    env = RunEnvironment.current(torch.device("cpu"), amp=False, deterministic=True,
                                 nondeterministic_ops=("b_op", "a_op"))
    assert (env.device, env.gpu, env.amp, env.deterministic) == ("cpu", "cpu", False, True)
    assert env.torch == torch.__version__ and env.python == platform.python_version()
    assert env.cuda == torch.version.cuda and env.threads == torch.get_num_threads()
    assert env.nondeterministic_ops == ("a_op", "b_op")
    assert RunEnvironment.from_dict(json.loads(json.dumps(env.to_dict()))) == env


def test_a_training_run_records_its_environment_and_the_nondeterministic_ops_it_met(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(_model(), Disks(16, 1), Disks(8, 2), tmp_path / "run",
                       TrainConfig(epochs=1, batch_size=8, progress=False))
    finally:
        torch.set_num_threads(threads)
    (session,) = result.sessions
    assert (session.gpu, session.deterministic, session.threads) == ("cpu", True, 1)
    assert "max_unpooling2d_forward_out" in session.nondeterministic_ops
    stored = json.loads((tmp_path / "run" / "result.json").read_text())["sessions"]
    assert [RunEnvironment.from_dict(s) for s in stored] == [session]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["environment"]["torch"] == torch.__version__
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


@pytest.mark.parametrize(("flags", "expected"), [([], True), (["--no-deterministic"], False),
                                                  (["--deterministic"], True)])
def test_the_deterministic_flag_reaches_the_protocol_and_every_runs_training(flags, expected):
    args = parser().parse_args(["run", "--out", "x", "--preset", "smoke", *flags])
    protocol = _protocol(args)
    assert protocol.deterministic is expected
    assert train_config(protocol, Runtime(), seed=0).deterministic is expected
