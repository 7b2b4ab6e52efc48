"""The run directory, in one place: its layout, its CSV logs and their columns, the one reader
and writer of ``config.yaml``, which keys do not make another run, and what a directory holds
(nothing yet, a run to resume, a finished run, another config's run).

Used by the harness, the sweep, the report, controls, compaction and Early-Bird; nothing else
builds a path inside a run directory or reads its ``config.yaml``.

    {base_dir}/{name}/
      config.yaml              the resolved config (every key, nested by section)
      data.json                the identity of the data it trains and tests on (utils/runs/data_identity.py)
      epochs.csv levels.csv layers.csv [stability.csv] [early_bird.csv] [mask_updates.csv]
      masks/level_L.pt         the masks level L trained with
      checkpoints/             init.pt, rewind.pt, last.pt (+ previous.pt), level_start.pt,
                               level_L.pt (channel structure), launch_id.txt
      logs/                    launcher logs (Slurm)
      tickets/level_L.safetensors   python -m utils.ticket export's default output

Missing keys: a ``config.yaml`` written before a key existed lacks it; it counts as that key's
default (``defaults``, given by the caller that knows the declared keys), everywhere.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set

import yaml

from utils.core.atomic_io import atomic_write_bytes, make_dirs, writing
from utils.runs.run_lock import LOCK_NAME

CONFIG_NAME = "config.yaml"
EPOCH_COLUMNS = ["level", "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                 "epoch_time_s", "images_per_s"]
# best_test_acc is the test accuracy of the epoch best_epoch, chosen on best_selected_on: "val" (validation
# data) or "test" (no validation data: the maximum test accuracy; utils/training/selection.py)
LEVEL_COLUMNS = ["level", "target_density", "density", "final_test_acc", "best_test_acc", "best_epoch",
                 "best_selected_on", "train_time_s"]
LAYER_COLUMNS = ["level", "layer", "numel", "alive", "density"]
STABILITY_COLUMNS = ["level", "alpha", "test_loss", "test_acc"]
EARLY_BIRD_COLUMNS = ["epoch", "distance"]
REUSED_COLUMNS = ["level", "source", "reason"]  # the levels a control took from its source
MASK_UPDATE_COLUMNS = ["step", "epoch", "layer", "density", "dropped", "grown"]  # gmp, rigl, set: per update and layer
TIMING_COLUMNS = ("epoch_time_s", "images_per_s", "train_time_s")  # differ between identical runs

# Keys that change how a run is watched or where it lives, not what it computes: a resumed
# run may differ in them (e.g. --experiment.name=NAME_1 resumes the run that
# --experiment.resume=false started in NAME_1; a moved base_dir still resumes).
NON_SEMANTIC_KEYS = frozenset({"experiment.resume", "training.progress", "dataset.num_workers", "logging.tensorboard",
                               "logging.wandb_project", "experiment.name", "experiment.base_dir"})


# Keys renamed since runs were made: old name -> new name.  Every config read here (a config.yaml,
# a checkpoint's config) has its old names read as the new ones, so an older run still resumes;
# harness_params reads the old names from YAML and the command line with the same table.
RENAMED_KEYS = {"prune.snip_batches": "prune.score_batches"}


def current_key_names(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """``flat`` with every old key name (``RENAMED_KEYS``) under its new one (the new one wins)."""
    renamed = dict(flat)
    for old, new in RENAMED_KEYS.items():
        if old in renamed:
            renamed.setdefault(new, renamed.pop(old))
    return renamed


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message is one line naming it."""


# ---------------------------------------------------------------------------- CSV logs
class CsvLog:
    """An append-only CSV file with a fixed header.

    A row is written with one ``write`` of the whole line followed by fsync, so a reader
    never sees half a row.  ``truncate(n)`` keeps the first n rows (used on resume to drop
    rows written after the checkpoint being resumed, so no row is ever written twice).
    """

    def __init__(self, path, columns: Sequence[str]):
        self.path = Path(path)
        self.columns = list(columns)

    def create(self) -> None:
        atomic_write_bytes(self.path, (",".join(self.columns) + "\n").encode())

    def append(self, row: Mapping[str, Any]) -> None:
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise KeyError(f"{self.path.name}: row lacks columns {missing}")
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow([_format(row[c]) for c in self.columns])
        data = buffer.getvalue().encode()
        with writing(self.path):  # a failure: one line (resume truncates a partial row)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                while data:  # a regular file takes it in one write; loop in case it does not
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)

    def rows(self) -> List[List[str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as handle:
            return list(csv.reader(handle))[1:]

    def records(self) -> List[Dict[str, str]]:
        """The rows as {column: text} (the file's own header)."""
        if not self.path.exists():
            return []
        with open(self.path, newline="") as handle:
            return list(csv.DictReader(handle))

    def count(self) -> int:
        return len(self.rows())

    def truncate(self, keep: int) -> None:
        """Keep the header and the first ``keep`` rows (creates the file when missing)."""
        rows = self.rows()
        if len(rows) == keep and self.path.exists():
            return
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(rows[:keep])
        atomic_write_bytes(self.path, buffer.getvalue().encode())


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(round(value, 6)) if abs(value) >= 1e-4 or value == 0 else f"{value:.6g}"
    return str(value)


# ---------------------------------------------------------------------------- layout
@dataclass
class RunFiles:
    """Every path inside one run directory, and its CSV logs."""
    root: Path
    level_extra: Sequence[str] = ()   # columns features add to levels.csv / layers.csv (the harness says which)
    layer_extra: Sequence[str] = ()
    extra_logs: Sequence[str] = ()    # logs features add (the harness says which): "mask_updates"
    epoch_extra: Sequence[str] = ()   # columns features add to epochs.csv (validation data: val_loss, val_acc)

    def __post_init__(self):
        self.root = Path(self.root)

    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def data(self) -> Path:
        """The identity of the run's data files (utils/runs/data_identity.py writes and checks it)."""
        return self.root / "data.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def init_checkpoint(self) -> Path:
        return self.checkpoints / "init.pt"

    @property
    def rewind_checkpoint(self) -> Path:
        return self.checkpoints / "rewind.pt"

    @property
    def level_start_checkpoint(self) -> Path:
        """The state a level started from (stability analysis: the second copy starts there)."""
        return self.checkpoints / "level_start.pt"

    @property
    def launch_id(self) -> Path:
        """The torchrun launch (TORCHELASTIC_RUN_ID) that created the directory: an elastic
        restart of that launch finds its directory again by it."""
        return self.checkpoints / "launch_id.txt"

    def masks(self, level: int) -> Path:
        return self.root / "masks" / f"level_{level}.pt"

    def level_weights(self, level: int) -> Path:
        """A finished level's weights (channel structure: what utils.compact makes smaller)."""
        return self.checkpoints / f"level_{level}.pt"

    def ticket(self, level: int) -> Path:
        """Where ``python -m utils.ticket export`` writes level L's ticket file by default."""
        return self.root / "tickets" / f"level_{level}.safetensors"

    @property
    def epochs(self) -> CsvLog:
        return CsvLog(self.root / "epochs.csv", EPOCH_COLUMNS + list(self.epoch_extra))

    @property
    def levels(self) -> CsvLog:
        return CsvLog(self.root / "levels.csv", LEVEL_COLUMNS + list(self.level_extra))

    @property
    def layers(self) -> CsvLog:
        return CsvLog(self.root / "layers.csv", LAYER_COLUMNS + list(self.layer_extra))

    @property
    def stability(self) -> CsvLog:
        return CsvLog(self.root / "stability.csv", STABILITY_COLUMNS)

    @property
    def early_bird(self) -> CsvLog:
        return CsvLog(self.root / "early_bird.csv", EARLY_BIRD_COLUMNS)

    @property
    def reused(self) -> CsvLog:
        """A control's levels taken from its source instead of retrained (utils.lottery.controls)."""
        return CsvLog(self.root / "reused.csv", REUSED_COLUMNS)

    @property
    def mask_updates(self) -> CsvLog:
        """Sparse training's mask updates, one row per update and layer (utils.training.sparse_training)."""
        return CsvLog(self.root / "mask_updates.csv", MASK_UPDATE_COLUMNS)

    def taken_levels(self) -> Set[int]:
        """The levels this control took from its source (``reused.csv``): in its CSVs, never trained here."""
        return {int(row["level"]) for row in self.reused.records()}

    def logs(self) -> Dict[str, CsvLog]:
        """The logs the harness creates and truncates on resume (Early-Bird keeps its own)."""
        logs = {"epochs": self.epochs, "levels": self.levels, "layers": self.layers}
        if "instability" in self.level_extra:
            logs["stability"] = self.stability
        if "mask_updates" in self.extra_logs:
            logs["mask_updates"] = self.mask_updates
        return logs

    def create(self, config_bytes: bytes, launch_id: Optional[str] = None) -> None:
        """A new run directory: its folders, the launch id (first: an elastic restart finds
        this directory by it), the config and the CSV headers."""
        make_dirs(self.root / "masks")
        make_dirs(self.checkpoints)
        if launch_id is not None:
            atomic_write_bytes(self.launch_id, (launch_id + "\n").encode())
        atomic_write_bytes(self.config, config_bytes)
        for log in self.logs().values():
            log.create()


def as_tree(resolved: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """{"section.key": value} -> {section: {key: value}}."""
    tree: Dict[str, Dict[str, Any]] = {}
    for key, value in resolved.items():
        section, name = key.split(".", 1)
        tree.setdefault(section, {})[name] = value
    return tree


def config_bytes(resolved: Mapping[str, Any]) -> bytes:
    return yaml.safe_dump(as_tree(resolved), sort_keys=True).encode()


def read_config(root) -> Dict[str, Any]:
    """``root/config.yaml`` (``root`` may also be the file itself) -> {"section.key": value}.
    Raises RunDirError (one line) when it is missing, unreadable or not a config of this harness."""
    path = Path(root)
    if path.name != CONFIG_NAME:
        path = path / CONFIG_NAME
    try:
        with open(path) as handle:
            tree = yaml.safe_load(handle)
    except FileNotFoundError:
        raise RunDirError(f"{path.parent}: no {CONFIG_NAME} there; it is not an experiment directory") from None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise RunDirError(f"{path.parent}: {CONFIG_NAME} cannot be read ({_one_line(error)})") from None
    if not isinstance(tree, dict) or not all(isinstance(v, dict) for v in tree.values()):
        raise RunDirError(f"{path.parent}: {CONFIG_NAME} is not a config of this harness")
    return current_key_names({f"{section}.{key}": value for section, keys in tree.items() for key, value in keys.items()})


def semantic_difference(a: Mapping[str, Any], b: Mapping[str, Any], defaults: Mapping[str, Any]) -> List[str]:
    """Keys whose values differ in what a run computes.  A key one side lacks (a config written
    before the key existed) counts as its default, so older runs still resume."""
    a, b = {**defaults, **current_key_names(a)}, {**defaults, **current_key_names(b)}
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in NON_SEMANTIC_KEYS)


# ---------------------------------------------------------------------------- state of a directory
def is_finished(root, levels: Optional[int] = None) -> bool:
    """Whether the run in ``root`` has finished its last level (its last.pt says so); with
    ``levels`` (how many the run has now: it may have been made deeper, or its control's source
    may), only when that last level is level ``levels - 1`` or later."""
    path = RunFiles(Path(root)).last_checkpoint
    if not path.exists():
        return False
    try:
        import torch  # mmap: only the few bytes of the flag are read, not the whole model
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False  # a corrupt checkpoint is refused, with a message, when resume loads it
    if not isinstance(state, dict) or not state.get("finished", False):
        return False
    return levels is None or int(state.get("level", -1)) + 1 >= levels


# What the level plan says of a directory's run and a new config (the harness and the sweep pass
# it; the rule is utils/training/level_plan.deepening): (stored config, new config, keys that
# differ) -> how many levels the new config's run has when it is the stored run or goes deeper,
# else None (with no key differing: its plan cannot be built here; the run's own flag decides).
PlannedLevels = Callable[[Mapping[str, Any], Mapping[str, Any], List[str]], Optional[int]]


def run_state(root, resolved: Mapping[str, Any], defaults: Mapping[str, Any],
              planned_levels: Optional[PlannedLevels] = None) -> str:
    """What ``root`` holds for a run of config ``resolved``: 'new' (nothing yet), 'finished',
    'resume' (the harness goes on from its checkpoint; a run made deeper goes on too) or
    'other' (another config's run, or not a run directory: the harness refuses it, naming the
    keys)."""
    root = Path(root)
    if not root.exists() or (root.is_dir() and not any(p.name != LOCK_NAME for p in root.iterdir())):
        return "new"
    try:
        existing = read_config(root)
    except RunDirError:
        return "other"
    differing = semantic_difference(existing, resolved, defaults)
    levels = planned_levels(existing, resolved, differing) if planned_levels is not None else None
    if differing and levels is None:
        return "other"
    return "finished" if is_finished(root, levels) else "resume"


@dataclass
class DirDecision:
    action: str          # "fresh", "resume" or "finished"
    root: Path
    note: str = ""


def usable_launch_id(launch_id: Optional[str]) -> Optional[str]:
    """torchrun's run id names one launch only when it is set and not the default 'none'
    (--standalone draws a fresh uuid; a multi-node job passes its own --rdzv-id)."""
    return launch_id if launch_id and launch_id != "none" else None


def _launch_id_of(path: Path) -> Optional[str]:
    try:
        return RunFiles(path).launch_id.read_text().strip()
    except OSError:
        return None


def decide(resolved: Mapping[str, Any], defaults: Mapping[str, Any], *, restarted: bool,
           launch_id: Optional[str] = None, planned_levels: Optional[PlannedLevels] = None) -> DirDecision:
    """Where this run goes and whether it resumes.  Creates nothing.

    * a new name -> fresh;
    * same config there -> resume (or 'finished' when the run is done);
    * another config there -> refuse, naming the keys that differ, unless
      experiment.resume=false, which starts fresh in NAME_1, NAME_2, ... (never overwriting);
    * an elastic restart (torchrun restarted the workers: ``restarted``) resumes the
      directory its own launch created (found by ``launch_id``, torchrun's run id, which
      ``RunFiles.create`` records); when that launch created none, it decides as the first
      attempt did.  Without a usable launch id, a restart of a resume=false run resumes
      the newest directory with the same config.
    ``planned_levels``: the level plan's word on a run made deeper (``run_state``).
    """
    base = Path(resolved["experiment.base_dir"])
    name = resolved["experiment.name"]
    if "/" in name or name in ("", ".", ".."):
        raise RunDirError(f"experiment.name={name!r} must be a plain directory name (no '/')")
    candidates = [base / name] + [base / f"{name}_{k}" for k in range(1, 10_000)]
    existing = []
    for path in candidates:
        if not path.exists():
            break
        existing.append(path)
    first_free = candidates[len(existing)]

    def state_of(path: Path) -> str:
        return run_state(path, resolved, defaults, planned_levels)

    if restarted:
        launch_id = usable_launch_id(launch_id)
        if launch_id is not None:
            for path in existing:
                if _launch_id_of(path) == launch_id:
                    state = state_of(path)
                    if state in ("resume", "finished"):
                        return DirDecision(state, path)
        elif not resolved["experiment.resume"]:
            for path in reversed(existing):
                state = state_of(path)
                if state in ("resume", "finished"):
                    return DirDecision(state, path)
    if not resolved["experiment.resume"]:
        return DirDecision("fresh", first_free)
    root = base / name
    state = state_of(root)
    if state == "new":
        return DirDecision("fresh", root)
    if state != "other":
        return DirDecision(state, root)
    if not RunFiles(root).config.exists():
        raise RunDirError(f"{root} exists but is not an experiment directory (no config.yaml); "
                          f"choose another experiment.name or experiment.base_dir")
    try:
        previous = read_config(root)
    except RunDirError as error:
        raise RunDirError(f"{error}; move the directory away or choose another experiment.name") from None
    differing = semantic_difference(previous, resolved, defaults)
    shown = ", ".join(f"{k} ({previous.get(k, defaults.get(k))!r} there, {resolved.get(k)!r} now)" for k in differing[:6])
    more = f" and {len(differing) - 6} more" if len(differing) > 6 else ""
    raise RunDirError(f"{root} holds a run with a different config: {shown}{more}; "
                      f"use another experiment.name, or --experiment.resume=false to start fresh in a new directory")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())[:300]
