"""Fine-tuning (``prune.training_type=finetune``), the GraSP criterion and the training cost of a
level (``TrainingType.training_cost_epochs``, the report's cost axis).

* finetune: level 0 trains on the config's schedule; every later level at one constant rate, the
  schedule's final rate (its last step's) or ``prune.finetune_lr``; a run interrupted inside a
  fine-tuning level and resumed logs the uninterrupted run's rates (and results);
* grasp: theta * (H g) equals a direct float64 computation (an explicit Hessian of a hand-written
  MLP, not the criterion's double backward), the highest -theta * H g are removed, and the model is
  left as it was found;
* the cost of level L per training type, from the formulas (with numbers of this file's own).
"""
from __future__ import annotations

import math
import signal

import pandas as pd
import pytest
import torch
from torch import nn

import harness_params
import harness_utils as hu
from tests.helpers import digits_config, run_harness, write_config
from utils.models.mask_layers import all_true_masks, count_alive, prepare_model
from utils.pruning import criteria
from utils.pruning.masks import compute_masks
from utils.training.schedulers import ScheduleSpec, lr_factor
from utils.training.training_types import get_training_type

pytestmark = pytest.mark.xdist_group("finetune_grasp")


# ================================================================================== GraSP
def tiny_mlp() -> nn.Module:
    """4 -> 5 (tanh) -> 3, float64, prepared (both Linear layers are masked)."""
    torch.manual_seed(3)
    return prepare_model(nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))).double()


def tiny_batches(count=2):
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(6, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (6,), generator=generator))
            for _ in range(count)]


def direct_grasp(model: nn.Module, masks, batches, temperature: float = 200.0):
    """theta * (H g) with H the explicit Hessian of L(w) = sum_b CE(f(x_b; w) / T, y_b) in the masked
    weights w (biases fixed) and g = dL/dw: a forward written out here, float64 throughout."""
    w1 = (model[1].weight.detach() * masks["1"]).double()
    w2 = (model[3].weight.detach() * masks["3"]).double()
    b1, b2 = model[1].bias.detach().double(), model[3].bias.detach().double()
    sizes = (w1.numel(), w2.numel())

    def loss(flat):
        a, b = flat[:sizes[0]].view_as(w1), flat[sizes[0]:].view_as(w2)
        total = flat.new_zeros(())
        for x, y in batches:
            logits = torch.tanh(x @ a.T + b1) @ b.T + b2
            total = total + nn.functional.cross_entropy(logits / temperature, y)
        return total

    flat = torch.cat([w1.flatten(), w2.flatten()])
    gradient = torch.autograd.functional.jacobian(loss, flat)
    hessian = torch.autograd.functional.hessian(loss, flat)
    product = flat * (hessian @ gradient)
    return {"1": product[:sizes[0]].view_as(w1), "3": product[sizes[0]:].view_as(w2)}


def test_grasp_equals_a_direct_float64_computation_and_masked_weights_are_the_variable():
    model, batches = tiny_mlp(), tiny_batches()
    masks = all_true_masks(model)
    masks["1"] = torch.rand(5, 4, generator=torch.Generator().manual_seed(1)) > 0.3  # a level after pruning
    inputs = criteria.ScoringInputs(model=model, device=torch.device("cpu"), batches=batches, num_batches=2)
    scores = criteria.get_score_fn("grasp")(inputs, masks)
    expected = direct_grasp(model, masks, batches)
    for name in expected:
        assert scores[name].dtype == torch.float64
        assert expected[name].abs().max() > 0, name
        assert torch.allclose(scores[name], expected[name], rtol=1e-9, atol=1e-18), name
    # one batch: a different number (the sum really runs over num_batches)
    one = criteria.get_score_fn("grasp")(criteria.ScoringInputs(model=model, device=torch.device("cpu"),
                                                                batches=batches, num_batches=1), masks)
    assert torch.allclose(one["3"], direct_grasp(model, masks, batches[:1])["3"], rtol=1e-9, atol=1e-18)
    assert not torch.allclose(one["3"], expected["3"])


def test_grasp_removes_the_highest_paper_scores():
    """The paper's score is S = -theta * H g and its highest are removed: the masks keep the smallest S."""
    model, batches = tiny_mlp(), tiny_batches()
    dense = all_true_masks(model)
    paper = {name: -value for name, value in direct_grasp(model, dense, batches).items()}
    masks = compute_masks(model, density=0.4, criterion="grasp", allocation="global", batches=batches, num_batches=2)
    every = torch.cat([paper[name].flatten() for name in ("1", "3")])
    kept = torch.cat([masks[name].flatten() for name in ("1", "3")])
    assert int(kept.sum()) == round(0.4 * every.numel())
    assert every[kept].max() < every[~kept].min()


@pytest.mark.parametrize("allocation", ["global", "uniform", "erk", "balanced"])
def test_grasp_exact_counts_with_every_allocation_and_leaves_the_model_as_found(allocation):
    from tests.test_contracts import assert_untouched, contract_model, snapshot

    model = contract_model()  # BatchNorm, dropout, mixed train/eval flags, a frozen parameter, a .grad
    before = snapshot(model)
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 10, (4,), generator=generator))
               for _ in range(2)]
    dense = all_true_masks(model)
    first = compute_masks(model, density=0.5, criterion="grasp", allocation=allocation, batches=batches, num_batches=2)
    second = compute_masks(model, density=0.2, criterion="grasp", allocation=allocation, batches=batches,
                           num_batches=2, masks=first)  # an IMP level after the first: masks only shrink
    total = sum(mask.numel() for mask in dense.values())
    assert count_alive(first) == round(0.5 * total) and count_alive(second) == round(0.2 * total)
    assert all(bool((second[name] <= first[name]).all()) for name in first)
    assert_untouched(model, before, "grasp")


def test_grasp_refuses_too_few_batches():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="grasp asked for 3 batches"):
        compute_masks(model, density=0.5, criterion="grasp", allocation="global", batches=tiny_batches(2),
                      num_batches=3)


# =============================================================================== finetune
def schedule_builder(config, iterations_per_epoch):
    model = nn.Linear(3, 2)

    def build(overrides=None):
        return hu.build_optimizer_and_schedule({**config, **(overrides or {})}, model.parameters(), iterations_per_epoch)
    return build


def resolved(**overrides):
    base = {"model.name": "lenet_300_100", "dataset.name": "digits", "dataset.train_path": "a",
            "dataset.test_path": "b", "experiment.name": "x", "prune.training_type": "finetune",
            "prune.levels": "3", "training.epochs": "3", "schedule.name": "cosine", "optimizer.lr": "0.4",
            "schedule.warmup_epochs": "1"}
    return harness_params.resolve(None, {**base, **overrides})


def rates(schedule, steps):
    seen = []
    for _ in range(steps):
        seen.append(schedule.lr)
        schedule.step()
    return seen


def test_finetune_trains_later_levels_at_the_schedules_final_rate():
    config, per_epoch = resolved(), 7
    kind = get_training_type("finetune")
    build = schedule_builder(config, per_epoch)
    # level 0: the config's schedule (warmup, then cosine down)
    _, level0 = kind.optimizer_and_schedule(0, config, build)
    trained = rates(level0, 3 * per_epoch)
    assert len(set(trained)) > 10
    # the final rate, written out: cosine over epochs 1..3 after one warmup epoch, at step 20 of 21
    progress = (20 / per_epoch - 1) / (3 - 1)
    final = 0.4 * 0.5 * (1 + math.cos(math.pi * progress))
    assert trained[-1] == pytest.approx(final, rel=1e-12)
    spec = ScheduleSpec("cosine", 3, per_epoch, warmup_epochs=1.0)
    assert lr_factor(spec, 3 * per_epoch - 1) * 0.4 == pytest.approx(final, rel=1e-12)
    for level in (1, 2):
        optimizer, schedule = kind.optimizer_and_schedule(level, config, build)
        assert rates(schedule, 3 * per_epoch) == [pytest.approx(final, rel=1e-12)] * (3 * per_epoch)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(final, rel=1e-12)
        assert optimizer.state == {}  # a fresh optimizer: momentum starts at 0


def test_finetune_lr_overrides_and_is_refused_for_other_types():
    config = resolved(**{"prune.finetune_lr": "0.0125"})
    kind = get_training_type("finetune")
    _, schedule = kind.optimizer_and_schedule(2, config, schedule_builder(config, 5))
    assert rates(schedule, 15) == [0.0125] * 15
    _, level0 = kind.optimizer_and_schedule(0, config, schedule_builder(config, 5))
    assert level0.lr != 0.0125  # level 0 keeps the config's schedule
    for other in ("imp", "lrr", "wr"):
        with pytest.raises(harness_params.ConfigError) as refusal:
            resolved(**{"prune.training_type": other, "prune.finetune_lr": "0.0125"})
        assert str(refusal.value) == (f"prune.finetune_lr=0.0125 needs prune.training_type=finetune, not {other}, "
                                      "which does not fine-tune at a constant rate")
    with pytest.raises(harness_params.ConfigError, match="prune.finetune_lr"):
        resolved(**{"prune.finetune_lr": "0"})


FINETUNE = {"prune.training_type": "finetune", "training.epochs": 3, "schedule__name": "step",
            "schedule__step_size": 1.0, "schedule__gamma": 0.5}


def test_finetune_resumed_inside_a_fine_tuning_level_keeps_its_rate(tmp_path, digits):
    """Killed in the middle of epoch 1 of level 1 (SIGKILL: back to the end of epoch 0) and again
    in level 2 (SIGTERM: a mid-epoch checkpoint), then resumed: every epoch's logged rate, and
    every other number, is the uninterrupted run's; the fine-tuning levels log the final rate."""
    from tests.test_resume import assert_same_results, run_in_process

    reference = write_config(tmp_path / "reference.yaml", digits_config(digits, tmp_path / "ref", **FINETUNE))
    code, _, err = run_in_process(reference)
    assert code == 0, err
    epochs = pd.read_csv(tmp_path / "ref" / "exp" / "epochs.csv")
    # step schedule, base 0.05, halved each epoch: 0.05, 0.025, 0.0125; its last step's rate 0.0125
    assert epochs[epochs.level == 0]["lr"].tolist() == pytest.approx([0.05, 0.025, 0.0125])
    assert epochs[epochs.level > 0]["lr"].tolist() == pytest.approx([0.0125] * 6)

    config = write_config(tmp_path / "config.yaml", digits_config(digits, tmp_path / "runs", **FINETUNE))
    killed = run_harness(config, env={"HARNESS_TEST_KILL_AT": "batch:1:1:5"}, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    stopped = run_harness(config, env={"HARNESS_TEST_KILL_AT": "batch:2:1:4", "HARNESS_TEST_KILL_SIGNAL": "SIGTERM"},
                          timeout=120)
    assert "resuming" in stopped.stdout and "level 1" in stopped.stdout, stopped.stdout
    code, out, err = run_in_process(config)
    assert code == 0, err
    assert "level 2, epoch 1" in out, out
    resumed = pd.read_csv(tmp_path / "runs" / "exp" / "epochs.csv")
    assert resumed["lr"].tolist() == epochs["lr"].tolist()
    assert_same_results(tmp_path / "ref" / "exp", tmp_path / "runs" / "exp")
    # the report reads the run's cost: E + L x E (3 epochs a level)
    from utils.report import experiments, tables
    from utils.runs import run_facts
    last = torch.load(tmp_path / "runs" / "exp" / "checkpoints" / "last.pt", weights_only=True)
    steps = run_facts.recorded_iterations_per_epoch(tmp_path / "runs" / "exp")
    assert steps and last["schedule"]["iteration"] == 3 * steps  # the last level's schedule ran 3 epochs of them
    group, = experiments.make_groups([experiments.load_experiment(tmp_path / "runs" / "exp")])
    assert tables.summarize(group)["train_cost_epochs"].tolist() == [3.0, 6.0, 9.0]


# ========================================================================== training cost
@pytest.mark.parametrize("name,level,epochs,rewind,expected", [
    ("imp", 4, 7, 0, 5 * 7),
    ("lrr", 3, 11, 0, 4 * 11),
    ("wr", 0, 9, 2, 9),
    ("wr", 5, 9, 2, 9 + 5 * (9 - 2)),
    ("wr", 3, 6, 1.25, 6 + 3 * (6 - 1.25)),   # a rewind iteration, as a fraction of an epoch
    ("finetune", 6, 4, 0, 4 + 6 * 4),
    ("at_init", 0, 13, 0, 13),
])
def test_training_cost_of_a_level_per_training_type(name, level, epochs, rewind, expected):
    assert get_training_type(name).training_cost_epochs(level, epochs, rewind) == pytest.approx(expected)
