"""One level plan (utils/training/level_plan.py): which levels a run trains, which prune, and each
level's target, built once from the prune settings and asked by the harness, controls, the report
and the sweep."""
from __future__ import annotations

import pytest
import yaml

import harness_params
from utils.pruning.schedules import layer_rate_counts
from utils.report import experiments as report_experiments
from utils.training.level_plan import PlanError, plan_of_config

SHAPES = {"fc1": (300, 64), "fc2": (100, 300), "fc3": (10, 100)}   # LeNet-300-100 on 8x8 digits


def config(**prune):
    defaults = harness_params.defaults()
    return {**defaults, **{f"prune.{key}": value for key, value in prune.items()}}


def test_an_iterative_run_prunes_every_level_after_the_dense_one():
    plan = plan_of_config(config(levels=4, rate=0.2), shapes=SHAPES)
    assert len(plan) == 4 and plan.densities == pytest.approx([1.0, 0.8, 0.64, 0.512])
    assert [plan.prunes_at(level) for level in range(4)] == [False, True, True, True]
    assert plan.target(2) == pytest.approx(0.64)  # unstructured: the density is the target


def test_a_target_density_ends_the_plan_at_the_first_level_at_or_below_it():
    plan = plan_of_config(config(rate=0.2, target_density=0.512))
    assert len(plan) == 4 and plan.densities[-1] == pytest.approx(0.512)  # 0.8 ** 3 counts as reaching it


def test_at_init_prunes_its_one_level_and_needs_a_density_unless_the_structure_fixes_it():
    plan = plan_of_config(config(training_type="at_init", target_density=0.1))
    assert len(plan) == 1 and plan.prunes_at(0) and plan.densities == [0.1]
    with pytest.raises(PlanError, match="at_init needs prune.target_density"):
        plan_of_config(config(training_type="at_init"))
    nm = plan_of_config(config(training_type="at_init", structure="nm", nm="2:4"), shapes=SHAPES)
    assert len(nm) == 1 and nm.target(0) == (2, 4)                     # N:M: the pattern is the target
    assert nm.densities == pytest.approx([0.5])                       # every layer's input is a multiple of 4
    with pytest.raises(PlanError, match="needs prune.levels"):
        plan_of_config(config(levels=None, target_density=None))


def test_per_layer_rates_give_each_level_its_counts_and_the_density_they_make():
    plan = plan_of_config(config(levels=3, rate=0.2, allocation="uniform", layer_rates=["fc3=0.1"]), shapes=SHAPES)
    numels = {name: a * b for name, (a, b) in SHAPES.items()}
    counts = layer_rate_counts(numels, {"fc1": 0.2, "fc2": 0.2, "fc3": 0.1}, 2)
    assert plan.target(2) == counts
    assert plan.densities[2] == pytest.approx(sum(counts.values()) / sum(numels.values()))
    assert plan_of_config(config(levels=3, allocation="uniform", layer_rates=["fc3=0.1"])).densities[2] is None  # no shapes


def test_n_m_levels_step_the_count_per_group_down_to_n():
    plan = plan_of_config(config(structure="nm", nm="1:4", levels=4), shapes=SHAPES)
    assert [plan.target(level) for level in range(4)] == [(4, 4), (3, 4), (2, 4), (1, 4)]
    assert plan.densities == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert "N:M 1:4" in plan.start_line


def test_a_control_takes_every_level_of_its_source_at_most_its_own_levels():
    source = plan_of_config(config(levels=4))
    control = source.for_control(None)
    assert len(control) == 4 and all(control.prunes_at(level) for level in range(4))
    assert control.densities == source.densities
    assert len(source.for_control(2)) == 2 and len(source.for_control(9)) == 4


def test_a_plan_that_cannot_be_built_is_one_line_and_the_report_says_so(tmp_path):
    with pytest.raises(PlanError) as error:
        plan_of_config(config(levels=3, training_type="nowhere_to_be_found:Type"))
    assert "\n" not in str(error.value)
    run = tmp_path / "run"
    run.mkdir()
    tree = {}
    for key, value in config(levels=3, training_type="nowhere_to_be_found:Type").items():
        section, name = key.split(".", 1)
        tree.setdefault(section, {})[name] = value
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    (run / "levels.csv").write_text("level,target_density,density,final_test_acc,best_test_acc,train_time_s\n"
                                    "0,1.0,1.0,90.0,91.0,1.0\n")
    experiment = report_experiments.load_experiment(run)
    assert experiment.expected_levels is None and not experiment.complete
    assert "its level plan cannot be built here" in experiment.plan_problem
    assert "nowhere_to_be_found" in experiment.status()
