"""Config keys and plain functions of the lottery-ticket science features (docs/design.md section 9):
per-layer pruning rates, late-resetting checks, a user's own networks and criteria."""
from __future__ import annotations

import pytest
import torch
import yaml

import harness_params as hp
from utils.models.mask_layers import get_masks, is_subset, prepare_model, set_masks
from utils.models.registry import ModelError, get_model
from utils.pruning import criteria
from utils.pruning import masks as pruning_masks
from utils.pruning import schedules as density_schedules
from utils.training.rewind import CaptureAtIteration, RewindError, rewind_point, start_of_later_levels

MINIMAL = {
    "model": {"name": "lenet_300_100"},
    "dataset": {"name": "digits", "train_path": "a.beton", "test_path": "b.beton"},
    "prune": {"levels": 3},
    "experiment": {"name": "x"},
}


def resolve(tmp_path, **overrides):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    return hp.resolve(str(path), {k: str(v) for k, v in overrides.items()})


# ------------------------------------------------------------------------------ config keys
def test_new_keys_have_defaults_and_take_values(tmp_path):
    c = resolve(tmp_path)
    assert (c["prune.masks_from"], c["prune.control"], c["prune.rewind_iteration"], c["prune.layer_rates"]) == \
        ("", "none", 0, [])
    assert (c["analysis.stability"], c["analysis.interpolation_points"], c["analysis.bn_batches"],
            c["analysis.reestimate_endpoints"]) == (False, 11, 20, False)
    c = resolve(tmp_path, **{"prune.allocation": "uniform", "prune.layer_rates": '["fc*=0.2", "conv*=0.1"]'})
    assert c["prune.layer_rates"] == ["fc*=0.2", "conv*=0.1"]
    c = resolve(tmp_path, **{"prune.allocation": "uniform", "prune.layer_rates": "*.fc=0.2,conv*=0.1"})
    assert c["prune.layer_rates"] == ["*.fc=0.2", "conv*=0.1"]  # one string with commas: the command-line form
    c = resolve(tmp_path, **{"prune.masks_from": "runs/a", "prune.control": "shuffle", "prune.levels": "null"})
    assert c["prune.levels"] is None  # a control may train all of its source's levels
    c = resolve(tmp_path, **{"prune.training_type": "wr", "prune.rewind_iteration": 500, "analysis.stability": "true"})
    assert c["prune.rewind_iteration"] == 500 and c["analysis.stability"] is True


@pytest.mark.parametrize("overrides,fragment", [
    ({"prune.control": "reinit"}, "prune.control=reinit needs prune.masks_from"),
    ({"prune.control": "random"}, "prune.control='random' is not allowed"),
    ({"prune.masks_from": "runs/a", "prune.training_type": "at_init", "prune.target_density": 0.1,
      "prune.levels": "null"}, "at_init contradicts it"),
    ({"prune.masks_from": "runs/a", "prune.target_density": 0.1, "prune.levels": "null"}, "contradicts prune.masks_from"),
    ({"prune.masks_from": "runs/a", "prune.allocation": "uniform", "prune.layer_rates": "fc*=0.2"},
     "layer_rates contradicts prune.masks_from"),
    ({"prune.rewind_iteration": 500}, "needs prune.training_type=wr, not imp"),
    ({"prune.training_type": "wr", "prune.rewind_iteration": 500, "prune.rewind_epoch": 1, "training.epochs": 3},
     "both set; give one"),
    ({"prune.rewind_iteration": -1}, "prune.rewind_iteration=-1 is not allowed"),
    ({"prune.layer_rates": "fc*=0.2"}, "need prune.allocation=uniform, not global"),
    ({"prune.allocation": "uniform", "prune.layer_rates": "fc*=1.5"}, "is not allowed"),
    ({"prune.allocation": "uniform", "prune.layer_rates": "fc*"}, "is not allowed"),
    ({"prune.allocation": "uniform", "prune.layer_rates": "fc*=0.2", "prune.training_type": "at_init",
      "prune.target_density": 0.1, "prune.levels": "null"}, "need an iterative run"),
    ({"prune.allocation": "uniform", "prune.layer_rates": "fc*=0.2", "prune.target_density": 0.1,
      "prune.levels": "null"}, "give prune.levels"),
    ({"analysis.interpolation_points": 1}, "analysis.interpolation_points=1 is not allowed"),
    ({"model.name": "examples.nothing_here:build_net"}, "cannot import module 'examples.nothing_here'"),
    ({"model.name": "examples.custom:no_such_factory"}, "has no attribute 'no_such_factory'"),
    ({"model.name": "examples.custom"}, "model.name='examples.custom' is not allowed"),
    ({"prune.criterion": "math:sqrt"}, "must accept (inputs, masks)"),
    ({"prune.criterion": "utils.pruning.criteria:SCORES"}, "is a dict, not a function"),
])
def test_science_contradictions_are_refused_in_one_line(tmp_path, overrides, fragment):
    with pytest.raises(hp.ConfigError) as error:
        resolve(tmp_path, **overrides)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_help_names_the_new_keys():
    text = hp.help_text()
    for key in ("prune.masks_from", "prune.control", "prune.rewind_iteration", "prune.layer_rates",
                "analysis.stability", "analysis.interpolation_points", "analysis.bn_batches"):
        assert key in text


# --------------------------------------------------------------------------- per-layer rates
def lenet():
    torch.manual_seed(0)
    return prepare_model(get_model("lenet_300_100", num_classes=10, in_channels=1, image_size=8))


def test_parse_and_match_layer_rates():
    assert density_schedules.parse_layer_rates(["5=0.1", "*=0.2"]) == [("5", 0.1), ("*", 0.2)]
    for bad, fragment in ((["x"], "pattern=rate"), (["x=a"], "not a number"), (["=0.1"], "empty"),
                          (["x=1"], "[0, 1)"), (["x=0.1", "x=0.2"], "given twice")):
        with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
            density_schedules.parse_layer_rates(bad)
    rates = density_schedules.rates_by_layer(["1", "3", "5"], [("5", 0.1), ("*", 0.3)], default_rate=0.2)
    assert rates == {"1": 0.3, "3": 0.3, "5": 0.1}  # the first matching pattern wins
    assert density_schedules.rates_by_layer(["1", "3", "5"], [("5", 0.1)], 0.2) == {"1": 0.2, "3": 0.2, "5": 0.1}
    with pytest.raises(ValueError, match=r"\['fc\*'\] match no prunable layer"):
        density_schedules.rates_by_layer(["1", "3", "5"], [("fc*", 0.1)], 0.2)


def test_layer_rate_levels_keep_exact_rounded_counts_and_nest():
    model = lenet()
    plan = density_schedules.layer_rate_plan(model, ["5=0.1"], default_rate=0.2, levels=5)
    numels = {"1": 64 * 300, "3": 300 * 100, "5": 100 * 10}
    assert plan.rates == {"1": 0.2, "3": 0.2, "5": 0.1}
    for level in range(5):
        expected = {name: round((1 - plan.rates[name]) ** level * numels[name]) for name in numels}
        assert plan.counts[level] == expected
        assert plan.densities[level] == pytest.approx(sum(expected.values()) / sum(numels.values()))
    previous = get_masks(model)
    for level in range(1, 5):
        for criterion in ("magnitude", "synflow"):
            masks = pruning_masks.compute_masks(model, criterion=criterion, allocation="uniform", layer_counts=plan.counts[level],
                                     input_shape=(1, 8, 8), synflow_iterations=5)
            assert {name: int(m.sum()) for name, m in masks.items()} == plan.counts[level]
            assert is_subset(masks, previous)
        set_masks(model, masks)
        previous = masks


def test_layer_counts_are_refused_where_they_cannot_apply():
    model = lenet()
    counts = density_schedules.layer_rate_plan(model, [], 0.2, 2).counts[1]
    with pytest.raises(ValueError, match="allocation 'uniform' only"):
        pruning_masks.compute_masks(model, criterion="magnitude", allocation="global", layer_counts=counts)
    with pytest.raises(ValueError, match="exactly one of density and layer_counts"):
        pruning_masks.compute_masks(model, density=0.5, criterion="magnitude", allocation="uniform", layer_counts=counts)
    with pytest.raises(ValueError, match="cannot keep"):
        pruning_masks.compute_masks(model, criterion="magnitude", allocation="uniform", layer_counts={**counts, "5": 1001})


# ------------------------------------------------------------------------------ late resetting
def test_rewind_point_places_the_iteration_and_refuses_beyond_level_0():
    point = rewind_point(500, epochs=10, iterations_per_epoch=196)
    assert (point.epoch, point.batch, point.at_epoch_boundary) == (2, 108, False)
    assert rewind_point(392, epochs=10, iterations_per_epoch=196).at_epoch_boundary
    assert start_of_later_levels(point, 0) == (2, 108) and start_of_later_levels(None, 3) == (3, 0)
    assert rewind_point(1959, epochs=10, iterations_per_epoch=196).epoch == 9
    with pytest.raises(RewindError, match="beyond level 0, which has 1960 iterations"):
        rewind_point(1960, epochs=10, iterations_per_epoch=196)


def test_capture_callback_fires_once_at_the_step():
    class State:
        pass

    state = State()
    captured = []
    callback = CaptureAtIteration(rewind_point(5, epochs=2, iterations_per_epoch=4),
                                  lambda: captured.append((state.level, state.epoch, state.batches_done)))
    for level in (0, 1):
        for epoch in (0, 1):
            for done in range(1, 5):
                state.level, state.epoch, state.batches_done = level, epoch, done
                callback.on_step_end(state)
    assert captured == [(0, 1, 1)]  # after step 5 of level 0 = epoch 1 after 1 batch of 4
    boundary = CaptureAtIteration(rewind_point(4, epochs=2, iterations_per_epoch=4), lambda: captured.append("x"))
    state.level, state.epoch, state.batches_done = 0, 1, 0
    boundary.on_step_end(state)
    assert captured == [(0, 1, 1)] and boundary.capture_now(0, 1, 0)  # epoch boundaries: the harness captures


# ------------------------------------------------------------------- a user's networks and criteria
def test_user_factory_gets_the_arguments_it_accepts(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "from torch import nn\n"
        "seen = []\n"
        "def only_classes(num_classes):\n"
        "    seen.append(num_classes)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n"
        "def not_a_module(num_classes):\n"
        "    return 3\n"
        "def raises(num_classes):\n"
        "    raise RuntimeError('no GPU here')\n"
        "def wrong_output(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes + 1))\n"
        "def no_classes():\n"
        "    return nn.Identity()\n")
    monkeypatch.chdir(tmp_path)  # the current directory is searched, as with python -m
    model = get_model("my_nets:only_classes", num_classes=7, in_channels=1, image_size=8)
    import my_nets
    assert my_nets.seen == [7] and model(torch.zeros(2, 1, 8, 8)).shape == (2, 7)
    own = get_model("examples.custom:build_net", num_classes=10, in_channels=1, image_size=8)
    assert own[0].in_channels == 1 and own[-1].out_features == 10
    for name, fragment in (("my_nets:not_a_module", "returned a int, not a torch.nn.Module"),
                           ("my_nets:raises", "raised RuntimeError: no GPU here"),
                           ("my_nets:wrong_output", "returns shape (1, 8) for one input, expected (1, 7)"),
                           ("my_nets:no_classes", "must accept (num_classes=)"),
                           ("my_nets:missing", "has no attribute 'missing'")):
        with pytest.raises(ModelError) as error:
            get_model(name, num_classes=7, in_channels=1, image_size=8)
        assert fragment in str(error.value) and "\n" not in str(error.value)


def test_user_criterion_scores_are_used_and_checked(tmp_path, monkeypatch):
    model = lenet()
    lamp = pruning_masks.compute_masks(model, density=0.3, criterion="examples.custom:lamp_scores", allocation="global")
    assert sum(int(m.sum()) for m in lamp.values()) == round(0.3 * (19200 + 30000 + 1000))
    # LAMP keeps each layer's largest weight: no layer is emptied, unlike global magnitude at low density
    low = pruning_masks.compute_masks(model, density=0.002, criterion="examples.custom:lamp_scores", allocation="global")
    assert all(int(m.sum()) > 0 for m in low.values())
    assert criteria.user_criterion("examples.custom:lamp_scores").needs() == []  # weights only: no loader made for it
    (tmp_path / "my_scores.py").write_text(
        "import torch\n"
        "def half_missing(inputs, masks):\n"
        "    return {name: torch.ones(m.shape) for name, m in list(masks.items())[:1]}\n"
        "def negative_magnitude(inputs, masks):\n"
        "    from utils.models.mask_layers import masked_layers\n"
        "    return {n: -l.weight.detach().abs() for n, l in masked_layers(inputs.model)}\n")
    monkeypatch.chdir(tmp_path)
    smallest = pruning_masks.compute_masks(model, density=0.5, criterion="my_scores:negative_magnitude", allocation="uniform")
    largest = pruning_masks.compute_masks(model, density=0.5, criterion="magnitude", allocation="uniform")
    weight = model[5].weight.detach().abs()
    assert weight[smallest["5"]].max() <= weight[largest["5"]].min()
    with pytest.raises(ValueError, match="scores must name exactly the masked layers"):
        pruning_masks.compute_masks(model, density=0.5, criterion="my_scores:half_missing", allocation="global")
