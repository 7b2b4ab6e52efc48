"""Going deeper (issue 29): raising ``prune.levels`` (or lowering an iterative run's
``prune.target_density``) on a finished or stopped run continues it from its last level, the
levels done staying byte for byte; its controls and a sweep follow; any other change is still
refused.  The rule is one: utils/training/level_plan.deepening.

Runs: LeNet-300-100 on digits, torch loader, 1 epoch per level (the shared ``digits`` data).
"Equal" is test_resume's: every CSV column but timing, every level's masks, the final weights.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import harness
from tests.helpers import digits_config, write_config
from tests.test_resume import assert_same_results, run_in_process
from utils.runs import rundir
from utils.training.level_plan import DEPTH_KEYS, deepening, plan_of_config

pytestmark = pytest.mark.xdist_group("deeper")

SHORT = {"training.epochs": 1, "prune.levels": 7}


def config_file(tmp_path: Path, digits: Path, name: str, **overrides) -> Path:
    tree = digits_config(digits, tmp_path / "runs", name, **{**SHORT, **overrides})
    return write_config(tmp_path / f"{name}.yaml", tree)


def file_bytes(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.parent.name == "masks"}


@pytest.fixture(scope="module")
def deep_reference(tmp_path_factory, digits) -> Path:
    """An uninterrupted 10-level run."""
    base = tmp_path_factory.mktemp("deep_reference")
    code, out, err = run_in_process(config_file(base, digits, "ref", **{"prune.levels": 10}))
    assert code == 0, err
    return base / "runs" / "ref"


# ------------------------------------------------------------------ the rule
def test_a_plan_extends_another_only_when_its_first_levels_are_the_same():
    import harness_params

    def plan(**keys):
        return plan_of_config({"prune.training_type": "imp", "prune.rate": 0.2, **keys}, harness_params.defaults())

    seven, ten = plan(**{"prune.levels": 7}), plan(**{"prune.levels": 10})
    assert ten.extends(seven) and not seven.extends(ten) and ten.extends(ten)
    assert not plan(**{"prune.levels": 10, "prune.rate": 0.5}).extends(seven)  # other targets
    assert deepening(["prune.levels"], lambda: (seven, ten)) == 10
    assert deepening(["prune.levels"], lambda: (ten, seven)) is None           # fewer levels: another run
    assert deepening([], lambda: (seven, seven)) == 7
    assert deepening(["prune.levels", "prune.rate"], lambda: (seven, ten)) is None
    assert {"prune.levels", "prune.target_density"} == set(DEPTH_KEYS)
    # a lower final density of an iterative run goes deeper too; N:M's levels all change with their number
    assert plan(**{"prune.target_density": 0.1}).extends(plan(**{"prune.target_density": 0.3}))
    nm = {"prune.structure": "nm", "prune.nm": "2:4", "prune.allocation": "layerwise"}
    assert not plan(**nm, **{"prune.levels": 4}).extends(plan(**nm, **{"prune.levels": 3}))


# ------------------------------------------------------------------ finished, stopped, refused
def test_a_finished_7_level_run_raised_to_10_equals_a_10_level_run(tmp_path, digits, deep_reference):
    config = config_file(tmp_path, digits, "deep")
    root = tmp_path / "runs" / "deep"
    code, out, err = run_in_process(config)
    assert code == 0, err
    done = {name: (root / f"{name}.csv").read_bytes() for name in ("epochs", "levels", "layers")}
    masks = file_bytes(root)
    code, out, err = run_in_process(config, "--prune.levels=10")
    assert code == 0, err
    assert f"going deeper: {root} now has 10 levels (it had 7)" in out
    assert f"resuming {root} after level 6" in out
    assert_same_results(deep_reference, root)
    for name, text in done.items():  # the levels done stay byte for byte: the files only grew
        assert (root / f"{name}.csv").read_bytes().startswith(text), name
    assert all(file_bytes(root)[path] == data for path, data in masks.items())
    assert rundir.read_config(root)["prune.levels"] == 10
    code, out, err = run_in_process(config, "--prune.levels=10")
    assert code == 0 and "is finished (10 levels); nothing to do" in out
    # back to 7 is another run now (the directory has 10 levels)
    code, out, err = run_in_process(config)
    assert code == harness.EXIT_USER_ERROR and "prune.levels (10 there, 7 now)" in err and err.count("\n") == 1


def test_a_stopped_run_raised_to_more_levels_equals_the_deeper_run(tmp_path, digits, deep_reference):
    config = config_file(tmp_path, digits, "stopped")
    root = tmp_path / "runs" / "stopped"
    code, out, err = run_in_process(config, env={"HARNESS_TEST_KILL_AT": "batch:5:0:7",
                                                 "HARNESS_TEST_KILL_SIGNAL": "SIGTERM"})
    assert code == harness.EXIT_PREEMPTED, err
    code, out, err = run_in_process(config, "--prune.levels=10")
    assert code == 0, err
    assert "going deeper" in out and f"resuming {root} at level 5, epoch 0, batch 7" in out
    assert_same_results(deep_reference, root)


@pytest.mark.parametrize("training_type", ["wr", "lrr"])
def test_other_training_types_go_deeper_exactly(tmp_path, digits, training_type):
    """WR rewinds later levels to level 0's epoch-1 state (rewind.pt), LRR retrains from the last
    level's weights: both carry over into the new levels as in an uninterrupted run."""
    overrides = {"prune.training_type": training_type, "training.epochs": 2,
                 **({"prune.rewind_epoch": 1} if training_type == "wr" else {})}
    reference = config_file(tmp_path, digits, "ref", **overrides, **{"prune.levels": 3})
    assert run_in_process(reference)[0] == 0
    config = config_file(tmp_path, digits, "deep", **overrides, **{"prune.levels": 2})
    assert run_in_process(config)[0] == 0
    code, out, err = run_in_process(config, "--prune.levels=3")
    assert code == 0 and "going deeper" in out, err
    assert_same_results(tmp_path / "runs" / "ref", tmp_path / "runs" / "deep")


def test_a_lower_final_density_goes_deeper(tmp_path, digits, deep_reference):
    """0.8 ** 6 = 0.262: target 0.27 stops at level 6 (7 levels); 0.8 ** 9 = 0.134: 0.14 at level 9 (10 levels)."""
    config = config_file(tmp_path, digits, "density", **{"prune.levels": None, "prune.target_density": 0.27})
    root = tmp_path / "runs" / "density"
    assert run_in_process(config)[0] == 0
    assert len(pd.read_csv(root / "levels.csv")) == 7
    code, out, err = run_in_process(config, "--prune.target_density=0.14")
    assert code == 0, err
    assert_same_results(deep_reference, root)


def test_any_other_change_to_a_finished_run_is_still_refused(tmp_path, digits):
    config = config_file(tmp_path, digits, "other", **{"prune.levels": 2})
    root = tmp_path / "runs" / "other"
    assert run_in_process(config)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    for args, named in [(("--prune.levels=3", "--prune.rate=0.5"), "prune.rate (0.2 there, 0.5 now)"),
                        (("--prune.levels=3", "--training.epochs=2"), "training.epochs (1 there, 2 now)"),
                        (("--prune.levels=1",), "prune.levels (2 there, 1 now)")]:
        code, out, err = run_in_process(config, *args)
        assert code == harness.EXIT_USER_ERROR, (args, out, err)
        assert err.count("\n") == 1 and "holds a run with a different config" in err and named in err, err
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before, "nothing was touched"


# ------------------------------------------------------------------ controls and sweeps follow
def test_a_control_of_a_source_made_deeper_continues_to_its_new_levels(tmp_path, digits):
    source_config = config_file(tmp_path, digits, "source", **{"prune.levels": 2})
    source = tmp_path / "runs" / "source"
    control = config_file(tmp_path, digits, "control", **{"prune.levels": None, "prune.masks_from": str(source),
                                                          "prune.control": "shuffle"})
    assert run_in_process(source_config)[0] == 0
    code, out, err = run_in_process(control)
    assert code == 0, err
    assert len(pd.read_csv(tmp_path / "runs" / "control" / "levels.csv")) == 2
    code, out, err = run_in_process(control)
    assert code == 0 and "nothing to do" in out
    assert run_in_process(source_config, "--prune.levels=3")[0] == 0
    code, out, err = run_in_process(control)
    assert code == 0, err
    assert "resuming" in out and "after level 1" in out
    levels = pd.read_csv(tmp_path / "runs" / "control" / "levels.csv")
    assert list(levels.level) == [0, 1, 2]
    taken = torch.load(source / "masks" / "level_2.pt", weights_only=True)
    trained = torch.load(tmp_path / "runs" / "control" / "masks" / "level_2.pt", weights_only=True)
    assert {k: int(v.sum()) for k, v in taken.items()} == {k: int(v.sum()) for k, v in trained.items()}


def test_a_sweep_that_raises_levels_finds_its_finished_runs_partial(tmp_path, digits):
    """The sweep's own status rule (utils.launch.sweep_spec.run_status) with the level plan's."""
    from utils.launch import sweep_spec
    config = config_file(tmp_path, digits, "swept", **{"prune.levels": 2})
    assert run_in_process(config)[0] == 0
    import harness_params
    stored = rundir.read_config(tmp_path / "runs" / "swept")

    class Run:  # what run_status reads of a sweep's run
        def __init__(self, **changes):
            self.directory, self.source = tmp_path / "runs" / "swept", None
            self.config = {**harness_params.defaults(), **stored, **changes}

    assert sweep_spec.run_status(Run()) == "finished"
    assert sweep_spec.run_status(Run(**{"prune.levels": 3})) == "partial"
    assert sweep_spec.run_status(Run(**{"prune.levels": 3, "prune.rate": 0.5})) == "conflict"
    assert sweep_spec.run_status(Run(**{"prune.levels": 1})) == "conflict"


@pytest.mark.slow  # ~30 s: torchrun twice; one process goes deeper in the tests above (RUN_SLOW=1 runs it)
def test_two_processes_go_deeper_and_agree_on_what_to_do(tmp_path, digits):
    """Under torchrun rank 0 decides (under the lock) and every rank follows its decision."""
    from tests.helpers import run_harness
    config = config_file(tmp_path, digits, "ddp", **{"prune.levels": 1})
    root = tmp_path / "runs" / "ddp"
    result = run_harness(config, nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    level_0 = (root / "levels.csv").read_bytes()
    result = run_harness(config, "--prune.levels=2", nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "going deeper" in result.stdout and "resuming" in result.stdout
    assert list(pd.read_csv(root / "levels.csv").level) == [0, 1]
    assert (root / "levels.csv").read_bytes().startswith(level_0)
    result = run_harness(config, "--prune.levels=2", nproc=2, timeout=300)
    assert result.returncode == 0 and "nothing to do" in result.stdout, result.stderr[-2000:]


@pytest.mark.slow  # ~35 s: a whole sweep twice; run_status of a deepened sweep is tested above (RUN_SLOW=1 runs it)
def test_a_sweep_whose_file_raises_levels_continues_its_runs_and_their_controls(tmp_path, digits, monkeypatch, capsys):
    """One source and its shuffle control, 1 level each; the same sweep with prune.levels=2
    relaunches both and each goes on to level 1, level 0 unchanged (one run at a time: the
    source first, as listed)."""
    import yaml

    from utils import sweep as sweep_command
    base = config_file(tmp_path, digits, "base", **{"prune.levels": 1})
    spec = {"base": str(base), "name": "deeper", "grid": {"experiment.seed": [0]}, "controls": ["shuffle"],
            "overrides": {"prune.levels": 1}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sweep_command.main([str(path), "--no-report"]) == 0
    root = tmp_path / "runs" / "deeper"
    names = sorted(p.name for p in root.iterdir() if (p / "levels.csv").exists())
    assert len(names) == 2
    first = {name: (root / name / "levels.csv").read_bytes() for name in names}
    capsys.readouterr()
    path.write_text(yaml.safe_dump({**spec, "overrides": {"prune.levels": 2}}))
    assert sweep_command.main([str(path), "--no-report"]) == 0
    assert "0 finished, 2 to run" in capsys.readouterr().out
    for name in names:
        levels = root / name / "levels.csv"
        assert list(pd.read_csv(levels).level) == [0, 1], name
        assert levels.read_bytes().startswith(first[name]), name
    assert sweep_command.main([str(path), "--no-report"]) == 0
    assert "2 finished, 0 to run" in capsys.readouterr().out
