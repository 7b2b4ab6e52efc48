"""Trustworthy results (issue 9): defects found in review, each pinned by a test that fails
on the code before the fix.  Runs are LeNet-300-100 on digits with the torch loader."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn as nn

import harness
import harness_params
import harness_utils as hu
from tests.helpers import digits_config, write_config
from tests.test_resume import assert_same_results, run_in_process
from utils.models import mask_layers
from utils.pruning import command as pruning_command
from utils.pruning import masks as pruning_masks
from utils.pruning import schedules as density_schedules
from utils.training.step import TrainingStep


# ------------------------------------------------------------------ 1. WR after SIGTERM
def test_wr_stopped_inside_the_rewind_epoch_resumes_to_the_uninterrupted_results(tmp_path, digits):
    """SIGTERM in level 0's epoch ``rewind_epoch``: the resumed run must rewind later levels
    to the end of epoch rewind_epoch - 1 (rewind.pt), not to the mid-epoch state it resumed."""
    overrides = {"prune.training_type": "wr", "prune.rewind_epoch": 1, "training.epochs": 3}
    reference = write_config(tmp_path / "ref.yaml", digits_config(digits, tmp_path / "runs", "ref", **overrides))
    assert run_in_process(reference)[0] == 0
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", "stopped", **overrides))
    code, out, err = run_in_process(config, env={"HARNESS_TEST_KILL_AT": "batch:0:1:5",
                                                 "HARNESS_TEST_KILL_SIGNAL": "SIGTERM"})
    assert code == harness.EXIT_PREEMPTED, err
    code, out, err = run_in_process(config)
    assert code == 0, err
    assert "resuming" in out and "epoch 1, batch 5" in out
    assert_same_results(tmp_path / "runs" / "ref", tmp_path / "runs" / "stopped")
    epochs = pd.read_csv(tmp_path / "runs" / "stopped" / "epochs.csv")
    lr = epochs[(epochs.level == 1) & (epochs.epoch == 1)].lr.item()
    assert lr == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi / 3)), abs=1e-6)  # cosine at 1 of 3 epochs


# ------------------------------------------------------------------ 2. SNIP in eval mode
class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _hand_snip_masks(model, batch, density):
    """|dL/dw * w| with the model in eval mode (running BN statistics), global top-k."""
    model.eval()
    x, y = batch
    loss = nn.functional.cross_entropy(model(x), y)
    layers = dict(mask_layers.masked_layers(model))
    grads = torch.autograd.grad(loss, [layer.weight for layer in layers.values()])
    scores = {name: (g * layer.weight).abs().detach() for (name, layer), g in zip(layers.items(), grads)}
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = density_schedules.target_keep_count(density, flat.numel())
    threshold = flat.sort(descending=True).values[keep - 1]
    return {name: s >= threshold for name, s in scores.items()}


def test_snip_scores_in_eval_mode_by_default():
    torch.manual_seed(0)
    model = _BNNet()
    mask_layers.prepare_model(model)
    with torch.no_grad():  # running statistics far from a batch's: train and eval mode disagree
        model.bn.running_mean.uniform_(-2, 2)
        model.bn.running_var.uniform_(0.1, 5)
    batch = (torch.randn(16, 3, 4, 4), torch.randint(0, 5, (16,)))
    kwargs = dict(density=0.3, criterion="snip", allocation="global", batches=[batch], num_batches=1)
    model.train()
    default = pruning_masks.compute_masks(model, **kwargs)
    assert model.training and model.bn.training  # scoring restores the flags
    expected = _hand_snip_masks(model, batch, 0.3)
    for name in expected:
        assert torch.equal(default[name], expected[name]), name
    train = pruning_masks.compute_masks(model, criterion_options={"snip_mode": "train"}, **kwargs)
    assert any(not torch.equal(train[n], default[n]) for n in default), "train mode must remain available and differ"


# ------------------------------------------------------------------ 4. clipping alive weights
def test_grad_clip_measures_the_alive_weights_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20, bias=False))
    mask_layers.prepare_model(model)
    layer = model[0]
    keep = torch.zeros(20, 20, dtype=torch.bool)
    keep[:2] = True  # 10% alive
    mask_layers.set_masks(model, {"0": keep})
    before = layer.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    class _Schedule:
        lr = 1.0

        def step(self):
            pass

    x = torch.randn(32, 20)
    y = torch.randint(0, 20, (32,))
    step = TrainingStep(model, model, optimizer, _Schedule(), grad_clip=1e-3)
    # The gradient the step will see, for the expectation.
    probe = nn.functional.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(probe, [layer.weight])
    alive_grad = grad * keep
    expected_update = alive_grad * min(1.0, 1e-3 / (alive_grad.norm().item() + 1e-6))
    step(x, y)
    update = before - layer.weight.detach()
    assert torch.allclose(update, expected_update, atol=1e-6, rtol=1e-2)
    assert update.norm().item() == pytest.approx(1e-3, rel=1e-2)  # the full norm (pruned included) would clip harder
    assert torch.count_nonzero(layer.weight.detach()[~keep]) == 0


# ------------------------------------------------------------------ 3. SyncBatchNorm default
def test_sync_bn_defaults_to_auto_on_for_cuda_only(tmp_path, digits):
    config_path = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs"))
    config = harness_params.load_config(["--config", str(config_path)])
    assert config["distributed.sync_bn"] == "auto"
    assert hu.wants_sync_bn("auto", torch.device("cuda", 0))
    assert not hu.wants_sync_bn("auto", torch.device("cpu"))
    assert hu.wants_sync_bn(True, torch.device("cpu")) and not hu.wants_sync_bn(False, torch.device("cuda", 0))
    for value in ("true", "false", "auto"):
        assert harness_params.load_config(["--config", str(config_path), f"--distributed.sync_bn={value}"])


# ------------------------------------------------------------------ 5. CLI = harness masks
@pytest.mark.parametrize("criterion", ["random", "snip"])
def test_pruning_cli_reproduces_the_harness_masks_of_a_level(tmp_path, digits, criterion):
    """The harness's level-1 masks, and the CLI's from level 0's final weights with the same
    config and ``--level 1``: identical."""
    runs = tmp_path / "runs"
    overrides = {"prune.criterion": criterion, "prune.training_type": "lrr", "training.epochs": 1,
                 "experiment.seed": 3, "prune.snip_batches": 2}
    two = write_config(tmp_path / "two.yaml", digits_config(digits, runs, "two", **overrides, **{"prune.levels": 2}))
    one = write_config(tmp_path / "one.yaml", digits_config(digits, runs, "one", **overrides, **{"prune.levels": 1}))
    assert run_in_process(two)[0] == 0
    assert run_in_process(one)[0] == 0  # its last.pt: level 0's final weights, the ones level 1 pruned
    out = tmp_path / "cli_masks.pt"
    assert pruning_command.main(["--config", str(two), "--checkpoint", str(runs / "one" / "checkpoints" / "last.pt"),
                    "--density", "0.8", "--level", "1", "--out", str(out)]) == 0
    cli = torch.load(out, weights_only=True)
    ran = torch.load(runs / "two" / "masks" / "level_1.pt", weights_only=True)
    assert cli.keys() == ran.keys()
    for name in ran:
        assert torch.equal(cli[name], ran[name]), name
    level_0 = torch.load(runs / "two" / "masks" / "level_0.pt", weights_only=True)
    assert any(not torch.equal(ran[n], level_0[n]) for n in ran)  # level 1 really pruned


# ------------------------------------------------------------------ one live run per directory
def test_a_second_launch_on_a_live_directory_is_refused_and_writes_nothing(tmp_path, digits):
    """The first run is held in its first step (a 30 s step: nothing is written meanwhile); a second launch of the same
    config is refused in one line naming the holder, exit 2, leaving the directory as it was.
    Once the holder is gone (SIGKILL) the same command resumes."""
    import os
    import signal
    import subprocess
    import time

    from tests.helpers import PYTHON, ROOT
    from tests.test_bad_input import tree

    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **{"training.epochs": 1}))
    root = tmp_path / "runs" / "exp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_TEST_STEP_DELAY_S": "30"}
    first = subprocess.Popen([PYTHON, "harness.py", "--config", str(config)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (root / "masks" / "level_0.pt").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        before = tree(root)
        code, out, err = run_in_process(config)
        assert code == harness.EXIT_USER_ERROR
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f"{root} is in use by a live run (host " in lines[0], err
        assert f"pid {first.pid}, since " in lines[0]
        assert tree(root) == before, "the refused launch wrote nothing"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    code, out, err = run_in_process(config)  # the holder died: its lock went with it
    assert code == 0, err
    assert "resuming" in out or "no checkpoint" in out
    assert len(pd.read_csv(root / "levels.csv")) == 3


# ------------------------------------------------------------------ failed writes
def test_a_failed_checkpoint_write_is_one_line_and_the_run_resumes_exactly(tmp_path, digits, monkeypatch):
    import errno

    from utils.runs import checkpointing

    reference = write_config(tmp_path / "ref.yaml", digits_config(digits, tmp_path / "runs", "ref"))
    assert run_in_process(reference)[0] == 0
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", "full"))
    real_save, calls = torch.save, {"n": 0}

    def save_until_the_disk_fills(obj, handle, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # init.pt, 2 epochs' last.pt, then the disk is full mid-write
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", save_until_the_disk_fills)
    root = tmp_path / "runs" / "full"
    code, out, err = run_in_process(config)
    assert code == harness.EXIT_WRITE_FAILED
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {root / 'checkpoints'}")
    assert "no space left on device" in lines[0] and "run the same command to resume" in lines[0]
    assert not [p for p in root.rglob("*.tmp")], "no temporary file left behind"
    intact = torch.load(root / "checkpoints" / "last.pt", weights_only=True)  # the last good one
    assert intact["format"] == checkpointing.CHECKPOINT_FORMAT
    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    code, out, err = run_in_process(config)
    assert code == 0, err
    assert_same_results(tmp_path / "runs" / "ref", root)


def test_the_cause_of_a_failed_write_is_named():
    import errno

    from utils.runs.checkpointing import write_failure_cause

    assert write_failure_cause(OSError(errno.EDQUOT, "x"), "/") == "disk quota exceeded"
    assert write_failure_cause(OSError(errno.EROFS, "x"), "/") == "read-only file system"
    wrapped = RuntimeError("unexpected pos 225792 vs 225696")
    wrapped.__cause__ = OSError(errno.ENOSPC, "x")
    assert write_failure_cause(wrapped, "/") == "no space left on device"


def test_an_unreadable_last_checkpoint_falls_back_to_the_previous_one(tmp_path, digits):
    reference = write_config(tmp_path / "ref.yaml", digits_config(digits, tmp_path / "runs", "ref"))
    assert run_in_process(reference)[0] == 0
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", "bad"))
    root = tmp_path / "runs" / "bad"
    code, _, err = run_in_process(config, env={"HARNESS_TEST_KILL_AT": "batch:1:1:3", "HARNESS_TEST_KILL_SIGNAL": "SIGTERM"})
    assert code == harness.EXIT_PREEMPTED, err
    last = root / "checkpoints" / "last.pt"
    assert (root / "checkpoints" / "previous.pt").exists()
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # e.g. a disk that lost the file's tail
    code, out, err = run_in_process(config)
    assert code == 0, err
    assert f"note: checkpoint {last} cannot be read" in out and "resuming from" in out and "previous.pt" in out
    assert_same_results(tmp_path / "runs" / "ref", root)


# ------------------------------------------------------------------ reproducible ffcv augmentation
@pytest.fixture(scope="module")
def cifar_files(tmp_path_factory):
    """A small CIFAR-10-format .beton pair written by the real writer (raw storage: flips and
    translations are the augmentations)."""
    from tests.test_data import write_cifar10_tree
    from utils.data import writer as wb

    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_tree(root / "src", per_batch=32, test=40)
    return wb.write_dataset("cifar10", root / "src", root / "data", num_workers=1)


@pytest.mark.slow  # 25-45 s here: RUN_SLOW=1 runs it (make test stays near its time budget)
def test_ffcv_runs_with_augmentation_repeat_and_resume_exactly(tmp_path, cifar_files):
    from tests.helpers import run_harness

    train, test = cifar_files
    overrides = {"model.name": "conv2", "dataset.name": "cifar10", "dataset.train_path": str(train),
                 "dataset.test_path": str(test), "dataset.batch_size": 32, "dataset.loader": "ffcv",
                 "training.epochs": 3, "prune.levels": 1}
    configs = {name: write_config(tmp_path / f"{name}.yaml", digits_config(tmp_path, tmp_path / "runs", name, **overrides))
               for name in ("first", "second", "killed")}
    for name in ("first", "second"):
        code, _, err = run_in_process(configs[name])
        assert code == 0, err
    assert_same_results(tmp_path / "runs" / "first", tmp_path / "runs" / "second")
    killed = run_harness(configs["killed"], env={"HARNESS_TEST_KILL_AT": "batch:0:2:2"}, timeout=600)
    assert killed.returncode == -9, killed.stderr  # SIGKILL mid-epoch: back to the end of epoch 1
    code, out, err = run_in_process(configs["killed"])
    assert code == 0 and "resuming" in out, err
    assert_same_results(tmp_path / "runs" / "first", tmp_path / "runs" / "killed")
