"""Config contract: every key declared, strict types and sets, cross-field checks, one-line errors."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import harness_params as hp

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {
    "model": {"name": "lenet_300_100"},
    "dataset": {"name": "digits", "train_path": "a.beton", "test_path": "b.beton"},
    "prune": {"levels": 2},
    "experiment": {"name": "x"},
}


def write(tmp_path, tree, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def resolve(tmp_path, tree=None, **overrides):
    return hp.resolve(write(tmp_path, tree or MINIMAL), {k: str(v) for k, v in overrides.items()})


def test_design_keys_are_declared():
    keys = set(hp._known_keys(hp.declare_sections()))
    for key in ["model.name", "dataset.name", "dataset.train_path", "dataset.test_path", "dataset.batch_size",
                "dataset.num_workers", "dataset.loader", "optimizer.name", "optimizer.lr", "optimizer.momentum",
                "optimizer.nesterov", "optimizer.weight_decay", "optimizer.label_smoothing", "schedule.name",
                "schedule.warmup_epochs", "schedule.milestones", "schedule.gamma", "training.epochs",
                "training.precision", "training.channels_last", "training.compile", "prune.criterion",
                "prune.allocation", "prune.training_type", "prune.rate", "prune.levels", "prune.target_density",
                "prune.rewind_epoch", "prune.exclude", "experiment.name", "experiment.base_dir", "experiment.seed"]:
        assert key in keys, key


def test_defaults_and_overrides(tmp_path):
    c = resolve(tmp_path, **{"prune.rate": "0.5", "optimizer.nesterov": "true", "schedule.milestones": "[1, 2]"})
    assert c["prune.rate"] == 0.5 and c["optimizer.nesterov"] is True and c["schedule.milestones"] == [1.0, 2.0]
    assert c["dataset.batch_size"] == 128 and c["prune.criterion"] == "magnitude"


def test_fastargs_sees_resolved_values(tmp_path):
    resolve(tmp_path, **{"prune.rate": "0.3"})
    from fastargs import get_current_config
    assert get_current_config()["prune.rate"] == 0.3


@pytest.mark.parametrize("key,value,fragment", [
    ("prune.rate", "1.5", "prune.rate=1.5 is not allowed"),
    ("prune.rate", "0", "(0, 1)"),
    ("prune.levels", "0", "prune.levels=0"),
    ("prune.target_density", "1.2", "prune.target_density"),
    ("dataset.batch_size", "3.5", "an integer"),
    ("optimizer.nesterov", "maybe", "true or false"),
    ("experiment.resume", "'false'", "true or false"),
    ("prune.criterion", "l1", "one of magnitude"),
    ("model.name", "resnet9000", "model.name='resnet9000'"),
    ("dataset.name", "cifar11", "cifar10"),
])
def test_bad_values_are_refused(tmp_path, key, value, fragment):
    with pytest.raises(hp.ConfigError) as error:
        resolve(tmp_path, **{key: value})
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_key_and_section(tmp_path):
    with pytest.raises(hp.ConfigError, match="unknown key training.bn_wd"):
        resolve(tmp_path, {**MINIMAL, "training": {"bn_wd": True}})
    with pytest.raises(hp.ConfigError, match="unknown section 'lr'"):
        resolve(tmp_path, {**MINIMAL, "lr": {"lr": 0.1}})
    with pytest.raises(hp.ConfigError, match="unknown key prune.ratee"):
        resolve(tmp_path, **{"prune.ratee": "0.1"})


@pytest.mark.parametrize("overrides,fragment", [
    ({"prune.training_type": "wr", "prune.rewind_epoch": "10", "training.epochs": "10"}, "rewind_epoch=10 must be less"),
    ({"prune.training_type": "at_init"}, "needs prune.target_density"),
    ({"prune.target_density": "0.1"}, "both set"),
    ({"optimizer.nesterov": "true", "optimizer.name": "adam"}, "nesterov"),
    ({"schedule.name": "multistep"}, "needs schedule.milestones"),
    ({"schedule.name": "multistep", "schedule.milestones": "[5, 2]"}, "must increase"),
    ({"schedule.warmup_epochs": "10", "training.epochs": "10"}, "warmup_epochs"),
])
def test_cross_field_contradictions(tmp_path, overrides, fragment):
    with pytest.raises(hp.ConfigError, match=fragment):
        resolve(tmp_path, **overrides)


def test_missing_required_key(tmp_path):
    tree = {k: dict(v) for k, v in MINIMAL.items()}
    del tree["experiment"]
    with pytest.raises(hp.ConfigError, match="experiment.name is required"):
        resolve(tmp_path, tree)


def test_yaml_errors(tmp_path):
    with pytest.raises(hp.ConfigError, match="does not exist"):
        hp.resolve(str(tmp_path / "nope.yaml"), {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(hp.ConfigError, match="not valid YAML at line"):
        hp.resolve(str(bad), {})


def test_cli_exit_codes_and_help(tmp_path):
    config = write(tmp_path, MINIMAL)
    run = lambda *args: subprocess.run([sys.executable, "harness.py", *args], cwd=ROOT, capture_output=True,
                                       text=True, timeout=120)
    bad = run("--config", config, "--prune.rate=2")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "prune.rate=2" in bad.stderr
    assert not (tmp_path / "runs").exists() and not (ROOT / "runs" / "x").exists()
    helped = run("--help")
    assert helped.returncode == 0
    for key in ("prune.criterion", "dataset.batch_size", "training.channels_last", "prune.rewind_epoch"):
        assert key in helped.stdout
