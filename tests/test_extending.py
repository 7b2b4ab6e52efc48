"""docs/extending.md's recipes, each proven: an outside module adds a training type (and a
criterion), and a run of the real CLI uses it.  The test fails if adding one needs an edit
of the project."""
from __future__ import annotations

import csv

import pytest

from tests.helpers import digits_config, run_harness, write_config

FINETUNE = '''
from utils.training.training_types import TrainingType


class FineTune(TrainingType):
    """Keep the trained weights; later levels train at a constant tenth of the learning rate."""
    name = "finetune"

    def optimizer_and_schedule(self, level, config, build):
        if level == 0:
            return build()
        return build({"optimizer.lr": 0.1 * config["optimizer.lr"], "schedule.name": "constant"})
'''


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def finetune_module(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "mytypes.py").write_text(FINETUNE)
    return {"PYTHONPATH": str(code)}


def test_an_outside_training_type_runs_and_resumes_at_its_own_learning_rate(tmp_path, digits, finetune_module):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **{
        "prune.levels": 2, "training.epochs": 3, "prune.training_type": "mytypes:FineTune"}))
    # Stopped (SIGTERM) inside level 1, then the same command resumes it.
    stopped = run_harness(config, env={**finetune_module, "HARNESS_TEST_KILL_AT": "batch:1:1:3",
                                       "HARNESS_TEST_KILL_SIGNAL": "SIGTERM"})
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    resumed = run_harness(config, env=finetune_module)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = read_csv(tmp_path / "runs" / "exp" / "epochs.csv")
    lr = {(int(r["level"]), int(r["epoch"])): float(r["lr"]) for r in rows}
    assert sorted(lr) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert lr[(0, 0)] == pytest.approx(0.05) and lr[(0, 2)] < 0.05  # level 0: the config's cosine
    for epoch in range(3):  # level 1, the resumed epoch included: constant 0.1 x lr
        assert lr[(1, epoch)] == pytest.approx(0.005), rows
    levels = read_csv(tmp_path / "runs" / "exp" / "levels.csv")
    assert [float(r["density"]) for r in levels] == pytest.approx([1.0, 0.8], abs=1e-4)


def test_an_outside_training_type_that_is_not_one_is_refused_in_one_line(tmp_path, digits):
    code = tmp_path / "code"
    code.mkdir()
    (code / "mytypes.py").write_text("class NotAType:\n    pass\n")
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **{
        "prune.training_type": "mytypes:NotAType"}))
    result = run_harness(config, env={"PYTHONPATH": str(code)})
    assert result.returncode == 2
    assert "not a utils.training.training_types.TrainingType" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not (tmp_path / "runs").exists()


def test_every_registered_training_type_declares_what_the_loop_asks():
    from utils.training.training_types import TRAINING_TYPES, TrainingType
    for name, kind in TRAINING_TYPES.items():
        assert isinstance(kind, TrainingType) and kind.name == name and kind.description
    assert [n for n, k in TRAINING_TYPES.items() if k.one_shot] == ["at_init", "gmp", "rigl", "set"]
    assert [n for n, k in TRAINING_TYPES.items() if k.updates_masks] == ["gmp", "rigl", "set"]
    assert [n for n, k in TRAINING_TYPES.items() if k.captures_rewind] == ["wr"]
