import numpy as np
import pytest
import torch

from model import registry
from model.checkpoint import CheckpointError, CheckpointMeta, InputContract, load_checkpoint, save_checkpoint
from model.predictor import Predictor, PredictorOptions, pick_device


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    net = registry.build("ian_net", width=0.125)
    meta = CheckpointMeta(
        architecture="ian_net",
        width=0.125,
        options={"attention": True},
        variant=net.variant,
        input=InputContract(size=64, in_channels=1),
        label="test",
        training={"epochs": 0},
    )
    path = tmp_path_factory.mktemp("ckpt") / "net.pt"
    digest = save_checkpoint(path, net, meta)
    return path, digest, net, meta


def test_checkpoint_round_trip_restores_weights_and_metadata(saved):
    path, digest, net, meta = saved
    loaded = load_checkpoint(path)
    assert loaded.meta == meta
    assert loaded.sha256 == digest
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert not loaded.model.training


def test_a_foreign_file_is_refused_with_its_path(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="not an ian-node checkpoint"):
        load_checkpoint(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)


def test_weights_of_another_width_are_refused(saved, tmp_path):
    path, _, net, meta = saved
    other = CheckpointMeta(**{**meta.__dict__, "width": 0.25})
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(wrong, net, other)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(wrong)


def test_predictor_matches_the_model_in_batches(saved):
    path, *_ = saved
    loaded = load_checkpoint(path)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 64, 64), dtype=np.uint8)
    probs = Predictor(loaded, PredictorOptions(batch_size=2)).predict(images)
    assert probs.shape == (5, 64, 64) and probs.dtype == np.float32
    expected = torch.sigmoid(loaded.model.predict(torch.from_numpy(images).float().div(255).unsqueeze(1)))[:, 0]
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)


def test_predictor_refuses_slices_of_the_wrong_size(saved):
    loaded = load_checkpoint(saved[0])
    with pytest.raises(ValueError, match=r"\(N, 64, 64\)"):
        Predictor(loaded).predict(np.zeros((1, 32, 32), np.uint8))


def test_cuda_request_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick_device("cuda")


def test_auto_and_none_pick_cuda_when_present_else_the_cpu():
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("auto") == pick_device(None) == expected
    assert pick_device("cpu") == torch.device("cpu")


def test_predictor_over_an_in_memory_model_matches_the_checkpoint_predictor(saved):
    path, _, net, meta = saved
    images = np.random.default_rng(1).integers(0, 256, size=(3, 64, 64), dtype=np.uint8)
    from_file = Predictor(load_checkpoint(path)).predict(images)
    in_memory = Predictor.from_model(net, meta.input)
    assert in_memory.checkpoint is None and in_memory.size == 64
    np.testing.assert_array_equal(in_memory.predict(images), from_file)


def test_three_channel_model_takes_grey_slices_as_replicated_channels():
    torch.manual_seed(0)
    predictor = Predictor.from_model(registry.build("ian_net", in_channels=3, width=0.125), InputContract(32, 3))
    grey = torch.rand(2, 1, 32, 32)
    np.testing.assert_array_equal(predictor.probabilities(grey).cpu().numpy(),
                                  predictor.probabilities(grey.expand(-1, 3, -1, -1)).cpu().numpy())
    with pytest.raises(ValueError, match=r"\(N, 1 or 3, 32, 32\)"):
        predictor.probabilities(torch.rand(2, 2, 32, 32))
