"""The benchmark's rows: every preset runs both IAN-Net variants and U-Net beside the comparators;
`--pretrained DIR` records the backbone files by SHA-256 in the protocol, refuses a folder that lacks one
before anything is trained, and a run's network starts from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.registry import NETWORKS, PRETRAINED_FILES, PretrainedError, build
from tests.model.official_backbones import write_official_files
from training.benchmark import main
from training.presets import PRESETS, Protocol, Runtime, load_row_pretrained, preset, with_pretrained


def test_every_preset_runs_both_ian_net_variants_unet_and_the_six_comparators() -> None:
    for name, protocol in PRESETS.items():
        assert protocol.models == tuple(NETWORKS), name
        assert {"ian_net", "ian_net_released", "unet"} <= set(protocol.models)
        options = {m: build(m, width=0.125, **protocol.model_options(m)) for m in ("ian_net", "ian_net_released")}
        assert [net.variant for net in options.values()] == ["paper-attention", "released-no-attention"]


def test_the_released_variant_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="same network as the ian_net_released row"):
        preset("smoke", ian_net_variant="released-no-attention")
    assert preset("smoke", ian_net_variant="released-no-attention", models=("ian_net", "unet")).model_options(
        "ian_net") == {"attention": False}


def test_pretrained_folder_is_recorded_by_sha256_for_the_rows_that_use_it(tmp_path: Path) -> None:
    write_official_files("deeplabv3plus", tmp_path, 0.125)
    protocol = with_pretrained(preset("smoke", width=1.0, models=("unet", "deeplabv3plus")), tmp_path)
    assert list(protocol.pretrained) == list(PRETRAINED_FILES["deeplabv3plus"])
    assert protocol.pretrained_rows() == {"deeplabv3plus": protocol.pretrained}
    assert Protocol.from_dict(protocol.to_dict()) == protocol
    assert preset("smoke").pretrained == {} and preset("smoke").pretrained_rows() == {}
    assert with_pretrained(preset("smoke"), None) == preset("smoke")


def test_pretrained_files_need_full_width_and_must_be_those_the_rows_need(tmp_path: Path) -> None:
    with pytest.raises(PretrainedError, match="width 1.0"):
        with_pretrained(preset("smoke", models=("unet", "deeplabv3plus")), tmp_path)
    with pytest.raises(ValueError, match="not those the models need"):
        preset("smoke", width=1.0, models=("unet", "caranet"), pretrained={"hardnet68.pth": "0" * 64})


def test_a_run_starts_from_the_recorded_backbone_and_refuses_a_changed_file(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    expected = write_official_files("hardnet_mseg", tmp_path, 1.0)["hardnet"]
    protocol = with_pretrained(preset("smoke", width=1.0, models=("hardnet_mseg", "unet")), tmp_path)
    runtime = Runtime(pretrained_dir=str(tmp_path))
    net = build("hardnet_mseg", in_channels=1, width=1.0)  # the smoke preset's one channel
    assert load_row_pretrained(net, protocol, runtime) == protocol.pretrained
    loaded = net.hardnet.state_dict()
    torch.testing.assert_close(loaded["base.0.conv.weight"], expected["base.0.conv.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(loaded["base.11.layers.3.conv.weight"], expected["base.11.layers.3.conv.weight"])
    assert load_row_pretrained(build("unet", in_channels=1, width=1.0), protocol, runtime) == {}
    with pytest.raises(ValueError, match="give --pretrained DIR"):
        load_row_pretrained(net, protocol, Runtime())
    torch.save({"base.0.conv.weight": torch.zeros(1)}, tmp_path / "hardnet68.pth")
    with pytest.raises(ValueError, match=r"\['hardnet68.pth'\] .* differ from those this benchmark recorded"):
        load_row_pretrained(net, protocol, runtime)


def test_a_folder_missing_a_file_stops_the_benchmark_before_anything_is_made(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "imagenet"
    folder.mkdir()
    (folder / "hardnet68.pth").write_bytes(b"not looked at")
    out = tmp_path / "bench"
    argv = ["--preset", "smoke", "--out", str(out), "--no-progress", "--width", "1.0", "--models", "unet", "caranet",
            "hardnet_mseg", "--pretrained", str(folder)]
    assert main(argv) == 2
    assert "lacks res2net101_v1b_26w_4s-0812c246.pth." in caplog.text
    assert "caranet: res2net101_v1b_26w_4s-0812c246.pth; hardnet_mseg: hardnet68.pth" in caplog.text
    assert not (out / "data").exists() and not (out / "runs").exists() and not (out / "ledger.json").exists()
