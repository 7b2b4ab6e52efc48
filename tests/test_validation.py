"""Model selection on validation data (dataset.val_fraction, dataset.val_path): the split is a
function of the training file and dataset.val_seed only, disjoint from training, the same for
every process count and loader back-end; the best and early-stopping epochs are chosen on it;
without it levels.csv says the best epoch was chosen on the test set."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import harness
import harness_utils as hu
from tests.helpers import digits_config, write_config
from tests.test_resume import assert_same_results, run_in_process
from utils.data.beton import BetonFile
from utils.data.loaders import make_loader
from utils.data.sources import DataError
from utils.data.specs import get_dataset_spec
from utils.data.validation import split_indices
from utils.training import selection


def test_the_split_is_deterministic_disjoint_and_independent_of_the_run_seed():
    train, val = split_indices(1437, 0.1, 0)
    again_train, again_val = split_indices(1437, 0.1, 0)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert len(val) == 144 and len(train) == 1437 - 144
    assert not set(train) & set(val) and sorted(set(train) | set(val)) == list(range(1437))
    assert list(val) == sorted(val) and list(train) == sorted(train)
    assert not np.array_equal(val, split_indices(1437, 0.1, 1)[1]), "dataset.val_seed draws another split"
    # dataset.train_samples: a subset of the rest, from the same permutation (validation unchanged; nested)
    small, small_val = split_indices(1437, 0.1, 0, train_samples=300)
    larger = split_indices(1437, 0.1, 0, train_samples=600)[0]
    assert np.array_equal(small_val, val) and len(small) == 300 and set(small) <= set(larger) <= set(train)
    assert len(split_indices(1437, 0.0, 0, train_samples=300)[1]) == 0
    with pytest.raises(DataError, match="dataset.train_samples=1400: the training file has 1293"):
        split_indices(1437, 0.1, 0, train_samples=1400)
    # experiment.seed is not an argument: every seed and control of a study holds out the same samples
    for seed in (0, 7):
        config = {"dataset.val_fraction": 0.1, "dataset.val_seed": 0, "dataset.train_samples": 0, "experiment.seed": seed}
        assert np.array_equal(hu.validation_split(config, 1437)[1], val)


@pytest.mark.parametrize("backend", ["torch", "memory", "ffcv"])
def test_every_backend_and_process_count_reads_only_its_side(digits, backend):
    spec = get_dataset_spec("digits")
    path = digits / "digits_train.beton"
    file = BetonFile(path)
    train, val = split_indices(file.num_samples, 0.1, 0)
    labels = np.asarray(file.metadata["label"], dtype=np.int64)
    common = dict(batch_size=64, num_workers=1, device="cpu", seed=3)
    reference = make_loader(path, spec, train=True, backend="torch", indices=train, **common)
    one = make_loader(path, spec, train=True, backend=backend, indices=train, **common)
    ranks = [make_loader(path, spec, train=True, backend=backend, indices=train, rank=r, world_size=2, **common)
             for r in (0, 1)]
    assert len(one) == (file.num_samples - len(val)) // 64
    seen = set()
    batches = zip(reference.batches(1), one.batches(1), *(rank.batches(1) for rank in ranks))
    for (ref_x, ref_y), (x, y), (x0, y0), (x1, y1) in batches:
        assert torch_equal(x, ref_x) and torch_equal(y, ref_y), "the same images as the torch back-end, bit for bit"
        assert torch_equal(torch_cat(x0, x1), x) and torch_equal(torch_cat(y0, y1), y), "2 processes: the same batch"
    for index in one.order(1):
        seen.add(int(index))
    assert seen <= set(train.tolist()) and not seen & set(val.tolist()), "training never reads a held-out sample"
    held_out = make_loader(path, spec, train=False, backend=backend, indices=val, **common)
    images, targets = zip(*held_out.batches(0))
    assert torch_cat(*targets).tolist() == labels[val].tolist(), "validation: every held-out sample once, in order"
    assert held_out.num_samples == len(val)
    expected = np.stack([file.decode_image(int(i)) for i in val[:5]]).astype(np.float32)
    got = torch_cat(*images)[:5].permute(0, 2, 3, 1).numpy() * (255 * spec.std[0]) + 255 * spec.mean[0]
    assert np.allclose(got, expected, atol=1e-3)


def torch_equal(a, b) -> bool:
    import torch
    return a.shape == b.shape and torch.equal(a, b)


def torch_cat(*tensors):
    import torch
    return torch.cat(tensors)


def test_selection_rules():
    stats = selection.new_level_stats(with_validation=True)
    rows = [  # test accuracy peaks at epoch 2, validation accuracy at epoch 1, validation loss at epoch 0
        {"epoch": 0, "test_acc": 50.0, "val_acc": 70.0, "val_loss": 0.2},
        {"epoch": 1, "test_acc": 60.0, "val_acc": 80.0, "val_loss": 0.3},
        {"epoch": 2, "test_acc": 90.0, "val_acc": 80.0, "val_loss": 0.2},
    ]
    for row in rows:
        selection.record_epoch(stats, row, iterations_per_epoch=10)
    assert selection.level_fields(stats) == {
        "best_test_acc": 60.0, "best_epoch": 1, "best_selected_on": "val", "best_val_acc": 80.0,
        "early_stop_epoch": 0, "early_stop_iteration": 10, "test_acc_at_early_stop": 50.0}
    on_test = selection.new_level_stats(with_validation=False)
    for row in rows:
        selection.record_epoch(on_test, row, iterations_per_epoch=10)
    assert selection.level_fields(on_test) == {"best_test_acc": 90.0, "best_epoch": 2, "best_selected_on": "test"}


@pytest.mark.parametrize("val_fraction", [0.1, 0.0])
def test_the_reported_best_epoch_is_chosen_on_validation_not_on_test(tmp_path, digits, monkeypatch, val_fraction):
    """A constructed case where test and validation disagree: the evaluations are scripted (test
    accuracy peaks at epoch 2, validation accuracy at epoch 1, validation loss at epoch 0)."""
    script = {"test": [(1.0, 50.0), (0.9, 60.0), (0.8, 90.0)], "val": [(0.2, 70.0), (0.3, 80.0), (0.25, 75.0)]}
    calls = {"test": 0, "val": 0}

    def scripted(self, loader=None):
        kind = "test" if loader is None else "val"
        assert loader is None or loader is self.val_loader
        result = script[kind][calls[kind] % 3]
        calls[kind] += 1
        return result

    monkeypatch.setattr(harness.Experiment, "evaluate", scripted)
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **{
        "dataset.val_fraction": val_fraction, "training.epochs": 3, "prune.levels": 2}))
    code, out, err = run_in_process(config)
    assert code == 0, err
    root = tmp_path / "runs" / "exp"
    levels, epochs = pd.read_csv(root / "levels.csv"), pd.read_csv(root / "epochs.csv")
    assert levels.final_test_acc.tolist() == [90.0, 90.0]
    if val_fraction:
        assert calls == {"test": 6, "val": 6}
        assert levels.best_selected_on.tolist() == ["val", "val"]
        assert levels.best_epoch.tolist() == [1, 1] and levels.best_test_acc.tolist() == [60.0, 60.0]
        assert levels.best_val_acc.tolist() == [80.0, 80.0]
        assert levels.early_stop_epoch.tolist() == [0, 0]
        train_batches = (1437 - 144) // 64
        assert levels.early_stop_iteration.tolist() == [train_batches] * 2
        assert levels.test_acc_at_early_stop.tolist() == [50.0, 50.0]
        assert epochs.val_acc.tolist() == [70.0, 80.0, 75.0] * 2 and "val_loss" in epochs
        assert "chosen on the validation set" in out
    else:
        assert calls["val"] == 0
        assert list(levels.columns) == hu.LEVEL_COLUMNS and "val_acc" not in epochs
        assert levels.best_selected_on.tolist() == ["test", "test"]
        assert levels.best_epoch.tolist() == [2, 2] and levels.best_test_acc.tolist() == [90.0, 90.0]
        assert "chosen on the test set" in out


def test_a_run_with_validation_resumes_to_the_uninterrupted_results(tmp_path, digits):
    overrides = {"dataset.val_fraction": 0.1, "training.epochs": 3, "prune.levels": 2, "dataset.loader": "memory"}
    reference = write_config(tmp_path / "ref.yaml", digits_config(digits, tmp_path / "runs", "ref", **overrides))
    assert run_in_process(reference)[0] == 0
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", "stopped", **overrides))
    code, _, err = run_in_process(config, env={"HARNESS_TEST_KILL_AT": "batch:1:1:5",
                                               "HARNESS_TEST_KILL_SIGNAL": "SIGTERM"})
    assert code == harness.EXIT_PREEMPTED, err
    code, out, err = run_in_process(config)
    assert code == 0 and "resuming" in out, err
    assert_same_results(tmp_path / "runs" / "ref", tmp_path / "runs" / "stopped")


def test_a_validation_file_and_the_refusals(tmp_path, digits):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **{
        "dataset.val_path": str(digits / "digits_test.beton"), "prune.levels": 1, "training.epochs": 1}))
    code, out, err = run_in_process(config)
    assert code == 0, err
    levels = pd.read_csv(tmp_path / "runs" / "exp" / "levels.csv")
    epochs = pd.read_csv(tmp_path / "runs" / "exp" / "epochs.csv")
    assert levels.best_selected_on.tolist() == ["val"]
    assert epochs.val_acc.tolist() == epochs.test_acc.tolist(), "the test file given as validation data"
    code, _, err = run_in_process(config, "--dataset.val_fraction=0.1", "--experiment.name=both")
    assert code == 2 and "dataset.val_fraction=0.1 and dataset.val_path=" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_in_process(config, "--dataset.val_path=", "--dataset.val_fraction=0.0001",
                                  "--experiment.name=tiny")
    assert code == 2 and "holds out 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "both").exists() and not (tmp_path / "runs" / "tiny").exists()


def test_a_control_trains_on_its_sources_samples(tmp_path, digits):
    """Every control of a study holds out the same validation samples: another split is refused."""
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", "source", **{
        "dataset.val_fraction": 0.1, "prune.levels": 2, "training.epochs": 1}))
    assert run_in_process(config)[0] == 0
    source = str(tmp_path / "runs" / "source")
    code, _, err = run_in_process(config, f"--prune.masks_from={source}", "--prune.control=shuffle",
                                  "--experiment.name=other_split", "--dataset.val_seed=1")
    assert code == 2 and "was made with dataset.val_seed=0, this run has dataset.val_seed=1" in err
    code, out, err = run_in_process(config, f"--prune.masks_from={source}", "--prune.control=shuffle",
                                    "--experiment.name=same_split")
    assert code == 0, err
    assert pd.read_csv(tmp_path / "runs" / "same_split" / "levels.csv").best_selected_on.tolist() == ["val", "val"]
