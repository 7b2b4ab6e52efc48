"""Bad input ends in ONE line on stderr naming the problem and what is allowed, exit status
2, and nothing created or changed on disk (issue 5).

Most cases call ``harness.main(argv)`` in this process (it returns the exit status); two
run as real programs: ``python harness.py`` with a missing config file, and torchrun with 2
processes and a batch size they cannot share (one line in all, from rank 0).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

import harness
import harness_utils as hu
from tests.helpers import digits_config, run_harness, write_config
from utils.data.beton import _FIELD_DESCRIPTOR, _HEADER, BetonFile


def beton_with_label(source: Path, target: Path, label: int) -> Path:
    """A copy of ``source`` whose first sample has label ``label`` (patched in place in the
    metadata table, where ffcv stores an int field inline)."""
    beton = BetonFile(source)
    table = _HEADER.itemsize + len(beton.fields) * _FIELD_DESCRIPTOR.itemsize
    offset = table + beton.metadata.dtype.fields["label"][1]
    data = bytearray(source.read_bytes())
    data[offset:offset + 8] = np.int64(label).tobytes()
    target.write_bytes(bytes(data))
    return target


def run_main(capsys, *argv: str):
    code = harness.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, fragment: str) -> None:
    assert code == harness.EXIT_USER_ERROR, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert fragment in lines[0], lines[0]


def tree(root: Path) -> Dict[str, tuple]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


# name -> (overrides of the digits experiment, fragment of the message)
CONFIG_CASES = {
    "unknown key": ({"training.epoch": 3}, "unknown key training.epoch (in "),
    "unknown section": ({"trainer.epochs": 3}, "unknown section 'trainer'"),
    "wrong type": ({"training.epochs": "ten"}, "training.epochs='ten' is not allowed: expected an integer"),
    "value outside its set": ({"optimizer.name": "lion"}, "optimizer.name='lion' is not allowed: expected one of sgd"),
    "rate 0": ({"prune.rate": 0}, "prune.rate=0 is not allowed: expected a number in (0, 1)"),
    "rate 1": ({"prune.rate": 1.0}, "prune.rate=1.0 is not allowed: expected a number in (0, 1)"),
    "levels 0": ({"prune.levels": 0}, "prune.levels=0 is not allowed: expected an integer in [1, inf], or null"),
    "target density 0": ({"prune.levels": None, "prune.target_density": 0.0},
                         "prune.target_density=0.0 is not allowed: expected a number in (0, 1]"),
    "target density above 1": ({"prune.levels": None, "prune.target_density": 1.5},
                               "prune.target_density=1.5 is not allowed: expected a number in (0, 1]"),
    "rewind epoch = epochs": ({"prune.training_type": "wr", "prune.rewind_epoch": 2},
                              "prune.rewind_epoch=2 must be less than training.epochs=2"),
    "unknown model": ({"model.name": "resnet9000"}, "model.name='resnet9000' is not allowed: expected one of "),
    "unknown dataset": ({"dataset.name": "imagenet21k"}, "dataset.name='imagenet21k' is not allowed: expected one of"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_errors(tmp_path, digits, capsys, case):
    overrides, fragment = CONFIG_CASES[case]
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **overrides))
    assert_refused(*run_main(capsys, "--config", str(config))[::2], fragment)
    assert not (tmp_path / "runs").exists()


def test_missing_and_unparsable_config_files(tmp_path, capsys):
    code, _, err = run_main(capsys, "--config", str(tmp_path / "nope.yaml"))
    assert_refused(code, err, f"config file {tmp_path / 'nope.yaml'} does not exist")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  name: lenet_300_100\ndataset: {name: digits\n")
    code, _, err = run_main(capsys, "--config", str(broken))
    assert_refused(code, err, f"config file {broken} is not valid YAML at line")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml"]


# name -> (function (tmp_path, digits) -> overrides, fragment)
DATA_CASES = {
    "missing beton": (lambda tmp, digits: {"dataset.train_path": str(tmp / "missing.beton")},
                      ".beton file not found"),
    "truncated beton": (lambda tmp, digits: {"dataset.test_path": str(_truncated(digits, tmp))}, "truncated"),
    "beton of another image size": (lambda tmp, digits: {"dataset.name": "cifar10"},
                                    "holds 8x8 images with 1 channel(s), cifar10 expects 32x32 images with 3"),
    "labels beyond the classes": (
        lambda tmp, digits: {"dataset.train_path": str(beton_with_label(digits / "digits_train.beton",
                                                                        tmp / "labels.beton", 12))},
        "labels span 0..12, digits allows 0..9"),
    "model too big for the images": (lambda tmp, digits: {"model.name": "lenet5"}, "lenet5 needs image_size >= 12"),
    "batch larger than the data": (lambda tmp, digits: {"dataset.batch_size": 4096},
                                   "dataset.batch_size=4096 is larger than the training set (1437 samples)"),
}


def _truncated(digits: Path, tmp: Path) -> Path:
    data = (digits / "digits_test.beton").read_bytes()
    path = tmp / "truncated.beton"
    path.write_bytes(data[:len(data) // 2])
    return path


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_data_and_model_errors(tmp_path, digits, capsys, case):
    make_overrides, fragment = DATA_CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    config = write_config(inputs / "c.yaml", digits_config(digits, tmp_path / "runs", **make_overrides(inputs, digits)))
    code, _, err = run_main(capsys, "--config", str(config))
    assert_refused(code, err, fragment)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- checkpoints in the way
@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory, digits):
    """(config, directory) of a 2-level run stopped after its first level."""
    base = tmp_path_factory.mktemp("unfinished")
    config = write_config(base / "c.yaml", digits_config(digits, base / "runs", **{"training.epochs": 1}))
    code = harness.main(["--config", str(config), "--prune.levels=1"])  # level 0 only: a finished 1-level run
    assert code == 0
    root = base / "runs" / "exp"
    # Make it the first level of the 3-level config: same checkpoint, not finished, config of 3 levels.
    state = torch.load(root / "checkpoints" / "last.pt", weights_only=True)
    resolved = harness.load_config_on_every_rank(["--config", str(config)])
    for name in ("last", "init"):
        path = root / "checkpoints" / f"{name}.pt"
        saved = torch.load(path, weights_only=True)
        saved["config"] = resolved
        if name == "last":
            saved["finished"] = False
        hu.atomic_torch_save(saved, path)
    hu.atomic_write_bytes(root / "config.yaml", hu.config_yaml(resolved))
    assert state["phase"] == "level_done"
    return config, root


def _damage(root: Path, how: str, config: Path) -> str:
    last = root / "checkpoints" / "last.pt"
    if how == "garbage":
        last.write_bytes(b"\x00not a checkpoint" * 100)
        return f"checkpoint {last} cannot be read"
    if how == "truncated":
        last.write_bytes(last.read_bytes()[:last.stat().st_size // 2])
        return f"checkpoint {last} cannot be read"
    if how == "another config":
        state = torch.load(last, weights_only=True)
        state["config"] = {**state["config"], "prune.rate": 0.5, "optimizer.lr": 0.2}
        hu.atomic_torch_save(state, last)
        return f"checkpoint {last} belongs to another config (differs in optimizer.lr, prune.rate)"
    if how == "not ours":
        hu.atomic_torch_save({"weights": torch.zeros(3)}, last)
        return f"checkpoint {last} is not a format-{hu.CHECKPOINT_FORMAT} checkpoint of this harness"
    if how == "init missing":
        (root / "checkpoints" / "init.pt").unlink()
        return f"checkpoint {root / 'checkpoints' / 'init.pt'} is missing"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["garbage", "truncated", "another config", "not ours", "init missing"])
def test_a_bad_checkpoint_is_refused_and_left_alone(tmp_path, unfinished_run, capsys, how):
    config, original = unfinished_run
    root = tmp_path / "runs" / "exp"
    shutil.copytree(original, root)
    fragment = _damage(root, how, config)
    before = tree(root)
    code, _, err = run_main(capsys, "--config", str(config), f"--experiment.base_dir={tmp_path / 'runs'}")
    assert_refused(code, err, fragment)
    assert "move it away" in err
    assert tree(root) == before, "nothing in the directory was touched"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["exp"]


def test_the_unfinished_run_itself_resumes(tmp_path, unfinished_run, capsys):
    """The control for the test above: undamaged, the same directory resumes and finishes."""
    config, original = unfinished_run
    root = tmp_path / "runs" / "exp"
    shutil.copytree(original, root)
    code, out, err = run_main(capsys, "--config", str(config), f"--experiment.base_dir={tmp_path / 'runs'}")
    assert code == 0, err
    assert f"resuming {root} after level 0" in out


# ------------------------------------------------------------------------- as programs
def test_only_rank_zero_reports_a_config_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert harness.load_config_on_every_rank(["--config", str(tmp_path / "nope.yaml")]) == harness.EXIT_USER_ERROR
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert harness.load_config_on_every_rank(["--config", str(tmp_path / "nope.yaml")]) == harness.EXIT_USER_ERROR
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_missing_config_file_as_a_program(tmp_path):
    result = run_harness(tmp_path / "nope.yaml", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"config error: config file {tmp_path / 'nope.yaml'} does not exist"]
    assert result.stdout == ""


def test_batch_not_divisible_by_processes_under_torchrun(tmp_path, digits):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **{"dataset.batch_size": 63}))
    result = run_harness(config, nproc=2, timeout=120)
    message = "error: dataset.batch_size=63 is not divisible by the number of processes (2); use a multiple of 2"
    harness_lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert harness_lines == [message], result.stderr  # once, from rank 0
    # torchrun itself exits with 1 and appends its failure summary; the workers' status is 2.
    assert result.returncode != 0 and re.search(r"exitcode\s*:\s*2", result.stderr), result.stderr
    assert not (tmp_path / "runs").exists()
    # torchrun's "Root Cause" shows the refusal line alone: a user error has no stack frames.
    root_cause = result.stderr.split("Root Cause", 1)[-1]
    assert message in root_cause, result.stderr
    assert "Traceback" not in root_cause and 'File "' not in root_cause, root_cause
