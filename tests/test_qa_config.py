"""The [qa] and [output] sections: what a QA FAIL does to a result, and the SEG's viewer-compatibility choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from ian_node.config import ConfigError, NodeConfig, OutputConfig, QaConfig, load_config


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> NodeConfig:
    path = tmp_path / "ian-node.toml"
    path.write_text(text)
    return load_config(path, environ=env or {})


def test_by_default_a_failed_result_is_sent_and_the_seg_stores_only_frames_with_voxels() -> None:
    config = load_config(None, environ={})
    assert config.qa == QaConfig(on_fail="send")
    assert config.output == OutputConfig(omit_empty_frames=True, empty_segments="empty_frame", probability_seg=False)


def test_hold_and_the_seg_choices_are_read_from_the_file_and_the_environment(tmp_path: Path) -> None:
    config = _load(tmp_path, '[qa]\non_fail = "hold"\n[output]\nomit_empty_frames = false\n')
    assert (config.qa.on_fail, config.output.omit_empty_frames) == ("hold", False)
    assert _load(tmp_path, "", {"IAN_NODE_QA_ON_FAIL": "hold"}).qa.on_fail == "hold"


@pytest.mark.parametrize(("text", "key"), [
    ('[qa]\non_fail = "drop"\n', "qa.on_fail"),
    ('[qa]\non_fail = "send"\nthreshold = 1\n', "qa.threshold"),
    ('[output]\nempty_segments = "drop"\n', "output.empty_segments"),
    ('[output]\nprobability_seg = "yes"\n', "output.probability_seg"),
])
def test_an_unknown_policy_or_key_is_refused_naming_it(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert info.value.key == key
