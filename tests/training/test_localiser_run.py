"""The benchmark's localiser: boxes by the samples' crop rule, trained on training + validation patients only."""

from __future__ import annotations

import json
from dataclasses import asdict

import nibabel as nib
import numpy as np
import pytest
import torch

from ian_node.phantom.study import PhantomConfig, generate_phantom, write_phantom
from ian_node.segment.volume import SeriesVolume, Side
from model.localiser import load_localiser
from training.data import DatasetError, LoadOptions, nerve_margin_boxes
from training.localiser import LocaliserTrainOptions
from training.localiser_run import (
    StudyVolumes,
    benchmark_localiser,
    dicom_readers,
    patient_key,
    read_samples,
    study_sample,
)
from training.presets import LOCALISER_PRESETS, Protocol, Runtime, localiser_preset
from training.runner import BenchmarkPaths, Ledger
from training.splits import Split

SHAPE = (24, 96, 96)
TINY = LocaliserTrainOptions(spacing_mm=3.0, channels=(2, 2, 2, 2), canvas=(16, 16, 16), iterations=2)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def phantoms():
    return [generate_phantom(i, 5, PhantomConfig(shape=SHAPE)) for i in range(2)]


def _study(phantom, labels: np.ndarray | None = None, landmarks=None) -> StudyVolumes:
    series = SeriesVolume(series_uid="1.2.3", volume=phantom.volume, frames=())
    return StudyVolumes("P0", series, phantom.labels if labels is None else labels, landmarks)


def test_a_study_without_landmarks_gets_its_nerve_margin_boxes(phantoms):
    phantom = phantoms[0]
    sample = study_sample(_study(phantom), "nerve-margins", 6.0, "study")
    expected = nerve_margin_boxes(phantom.labels, np.asarray(phantom.volume.affine))
    assert set(sample.boxes) == set(Side)
    for side in Side:
        np.testing.assert_allclose(sample.boxes[side].bounds, expected[side].bounds)
        assert len(sample.nerve_points[side]) == int((phantom.labels == side.label).sum())


def test_landmark_boxes_are_used_when_the_region_is_landmarks_and_nerve_margins_are_not_a_substitute(phantoms):
    phantom = phantoms[0]
    landmarks = {Side(k): v for k, v in phantom.crop_boxes.items()}
    sample = study_sample(_study(phantom, landmarks=landmarks), "landmarks", 6.0, "study")
    for side in Side:
        np.testing.assert_allclose(sample.boxes[side].bounds, landmarks[side].bounds)
    with pytest.raises(DatasetError, match="no landmark crop boxes"):
        study_sample(_study(phantom), "landmarks", 6.0, "study")


def test_a_study_with_one_side_annotated_is_refused_since_the_other_box_is_unknown(phantoms):
    phantom = phantoms[0]
    right_only = np.where(phantom.labels == Side.RIGHT.label, phantom.labels, 0).astype(np.uint8)
    with pytest.raises(DatasetError, match="right side annotated"):
        study_sample(_study(phantom, right_only), "nerve-margins", 6.0, "study")


def test_nifti_localiser_learns_nerve_margins_from_train_and_val_patients_and_never_reads_the_test_patient(
        phantoms, tmp_path):
    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    for name, phantom in zip(("TRAIN", "VAL"), phantoms, strict=True):
        nib.save(phantom.volume.to_nibabel(), data / "imagesTr" / f"{name}_0000.nii.gz")
        nib.save(phantom.volume.with_array(phantom.labels).to_nibabel(), data / "labelsTr" / f"{name}.nii.gz")
    for path in (data / "imagesTr" / "TEST_0000.nii.gz", data / "labelsTr" / "TEST.nii.gz"):
        path.write_bytes(b"not a NIfTI file: reading it would leave the study out with an error")
    paths = BenchmarkPaths(tmp_path / "bench")
    split = Split(0, 7, ("TRAIN",), ("VAL",), ("TEST",))
    ledger = Ledger(paths.ledger, Protocol(), "fingerprint", [split])
    source = {"data": str(data), "format": "nifti", "load": asdict(LoadOptions())}

    record = benchmark_localiser(paths, ledger, source, "nerve-margins", 0, TINY, Runtime(progress=False))
    assert record["status"] == "trained" and record["studies_left_out"] == []
    assert record["patients"] == {"train": ["TRAIN"], "val": ["VAL"]}
    loaded = load_localiser(paths.localiser)
    assert loaded.sha256 == record["sha256"] and loaded.meta.region == "nerve-margins"
    made = loaded.meta.training["benchmark"]
    assert made["studies"] == {"train": [patient_key("TRAIN")], "val": [patient_key("VAL")]}
    assert patient_key("TEST") not in made["studies"]["train"] + made["studies"]["val"]
    assert "TRAIN" not in str(loaded.meta.training)  # the deployed file names no patient
    assert Ledger.read(paths.ledger).localiser == record

    stamp = paths.localiser.stat().st_mtime_ns
    again = benchmark_localiser(paths, ledger, source, "nerve-margins", 0, TINY, Runtime(progress=False))
    assert again["status"] == "kept" and again["sha256"] == record["sha256"]
    assert paths.localiser.stat().st_mtime_ns == stamp


def test_half_crops_and_the_2d_form_get_no_localiser_and_say_why(tmp_path):
    paths = BenchmarkPaths(tmp_path)
    ledger = Ledger(paths.ledger, Protocol(), "fingerprint", [Split(0, 7, ("A",), ("B",), ("C",))])
    half = benchmark_localiser(paths, ledger, {"format": "dicom"}, "half", 0, TINY, Runtime(progress=False))
    assert half["status"] == "skipped" and "'half'" in half["reason"]
    flat = benchmark_localiser(paths, ledger, {"format": "2d", "data": str(tmp_path)}, "landmarks", 0, TINY,
                               Runtime(progress=False))
    assert flat["status"] == "skipped" and "holds no volumes" in flat["reason"]
    off = benchmark_localiser(paths, ledger, {"format": "dicom"}, "landmarks", 0, localiser_preset("smoke", 0),
                              Runtime(progress=False))
    assert off["status"] == "off" and not paths.localiser.exists()


def test_presets_choose_the_localiser_settings_and_the_smoke_one_is_small():
    assert LOCALISER_PRESETS["paper"] == LOCALISER_PRESETS["phantom"] == LocaliserTrainOptions()
    smoke = localiser_preset("smoke")
    assert smoke.iterations <= 50 and smoke.spacing_mm >= 6.0
    assert localiser_preset("paper", 7).iterations == 7
    with pytest.raises(ValueError, match="iterations"):
        localiser_preset("paper", -1)


def test_a_dicom_study_without_landmarks_gives_nerve_margin_boxes_and_none_for_a_landmark_localiser(
        phantoms, tmp_path):
    phantom = phantoms[0]
    files = write_phantom(phantom, tmp_path / "study")
    summary = json.loads(files.summary.read_text())
    del summary["crop_boxes"]
    files.summary.write_text(json.dumps(summary))
    roles = {phantom.study.patient_id: "train"}
    readers = dicom_readers(tmp_path, LoadOptions(), roles.__contains__, "nerve-margins")
    samples, left_out = read_samples(readers, roles, "nerve-margins", 3.0)
    assert left_out == [] and len(samples["train"]) == 1
    expected = nerve_margin_boxes(phantom.labels, np.asarray(phantom.volume.affine))
    for side in Side:
        np.testing.assert_allclose(samples["train"][0].boxes[side].bounds, expected[side].bounds, atol=1e-3)
    readers = dicom_readers(tmp_path, LoadOptions(), roles.__contains__, "landmarks")
    samples, left_out = read_samples(readers, roles, "landmarks", 3.0)
    assert samples["train"] == [] and "no landmark crop boxes" in left_out[0]["reason"]
    assert read_samples(dicom_readers(tmp_path, LoadOptions(), lambda p: False, "nerve-margins"), roles,
                        "nerve-margins", 3.0) == ({"train": [], "val": []}, [])
