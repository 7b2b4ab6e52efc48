"""Optional experiment trackers (TensorBoard, Weights & Biases) as level-loop callbacks.

    trackers = make_trackers(TrackerSettings.from_config(config), root, is_primary)   # [] unless logging.* asks

Both are off by default (``logging.tensorboard``, ``logging.wandb_project``), write on rank 0
only, and log once per epoch and once per level from ``on_epoch_logged`` / ``on_level_logged``
(the CSV row just written), never from the training step.

One step axis for everything: ``global_step = level * training.epochs + epoch``.  It only
grows through a run (a WR level starts at ``rewind_epoch``, an Early-Bird level may end early:
steps are skipped, never repeated).  A level's summary is logged at the step of the level's
last epoch.

No duplicates on resume.  A resumed run replays no CSV rows, but a tracker can have logged an
epoch (or a level) that the last checkpoint does not cover: the process died between the row
and the checkpoint.  That epoch is trained and logged again after the resume.  So each tracker
knows ``next_step``, the first step the last checkpoint does not cover:

* from its own state, which the harness stores in every ``last.pt`` (``name`` +
  ``state_dict()`` / ``load_state_dict()``, utils/core/callbacks.py), or, when no state came back,
* from ``epochs.csv`` as the harness left it at ``on_run_start`` (truncated to the checkpoint):
  the step after its last row.

TensorBoard then reopens its series with ``purge_step=next_step``: readers drop every event
at or after that step written before the restart.  W&B resumes the same run id (kept in
``wandb_run_id.txt``); a step it already holds is not sent again (W&B drops steps below its own).

A control that took its source's level 0 instead of training it (``reused.csv``,
utils/lottery/controls.py) logs that level's copied rows at ``on_run_start``, at their usual steps, so
its series start at step 0 like any run's (once: a resumed control's ``next_step`` is past them).
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from utils.core.atomic_io import atomic_write_text
from utils.core.callbacks import Callback, LevelInfo
from utils.runs.rundir import RunFiles

EPOCH_METRICS = ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "images_per_s")
LEVEL_METRICS = ("target_density", "density", "final_test_acc", "best_test_acc", "train_time_s")
WANDB_ID_FILE = "wandb_run_id.txt"


class TrackerError(ValueError):
    """A tracker that was asked for cannot run; the message is one line naming the key."""


@dataclass(frozen=True)
class TrackerSettings:
    """What the trackers read of a config (the logging section and the epochs per level), and the
    resolved config itself as the record W&B keeps with its run (stored, not read)."""

    tensorboard: bool = False
    wandb_project: Any = None
    epochs_per_level: int = 1
    record: Dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "TrackerSettings":
        """From the harness's flat {"section.key": value} or a nested {section: {key: value}}."""
        flat = _flat(config)
        return cls(tensorboard=bool(flat.get("logging.tensorboard")), wandb_project=flat.get("logging.wandb_project"),
                   epochs_per_level=int(flat.get("training.epochs", 1)), record=flat)


def _flat(tree: Mapping[str, Any]) -> Dict[str, Any]:
    """Accept the harness's flat {"section.key": value} or a nested {section: {key: value}}."""
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and "." not in key:
            for inner, inner_value in value.items():
                flat[f"{key}.{inner}"] = inner_value
        else:
            flat[key] = value
    return flat


def global_step(level: int, epoch: int, epochs_per_level: int) -> int:
    return int(level) * int(epochs_per_level) + int(epoch)


def next_step_from_csv(root: Path, epochs_per_level: int) -> int:
    """The step after the last row of ``root/epochs.csv`` trained in this directory (0 when there
    is none): the rows of levels a control took from its source (``reused.csv``) do not count."""
    files = RunFiles(root)
    taken = files.taken_levels()
    trained = [row for row in files.epochs.records() if int(row["level"]) not in taken]
    if not trained:
        return 0
    return global_step(int(trained[-1]["level"]), int(trained[-1]["epoch"]), epochs_per_level) + 1


def _number(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


class Tracker(Callback):
    """Common bookkeeping: the step axis and ``next_step`` across resumes."""

    name = "tracker"

    def __init__(self, root: Path, epochs_per_level: int):
        self.root = Path(root)
        self.epochs_per_level = int(epochs_per_level)
        self.next_step = 0            # first step not covered by the last checkpoint (see module doc)
        self._state_loaded = False

    # callback state, stored by the harness in every last.pt under callbacks[name]
    def state_dict(self) -> Dict[str, Any]:
        return {"next_step": int(self.next_step)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.next_step = int(state["next_step"])
        self._state_loaded = True

    def _resume_step(self) -> int:
        if not self._state_loaded:
            self.next_step = next_step_from_csv(self.root, self.epochs_per_level)
        return self.next_step

    def step_of(self, info: LevelInfo) -> int:
        epoch = info.epoch
        if epoch is None and info.row is not None and "epoch" in info.row:
            epoch = info.row["epoch"]
        if epoch is None:  # a level summary: the level's last epoch
            epoch = self.epochs_per_level - 1
        return global_step(info.level, epoch, self.epochs_per_level)

    @staticmethod
    def epoch_scalars(info: LevelInfo) -> Dict[str, float]:
        row = info.row or {}
        scalars = {f"epoch/{key}": _number(row.get(key)) for key in EPOCH_METRICS}
        scalars["epoch/target_density"] = _number(info.density)
        scalars["epoch/level"] = float(info.level)
        return {k: v for k, v in scalars.items() if v is not None}

    @staticmethod
    def level_scalars(info: LevelInfo) -> Dict[str, float]:
        row = info.row or {}
        scalars = {f"level/{key}": _number(row.get(key)) for key in LEVEL_METRICS}
        scalars["level/level"] = float(info.level)
        return {k: v for k, v in scalars.items() if v is not None}

    def log_taken_levels(self) -> None:
        """A control that took its source's level 0 (``reused.csv``) holds that level's rows in its
        CSVs without having trained it, so no hook logged them: log them here, at their own steps,
        unless this tracker is already past them (a resumed run)."""
        files = RunFiles(self.root)
        taken = files.taken_levels()
        if not taken:
            return
        start = self._resume_step()
        levels = [row for row in files.levels.records() if int(row["level"]) in taken]
        density = {int(row["level"]): _number(row["target_density"]) for row in levels}
        epochs = [LevelInfo(level=int(row["level"]), density=density.get(int(row["level"])), model=None,
                            epoch=int(row["epoch"]), row=row)
                  for row in files.epochs.records() if int(row["level"]) in taken]
        summaries = [LevelInfo(level=int(row["level"]), density=density[int(row["level"])], model=None, row=row)
                     for row in levels]  # a summary's step: its level's last epoch
        for info, scalars in [*((i, self.epoch_scalars(i)) for i in epochs),
                              *((i, self.level_scalars(i)) for i in summaries)]:
            if self.step_of(info) >= start:
                self._log(scalars, self.step_of(info))

    # The hooks, the same for every tracker: ``_log(scalars, step)`` and ``close()`` are each one's own.
    def on_run_start(self, info: LevelInfo) -> None:
        self.log_taken_levels()

    def on_epoch_logged(self, info: LevelInfo) -> None:
        self._log(self.epoch_scalars(info), self.step_of(info))

    def on_level_logged(self, info: LevelInfo) -> None:
        step = self.step_of(LevelInfo(level=info.level, density=info.density, model=info.model, row=None))
        self._log(self.level_scalars(info), step)

    def on_run_end(self, info: LevelInfo) -> None:
        self.close()


class TensorBoardTracker(Tracker):
    """Event files in the experiment directory (``tensorboard --logdir runs/`` shows one run per
    experiment).  ``SummaryWriter`` queues events for a background thread; the one flush per
    epoch happens in ``on_epoch_logged``, between epochs."""

    name = "tensorboard"

    def __init__(self, root: Path, epochs_per_level: int):
        super().__init__(root, epochs_per_level)
        self.writer = None

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter
        purge = self._resume_step()
        earlier = any(self.root.glob("events.out.tfevents.*"))
        # purge_step: events at or after it from an earlier process are dropped by readers
        self.writer = SummaryWriter(log_dir=str(self.root), purge_step=purge if purge > 0 or earlier else None)

    def on_run_start(self, info: LevelInfo) -> None:
        if self.writer is None:
            self._open()
        super().on_run_start(info)

    def _log(self, scalars: Dict[str, float], step: int) -> None:
        if self.writer is None:
            self._open()
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # once per epoch: what a checkpoint covers is on disk before it
        self.next_step = max(self.next_step, step + 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker(Tracker):
    """Weights & Biases: one W&B run per experiment directory, resumed by the id kept in
    ``wandb_run_id.txt``; files under ``root/wandb``."""

    name = "wandb"

    def __init__(self, root: Path, epochs_per_level: int, project: str, record: Dict[str, Any]):
        super().__init__(root, epochs_per_level)
        self.project = project
        self.record = record  # the resolved config, stored with the W&B run
        self.run = None

    def _run_id(self, wandb) -> str:
        path = self.root / WANDB_ID_FILE
        if path.exists():
            return path.read_text().strip()
        run_id = wandb.util.generate_id()
        atomic_write_text(path, run_id + "\n")
        return run_id

    def _open(self) -> None:
        wandb = importlib.import_module("wandb")
        self._resume_step()
        tree: Dict[str, Dict[str, Any]] = {}
        for key, value in _flat(self.record).items():
            section, _, name = key.partition(".")
            tree.setdefault(section, {})[name] = value
        (self.root / "wandb").mkdir(exist_ok=True)
        self.run = wandb.init(project=self.project, id=self._run_id(wandb), resume="allow",
                              name=self.root.name, dir=str(self.root), config=tree)

    def on_run_start(self, info: LevelInfo) -> None:
        if self.run is None:
            self._open()
        super().on_run_start(info)

    def _log(self, scalars: Dict[str, float], step: int) -> None:
        if self.run is None:
            self._open()
        if step < int(getattr(self.run, "step", 0) or 0):
            return  # the resumed W&B run is past this step (W&B would drop it with a warning)
        self.run.log(scalars, step=step)
        self.next_step = max(self.next_step, step + 1)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _importable(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def check_trackers(settings: TrackerSettings) -> None:
    """Refuse (TrackerError, one line naming the key) a tracker whose package is missing.
    Cheap (no import): call it with the other input checks, on every rank, before writing."""
    if settings.tensorboard and not _importable("tensorboard"):
        raise TrackerError("logging.tensorboard=true needs the tensorboard package, which is not installed "
                           "(pip install tensorboard), or set logging.tensorboard=false")
    project = settings.wandb_project
    if project is not None and not isinstance(project, str):
        raise TrackerError(f"logging.wandb_project={project!r} must be a project name (a string) or null")
    if project == "":
        raise TrackerError("logging.wandb_project='' is empty: give a project name, or null for no W&B logging")
    if project and not _importable("wandb"):
        raise TrackerError(f"logging.wandb_project={project} needs the wandb package, which is not installed "
                           f"(pip install wandb), or leave logging.wandb_project unset")


def make_trackers(settings: TrackerSettings, root: Path, is_primary: bool) -> List[Callback]:
    """The trackers the settings ask for (``logging.tensorboard``, ``logging.wandb_project``);
    [] on every rank but the primary one.  Raises TrackerError when one cannot run."""
    check_trackers(settings)
    if not is_primary:
        return []
    trackers: List[Callback] = []
    if settings.tensorboard:
        trackers.append(TensorBoardTracker(Path(root), settings.epochs_per_level))
    if settings.wandb_project:
        trackers.append(WandbTracker(Path(root), settings.epochs_per_level, settings.wandb_project, settings.record))
    return trackers
