"""The ``[crop]`` section: modes, boxes, localiser and threshold, from TOML and the environment, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ian_node.config import ConfigError, CropConfig, load_config
from ian_node.segment.crop import CropMode
from ian_node.segment.reformat import PatientBox
from ian_node.segment.result import configured_crop, request_from_record, request_record
from ian_node.segment.volume import Side

RIGHT = "[[-60, -5], [-40, 30], [-80, -20]]"
LEFT = "[[5, 60.5], [-40, 30], [-80, -20]]"


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> CropConfig:
    path = tmp_path / "ian-node.toml"
    path.write_text(text)
    return load_config(path, environ=env or {}).crop


def _error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text, env)
    return info.value


def test_the_default_crop_is_the_localiser_with_its_own_threshold_and_no_segmentation_when_not_found() -> None:
    crop = load_config(None, environ={}).crop
    assert (crop.mode, crop.right, crop.left, crop.localiser) == ("auto", None, None, None)
    assert crop.min_confidence is None and crop.segment_when_not_found is False
    assert configured_crop(crop).mode is CropMode.AUTO


def test_box_mode_reads_both_boxes_from_toml_as_lps_patient_boxes(tmp_path: Path) -> None:
    crop = _load(tmp_path, f"[crop]\nmode = \"box\"\nright = {RIGHT}\nleft = {LEFT}\n")
    assert crop.right == ((-60.0, -5.0), (-40.0, 30.0), (-80.0, -20.0))
    request = configured_crop(crop)
    assert request.mode is CropMode.BOX
    assert request.boxes[Side.LEFT] == PatientBox(5.0, 60.5, -40.0, 30.0, -80.0, -20.0)


def test_oracle_mode_takes_boxes_like_box_and_is_recorded_as_oracle(tmp_path: Path) -> None:
    crop = _load(tmp_path, f"[crop]\nmode = \"oracle\"\nright = {RIGHT}\nleft = {LEFT}\n")
    record = request_record(crop)
    assert record == {"mode": "oracle", "right": [[-60.0, -5.0], [-40.0, 30.0], [-80.0, -20.0]],
                      "left": [[5.0, 60.5], [-40.0, 30.0], [-80.0, -20.0]], "source": "config"}
    assert request_from_record(record) == configured_crop(crop)


def test_environment_overrides_set_every_crop_key(tmp_path: Path) -> None:
    localiser = tmp_path / "localiser.pt"
    localiser.write_bytes(b"")
    env = {"IAN_NODE_CROP_MODE": "box", "IAN_NODE_CROP_RIGHT": RIGHT, "IAN_NODE_CROP_LEFT": LEFT,
           "IAN_NODE_CROP_LOCALISER": str(localiser), "IAN_NODE_CROP_MIN_CONFIDENCE": "0.3",
           "IAN_NODE_CROP_SEGMENT_WHEN_NOT_FOUND": "true"}
    crop = load_config(None, environ=env).crop
    assert crop.mode == "box" and crop.left == ((5.0, 60.5), (-40.0, 30.0), (-80.0, -20.0))
    assert (crop.localiser, crop.min_confidence, crop.segment_when_not_found) == (localiser, 0.3, True)
    assert load_config(None, environ={"IAN_NODE_CROP_MIN_CONFIDENCE": ""}).crop.min_confidence is None


@pytest.mark.parametrize(
    ("text", "env", "key", "reason"),
    [
        ('[crop]\nmode = "landmarks"\n', {}, "crop.mode", "must be 'auto', 'half', 'box' or 'oracle'"),
        ('[crop]\nmode = "box"\n', {}, "crop.right", "required with mode 'box'"),
        (f'[crop]\nmode = "oracle"\nright = {RIGHT}\n', {}, "crop.left", "required with mode 'oracle'"),
        (f"[crop]\nright = {RIGHT}\n", {}, "crop.right", "only with mode 'box' or 'oracle'"),
        (f'[crop]\nmode = "half"\nleft = {LEFT}\n', {}, "crop.left", "only with mode 'box' or 'oracle'"),
        (f'[crop]\nmode = "box"\nright = [[-60, -5], [-40, 30]]\nleft = {LEFT}\n', {}, "crop.right",
         "[[x_min, x_max], [y_min, y_max], [z_min, z_max]]"),
        (f'[crop]\nmode = "box"\nright = [[-5, -60], [-40, 30], [-80, -20]]\nleft = {LEFT}\n', {}, "crop.right",
         "x range must have min < max"),
        (f'[crop]\nmode = "box"\nright = [[-60, -5], [-40, 30], [-80, -20, 3]]\nleft = {LEFT}\n', {}, "crop.right",
         "z range is not two finite numbers"),
        (f'[crop]\nmode = "box"\nright = [[-60, -5], [-40, 30], [-80, "top"]]\nleft = {LEFT}\n', {},
         "crop.right[2][1]", "must be a valid number"),
        (f'[crop]\nmode = "box"\nright = {RIGHT}\nleft = [[-10, 60], [-40, 30], [-80, -20]]\n', {}, "crop.left",
         "overlap"),
        (f'[crop]\nmode = "box"\nright = {LEFT}\nleft = {RIGHT}\n', {}, "crop.left", "lower x"),
        ('[crop]\nlocaliser = "/nonexistent/localiser.pt"\n', {}, "crop.localiser", "does not exist"),
        ("[crop]\nmin_confidence = 1.5\n", {}, "crop.min_confidence", "from 0 to 1"),
        ("[crop]\nmin_confidence = nan\n", {}, "crop.min_confidence", "from 0 to 1"),
        ('[crop]\nsegment_when_not_found = "yes"\n', {}, "crop.segment_when_not_found", "must be a valid boolean"),
        ("", {"IAN_NODE_CROP_MODE": "box", "IAN_NODE_CROP_RIGHT": "-60,-5", "IAN_NODE_CROP_LEFT": LEFT},
         "IAN_NODE_CROP_RIGHT", "TOML inline array"),
        ("", {"IAN_NODE_CROP_SEGMENT_WHEN_NOT_FOUND": "maybe"}, "IAN_NODE_CROP_SEGMENT_WHEN_NOT_FOUND",
         "must be a valid boolean"),
        ("", {"IAN_NODE_CROP_BOXES": RIGHT}, "IAN_NODE_CROP_BOXES", "names no configuration key"),
    ],
)
def test_invalid_crop_value_raises_config_error_naming_key_and_reason(
    tmp_path: Path, text: str, env: dict[str, str], key: str, reason: str
) -> None:
    error = _error(tmp_path, text, env)
    assert error.key == key
    assert reason in error.reason


def test_the_example_config_documents_the_crop_with_its_defaults() -> None:
    example = Path(__file__).parents[1] / "deploy" / "ian-node.toml"
    assert load_config(example, environ={}).crop == CropConfig()
    text = example.read_text()
    assert "[crop]" in text and "segment_when_not_found" in text and "min_confidence" in text
