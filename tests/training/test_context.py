"""2.5D training samples: each sample's window is the node's input window for the same slice, and a
context-3 network trained on them predicts through the node's pipeline with those same windows."""

from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from ian_node.phantom.mr_series import build_mr_series
from ian_node.phantom.study import PhantomConfig, generate_phantom
from ian_node.segment.crop import CropMode, CropRequest
from ian_node.segment.pipeline import PipelineOptions, finish_series, prepare, segment_series
from ian_node.segment.volume import load_series
from model import registry
from model.checkpoint import CheckpointMeta, InputContract, load_checkpoint, save_checkpoint
from model.predictor import Predictor, PredictorOptions
from training.data import Collector, DatasetError, LoadOptions, SampleMeta
from training.data.phantoms import phantom_slice_set
from training.data.samples import load_slice_set, save_slice_set, subset
from training.loop import TrainConfig, load_weights, predict_dataset, train
from training.presets import Protocol, preset

SMALL = PhantomConfig(shape=(24, 96, 96))
SEED, SIZE, STEP = 11, 32, 3
PATIENTS = (0, 1, 2)


@pytest.fixture(scope="module")
def samples():
    """Every third coronal slice of each side's half, with its 3-slice window."""
    return phantom_slice_set(PATIENTS, SEED, SMALL, size=SIZE, crop="half", slice_step=STEP, context=3)


@pytest.fixture(scope="module")
def series():
    """Each phantom patient's series as the node loads it, by patient key."""
    out = {}
    for index in PATIENTS:
        phantom = generate_phantom(index, SEED, SMALL)
        out[phantom.study.patient_id] = load_series(build_mr_series(phantom.volume, phantom.study, phantom.series))
    return out


def _node_rows(prepared) -> dict[tuple[str, int], int]:
    """(side, coronal index) → row of `prepared.inputs(...)`."""
    rows, start = {}, 0
    for side in prepared.sides:
        rows.update({(side.stack.side.value, k): start + k for k in range(len(side.images))})
        start += len(side.images)
    return rows


def test_each_sample_window_is_the_nodes_input_window_for_that_slice(samples, series):
    assert samples.context == 3
    for patient, s in series.items():
        prepared = prepare(s, SIZE)
        inputs, rows = prepared.inputs(3), _node_rows(prepared)
        mine = [k for k, m in enumerate(samples.metas) if m.patient == patient]
        assert mine
        for k in mine:
            m = samples.metas[k]
            np.testing.assert_array_equal(samples.window(k), inputs[rows[(m.side, m.slice)]])
            np.testing.assert_array_equal(samples.window(k)[1], samples.images[k])


def test_with_a_slice_step_the_neighbours_are_the_stacks_adjacent_slices_not_the_next_samples(samples, series):
    patient = samples.metas[0].patient
    side = next(p for p in prepare(series[patient], SIZE).sides if p.stack.side.value == samples.metas[0].side)
    for k, m in enumerate(samples.metas):
        if (m.patient, m.side) != (patient, side.stack.side.value):
            continue
        assert m.slice % STEP == 0
        lo, hi = max(m.slice - 1, 0), min(m.slice + 1, len(side.images) - 1)  # the edge slice repeated
        np.testing.assert_array_equal(samples.window(k), side.images[[lo, m.slice, hi]])
    assert len(samples.neighbours) > 0  # kept once beside the samples


def test_the_windows_survive_a_subset_and_the_cache_file(samples, tmp_path):
    picked = [5, 0, 17, 2]
    part = subset(samples, picked)
    for new, old in enumerate(picked):
        np.testing.assert_array_equal(part.window(new), samples.window(old))
    assert len(part.neighbours) <= 3 * len(picked)
    save_slice_set(part, tmp_path / "s.npz")
    loaded, _ = load_slice_set(tmp_path / "s.npz")
    assert loaded.context == 3 and loaded.fingerprint() == part.fingerprint()
    for k in range(len(picked)):
        np.testing.assert_array_equal(loaded.window(k), part.window(k))


def test_2d_samples_keep_their_form_and_fingerprint(samples):
    flat = phantom_slice_set(PATIENTS[:1], SEED, SMALL, size=SIZE, crop="half", slice_step=STEP)
    assert flat.context == 1 and len(flat.neighbours) == 0
    same = replace(flat, windows=None, neighbours=None)
    assert same.fingerprint() == flat.fingerprint()
    three = subset(samples, [i for i, m in enumerate(samples.metas) if m.patient == flat.metas[0].patient])
    np.testing.assert_array_equal(three.images, flat.images)
    assert three.fingerprint() != flat.fingerprint()  # the windows are part of what a 2.5D run used


def test_the_dataset_feeds_the_window_as_channels(samples):
    image, mask, meta = samples.torch_dataset([4], 3)[0]
    assert image.shape == (3, SIZE, SIZE) and mask.shape == (1, SIZE, SIZE)
    np.testing.assert_array_equal(image.numpy() * 255, samples.window(4).astype(np.float32))
    assert meta == samples.metas[4]
    with pytest.raises(ValueError, match="context 3"):
        samples.torch_dataset([4], 1)


def test_single_2d_slices_refuse_a_context():
    collector = Collector(LoadOptions(size=SIZE, context=3))
    with pytest.raises(DatasetError, match="context 3"):
        collector.add_sample("row 1", SampleMeta("P", "right", 0), np.zeros((SIZE, SIZE), np.uint8),
                             np.zeros((SIZE, SIZE), bool))
    with pytest.raises(ValueError, match="odd"):
        LoadOptions(context=2)


def test_the_protocol_records_context_and_gives_it_its_channels():
    assert preset("smoke").context == 1
    p = preset("smoke", context=3)
    assert (p.context, p.in_channels) == (3, 3)
    assert Protocol.from_dict(p.to_dict()) == p
    old = p.to_dict()
    del old["context"]
    del old["in_channels"]
    assert Protocol.from_dict(old).context == 1  # ledgers written before 2.5D
    with pytest.raises(ValueError, match="context 3"):
        preset("smoke", context=3, in_channels=1)
    with pytest.raises(ValueError, match="odd"):
        preset("smoke", context=4)


def test_a_context_3_network_trained_one_epoch_predicts_through_the_node_with_its_training_windows(
        samples, series, tmp_path):
    torch.manual_seed(0)
    net = registry.build("unet", in_channels=3, width=0.125)
    train_idx = [k for k, m in enumerate(samples.metas) if m.patient != samples.metas[0].patient]
    test_idx = [k for k, m in enumerate(samples.metas) if m.patient == samples.metas[0].patient]
    result = train(net, samples.torch_dataset(train_idx, 3), samples.torch_dataset(test_idx, 3), tmp_path / "run",
                   TrainConfig(epochs=1, batch_size=8, device="cpu", progress=False))
    load_weights(net, result.best_checkpoint)
    meta = CheckpointMeta("unet", width=0.125, input=InputContract(size=SIZE, in_channels=3, context=3))
    save_checkpoint(tmp_path / "c3.pt", net, meta)
    predictor = Predictor(load_checkpoint(tmp_path / "c3.pt"), PredictorOptions(device="cpu", batch_size=8))
    assert predictor.context == 3

    patient = samples.metas[0].patient
    options = PipelineOptions(crop=CropRequest(CropMode.HALF), max_gap_mm=None)
    prepared = prepare(series[patient], SIZE)
    node_probabilities = predictor.predict(prepared.inputs(3))
    result = segment_series(series[patient], predictor, options)
    np.testing.assert_array_equal(result.labels, finish_series(prepared, node_probabilities, options)[0])

    scored = predict_dataset(net, samples.torch_dataset(test_idx, 3), device="cpu", keep_probabilities=True)
    rows = _node_rows(prepared)
    node = node_probabilities[[rows[(m.side, m.slice)] for m in scored.metas]]
    np.testing.assert_array_equal(scored.masks, node >= 0.5)  # the benchmark scores what the node predicts
    np.testing.assert_allclose(scored.probabilities.astype(np.float32), node, rtol=0, atol=1e-3)  # kept as float16
    assert asdict(load_checkpoint(tmp_path / "c3.pt").meta.input)["context"] == 3
