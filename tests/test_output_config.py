"""The [output] section's result choices: the empty-segment rule and the optional probability SEG."""

from __future__ import annotations

from pathlib import Path
from typing import get_args, get_type_hints

from ian_node.config import OutputConfig, load_config
from ian_node.segment.seg import EmptySegments


def test_both_keys_are_off_by_default_today_s_seg_and_no_probability_seg() -> None:
    output = load_config(None, environ={}).output
    assert (output.empty_segments, output.probability_seg) == ("empty_frame", False)


def test_both_keys_are_read_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ian-node.toml"
    path.write_text('[output]\nempty_segments = "omit"\nprobability_seg = true\n')
    output = load_config(path, environ={}).output
    assert (output.empty_segments, output.probability_seg) == ("omit", True)


def test_both_keys_are_overridden_by_the_environment() -> None:
    env = {"IAN_NODE_OUTPUT_EMPTY_SEGMENTS": "omit", "IAN_NODE_OUTPUT_PROBABILITY_SEG": "true"}
    output = load_config(None, environ=env).output
    assert (output.empty_segments, output.probability_seg) == ("omit", True)


def test_the_config_values_are_the_seg_builders_own() -> None:
    allowed = get_args(get_type_hints(OutputConfig)["empty_segments"])
    assert set(allowed) == {e.value for e in EmptySegments}
    assert EmptySegments(OutputConfig().empty_segments) is EmptySegments.EMPTY_FRAME
