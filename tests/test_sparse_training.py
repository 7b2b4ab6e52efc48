"""Sparse training: gmp, rigl and set (utils/training/sparse_training.py, docs/design.md section 19).

Pinned here: the schedules' values and update steps; each update's exact counts (gmp: round(d_t N)
kept at every update; rigl / set: every layer keeps its count and changes exactly n weights each
way, none dropped and grown back by the same update); grown weights and their optimizer state
start at 0; rigl grows the largest |gradient| of the step's own batch; 1 and 2 processes write
the same masks and mask_updates.csv; a run killed at an update step (SIGKILL before it, SIGKILL
after its rows, SIGTERM at it) resumes to the uninterrupted run's files; the refusals; a shuffle
control of a rigl run trains its masks unchanged.

Runs: LeNet-300-100 on the bundled digits, 2 epochs of 22 steps, a mask update every 5 steps.
"""
from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Dict

import pandas as pd
import pytest
import torch
from torch import nn

import harness
import harness_params
from tests.helpers import digits_config, run_harness, write_config
from tests.test_resume import assert_same_results, run_in_process
from utils.models import mask_layers
from utils.training import sparse_training as st
from utils.training import step as training

pytestmark = pytest.mark.xdist_group("sparse_training")

STEPS_PER_EPOCH, EPOCHS = 22, 2   # digits: 1437 training images, batch 64 (full batches)
EVERY = 5
KINDS = ("gmp", "rigl", "set")


def sparse_overrides(kind: str, **more) -> Dict:
    overrides = {"prune.training_type": kind, "prune.levels": None, "prune.target_density": 0.2,
                 "prune.update_every": EVERY}
    return {**overrides, **more}


def sparse_config(directory: Path, digits: Path, kind: str, **more) -> Path:
    tree = digits_config(digits, directory / "runs", **sparse_overrides(kind, **more))
    if kind != "gmp":  # rigl and set: the type's own defaults (erk + random), as a user would leave them
        del tree["prune"]["criterion"], tree["prune"]["allocation"]
    return write_config(directory / "config.yaml", tree)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits) -> Dict[str, Path]:
    """kind -> the directory of its uninterrupted one-process run."""
    made = {}
    for kind in KINDS:
        base = tmp_path_factory.mktemp(f"sparse_{kind}")
        code, out, err = run_in_process(sparse_config(base, digits, kind))
        assert code == 0, err
        made[kind] = base / "runs" / "exp"
    return made


def updates(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "mask_updates.csv")


def layer_sizes(root: Path) -> Dict[str, int]:
    layers = pd.read_csv(root / "layers.csv", dtype={"layer": str})
    return dict(zip(layers["layer"], layers["numel"]))


# ================================================================== schedule math (plain functions)
def test_gmp_density_is_zhu_and_guptas_cubic():
    assert st.gmp_density(10, 10, 30, 0.1) == 1.0
    assert st.gmp_density(30, 10, 30, 0.1) == pytest.approx(0.1)
    assert st.gmp_density(20, 10, 30, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 ** 3)
    assert st.gmp_density(99, 10, 30, 0.1) == pytest.approx(0.1)   # training goes on at d_f


def test_drop_fraction_decays_as_a_cosine_to_zero_at_the_end():
    assert st.drop_fraction(0, 100, 0.3) == pytest.approx(0.3)
    assert st.drop_fraction(50, 100, 0.3) == pytest.approx(0.15)
    assert st.drop_fraction(100, 100, 0.3) == pytest.approx(0.0, abs=1e-12)
    assert st.drop_count(0.3, 10, 100) == 3 and st.drop_count(0.3, 10, 2) == 2   # never more than the dead


def test_update_steps_of_both_schedules():
    gmp = st.UpdateSchedule(every=5, start=0.1, end=0.75, epochs=2, final_step=True)
    assert gmp.window(22) == (4, 33)
    assert gmp.steps(22) == [4, 9, 14, 19, 24, 29, 33]              # t0 + k*5 below t1, and t1 itself
    drop_grow = st.UpdateSchedule(every=5, start=0.0, end=0.75, epochs=2, final_step=False)
    assert drop_grow.steps(22) == [5, 10, 15, 20, 25, 30]            # t >= 1, below t1
    assert drop_grow.refusal(22) is None
    assert "holds no update step" in st.UpdateSchedule(every=40, start=0.0, end=0.75, epochs=2,
                                                       final_step=False).refusal(22)


def test_drop_and_grow_changes_exactly_n_each_way_and_never_regrows_a_dropped_weight():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(20, 30, generator=generator)
    mask = torch.rand(20, 30, generator=generator) < 0.3
    weight = weight * mask
    score = torch.rand(20, 30, generator=generator, dtype=torch.float64)
    alive = int(mask.sum())
    n = st.drop_count(0.3, alive, mask.numel() - alive)
    new = st.drop_and_grow(weight, mask, n, score)
    dropped, grown = mask & ~new, new & ~mask
    assert int(new.sum()) == alive and int(dropped.sum()) == n and int(grown.sum()) == n
    # the dropped are the n smallest |w| of the alive; the grown the n largest scores of the dead
    assert weight.abs()[dropped].max() <= weight.abs()[mask & new].min()
    assert score[grown].min() >= score[~mask & ~new].max()
    assert not bool((dropped & new).any())


def test_random_grow_priorities_depend_on_seed_step_and_layer_only():
    a = st.random_grow_score(0, 10, 1, (4, 5))
    assert torch.equal(a, st.random_grow_score(0, 10, 1, (4, 5)))
    assert not torch.equal(a, st.random_grow_score(0, 15, 1, (4, 5)))
    assert not torch.equal(a, st.random_grow_score(0, 10, 2, (4, 5)))
    assert not torch.equal(a, st.random_grow_score(1, 10, 1, (4, 5)))


# ====================================================== the callback on a tiny model (optimizer state)
def tiny_training(optimizer_name: str, by_gradient: bool):
    torch.manual_seed(0)
    model = mask_layers.prepare_model(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)))
    masks = {name: torch.rand(layer.weight.shape) < 0.4 for name, layer in mask_layers.masked_layers(model)}
    mask_layers.set_masks(model, masks)
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer_name == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=0.01))

    class Constant:
        lr = 0.1

        def step(self):
            pass

    schedule = st.UpdateSchedule(every=3, start=0.0, end=1.0, epochs=1, final_step=False)
    rule = st.DropAndGrow(by_gradient=by_gradient, seed=0, fraction=0.5)
    callback = st.MaskUpdates(rule, schedule, model, lambda: optimizer)
    step = training.TrainingStep(model, model, optimizer, Constant(),
                                 after_backward=[callback.after_backward] if by_gradient else [])
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(10)]
    return model, optimizer, callback, step, batches


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
@pytest.mark.parametrize("by_gradient", [True, False], ids=["rigl", "set"])
def test_grown_weights_and_their_optimizer_state_start_at_zero(optimizer_name, by_gradient):
    model, optimizer, callback, step, batches = tiny_training(optimizer_name, by_gradient)
    seen = []

    class Watch:  # runs after the mask update of the same step
        def on_epoch_start(self, state): ...
        def on_epoch_end(self, state): ...

        def on_step_end(self, state):
            seen.append(state.batches_done)
            if state.batches_done == 3:  # the first update: its grown weights, before any later step
                for name, layer in mask_layers.masked_layers(model):
                    grown = layer.mask & ~before[name]
                    assert bool(grown.any()), name
                    assert bool((layer.weight[grown] == 0).all())
                    for value in optimizer.state[layer.weight].values():
                        if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
                            assert bool((value[grown] == 0).all()), name
                            assert bool((value[layer.mask & before[name]] != 0).any())   # the others kept theirs

    class Before:
        def on_epoch_start(self, state): ...
        def on_epoch_end(self, state): ...

        def on_step_end(self, state):
            if state.batches_done == 3:
                before.update(mask_layers.get_masks(model))

    before: Dict[str, torch.Tensor] = {}
    state = training.EpochState(epoch=0, total_batches=len(batches), lr_at_start=0.1)
    training.train_epoch(step, batches, state, [Before(), callback, Watch()])
    assert callback.updates == 3 and seen == list(range(1, 11))   # steps 3, 6, 9


def test_rigl_grows_the_largest_gradient_of_the_steps_own_batch():
    model, optimizer, callback, step, batches = tiny_training("sgd", True)
    captured = {}

    def record(model):
        captured.update({name: layer.weight.grad.detach().clone() for name, layer in mask_layers.masked_layers(model)})

    step.after_backward = [record, callback.after_backward]
    before = {}

    class Before:
        def on_epoch_start(self, state): ...
        def on_epoch_end(self, state): ...

        def on_step_end(self, state):
            if state.batches_done == 3:
                before.update(mask_layers.get_masks(model))

    state = training.EpochState(epoch=0, total_batches=len(batches), lr_at_start=0.1)  # 3 of its 10 steps
    training.train_epoch(step, batches[:3], state, [Before(), callback])
    for name, layer in mask_layers.masked_layers(model):
        grown = layer.mask & ~before[name]
        still_dead = ~layer.mask & ~before[name]
        assert bool(grown.any())
        assert captured[name].abs()[grown].min() >= captured[name].abs()[still_dead].max(), name


# ========================================================================= runs of the harness
def test_gmp_keeps_round_d_t_n_at_every_update(runs):
    root = runs["gmp"]
    frame = updates(root)
    sizes = layer_sizes(root)
    total = sum(sizes.values())
    t0, t1 = math.floor(0.1 * EPOCHS * STEPS_PER_EPOCH), math.floor(0.75 * EPOCHS * STEPS_PER_EPOCH)
    steps = sorted(frame["step"].unique())
    assert steps == st.UpdateSchedule(every=EVERY, start=0.1, end=0.75, epochs=EPOCHS,
                                      final_step=True).steps(STEPS_PER_EPOCH)
    assert (frame["grown"] == 0).all()                                # masks only shrink
    assert set(frame["epoch"]) == {0, 1} and (frame["epoch"] == (frame["step"] - 1) // STEPS_PER_EPOCH).all()
    removed = 0
    for t in steps:
        removed += int(frame.loc[frame["step"] == t, "dropped"].sum())
        d_t = 0.2 + 0.8 * (1 - (t - t0) / (t1 - t0)) ** 3
        assert total - removed == round(d_t * total), f"step {t}"
    final = mask_layers.load_masks(root / "masks" / "level_0.pt")
    assert mask_layers.count_alive(final) == round(0.2 * total)
    levels = pd.read_csv(root / "levels.csv")
    assert levels["density"].tolist() == [pytest.approx(0.2, abs=1e-6)] and len(levels) == 1


@pytest.mark.parametrize("kind", ["rigl", "set"])
def test_drop_and_grow_keeps_every_layers_count_and_changes_exactly_n(runs, kind):
    root = runs[kind]
    frame = updates(root)
    frame["layer"] = frame["layer"].astype(str)
    sizes = layer_sizes(root)
    schedule = st.UpdateSchedule(every=EVERY, start=0.0, end=0.75, epochs=EPOCHS, final_step=False)
    t1 = schedule.window(STEPS_PER_EPOCH)[1]
    assert sorted(frame["step"].unique()) == schedule.steps(STEPS_PER_EPOCH)
    final = mask_layers.load_masks(root / "masks" / "level_0.pt")
    changed = 0
    for layer, rows in frame.groupby("layer"):
        alive = int(final[layer].sum())
        assert rows["density"].nunique() == 1 and rows["density"].iloc[0] == pytest.approx(alive / sizes[layer], abs=1e-6)
        for row in rows.itertuples():
            n = st.drop_count(st.drop_fraction(row.step, t1, 0.3), alive, sizes[layer] - alive)
            assert row.dropped == row.grown == n, (layer, row.step)
            changed += n
    assert changed > 0
    assert mask_layers.overall_density(final) == pytest.approx(0.2, abs=1e-3)   # erk at 0.2, exact count


def test_one_and_two_processes_write_the_same_masks_and_updates(runs, tmp_path, digits):
    for kind in ("rigl", "gmp"):
        (tmp_path / kind).mkdir()
        config = sparse_config(tmp_path / kind, digits, kind)
        result = run_harness(config, nproc=2)
        assert result.returncode == 0, result.stderr[-3000:]
        root = tmp_path / kind / "runs" / "exp"
        pd.testing.assert_frame_equal(updates(root), updates(runs[kind]), check_exact=True)
        one, two = (mask_layers.load_masks(r / "masks" / "level_0.pt") for r in (runs[kind], root))
        assert all(torch.equal(one[name], two[name]) for name in one), kind


@pytest.mark.parametrize("kill", [
    {"HARNESS_TEST_KILL_AT": "batch:0:1:3"},                                        # step 25: killed before its update
    {"HARNESS_TEST_KILL_AT": "batch:0:1:4"},                                        # step 26: the update's rows written
    {"HARNESS_TEST_KILL_AT": "batch:0:1:3", "HARNESS_TEST_KILL_SIGNAL": "SIGTERM"},  # a stop at the update step
], ids=["sigkill-at-update", "sigkill-after-update", "sigterm-at-update"])
def test_a_run_interrupted_at_an_update_resumes_to_the_same_files(runs, tmp_path, digits, kill):
    config = sparse_config(tmp_path, digits, "rigl")
    root = tmp_path / "runs" / "exp"
    result = run_harness(config, env=kill, timeout=120)
    expected = -signal.SIGKILL if "HARNESS_TEST_KILL_SIGNAL" not in kill else harness.EXIT_PREEMPTED
    assert result.returncode == expected, result.stderr[-2000:]
    assert (updates(root)["step"] <= 25).all() and (updates(root)["step"] == 20).any()
    code, out, err = run_in_process(config)
    assert code == 0, err
    assert f"resuming {root}" in out
    assert_same_results(runs["rigl"], root)
    pd.testing.assert_frame_equal(updates(root), updates(runs["rigl"]), check_exact=True)


def test_a_shuffle_control_trains_a_rigl_runs_masks(runs, tmp_path, digits):
    tree = digits_config(digits, tmp_path / "runs", **{"prune.masks_from": str(runs["rigl"]),
                                                        "prune.control": "shuffle", "prune.levels": None})
    code, out, err = run_in_process(write_config(tmp_path / "c.yaml", tree))
    assert code == 0, err
    source = mask_layers.load_masks(runs["rigl"] / "masks" / "level_0.pt")
    control = mask_layers.load_masks(tmp_path / "runs" / "exp" / "masks" / "level_0.pt")
    assert {n: int(m.sum()) for n, m in control.items()} == {n: int(m.sum()) for n, m in source.items()}
    assert not all(torch.equal(control[n], source[n]) for n in source)
    assert not (tmp_path / "runs" / "exp" / "mask_updates.csv").exists()


# ================================================================================== refusals
BASE = {"model.name": "lenet_300_100", "dataset.name": "digits", "dataset.train_path": "a",
        "dataset.test_path": "b", "experiment.name": "x", "prune.target_density": "0.2"}


@pytest.mark.parametrize("overrides,message", [
    ({"prune.training_type": "rigl", "prune.structure": "channel", "prune.criterion": "magnitude",
      "prune.allocation": "global"},
     "prune.training_type=rigl does not apply to prune.structure=channel"),
    ({"prune.training_type": "set", "prune.structure": "nm", "prune.target_density": "null"},
     "prune.training_type=set does not apply to prune.structure=nm"),
    ({"prune.training_type": "gmp", "prune.structure": "channel"},
     "prune.training_type=gmp does not apply to prune.structure=channel"),
    ({"prune.training_type": "rigl", "prune.drop_fraction": "1"}, "prune.drop_fraction=1 is not allowed"),
    ({"prune.training_type": "rigl", "prune.drop_fraction": "0"}, "prune.drop_fraction=0 is not allowed"),
    ({"prune.training_type": "gmp", "prune.update_start": "0.8"},
     "prune.update_start=0.8 must be less than prune.update_end=0.75"),
    ({"prune.training_type": "gmp", "prune.update_end": "1.5"}, "prune.update_end=1.5 is not allowed"),
    ({"prune.training_type": "set", "prune.update_every": "0"}, "prune.update_every=0 is not allowed"),
    ({"prune.training_type": "rigl", "prune.levels": "3"},
     "prune.levels=3 contradicts prune.training_type=rigl, which trains once"),
    ({"prune.training_type": "imp", "prune.update_every": "50", "prune.target_density": "null", "prune.levels": "2"},
     "prune.update_every=50 needs prune.training_type=gmp or rigl or set, not imp"),
    ({"prune.training_type": "set", "analysis.stability": "true"},
     "analysis.stability=true contradicts prune.training_type=set"),
])
def test_combinations_that_do_not_apply_are_refused_in_one_line(overrides, message):
    with pytest.raises(harness_params.ConfigError) as refusal:
        harness_params.resolve(None, {**BASE, **overrides})
    assert message in str(refusal.value) and "\n" not in str(refusal.value), str(refusal.value)


def test_rigl_and_set_default_to_erk_and_random_and_take_the_users_choice():
    for kind in ("rigl", "set"):
        c = harness_params.resolve(None, {**BASE, "prune.training_type": kind})
        assert (c["prune.allocation"], c["prune.criterion"], c["prune.update_start"]) == ("erk", "random", 0.0)
        c = harness_params.resolve(None, {**BASE, "prune.training_type": kind, "prune.allocation": "uniform",
                                          "prune.criterion": "magnitude", "prune.update_start": "0.2"})
        assert (c["prune.allocation"], c["prune.criterion"], c["prune.update_start"]) == ("uniform", "magnitude", 0.2)
    c = harness_params.resolve(None, {**BASE, "prune.training_type": "gmp"})
    assert (c["prune.allocation"], c["prune.criterion"], c["prune.update_start"]) == ("global", "magnitude", 0.1)


def test_a_window_without_an_update_step_is_refused_before_anything_is_written(tmp_path, digits):
    config = sparse_config(tmp_path, digits, "set", **{"prune.update_every": 40})
    code, out, err = run_in_process(config)
    assert code == harness.EXIT_USER_ERROR
    assert "holds no update step of this run's 44 steps" in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "runs").exists()
