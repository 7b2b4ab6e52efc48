"""The commands users type keep their names after utils/ became packages: each ``python -m
utils.X`` answers --help with its own usage, and the one-process harness runs a real experiment
with the same output files as harness.py."""
from __future__ import annotations

import os
import subprocess

import pandas as pd
import pytest

from tests.helpers import PYTHON, ROOT, digits_config, write_config

COMMANDS = {
    "utils.write_beton": "--dataset",
    "utils.report": "--out-dir",
    "utils.sweep": "--dry-run",
    "utils.compact": "--experiment",
    "utils.pruning_utils": "--checkpoint",
    "utils.single_gpu_harness": "--config",
    "utils.ticket": "export",
}


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_documented_command_answers_help_with_its_usage(command):
    result = run("-m", command, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert COMMANDS[command] in result.stdout


def test_the_one_process_harness_runs_an_experiment_as_the_harness_does(tmp_path, digits):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **{
        "prune.levels": 2, "training.epochs": 1}))
    result = run("-m", "utils.single_gpu_harness", "--config", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    levels = pd.read_csv(tmp_path / "runs" / "exp" / "levels.csv")
    assert levels.level.tolist() == [0, 1] and levels.density.tolist() == pytest.approx([1.0, 0.8], abs=1e-4)
