"""The README's commands work as written: the quick ones are run, the long-running ones are parsed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from ian_node.app.cli import build_parser, main
from training.benchmark import main as train_benchmark_main

README = Path(__file__).resolve().parents[1] / "README.md"


def _table_commands() -> list[list[str]]:
    """Every backticked command in the README's "Using it" table, split like a shell would."""
    table = README.read_text().split("## Using it", 1)[1].strip().split("\n\n", 1)[0]
    commands = []
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue  # the header and its rule
        first_cell = row.split(" | ")[0]
        commands += [shlex.split(c) for c in re.findall(r"`([^`]+)`", first_cell)]
    return commands


def test_the_readme_table_lists_the_commands_this_test_checks() -> None:
    heads = {tuple(c[:2]) for c in _table_commands()}
    assert {("ian-node", "serve"), ("ian-node", "phantom"), ("ian-node", "predict"), ("ian-node", "jobs"),
            ("train_benchmark", "--preset")} <= heads


def test_the_readme_node_commands_parse_as_written() -> None:
    for command in _table_commands():
        if command[0] == "ian-node" and command[1] in ("serve", "jobs") and len(command) > 2:
            build_parser().parse_args(command[1:])  # exits (SystemExit) on an option the CLI does not have


def test_the_readme_benchmark_command_parses_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    (command,) = [c for c in _table_commands() if c[0] == "train_benchmark"]
    with pytest.raises(SystemExit) as done:
        train_benchmark_main([*command[1:], "--help"])
    assert done.value.code == 0 and "--out" in capsys.readouterr().out


def test_the_readme_phantom_then_predict_commands_run_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads spin against other processes on a busy 2-core machine
    try:
        _run_phantom_then_predict(tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _run_phantom_then_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (phantom,) = [c for c in _table_commands() if c[:2] == ["ian-node", "phantom"]]
    (predict,) = [c for c in _table_commands() if c[:2] == ["ian-node", "predict"]]
    assert main(phantom[1:]) == 0
    assert main(predict[1:]) == 0
    out = tmp_path / predict[predict.index("--out") + 1]
    assert out.exists() and "NOT FOR CLINICAL USE" in capsys.readouterr().err

