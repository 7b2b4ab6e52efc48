"""utils/pruning/criteria.py: exact counts, allocations, nesting, criteria, schedules, CLI.

Pins docs/design.md section 5: kept counts are the target rounded, masks only shrink, pruned
weights never come back, and each score / allocation means what the docstrings say.
"""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from utils.models.mask_layers import (
    all_true_masks,
    count_alive,
    get_masks,
    is_subset,
    load_masks,
    masked_layers,
    prepare_model,
    set_masks,
)
from utils.models.registry import get_model
from utils.pruning import allocations, criteria, topk
from utils.pruning import command as pruning_command
from utils.pruning import masks as pruning_masks
from utils.pruning import schedules as density_schedules

ROOT = Path(__file__).resolve().parents[1]
INPUT_SHAPE = (3, 8, 8)
CRITERIA = criteria.weight_criteria()   # every registered name that scores weights: a new entry is tested without editing this file
ALLOCATIONS = list(allocations.ALLOCATIONS)
DENSITIES = [0.5, 0.2, 0.05, 0.011]


def resnet20() -> nn.Module:
    """CIFAR ResNet-20 (option-B shortcuts: two prunable 1x1 convs), on 8x8 inputs."""
    torch.manual_seed(0)
    return prepare_model(get_model("resnet20", num_classes=10, in_channels=3, image_size=8))


def mlp_with_excluded_layer() -> nn.Module:
    """LeNet-300-100 on 3x8x8 inputs with its output layer ('5') excluded."""
    torch.manual_seed(1)
    return prepare_model(get_model("lenet_300_100", num_classes=10, in_channels=3, image_size=8), exclude=["5"])


MODELS = {"resnet20": resnet20, "mlp_excluded": mlp_with_excluded_layer}


def make_batches(count: int = 2, batch_size: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn((batch_size, *INPUT_SHAPE), generator=generator),
             torch.randint(0, 10, (batch_size,), generator=generator)) for _ in range(count)]


def scoring_kwargs(**overrides):
    kwargs = dict(batches=make_batches(), input_shape=INPUT_SHAPE, synflow_iterations=3, seed=0)
    kwargs.update(overrides)
    return kwargs


def total_weights(masks) -> int:
    return sum(mask.numel() for mask in masks.values())


def layer_counts(masks):
    return {name: int(mask.sum()) for name, mask in masks.items()}


def state_copy(model: nn.Module):
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_same_state(model: nn.Module, before) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """These tensors are tiny: extra intra-op threads only add overhead, and they spin-wait
    when other processes hold the cores (5x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in MODELS.items()}


# ----------------------------------------------------------------------- exact counts
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_exact_counts_for_every_score_and_allocation(models, model_name, criterion, allocation):
    model = models[model_name]
    before = state_copy(model)
    dense = all_true_masks(model)
    total = total_weights(dense)
    for density in DENSITIES:
        masks = pruning_masks.compute_masks(model, density=density, criterion=criterion, allocation=allocation,
                                 masks=dense, **scoring_kwargs())
        assert set(masks) == set(dense)
        assert all(mask.dtype == torch.bool and mask.device.type == "cpu" for mask in masks.values())
        assert count_alive(masks) == round(density * total)
        if allocation != "global":
            expected = allocations.layer_keep_counts(
                allocation, capacities={n: m.numel() for n, m in dense.items()},
                numels={n: m.numel() for n, m in dense.items()},
                shapes={n: tuple(m.shape) for n, m in dense.items()}, total_keep=round(density * total))
            assert layer_counts(masks) == expected
    assert_same_state(model, before)  # scoring never touches the model


def test_excluded_layer_is_neither_pruned_nor_counted():
    model = mlp_with_excluded_layer()
    excluded_weight = model[5].weight.detach().clone()
    masks = pruning_masks.prune_model(model, density=0.1, criterion="magnitude", allocation="global")
    assert set(masks) == {"1", "3"}
    assert count_alive(masks) == round(0.1 * (192 * 300 + 300 * 100))
    assert torch.equal(model[5].weight, excluded_weight)
    assert bool((model[1].weight[~masks["1"]] == 0).all())


# ------------------------------------------------------------------------ allocations
def rigl_erk_densities(shapes, density):
    """RigL's sparse_utils.get_sparsities_erdos_renyi, written out independently."""
    dense_layers = set()
    while True:
        divisor, rhs, raw = 0.0, 0.0, {}
        for name, shape in shapes.items():
            n_param = math.prod(shape)
            if name in dense_layers:
                rhs -= n_param * (1 - density)
            else:
                rhs += n_param * density
                raw[name] = sum(shape) / n_param
                divisor += raw[name] * n_param
        eps = rhs / divisor
        max_raw = max(raw.values())
        if max_raw * eps > 1:
            dense_layers.update(name for name, value in raw.items() if value == max_raw)
        else:
            return {name: 1.0 if name in dense_layers else eps * raw[name] for name in shapes}


@pytest.mark.parametrize("model_name", list(MODELS))
def test_erk_matches_the_rigl_formula(models, model_name):
    model = models[model_name]
    dense = all_true_masks(model)
    shapes = {name: tuple(mask.shape) for name, mask in dense.items()}
    total = total_weights(dense)
    capped_somewhere = False
    for density in DENSITIES:
        masks = pruning_masks.compute_masks(model, density=density, criterion="magnitude", allocation="erk", masks=dense)
        expected = rigl_erk_densities(shapes, density)
        assert count_alive(masks) == round(density * total)
        for name, mask in masks.items():
            # largest-remainder rounding: within one weight of the real-valued share
            assert abs(int(mask.sum()) - expected[name] * mask.numel()) < 1 + 1e-6, (density, name)
            if expected[name] == 1.0:
                capped_somewhere = True
                assert bool(mask.all())
    if model_name == "resnet20":
        assert capped_somewhere  # the redistribution loop is exercised


@pytest.mark.parametrize("density", DENSITIES + [0.9])
def test_uniform_keeps_each_layer_within_one_weight_of_its_share(models, density):
    model = models["resnet20"]
    masks = pruning_masks.compute_masks(model, density=density, criterion="random", allocation="uniform",
                             masks=all_true_masks(model))
    for name, mask in masks.items():
        assert abs(int(mask.sum()) - density * mask.numel()) < 1 + 1e-9


@pytest.mark.parametrize("density", DENSITIES)
def test_balanced_gives_equal_counts_except_capped_layers(models, density):
    model = models["resnet20"]
    masks = pruning_masks.compute_masks(model, density=density, criterion="magnitude", allocation="balanced",
                             masks=all_true_masks(model))
    counts = layer_counts(masks)
    numels = {name: mask.numel() for name, mask in masks.items()}
    free = [name for name in counts if counts[name] < numels[name]]
    capped = [name for name in counts if counts[name] == numels[name]]
    free_counts = [counts[name] for name in free]
    assert max(free_counts) - min(free_counts) <= 1
    assert free_counts == sorted(free_counts, reverse=True)  # the +1s go to the first layers
    assert all(numels[name] <= min(free_counts) for name in capped)
    if density == 0.5:
        assert capped  # conv (432), shortcuts (512, 2048), fc (640) are too small at k ~ 6.4 k


def test_layer_keep_counts_by_hand():
    numels = {"a": 100, "b": 100, "c": 100}
    shapes = {"a": (10, 10), "b": (10, 10), "c": (10, 10)}
    # uniform: shares 30 each; 'a' holds only 10 now, its 20 go to the others.
    assert allocations.layer_keep_counts("uniform", {"a": 10, "b": 100, "c": 100}, numels, shapes, 90) == \
        {"a": 10, "b": 40, "c": 40}
    # balanced: k = 20 > 5 = capacity of 'a'; 55 left for two layers -> 28, 27 (first gets the +1)
    assert allocations.layer_keep_counts("balanced", {"a": 5, "b": 100, "c": 100}, numels, shapes, 60) == \
        {"a": 5, "b": 28, "c": 27}
    # shares 4.4 and 5.6: the missing weight goes to the largest fractional part
    two = {"a": 11, "b": 14}
    assert allocations.layer_keep_counts("uniform", two, two, {"a": (11,), "b": (14,)}, 10) == {"a": 4, "b": 6}
    # equal fractional parts: the remainder goes to the earlier layer
    three = {"x": 3, "y": 3, "z": 3}
    assert allocations.layer_keep_counts("uniform", three, three, {k: (3,) for k in three}, 4) == {"x": 2, "y": 1, "z": 1}
    # ERK: conv (8, 4, 3, 3): sum 18 / 288; linear (10, 8): 18 / 80 -> the linear layer is denser
    erk = allocations.layer_keep_counts("erk", {"conv": 288, "fc": 80}, {"conv": 288, "fc": 80},
                               {"conv": (8, 4, 3, 3), "fc": (10, 8)}, 36)
    assert erk == {"conv": 18, "fc": 18}  # both shares are eps * sum(shape) = 18


def test_layer_keep_counts_refuses_global_and_unknown_names():
    one = {"a": 4}
    with pytest.raises(ValueError, match="balanced, erk, uniform"):
        allocations.layer_keep_counts("global", one, one, {"a": (4,)}, 2)
    with pytest.raises(ValueError, match="cannot keep 5"):
        allocations.layer_keep_counts("uniform", one, one, {"a": (4,)}, 5)


def test_registries_list_valid_names():
    with pytest.raises(ValueError, match=", ".join(sorted(criteria.SCORES))):
        criteria.get_score_fn("l1")
    with pytest.raises(ValueError, match=", ".join(sorted(allocations.ALLOCATIONS))):
        allocations.get_allocation("layerwise")


def test_criteria_entries_say_what_they_need():
    """The entries, not the names, say who gets batches, an input shape and rounds: each score
    function fails without what its entry says it needs, and works without the rest."""
    model = resnet20()
    dense = all_true_masks(model)
    for name in CRITERIA:
        entry = criteria.SCORES[name]
        full = criteria.ScoringInputs(model=model, device=torch.device("cpu"), batches=make_batches(), num_batches=1,
                                input_shape=INPUT_SHAPE)
        assert set(entry.score(full, dense)) == set(dense), name
        for need, field in (("needs_batches", "batches"), ("needs_input_shape", "input_shape")):
            lacking = copy.copy(full)
            setattr(lacking, field, None)
            if getattr(entry, need):
                with pytest.raises(ValueError, match="needs"):
                    entry.score(lacking, dense)
            else:
                entry.score(lacking, dense)  # works without it
    assert criteria.SCORES["snip"].needs() == ["batches"] and criteria.SCORES["synflow"].needs() == ["input shape", "rounds"]


# ------------------------------------------------------------------- masks only shrink
@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_iterative_masks_are_nested_and_pruned_weights_never_revive(criterion, allocation):
    model = resnet20()
    total = total_weights(get_masks(model))
    previous = get_masks(model)
    generator = torch.Generator().manual_seed(7)
    for level, density in enumerate([0.8, 0.41, 0.2, 0.05, 0.011], start=1):
        masks = pruning_masks.prune_model(model, density=density, criterion=criterion, allocation=allocation,
                               **scoring_kwargs(seed=level))
        assert count_alive(masks) == round(density * total)
        assert is_subset(masks, previous)
        previous = masks
        # "Training" between levels: new weights everywhere, pruned ones huge (not re-masked).
        with torch.no_grad():
            for name, layer in masked_layers(model):
                fresh = torch.randn(layer.weight.shape, generator=generator) * 0.1
                fresh[~masks[name]] = 1e6
                layer.weight.copy_(fresh)


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_a_huge_pruned_weight_stays_pruned(allocation):
    model = resnet20()
    first = pruning_masks.prune_model(model, density=0.5, criterion="magnitude", allocation=allocation)
    pruned_index = tuple((~first["blocks.8.conv2"]).nonzero()[0].tolist())  # the largest layer
    with torch.no_grad():
        model.blocks[8].conv2.weight[pruned_index] = 1e9
    second = pruning_masks.compute_masks(model, density=0.4, criterion="magnitude", allocation=allocation)
    assert not bool(second["blocks.8.conv2"][pruned_index])
    assert is_subset(second, first)


def test_nan_scores_rank_lowest_and_counts_stay_exact():
    model = resnet20()
    with torch.no_grad():
        model.fc.weight[0, :5] = float("nan")
    total = total_weights(get_masks(model))
    for allocation in ALLOCATIONS:
        masks = pruning_masks.compute_masks(model, density=0.2, criterion="magnitude", allocation=allocation)
        assert count_alive(masks) == round(0.2 * total)
        if not bool(masks["fc"].all()):  # (ERK keeps the small fc layer dense)
            assert not bool(masks["fc"][0, :5].any())


def test_density_above_the_current_one_is_refused():
    model = resnet20()
    pruning_masks.prune_model(model, density=0.3, criterion="magnitude", allocation="global")
    with pytest.raises(ValueError, match="only shrink"):
        pruning_masks.compute_masks(model, density=0.5, criterion="magnitude", allocation="global")
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="density"):
            pruning_masks.compute_masks(model, density=bad, criterion="magnitude", allocation="global")


# ----------------------------------------------------------------------- ties, top-k
@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_all_equal_weights_still_give_exact_deterministic_counts(allocation):
    model = resnet20()
    with torch.no_grad():
        for _, layer in masked_layers(model):
            layer.weight.fill_(0.5)
    total = total_weights(get_masks(model))
    for density in DENSITIES:
        masks = pruning_masks.compute_masks(model, density=density, criterion="magnitude", allocation=allocation)
        assert count_alive(masks) == round(density * total)
        again = pruning_masks.compute_masks(model, density=density, criterion="magnitude", allocation=allocation)
        assert all(torch.equal(masks[name], again[name]) for name in masks)
        # ties go to the lowest index: global keeps a prefix of the concatenation
        flat = torch.cat([masks[name].reshape(-1) for name in masks])
        if allocation == "global":
            assert bool(flat[: round(density * total)].all()) and not bool(flat[round(density * total):].any())
        else:
            for mask in masks.values():
                row = mask.reshape(-1)
                kept = int(row.sum())
                assert bool(row[:kept].all()) and not bool(row[kept:].any())


@pytest.mark.parametrize("narrow_band", [False, True])
def test_keep_top_k_on_long_vectors_matches_a_stable_sort(monkeypatch, narrow_band):
    if narrow_band:  # force the sampled band to miss, so the full kthvalue fallback runs
        monkeypatch.setattr(topk, "_BAND_HALF_WIDTH_FRACTION", 0.0)
        monkeypatch.setattr(topk, "_BAND_HALF_WIDTH_MIN", 0)
    generator = torch.Generator().manual_seed(3)
    n = topk._BAND_SEARCH_MIN_NUMEL + 12345  # long enough for the sampled-band path
    continuous = torch.randn(n, generator=generator)
    tied = torch.randint(0, 50, (n,), generator=generator).float()  # ~21 k copies of each value
    for values in (continuous, tied):
        order = torch.argsort(-values, stable=True)  # top k by value, ties to the lowest index
        for k in (1, 7, n // 5, n - 3):
            keep = topk.keep_top_k(values, k)
            expected = torch.zeros(n, dtype=torch.bool)
            expected[order[:k]] = True
            assert int(keep.sum()) == k
            assert torch.equal(keep, expected)


def test_keep_top_k_alive_never_picks_pruned_entries_even_among_minus_inf_ties():
    scores = torch.tensor([-math.inf, 3.0, -math.inf, -math.inf, 1.0])  # alive: 1, 3, 4 (3 scores -inf)
    alive = torch.tensor([False, True, False, True, True])
    keep = topk.keep_top_k_alive(scores, alive, 3)
    assert keep.tolist() == [False, True, False, True, True]


# --------------------------------------------------------------------------- random
def test_random_is_deterministic_per_seed_and_differs_across_seeds():
    model = resnet20()
    dense = all_true_masks(model)

    def random_masks(seed):
        return pruning_masks.compute_masks(model, density=0.3, criterion="random", allocation="global", masks=dense, seed=seed)

    a, b, c = random_masks(5), random_masks(5), random_masks(6)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert any(not torch.equal(a[name], c[name]) for name in a)
    # independent of the weights: a model with other weights gets the same random masks
    other = resnet20()
    with torch.no_grad():
        for _, layer in masked_layers(other):
            layer.weight.normal_()
    d = pruning_masks.compute_masks(other, density=0.3, criterion="random", allocation="global", seed=5)
    assert all(torch.equal(a[name], d[name]) for name in a)


# ----------------------------------------------------------------------------- snip
class TwoBranches(nn.Module):
    """The side branch is multiplied by zero: its weights get zero gradient."""

    def __init__(self):
        super().__init__()
        self.main = nn.Linear(16, 4)
        self.side = nn.Linear(16, 4)

    def forward(self, x):
        return self.main(x.flatten(1)) + 0.0 * self.side(x.flatten(1))


def test_snip_prunes_weights_without_gradient_first():
    torch.manual_seed(0)
    model = prepare_model(TwoBranches())
    with torch.no_grad():
        model.side.weight.mul_(100.0)  # magnitude would keep the side branch
    batches = [(torch.randn(8, 16), torch.randint(0, 4, (8,)))]
    snip = pruning_masks.compute_masks(model, density=0.5, criterion="snip", allocation="global", batches=batches)
    assert bool(snip["main"].all()) and not bool(snip["side"].any())
    magnitude = pruning_masks.compute_masks(model, density=0.5, criterion="magnitude", allocation="global")
    assert bool(magnitude["side"].all())


def manual_snip_scores(model, batches, train: bool):
    clone = copy.deepcopy(model)
    clone.train(train)
    clone.zero_grad()
    for x, y in batches:
        nn.functional.cross_entropy(clone(x), y).backward()
    return {name: (layer.weight.grad * layer.weight).abs() for name, layer in masked_layers(clone)}


def test_snip_scores_are_eval_mode_gradients_by_default_train_mode_on_request_summed_over_batches():
    """Eval mode (running BatchNorm statistics) is the default, as both reference codes score;
    snip_mode="train" scores with batch statistics (issue 9)."""
    model = resnet20()
    batches = make_batches(count=3)
    train_mode = manual_snip_scores(model, batches[:2], train=True)
    eval_mode = manual_snip_scores(model, batches[:2], train=False)
    default = criteria.get_score_fn("snip")(
        criteria.ScoringInputs(model=model, device=torch.device("cpu"), batches=batches, num_batches=2), all_true_masks(model))
    for name in default:
        assert torch.allclose(default[name], eval_mode[name], rtol=1e-4, atol=1e-7), name
    inputs = criteria.ScoringInputs(model=model, device=torch.device("cpu"), batches=batches, num_batches=2)
    scores = criteria.get_score_fn("snip", snip_mode="train")(inputs, all_true_masks(model))
    for name in scores:
        assert torch.allclose(scores[name], train_mode[name], rtol=1e-4, atol=1e-7), name
    assert any(not torch.allclose(scores[n], eval_mode[n], rtol=1e-2) for n in scores)
    # the masked model is scored, even when the masks are not installed in the model
    masks = pruning_masks.compute_masks(model, density=0.3, criterion="random", allocation="global")
    scores = criteria.get_score_fn("snip", snip_mode="train")(inputs, masks)
    masked = copy.deepcopy(model)
    set_masks(masked, masks)
    expected = manual_snip_scores(masked, batches[:2], train=True)
    for name in scores:
        assert torch.allclose(scores[name], expected[name], rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("snip_mode", criteria.SNIP_MODES)
def test_a_density_and_the_same_per_layer_counts_give_the_same_masks(snip_mode):
    """One mask path: every option reaches the per-layer target as it reaches the density target."""
    model = resnet20()
    options = dict(criterion="snip", allocation="uniform", batches=make_batches(count=2), num_batches=2,
                   criterion_options={"snip_mode": snip_mode})
    by_density = pruning_masks.compute_masks(model, density=0.3, **options)
    by_layer = pruning_masks.compute_masks(model, layer_counts=layer_counts(by_density), **options)
    assert all(torch.equal(by_density[name], by_layer[name]) for name in by_density)


def test_layer_rates_with_snip_train_mode_score_in_train_mode():
    """prune.layer_rates + criterion=snip + snip_mode=train: batch statistics, not running ones."""
    model = resnet20()
    plan = density_schedules.layer_rate_plan(model, ["fc=0.5", "blocks.*=0.3"], 0.2, 2)
    batches = make_batches(count=2)
    masks = {mode: pruning_masks.compute_masks(model, layer_counts=plan.counts[1], criterion="snip", allocation="uniform",
                                    batches=batches, num_batches=2, criterion_options={"snip_mode": mode}) for mode in criteria.SNIP_MODES}
    for mode, train in (("train", True), ("eval", False)):
        scores = manual_snip_scores(model, batches, train=train)
        for name, mask in masks[mode].items():
            assert int(mask.sum()) == plan.counts[1][name]
            expected = topk.keep_top_k(scores[name], plan.counts[1][name])
            assert int((mask & expected).sum()) >= 0.99 * int(mask.sum()), (mode, name)
    differing = sum(int((masks["train"][name] ^ masks["eval"][name]).sum()) for name in masks["train"])
    assert differing > 0.05 * sum(plan.counts[1].values())


def test_snip_leaves_model_state_modes_and_grads_alone():
    model = resnet20()
    model.eval()
    model.blocks[1].train()  # a mixed set of flags must come back as it was
    model.fc.weight.requires_grad_(False)
    flags = {name: module.training for name, module in model.named_modules()}
    before = state_copy(model)
    pruning_masks.compute_masks(model, density=0.3, criterion="snip", allocation="erk", batches=make_batches())
    assert_same_state(model, before)  # BatchNorm running statistics included
    assert flags == {name: module.training for name, module in model.named_modules()}
    assert all(p.grad is None for p in model.parameters())
    assert model.fc.weight.requires_grad is False


def test_snip_draws_exactly_num_batches_and_complains_when_short():
    model = resnet20()
    drawn = []

    def stream():
        for batch in make_batches(count=5):
            drawn.append(1)
            yield batch

    pruning_masks.compute_masks(model, density=0.5, criterion="snip", allocation="global", batches=stream(), num_batches=2)
    assert len(drawn) == 2
    with pytest.raises(ValueError, match="asked for 4 batches"):
        pruning_masks.compute_masks(model, density=0.5, criterion="snip", allocation="global",
                         batches=make_batches(count=3), num_batches=4)
    with pytest.raises(ValueError, match="needs batches"):
        pruning_masks.compute_masks(model, density=0.5, criterion="snip", allocation="global")


# -------------------------------------------------------------------------- synflow
def test_synflow_scores_follow_the_path_formula():
    torch.manual_seed(0)
    model = prepare_model(nn.Sequential(nn.Flatten(), nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False)))
    w1, w2 = model[1].weight.detach().abs().double(), model[3].weight.detach().abs().double()
    inputs = criteria.ScoringInputs(model=model, device=torch.device("cpu"), input_shape=(6,))
    scores = criteria.get_score_fn("synflow")(inputs, all_true_masks(model))
    # R = 1^T |W2| |W1| 1: dR/dW1_ij = sum_k |W2_ki|, dR/dW2_ki = sum_j |W1_ij|
    assert scores["1"].dtype == torch.float64
    assert torch.allclose(scores["1"], w2.sum(0)[:, None] * w1)
    assert torch.allclose(scores["3"], w1.sum(1)[None, :] * w2)
    # the masked model is scored: the same formula on the masked weights
    masks = {"1": torch.rand(5, 6) > 0.5, "3": torch.rand(3, 5) > 0.5}
    m1, m2 = w1 * masks["1"], w2 * masks["3"]
    scores = criteria.get_score_fn("synflow")(inputs, masks)
    assert torch.allclose(scores["1"], m2.sum(0)[:, None] * m1)
    assert torch.allclose(scores["3"], m1.sum(1)[None, :] * m2)


def test_synflow_rounds_shrink_monotonically_to_exact_counts():
    model = resnet20()
    total = total_weights(get_masks(model))
    rounds = []
    pruning_masks.compute_masks(model, density=0.05, criterion="synflow", allocation="global", input_shape=INPUT_SHAPE,
                     synflow_iterations=10, on_round=lambda k, d, masks: rounds.append((k, d, masks)))
    schedule = density_schedules.synflow_density_schedule(1.0, 0.05, 10)
    assert [k for k, _, _ in rounds] == list(range(1, 11))
    assert [d for _, d, _ in rounds] == schedule
    previous = all_true_masks(model)
    for _, density, masks in rounds:
        assert count_alive(masks) == round(density * total)
        assert is_subset(masks, previous)
        previous = masks


def test_synflow_restores_the_model_and_runs_in_float64():
    model = resnet20()
    model.train()
    before = state_copy(model)
    assert any(bool((w < 0).any()) for w in before.values() if w.is_floating_point())
    seen = []
    hook = model.conv.register_forward_pre_hook(lambda module, args: seen.append((args[0].dtype, module.weight.dtype)))
    try:
        pruning_masks.compute_masks(model, density=0.2, criterion="synflow", allocation="uniform", input_shape=INPUT_SHAPE,
                         synflow_iterations=4)
    finally:
        hook.remove()
    assert seen and all(dtypes == (torch.float64, torch.float64) for dtypes in seen)
    assert len(seen) == 4  # one forward per round
    assert_same_state(model, before)  # signs, BN statistics, everything
    assert all(module.training for module in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_synflow_needs_an_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        pruning_masks.compute_masks(resnet20(), density=0.5, criterion="synflow", allocation="global")


# -------------------------------------------------------------------------- schedules
def test_level_and_iterative_densities():
    assert density_schedules.level_density(0, 0.2) == 1.0
    assert density_schedules.level_density(3, 0.2) == pytest.approx(0.512)
    assert density_schedules.iterative_densities(0.2, levels=4) == pytest.approx([1.0, 0.8, 0.64, 0.512])
    # 0.8 ** 3 is 0.5120000000000001: still counts as reaching 0.512
    assert len(density_schedules.iterative_densities(0.2, target_density=0.512)) == 4
    assert density_schedules.iterative_densities(0.2, target_density=0.5)[-1] == pytest.approx(0.4096)
    assert density_schedules.iterative_densities(0.5, target_density=1.0) == [1.0]
    assert len(density_schedules.iterative_densities(0.2, levels=3, target_density=0.1)) == 3
    with pytest.raises(ValueError):
        density_schedules.iterative_densities(0.2)
    with pytest.raises(ValueError):
        density_schedules.level_density(1, 1.0)


def test_synflow_density_schedule_is_exponential_and_ends_on_target():
    schedule = density_schedules.synflow_density_schedule(0.8, 0.01, 100)
    assert len(schedule) == 100 and schedule[-1] == 0.01
    ratios = [b / a for a, b in zip(schedule, schedule[1:])]
    assert max(ratios) == pytest.approx(min(ratios)) and ratios[0] == pytest.approx((0.01 / 0.8) ** 0.01)
    assert schedule[0] == pytest.approx(0.8 * (0.01 / 0.8) ** 0.01)
    # the last round is the target itself, not start * (target / start) ** 1.0 (0.013000000000000001)
    assert density_schedules.synflow_density_schedule(0.8, 0.013, 10)[-1] == 0.013


# ------------------------------------------------------------------------------- CLI
@pytest.fixture()
def cli_files(tmp_path):
    """A config and a checkpoint of LeNet-300-100 on digits pruned to 50% (masks in it)."""
    config = {  # an experiment config the harness would accept (the command reads it as harness.py does)
        "model": {"name": "lenet_300_100"},
        "dataset": {"name": "digits", "train_path": str(tmp_path / "missing.beton"),
                    "test_path": str(tmp_path / "missing_test.beton")},
        "prune": {"criterion": "magnitude", "allocation": "erk", "exclude": ["5"], "synflow_iterations": 3,
                  "levels": 3},
        "experiment": {"name": "cli", "seed": 0},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    model = prepare_model(get_model("lenet_300_100", num_classes=10, in_channels=1, image_size=8), exclude=["5"])
    start = pruning_masks.prune_model(model, density=0.5, criterion="magnitude", allocation="global")
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "epoch": 3}, checkpoint)
    return config_path, checkpoint, start, tmp_path


def run_cli(*args):
    return pruning_command.main([str(arg) for arg in args])


@pytest.mark.parametrize("criterion", ["magnitude", "synflow"])
def test_cli_writes_nested_masks_with_exact_count(cli_files, capsys, criterion):
    config, checkpoint, start, tmp_path = cli_files
    out = tmp_path / "sub" / "masks.pt"
    assert run_cli("--config", config, "--checkpoint", checkpoint, "--density", 0.2, "--out", out,
                   "--criterion", criterion) == 0
    masks = load_masks(out)
    assert set(masks) == {"1", "3"}
    assert count_alive(masks) == round(0.2 * (64 * 300 + 300 * 100))
    assert is_subset(masks, start)
    printed = capsys.readouterr().out
    assert f"{criterion} x erk" in printed and "total" in printed and "0.2000" in printed


def test_cli_accepts_a_plain_dense_state_dict(tmp_path, cli_files):
    config, _, _, _ = cli_files
    model = get_model("lenet_300_100", num_classes=10, in_channels=1, image_size=8)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    out = tmp_path / "masks.pt"
    assert run_cli("--config", config, "--checkpoint", plain, "--density", 0.7, "--out", out,
                   "--allocation", "global") == 0
    assert count_alive(load_masks(out)) == round(0.7 * (64 * 300 + 300 * 100))


@pytest.mark.parametrize("change, message", [
    ({"density": "1.5"}, "--density must be in"),
    ({"density": "0.9"}, "only shrink"),  # the checkpoint is at 0.5
    ({"density": "abc"}, "invalid float"),
    ({"criterion": "obd"}, "prune.criterion='obd' is not allowed"),  # not a registered criterion
    ({"checkpoint": "nowhere.pt"}, "does not exist"),
    ({"config_model": None}, "model.name is required"),
    ({"config_typo": {"snip_batchez": 2}}, "unknown key prune.snip_batchez"),
    ({"config_typo": {"structure": "nm"}}, "this command computes unstructured masks"),
    ({"config_model": "resnet20"}, "does not fit the model"),
    ({"criterion": "snip"}, "does not exist"),  # snip needs dataset.train_path
])
def test_cli_bad_arguments_exit_2_with_one_line_and_write_nothing(cli_files, capsys, change, message):
    config, checkpoint, _, tmp_path = cli_files
    if "config_model" in change:
        tree = yaml.safe_load(config.read_text())
        tree["model"] = {"name": change["config_model"]} if change["config_model"] else {}
        config.write_text(yaml.safe_dump(tree))
    if "config_typo" in change:
        tree = yaml.safe_load(config.read_text())
        tree["prune"].update(change["config_typo"])
        config.write_text(yaml.safe_dump(tree))
    out = tmp_path / "masks.pt"
    args = ["--config", config, "--checkpoint", change.get("checkpoint", checkpoint),
            "--density", change.get("density", "0.2"), "--out", out]
    if "criterion" in change:
        args += ["--criterion", change["criterion"]]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "config.yaml"]


def test_cli_as_a_module_end_to_end(cli_files):
    config, checkpoint, start, tmp_path = cli_files
    out = tmp_path / "masks.pt"
    command = [sys.executable, "-m", "utils.pruning_utils", "--config", str(config), "--checkpoint", str(checkpoint),
               "--density", "0.1", "--out", str(out), "--allocation", "balanced"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    masks = load_masks(out)
    assert count_alive(masks) == round(0.1 * (64 * 300 + 300 * 100)) and is_subset(masks, start)
    missing_out = subprocess.run(command[:-4], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert missing_out.returncode == 2
    assert missing_out.stderr.count("\n") == 1 and "--out" in missing_out.stderr


OUTSIDE_CRITERIA = '''
import torch
from utils.models.mask_layers import masked_layers


def grad_times_weight(inputs, masks):
    """|w x grad| summed over inputs.num_batches training batches: refuses to run without them."""
    if inputs.batches is None:
        raise ValueError("grad_times_weight got no batches")
    model = inputs.model
    weights = {name: layer.weight for name, layer in masked_layers(model)}
    totals = {name: torch.zeros_like(weight) for name, weight in weights.items()}
    drawn = 0
    for _, (x, y) in zip(range(inputs.num_batches), inputs.batches):
        assert tuple(x.shape[1:]) == tuple(inputs.input_shape)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for name, weight in weights.items():
            totals[name] += weight.grad
        drawn += 1
    model.zero_grad(set_to_none=True)
    if drawn != inputs.num_batches:
        raise ValueError(f"drew {drawn} batches")
    with open(DRAWN_LOG, "a") as log:
        log.write(f"{drawn}\\n")
    return {name: (totals[name] * weights[name]).abs().detach() for name in weights}


def data_free(inputs, masks):
    return {name: layer.weight.detach().abs() for name, layer in masked_layers(inputs.model)}


data_free.needs_batches = False
'''


@pytest.fixture()
def outside_criteria(tmp_path, monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    log = tmp_path / "drawn.txt"
    (code / "outside_scores.py").write_text(OUTSIDE_CRITERIA.replace("DRAWN_LOG", repr(str(log))))
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delitem(sys.modules, "outside_scores", raising=False)  # this test's file, not an earlier one's
    yield log
    sys.modules.pop("outside_scores", None)


def test_outside_criteria_declare_their_needs(outside_criteria):
    assert criteria.get_criterion("outside_scores:grad_times_weight").needs() == ["batches"]  # undeclared: batches
    data_free = criteria.get_criterion("outside_scores:data_free")
    assert not data_free.needs_batches and not data_free.iterative


@pytest.mark.parametrize("batches_key", ["score_batches", "snip_batches"])  # the old name is still read
def test_cli_gives_batches_to_an_outside_criterion_that_needs_them(cli_files, digits, outside_criteria,
                                                                   capsys, batches_key):
    config, checkpoint, start, tmp_path = cli_files
    tree = yaml.safe_load(config.read_text())
    tree["dataset"].update(train_path=str(digits / "digits_train.beton"), loader="torch", batch_size=32,
                           num_workers=0)
    tree["prune"][batches_key] = 3
    config.write_text(yaml.safe_dump(tree))
    out = tmp_path / "masks.pt"
    assert run_cli("--config", config, "--checkpoint", checkpoint, "--density", 0.3, "--out", out,
                   "--criterion", "outside_scores:grad_times_weight") == 0, capsys.readouterr().err
    assert outside_criteria.read_text().split() == ["3"]
    masks = load_masks(out)
    assert count_alive(masks) == round(0.3 * (64 * 300 + 300 * 100)) and is_subset(masks, start)


def test_cli_gives_no_batches_to_a_criterion_that_declares_it_needs_none(cli_files, outside_criteria, capsys):
    config, checkpoint, _, tmp_path = cli_files  # dataset.train_path does not exist
    out = tmp_path / "masks.pt"
    assert run_cli("--config", config, "--checkpoint", checkpoint, "--density", 0.3, "--out", out,
                   "--criterion", "outside_scores:data_free") == 0
    assert run_cli("--config", config, "--checkpoint", checkpoint, "--density", 0.3, "--out", out,
                   "--criterion", "outside_scores:grad_times_weight") == 2
    assert "needs training batches" in capsys.readouterr().err


def test_old_and_new_name_of_score_batches():
    import harness_params
    import harness_utils as hu

    base = {"model.name": "lenet_300_100", "dataset.name": "digits", "dataset.train_path": "a",
            "dataset.test_path": "b", "experiment.name": "x", "prune.levels": "2"}
    assert harness_params.resolve(None, {**base, "prune.snip_batches": "3"})["prune.score_batches"] == 3
    resolved = harness_params.resolve(None, {**base, "prune.score_batches": "3"})
    assert "prune.snip_batches" not in resolved
    with pytest.raises(harness_params.ConfigError, match="old name of prune.score_batches"):
        harness_params.resolve(None, {**base, "prune.snip_batches": "2", "prune.score_batches": "3"})
    old_run = {("prune.snip_batches" if key == "prune.score_batches" else key): value for key, value in resolved.items()}
    assert hu.semantic_difference(old_run, resolved) == []
    assert hu.semantic_difference({**old_run, "prune.snip_batches": 4}, resolved) == ["prune.score_batches"]


def test_harness_gives_an_outside_criterion_its_batches_and_an_old_config_yaml_still_resumes(
        digits, outside_criteria, tmp_path):
    from tests.helpers import digits_config, run_harness, write_config

    tree = digits_config(digits, tmp_path / "runs", **{
        "prune.levels": 2, "training.epochs": 1, "prune.criterion": "outside_scores:grad_times_weight",
        "prune.score_batches": 2})
    config = write_config(tmp_path / "c.yaml", tree)
    code = {"PYTHONPATH": str(tmp_path / "code")}
    result = run_harness(config, env=code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert outside_criteria.read_text().split() == ["2"]  # level 1's masks, scored on 2 batches
    saved = tmp_path / "runs" / "exp" / "config.yaml"
    text = saved.read_text()
    assert "score_batches: 2" in text
    saved.write_text(text.replace("score_batches: 2", "snip_batches: 2"))  # a run made before the rename
    again = run_harness(config, env=code)
    assert again.returncode == 0 and "is finished" in again.stdout, again.stderr[-2000:]
