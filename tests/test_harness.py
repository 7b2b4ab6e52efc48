"""The level loop end to end on real digits .beton files: output contract and the exact
semantics of IMP / WR / LRR / at_init (docs/design.md sections 5 and 6)."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import harness
import harness_params
import harness_utils as hu
from tests.helpers import digits_config, run_harness, write_config
from utils.core import distributed as du
from utils.models import mask_layers


def make_experiment(tmp_path, digits, **overrides) -> harness.Experiment:
    """An Experiment set up exactly as run() does, up to the level loop (one process)."""
    config_path = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **overrides))
    config = harness_params.load_config(["--config", str(config_path)])
    experiment = harness.Experiment(config, du.DistributedContext(), use_ddp=False)
    experiment.check_inputs()
    experiment.files = hu.ExperimentFiles(experiment.decide_directory().root)
    experiment.build_training_objects()
    experiment.level_stats = experiment.new_level_stats()
    experiment.new_optimizer()
    experiment.start_fresh()
    return experiment


def train_level(experiment, level):
    epoch = experiment.begin_level(level)
    experiment.capture_rewind_state(level, epoch)
    while epoch < experiment.c["training.epochs"]:
        experiment.train_and_evaluate(level, epoch)
        epoch += 1
        experiment.capture_rewind_state(level, epoch)


def alive_weights(model):
    return {name: layer.weight.detach()[layer.mask].clone() for name, layer in mask_layers.masked_layers(model)}


def test_full_run_writes_the_output_contract(tmp_path, digits):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **{"prune.levels": 3}))
    result = run_harness(config)
    assert result.returncode == 0, result.stderr
    root = tmp_path / "runs" / "exp"
    epochs = pd.read_csv(root / "epochs.csv")
    assert list(epochs.columns) == hu.EPOCH_COLUMNS
    assert list(zip(epochs.level, epochs.epoch)) == [(l, e) for l in range(3) for e in range(2)]
    assert epochs.test_acc.between(0, 100).all() and (epochs.test_acc.iloc[:2] > 50).all()
    levels = pd.read_csv(root / "levels.csv")
    assert list(levels.columns) == hu.LEVEL_COLUMNS and levels.level.tolist() == [0, 1, 2]
    layers = pd.read_csv(root / "layers.csv")
    assert list(layers.columns) == hu.LAYER_COLUMNS and len(layers) == 3 * 3  # 3 levels x 3 Linear layers
    total = layers[layers.level == 0].numel.sum()
    for level in range(3):
        alive = layers[layers.level == level].alive.sum()
        assert alive == round(0.8 ** level * total), "kept-weight count is the target rounded, exactly"
        assert levels.density[level] == pytest.approx(alive / total)
        assert levels.target_density[level] == pytest.approx(0.8 ** level)
    masks = [torch.load(root / "masks" / f"level_{l}.pt", weights_only=True) for l in range(3)]
    assert mask_layers.is_subset(masks[2], masks[1]) and mask_layers.is_subset(masks[1], masks[0])
    # Pruned weights are exactly zero in the final checkpoint.
    state = torch.load(root / "checkpoints" / "last.pt", weights_only=True)
    assert state["finished"]
    for name, mask in masks[2].items():
        assert torch.count_nonzero(state["model"][f"{name}.weight"][~mask]) == 0
    assert hu.read_config_yaml(root / "config.yaml")["prune.levels"] == 3
    # Running the finished experiment again does nothing and says so.
    again = run_harness(config)
    assert again.returncode == 0 and "finished" in again.stdout
    assert len(pd.read_csv(root / "epochs.csv")) == 6


def test_imp_rewinds_to_initial_weights(tmp_path, digits):
    experiment = make_experiment(tmp_path, digits, **{"prune.training_type": "imp"})
    train_level(experiment, 0)
    experiment.begin_level(1)
    init = experiment.init_state["model"]
    for name, layer in mask_layers.masked_layers(experiment.model):
        expected = init[f"{name}.weight"] * layer.mask
        assert torch.equal(layer.weight.detach(), expected)
        assert torch.equal(layer.bias.detach(), init[f"{name}.bias"])
    assert experiment.schedule.iteration == 0 and not experiment.optimizer.state


def test_wr_restarts_from_saved_epoch_with_saved_lr_and_momentum(tmp_path, digits):
    experiment = make_experiment(tmp_path, digits, **{"prune.training_type": "wr", "prune.rewind_epoch": 1,
                                                      "training.epochs": 3})
    iterations_per_epoch = len(experiment.train_loader)
    train_level(experiment, 0)
    saved = experiment.rewind_state
    assert saved["schedule"]["iteration"] == iterations_per_epoch  # end of epoch 1 (one epoch done)
    start_epoch = experiment.begin_level(1)
    assert start_epoch == 1
    assert experiment.schedule.iteration == iterations_per_epoch
    assert experiment.schedule.lr == pytest.approx(
        experiment.c["optimizer.lr"] * (0.5 * (1 + math.cos(math.pi * 1 / 3))))
    for name, layer in mask_layers.masked_layers(experiment.model):
        assert torch.equal(layer.weight.detach(), saved["model"][f"{name}.weight"] * layer.mask)
    momentum = experiment.optimizer.state_dict()["state"]
    for index, param_state in saved["optimizer"]["state"].items():
        assert torch.equal(momentum[index]["momentum_buffer"], param_state["momentum_buffer"])


def test_lrr_keeps_weights_and_restarts_schedule(tmp_path, digits):
    experiment = make_experiment(tmp_path, digits, **{"prune.training_type": "lrr"})
    train_level(experiment, 0)
    trained = {n: l.weight.detach().clone() for n, l in mask_layers.masked_layers(experiment.model)}
    experiment.begin_level(1)
    for name, layer in mask_layers.masked_layers(experiment.model):
        assert torch.equal(layer.weight.detach(), trained[name] * layer.mask)
        assert int(layer.mask.sum()) < layer.mask.numel() or name == "5"
    assert experiment.schedule.iteration == 0 and experiment.schedule.lr == pytest.approx(experiment.c["optimizer.lr"])
    assert not experiment.optimizer.state


def test_pruned_weights_stay_zero_through_training_and_evaluation(tmp_path, digits):
    experiment = make_experiment(tmp_path, digits, **{"prune.training_type": "lrr"})
    train_level(experiment, 0)
    experiment.begin_level(1)
    masks = mask_layers.get_masks(experiment.model)
    experiment.train_and_evaluate(1, 0)
    for name, layer in mask_layers.masked_layers(experiment.model):
        assert torch.count_nonzero(layer.weight.detach()[~masks[name]]) == 0
        assert torch.equal(layer.mask.cpu(), masks[name])


def test_at_init_prunes_once_before_training(tmp_path, digits):
    config = write_config(tmp_path / "c.yaml", digits_config(
        digits, tmp_path / "runs", **{"prune.training_type": "at_init", "prune.levels": None,
                                      "prune.target_density": 0.1, "prune.criterion": "random",
                                      "prune.allocation": "erk"}))
    result = run_harness(config)
    assert result.returncode == 0, result.stderr
    levels = pd.read_csv(tmp_path / "runs" / "exp" / "levels.csv")
    assert levels.level.tolist() == [0]
    assert levels.density[0] == pytest.approx(0.1, abs=1e-4)
