"""A user's own network and criterion (``package.module:function``) through the real CLI."""
from __future__ import annotations

import csv

import pytest

from tests.helpers import digits_config, run_harness, write_config


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_harness_trains_a_user_network_pruned_by_a_user_criterion(tmp_path, digits):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **{
        "prune.levels": 2, "training.epochs": 1}))
    result = run_harness(config, "--model.name=examples.custom:build_net",
                         "--prune.criterion=examples.custom:lamp_scores")
    assert result.returncode == 0, result.stderr[-2000:]
    root = tmp_path / "runs" / "exp"
    levels = read_csv(root / "levels.csv")
    assert [row["level"] for row in levels] == ["0", "1"]
    layers = read_csv(root / "layers.csv")
    level1 = {row["layer"]: row for row in layers if row["level"] == "1"}
    assert sorted(level1) == ["0", "5", "7"]  # the conv and the two linear layers of build_net
    numel = sum(int(row["numel"]) for row in level1.values())
    assert sum(int(row["alive"]) for row in level1.values()) == round(0.8 * numel)
    assert "examples.custom:lamp_scores" in (root / "config.yaml").read_text()


@pytest.mark.parametrize("args,fragment", [
    # Import failures are refused by the config loader (tests/test_science.py covers each in
    # process); this one is found only when the harness builds the model.
    (["--model.name=my_bad_nets:not_a_network"], "returned a int, not a torch.nn.Module"),
])
def test_bad_user_code_is_refused_in_one_line_and_writes_nothing(tmp_path, digits, args, fragment):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "my_bad_nets.py").write_text("def not_a_network(num_classes):\n    return 3\n")
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs"))
    result = run_harness(config, *args, env={"PYTHONPATH": str(tmp_path / "code")})
    assert result.returncode == 2
    assert fragment in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert not (tmp_path / "runs").exists()
