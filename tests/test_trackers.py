"""Trackers (utils/runs/trackers.py): TensorBoard event files read back, resume without duplicates,
W&B refusal when the package is missing and its logging calls against a fake module."""
from __future__ import annotations

import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, digits_config, write_config
from utils.core.callbacks import LevelInfo
from utils.runs.trackers import (
    TensorBoardTracker,
    TrackerError,
    WandbTracker,
    check_trackers,
    global_step,
    TrackerSettings,
    make_trackers,
    next_step_from_csv,
)

EPOCHS = 3
MODEL = torch.nn.Linear(2, 2)


def config(**extra):
    return {"training.epochs": EPOCHS, "logging.tensorboard": False, "logging.wandb_project": None,
            "experiment.name": "exp", **extra}


def epoch_row(level, epoch):
    return {"level": level, "epoch": epoch, "lr": 0.1 / (epoch + 1), "train_loss": 1.0 / (1 + level + epoch),
            "train_acc": 50.0 + epoch, "test_loss": 0.5, "test_acc": 60.0 + 10 * level + epoch,
            "epoch_time_s": 1.5, "images_per_s": 1000.0 + epoch}


def level_row(level):
    return {"level": level, "target_density": 0.8 ** level, "density": 0.8 ** level,
            "final_test_acc": 62.0 + 10 * level, "best_test_acc": 63.0 + 10 * level, "train_time_s": 4.5}


def play(tracker, root, epochs_of_level, levels, *, start=None, end=True):
    """Drive the tracker the way the harness does: epochs of each level, then the level's row."""
    tracker.on_run_start(LevelInfo(level=levels[0], density=1.0, model=MODEL, root=root))
    for level in levels:
        for epoch in epochs_of_level(level):
            if start is not None and (level, epoch) < start:
                continue
            info = LevelInfo(level=level, density=0.8 ** level, model=MODEL, root=root, epoch=epoch,
                             row=epoch_row(level, epoch))
            tracker.on_epoch_logged(info)
        tracker.on_level_logged(LevelInfo(level=level, density=0.8 ** level, model=MODEL, root=root,
                                          row=level_row(level)))
    if end:
        tracker.on_run_end(LevelInfo(level=levels[-1], density=0.8 ** levels[-1], model=MODEL, root=root))


def next_second() -> None:
    """Wait for the next wall-clock second.  TensorBoard names an event file by its creation second,
    then host, process and a per-process counter, and reads a directory's files in name order;
    a resumed run is a later process, so its file sorts after the earlier one's.  Two writers made
    by this one process in the same second would sort by the counter as text ("10" < "9")."""
    time.sleep(1.02 - time.time() % 1)


def read_scalars(root: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(root), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_off_by_default_and_rank_zero_only(tmp_path):
    assert make_trackers(TrackerSettings.from_config(config()), tmp_path, True) == []
    assert make_trackers(TrackerSettings.from_config(config(**{"logging.tensorboard": True})), tmp_path, False) == []
    trackers = make_trackers(TrackerSettings.from_config(config(**{"logging.tensorboard": True})), tmp_path, True)
    assert [type(t) for t in trackers] == [TensorBoardTracker]
    # nested configs work too
    nested = {"training": {"epochs": 2}, "logging": {"tensorboard": True, "wandb_project": None}}
    assert [type(t) for t in make_trackers(TrackerSettings.from_config(nested), tmp_path, True)] == [TensorBoardTracker]
    assert list(tmp_path.iterdir()) == []  # nothing written before the run starts


def test_tensorboard_event_files_hold_every_epoch_and_level(tmp_path):
    tracker = make_trackers(TrackerSettings.from_config(config(**{"logging.tensorboard": True})), tmp_path, True)[0]
    play(tracker, tmp_path, lambda level: range(EPOCHS), [0, 1])
    assert list(tmp_path.glob("events.out.tfevents.*")), "event file next to the CSVs"
    scalars = read_scalars(tmp_path)
    steps = [step for step, _ in scalars["epoch/test_acc"]]
    assert steps == [global_step(l, e, EPOCHS) for l in (0, 1) for e in range(EPOCHS)] == list(range(6))
    assert [v for _, v in scalars["epoch/test_acc"]] == pytest.approx([epoch_row(l, e)["test_acc"]
                                                                       for l in (0, 1) for e in range(EPOCHS)])
    assert [v for _, v in scalars["epoch/lr"]] == pytest.approx([epoch_row(l, e)["lr"] for l in (0, 1) for e in range(3)])
    assert [v for _, v in scalars["epoch/images_per_s"]][-1] == pytest.approx(1002.0)
    assert scalars["epoch/target_density"][-1][1] == pytest.approx(0.8)
    # a level's summary sits at the step of its last epoch
    assert scalars["level/density"] == [(2, pytest.approx(1.0)), (5, pytest.approx(0.8))]
    assert [v for _, v in scalars["level/final_test_acc"]] == pytest.approx([62.0, 72.0])


def test_wr_levels_restart_at_the_rewind_epoch_without_reusing_steps(tmp_path):
    tracker = make_trackers(TrackerSettings.from_config(config(**{"logging.tensorboard": True})), tmp_path, True)[0]
    play(tracker, tmp_path, lambda level: range(EPOCHS) if level == 0 else range(1, EPOCHS), [0, 1, 2])
    steps = [step for step, _ in read_scalars(tmp_path)["epoch/test_acc"]]
    assert steps == sorted(set(steps)) == [0, 1, 2, 4, 5, 7, 8]


@pytest.mark.parametrize("state_from", ["checkpoint_state", "epochs_csv"])
def test_resume_after_a_crash_between_log_and_checkpoint_leaves_no_duplicates(tmp_path, state_from):
    """Level 0 done (steps 0-2), level 1 epoch 0 checkpointed (step 3); epoch 1 (step 4) was logged
    and the process died before its checkpoint.  The resumed run trains epoch 1 again with
    other numbers: the series must hold each step once, with the resumed values."""
    first = TensorBoardTracker(tmp_path, EPOCHS)
    first.on_run_start(LevelInfo(level=0, density=1.0, model=MODEL, root=tmp_path))
    for level, epoch in [(0, 0), (0, 1), (0, 2)]:
        first.on_epoch_logged(LevelInfo(level=level, density=1.0, model=MODEL, epoch=epoch, row=epoch_row(level, epoch)))
    first.on_level_logged(LevelInfo(level=0, density=1.0, model=MODEL, row=level_row(0)))
    first.on_epoch_logged(LevelInfo(level=1, density=0.8, model=MODEL, epoch=0, row=epoch_row(1, 0)))
    checkpointed = first.state_dict()  # what last.pt holds after level 1, epoch 0
    assert checkpointed == {"next_step": 4}
    first.on_epoch_logged(LevelInfo(level=1, density=0.8, model=MODEL, epoch=1, row=epoch_row(1, 1)))
    first.writer.flush()
    del first  # crash: no close

    # what the harness leaves in epochs.csv after truncating it to the checkpoint
    rows = [epoch_row(0, 0), epoch_row(0, 1), epoch_row(0, 2), epoch_row(1, 0)]
    header = list(rows[0])
    (tmp_path / "epochs.csv").write_text("\n".join([",".join(header)] + [",".join(str(r[k]) for k in header)
                                                                          for r in rows]) + "\n")
    next_second()  # the resumed run is a later process
    second = TensorBoardTracker(tmp_path, EPOCHS)
    if state_from == "checkpoint_state":
        second.load_state_dict(checkpointed)
    second.on_run_start(LevelInfo(level=1, density=0.8, model=MODEL, root=tmp_path))
    for epoch in (1, 2):
        row = dict(epoch_row(1, epoch), test_acc=99.0 - epoch)   # different numbers this time
        second.on_epoch_logged(LevelInfo(level=1, density=0.8, model=MODEL, epoch=epoch, row=row))
    second.on_level_logged(LevelInfo(level=1, density=0.8, model=MODEL, row=level_row(1)))
    second.on_run_end(LevelInfo(level=1, density=0.8, model=MODEL))

    series = read_scalars(tmp_path)["epoch/test_acc"]
    assert [step for step, _ in series] == [0, 1, 2, 3, 4, 5]
    assert series[4][1] == pytest.approx(98.0)  # the resumed value, not the orphaned one (71.0)
    assert [step for step, _ in read_scalars(tmp_path)["level/final_test_acc"]] == [2, 5]


def write_rows(path: Path, rows):
    header = list(rows[0])
    path.write_text("\n".join([",".join(header)] + [",".join(str(r[k]) for k in header) for r in rows]) + "\n")


def test_a_control_logs_the_level_0_it_took_from_its_source_once(tmp_path):
    """A shuffle control took level 0 (reused.csv; its CSVs hold the source's rows) and trains
    level 1: its series hold level 0 at steps 0-2 from the copied rows, then level 1; a resume
    inside level 1 logs level 0 again neither from its state nor from the CSV."""
    from utils.runs.rundir import RunFiles
    files = RunFiles(tmp_path)
    write_rows(files.epochs.path, [epoch_row(0, e) for e in range(EPOCHS)])
    write_rows(files.levels.path, [level_row(0)])
    files.reused.create()
    files.reused.append({"level": 0, "source": "runs/source", "reason": "identical"})
    assert next_step_from_csv(tmp_path, EPOCHS) == 0      # nothing trained here yet

    first = TensorBoardTracker(tmp_path, EPOCHS)
    play(first, tmp_path, lambda level: range(EPOCHS), [1], end=False)
    first.writer.flush()
    scalars = read_scalars(tmp_path)
    assert [step for step, _ in scalars["epoch/test_acc"]] == list(range(6))
    assert [v for _, v in scalars["epoch/test_acc"]] == pytest.approx(
        [epoch_row(l, e)["test_acc"] for l in (0, 1) for e in range(EPOCHS)])
    assert scalars["epoch/target_density"][0] == (0, pytest.approx(1.0))
    assert scalars["level/final_test_acc"] == [(2, pytest.approx(62.0)), (5, pytest.approx(72.0))]
    state = first.state_dict()
    first.close()

    with_rows = [epoch_row(0, e) for e in range(EPOCHS)] + [epoch_row(1, 0)]
    write_rows(files.epochs.path, with_rows)  # resumed after level 1, epoch 0
    assert next_step_from_csv(tmp_path, EPOCHS) == 4
    for state_from in ("checkpoint_state", "epochs_csv"):
        next_second()  # a resumed run is a later process
        again = TensorBoardTracker(tmp_path, EPOCHS)
        if state_from == "checkpoint_state":
            again.load_state_dict(dict(state, next_step=4))
        play(again, tmp_path, lambda level: range(1, EPOCHS), [1])
        series = read_scalars(tmp_path)["epoch/test_acc"]
        assert [step for step, _ in series] == list(range(6)), state_from
        assert read_scalars(tmp_path)["level/final_test_acc"] == [(2, pytest.approx(62.0)), (5, pytest.approx(72.0))]


def test_next_step_from_csv(tmp_path):
    assert next_step_from_csv(tmp_path, 5) == 0
    (tmp_path / "epochs.csv").write_text("level,epoch,lr\n")
    assert next_step_from_csv(tmp_path, 5) == 0
    (tmp_path / "epochs.csv").write_text("level,epoch,lr\n0,0,0.1\n0,1,0.1\n2,3,0.1\n")
    assert next_step_from_csv(tmp_path, 5) == 2 * 5 + 3 + 1


def test_wandb_refused_in_one_line_when_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError, as when not installed
    with pytest.raises(TrackerError) as error:
        make_trackers(TrackerSettings.from_config(config(**{"logging.wandb_project": "lottery"})), tmp_path, True)
    message = str(error.value)
    assert "logging.wandb_project" in message and "wandb" in message and "\n" not in message
    with pytest.raises(TrackerError):  # every rank refuses, not only the one that would log
        make_trackers(TrackerSettings.from_config(config(**{"logging.wandb_project": "lottery"})), tmp_path, False)
    check_trackers(TrackerSettings.from_config(config()))  # off: nothing to check
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_refused_when_its_package_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(TrackerError, match="logging.tensorboard"):
        check_trackers(TrackerSettings.from_config(config(**{"logging.tensorboard": True})))


class FakeRun:
    def __init__(self, log, step=0):
        self.log_calls, self.step, self.finished = log, step, False

    def log(self, data, step=None):
        self.log_calls.append((step, dict(data)))
        self.step = max(self.step, step)

    def finish(self):
        self.finished = True


def fake_wandb(calls, resumed_step=0):
    module = types.ModuleType("wandb")
    module.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    module.runs = []

    def init(**kwargs):
        calls.append(("init", kwargs))
        run = FakeRun([], step=resumed_step)
        module.runs.append(run)
        return run
    module.init = init
    return module


def test_wandb_logging_calls_with_a_fake_module(tmp_path, monkeypatch):
    calls = []
    module = fake_wandb(calls)
    monkeypatch.setitem(sys.modules, "wandb", module)
    trackers = make_trackers(TrackerSettings.from_config(config(**{"logging.wandb_project": "lottery"})), tmp_path, True)
    assert [type(t) for t in trackers] == [WandbTracker]
    play(trackers[0], tmp_path, lambda level: range(EPOCHS), [0, 1])
    (_, init), = calls
    assert init["project"] == "lottery" and init["id"] == "abc123" and init["resume"] == "allow"
    assert init["config"]["training"]["epochs"] == EPOCHS
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() == "abc123"
    run = module.runs[0]
    epoch_steps = [step for step, data in run.log_calls if "epoch/test_acc" in data]
    assert epoch_steps == list(range(6))
    level_logs = [(step, data["level/final_test_acc"]) for step, data in run.log_calls if "level/final_test_acc" in data]
    assert level_logs == [(2, 62.0), (5, 72.0)]
    assert run.finished

    # resume: same W&B run id, steps the W&B run already holds are not sent again
    calls.clear()
    module2 = fake_wandb(calls, resumed_step=4)
    monkeypatch.setitem(sys.modules, "wandb", module2)
    resumed = WandbTracker(tmp_path, EPOCHS, "lottery", config())
    resumed.load_state_dict({"next_step": 3})
    play(resumed, tmp_path, lambda level: range(EPOCHS), [1], start=(1, 0))
    assert calls[0][1]["id"] == "abc123"
    sent = [step for step, data in module2.runs[0].log_calls if "epoch/test_acc" in data]
    assert sent == [4, 5]


def test_logging_keys_are_declared_with_defaults(tmp_path):
    import harness_params as hp
    data = tmp_path / "data"
    path = write_config(tmp_path / "c.yaml", digits_config(data, tmp_path / "runs"))
    resolved = hp.resolve(str(path), {})
    assert resolved["logging.tensorboard"] is False and resolved["logging.wandb_project"] is None
    resolved = hp.resolve(str(path), {"logging.tensorboard": "true", "logging.wandb_project": "proj"})
    assert resolved["logging.tensorboard"] is True and resolved["logging.wandb_project"] == "proj"
    result = subprocess.run([sys.executable, "-c", "import harness_params as hp; hp.load_config()",
                             "--config", str(path), "--logging.tensorboard=maybe"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "logging.tensorboard" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
