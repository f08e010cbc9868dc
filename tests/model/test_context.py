"""2.5D inputs in the model package: the window rule, the input contract, and the predictor's two input forms."""

from dataclasses import asdict

import numpy as np
import pytest
import torch

from model import registry
from model.checkpoint import (
    BUNDLED_CHECKPOINT,
    CheckpointError,
    CheckpointMeta,
    InputContract,
    load_checkpoint,
    save_checkpoint,
    write_weights,
)
from model.checkpoint import FORMAT as CHECKPOINT_FORMAT
from model.predictor import Predictor, PredictorOptions
from model.preprocess import SliceTransformError, check_context, context_windows, model_input

SIZE = 32


def test_windows_put_the_slice_in_the_middle_and_repeat_the_edge_slice():
    np.testing.assert_array_equal(context_windows(4, 3), [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])
    np.testing.assert_array_equal(context_windows(2, 5), [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(context_windows(10, 3, np.array([0, 4, 9])), [[0, 0, 1], [3, 4, 5], [8, 9, 9]])
    np.testing.assert_array_equal(context_windows(3, 1), [[0], [1], [2]])


@pytest.mark.parametrize("bad", [0, 2, -1, True, 3.0])
def test_a_context_that_is_not_a_positive_odd_count_is_refused(bad):
    with pytest.raises(SliceTransformError, match="odd"):
        check_context(bad)


def test_a_window_centre_outside_the_stack_is_refused():
    with pytest.raises(SliceTransformError, match="0..3"):
        context_windows(4, 3, np.array([4]))


def test_model_input_takes_windows_as_channels_and_single_slices_as_grey():
    windows = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2)
    x = model_input(windows, 3, context=3)
    assert x.shape == (2, 3, 2, 2) and x.dtype == np.float32
    np.testing.assert_array_equal(x * 255, windows.astype(np.float32))
    grey = model_input(windows[:, 0], 3)  # a single slice: replicated, not windows
    assert grey.shape == (2, 3, 2, 2) and (grey[:, 0] == grey[:, 2]).all()
    with pytest.raises(SliceTransformError, match="context 3"):
        model_input(windows, 1, context=3)


def test_the_contract_ties_context_to_the_input_channels():
    assert InputContract().context == 1
    assert InputContract(size=SIZE, in_channels=5, context=5).context == 5
    with pytest.raises(ValueError, match="context 3"):
        InputContract(size=SIZE, in_channels=1, context=3)
    with pytest.raises(SliceTransformError, match="odd"):
        InputContract(size=SIZE, in_channels=2, context=2)


def test_a_checkpoint_with_context_3_records_it(tmp_path):
    net = registry.build("unet", in_channels=3, width=0.125)
    meta = CheckpointMeta("unet", width=0.125, input=InputContract(size=SIZE, in_channels=3, context=3))
    save_checkpoint(tmp_path / "c3.pt", net, meta)
    loaded = load_checkpoint(tmp_path / "c3.pt")
    assert loaded.meta.input.context == 3 and loaded.meta.input.in_channels == 3
    assert Predictor(loaded).context == 3


def test_a_checkpoint_written_before_context_loads_as_2d(tmp_path):
    net = registry.build("unet", in_channels=3, width=0.125)
    meta = asdict(CheckpointMeta("unet", width=0.125, input=InputContract(size=SIZE, in_channels=3)))
    del meta["input"]["context"]  # as files written before 2.5D
    write_weights(tmp_path / "old.pt", CHECKPOINT_FORMAT, net, meta)
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded.meta.input.context == 1 and loaded.meta.input.in_channels == 3


def test_a_checkpoint_whose_context_does_not_fit_its_channels_is_refused(tmp_path):
    net = registry.build("unet", in_channels=1, width=0.125)
    meta = asdict(CheckpointMeta("unet", width=0.125, input=InputContract(size=SIZE, in_channels=1)))
    meta["input"]["context"] = 3
    write_weights(tmp_path / "bad.pt", CHECKPOINT_FORMAT, net, meta)
    with pytest.raises(CheckpointError, match="context 3"):
        load_checkpoint(tmp_path / "bad.pt")


def test_the_bundled_checkpoint_is_2d_and_predicts_as_its_network_on_grey_slices():
    loaded = load_checkpoint(BUNDLED_CHECKPOINT)
    assert loaded.meta.input.context == 1
    size = loaded.meta.input.size
    images = np.random.default_rng(0).integers(0, 256, (2, size, size), dtype=np.uint8)
    probs = Predictor(loaded, PredictorOptions(device="cpu", batch_size=2)).predict(images)
    x = torch.from_numpy(images).float().div(255).unsqueeze(1).expand(-1, loaded.meta.input.in_channels, -1, -1)
    with torch.inference_mode():
        expected = torch.sigmoid(loaded.model(x).logits.float())[:, 0].numpy()
    np.testing.assert_array_equal(probs, expected)


def test_a_context_3_predictor_feeds_windows_as_channels_and_refuses_single_slices():
    torch.manual_seed(0)
    net = registry.build("unet", in_channels=3, width=0.125).eval()
    predictor = Predictor.from_model(net, InputContract(size=SIZE, in_channels=3, context=3),
                                     PredictorOptions(device="cpu", batch_size=3))
    windows = np.random.default_rng(1).integers(0, 256, (5, 3, SIZE, SIZE), dtype=np.uint8)
    probs = predictor.predict(windows)
    with torch.inference_mode():
        expected = torch.sigmoid(net(torch.from_numpy(windows).float().div(255)).logits.float())[:, 0].numpy()
    assert probs.shape == (5, SIZE, SIZE)
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="context-3 windows"):
        predictor.predict(windows[:, 1])
