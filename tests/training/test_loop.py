import json

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from model.checkpoint import InputContract
from model.predictor import Predictor, PredictorOptions
from model.registry import build
from training.data import SampleMeta, SliceSet
from training.loop import TrainConfig, load_weights, predict_dataset, seed_everything, train

SIZE = 32


class Disks(Dataset):
    """Noisy images with one bright disk; the mask is the disk. Learnable in a few epochs."""

    def __init__(self, n: int, seed: int, invert_masks: bool = False, flat_masks: bool = False):
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:SIZE, :SIZE]
        self.items = []
        for i in range(n):
            cy, cx = rng.uniform(8, SIZE - 8, 2)
            r = rng.uniform(3, 6)
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.float32)
            image = np.clip(0.3 * rng.random((SIZE, SIZE)) + 0.6 * mask, 0, 1).astype(np.float32)
            if invert_masks:
                mask = 1 - mask
            m = torch.from_numpy(mask) if flat_masks else torch.from_numpy(mask)[None]
            self.items.append((torch.from_numpy(image)[None], m, SampleMeta(f"P{i // 4}", "R", i % 4)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


CONFIG = TrainConfig(epochs=8, batch_size=16, lr=1e-2, patience=8, progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed=0):
    seed_everything(seed)
    return build("ian_net", width=0.125)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("run") / "ian_net_r0"
    model = _model()
    result = train(model, Disks(48, 1), Disks(16, 2), run_dir, CONFIG)
    return run_dir, model, result


def test_loss_decreases_on_learnable_toy_set(finished_run):
    _, _, result = finished_run
    losses = [h.train_loss for h in result.history]
    assert len(losses) == 8
    assert losses[-1] < 0.2 * losses[0]
    assert result.best_val_loss == min(h.val_loss for h in result.history)


def test_run_folder_holds_checkpoints_log_and_records(finished_run):
    run_dir, _, result = finished_run
    for name in ("checkpoint_best.pt", "checkpoint_latest.pt", "checkpoint_final.pt", "config.json",
                 "history.json", "result.json"):
        assert (run_dir / name).is_file(), name
    assert "epoch 8/8" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "config.json").read_text())["config"]["lr"] == CONFIG.lr
    assert result.train_seconds > 0 and result.training_hours == result.train_seconds / 3600


def test_resume_after_interruption_gives_the_same_final_weights(finished_run, tmp_path):
    _, reference_model, reference = finished_run

    class Crash(Exception):
        pass

    def crash_after_epoch_3(record):
        if record.epoch == 3:
            raise Crash

    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        train(_model(), Disks(48, 1), Disks(16, 2), run_dir, CONFIG, epoch_callback=crash_after_epoch_3)
    assert not (run_dir / "result.json").exists()
    resumed_model = _model(seed=123)  # different init and RNG state: both must come from the checkpoint
    resumed = train(resumed_model, Disks(48, 1), Disks(16, 2), run_dir, CONFIG)
    assert resumed.epochs_run == 8
    for key, value in reference_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    assert [h.val_loss for h in resumed.history] == [h.val_loss for h in reference.history]
    assert "resuming after epoch 3" in (run_dir / "train.log").read_text()


def test_resume_with_changed_settings_is_refused(tmp_path):
    def stop(record):
        raise KeyboardInterrupt

    config = TrainConfig(epochs=2, batch_size=16, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(_model(), Disks(16, 1), Disks(4, 2), tmp_path, config, epoch_callback=stop)
    with pytest.raises(ValueError, match=r"changed settings \['lr'\]"):
        train(_model(), Disks(16, 1), Disks(4, 2), tmp_path, TrainConfig(epochs=2, batch_size=16, lr=0.1, progress=False))


def test_finished_run_is_not_retrained(finished_run):
    run_dir, _, result = finished_run
    model = _model(seed=5)
    again = train(model, Disks(48, 1), Disks(16, 2), run_dir, CONFIG)
    assert again == result
    final = torch.load(run_dir / "checkpoint_final.pt", weights_only=True)["model"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in final.items())


def test_early_stopping_triggers_when_validation_loss_stops_improving(tmp_path):
    # Validation masks are the background: learning the disks makes the validation loss worse.
    config = TrainConfig(epochs=12, batch_size=16, lr=1e-2, patience=2, progress=False)
    result = train(_model(), Disks(32, 1), Disks(8, 2, invert_masks=True), tmp_path, config)
    assert result.stopped_early
    assert result.epochs_run == result.best_epoch + 2 < 12
    assert "early stopping" in (tmp_path / "train.log").read_text()


def test_predict_dataset_returns_masks_metadata_timing_and_scores(finished_run):
    run_dir, _, result = finished_run
    model = load_weights(_model(seed=9), result.best_checkpoint)
    test_set = Disks(12, 3)
    pred = predict_dataset(model, test_set, batch_size=5, keep_probabilities=True)
    assert pred.masks.shape == pred.targets.shape == pred.probabilities.shape == (12, SIZE, SIZE)
    assert pred.masks.dtype == bool and pred.metas[5] == SampleMeta("P1", "R", 1)
    assert np.array_equal(pred.masks, pred.probabilities.astype(np.float32) >= 0.5)
    assert pred.seconds_per_slice > 0 and pred.wall_seconds >= pred.seconds_per_slice * 12
    scores = pred.scores("ian_net", 0)
    assert len(scores) == 12 and scores[5].key == (0, "P1", "R", 1)
    assert np.mean([s.dsc for s in scores]) > 0.7


def test_predict_dataset_scores_exactly_what_the_nodes_predictor_returns(finished_run):
    _, _, result = finished_run
    disks = Disks(10, 4)
    images = np.stack([np.rint(disks[i][0][0].numpy() * 255).astype(np.uint8) for i in range(10)])
    masks = np.stack([disks[i][1][0].numpy() >= 0.5 for i in range(10)])
    slices = SliceSet(images, masks, tuple(disks[i][2] for i in range(10)))
    model = load_weights(_model(seed=9), result.best_checkpoint)
    pred = predict_dataset(model, slices.torch_dataset(range(10), 1), batch_size=4)
    node = Predictor.from_model(model, InputContract(SIZE, 1), PredictorOptions(batch_size=4)).predict(images)
    np.testing.assert_array_equal(pred.masks, node >= 0.5)
    np.testing.assert_array_equal(pred.targets, masks)


def test_badly_shaped_masks_are_rejected_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"mask \(N, 1, H, W\)"):
        train(_model(), Disks(16, 1, flat_masks=True), Disks(4, 2), tmp_path, TrainConfig(epochs=1, progress=False))


def test_config_validates_its_settings():
    assert TrainConfig() == TrainConfig(epochs=50, batch_size=32, lr=1e-3, weight_decay=1e-4, patience=25)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="gamma"):
        TrainConfig(focal_gamma=-1)
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"epochs": 3, "lr_max": 1})
