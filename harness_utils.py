"""Level-loop helpers: files written atomically, CSV logs, optimizer, checkpoints, RNG
state and the experiment-directory decision (fresh / resume / finished / refuse).

Every function that writes takes plain arguments and is called on rank 0 only (the
harness routes writes through ``primary_only``).
"""
from __future__ import annotations

import copy
import csv
import io
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import yaml

import harness_params

CHECKPOINT_FORMAT = 1
TEMPORARY_SUFFIX = ".tmp"  # the atomic writers' temporary files: .NAME.XXXX.tmp beside NAME

EPOCH_COLUMNS = ["level", "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                 "epoch_time_s", "images_per_s"]
LEVEL_COLUMNS = ["level", "target_density", "density", "final_test_acc", "best_test_acc", "train_time_s"]
LAYER_COLUMNS = ["level", "layer", "numel", "alive", "density"]

# Keys that change how a run is watched or where it lives, not what it computes: a resumed
# run may differ in them (e.g. --experiment.name=NAME_1 resumes the run that
# --experiment.resume=false started in NAME_1; a moved base_dir still resumes).
NON_SEMANTIC_KEYS = {"experiment.resume", "training.progress", "dataset.num_workers",
                     "experiment.name", "experiment.base_dir"}


class UserError(Exception):
    """Bad input found while setting up (data, model/dataset mismatch, experiment dir).
    Printed as one line; exit status 2."""


# ------------------------------------------------------------------------ atomic files
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, rename: readers see old or new, never half."""
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path) -> None:
    """torch.save through a temporary file + fsync + rename (no whole-file copy in memory)."""
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def make_dirs(path) -> None:
    """mkdir -p, then fsync every parent whose entries changed, so a crash right after
    cannot lose the directory that files just written into it are in."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        _fsync_dir(created.parent)


def remove_stale_temporaries(root) -> List[Path]:
    """Delete the temporary files a killed writer left (``.NAME.XXXX.tmp``) under ``root``.

    Only rank 0 writes and only while running, so at (re)start every such file is garbage:
    a checkpoint killed mid-write would otherwise leave up to a checkpoint's size behind.
    """
    removed = []
    for path in Path(root).rglob(f".*{TEMPORARY_SUFFIX}"):
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def detached_copy(obj: Any) -> Any:
    """A deep copy with every tensor cloned to the CPU.

    ``optimizer.state_dict()`` hands out the optimizer's LIVE state tensors (e.g. SGD's
    momentum buffers, updated in place at every step), and ``load_state_dict`` may adopt
    the tensors it is given: a snapshot kept in memory (WR's rewind state) must own its
    tensors or it silently changes as training goes on.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: detached_copy(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [detached_copy(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(detached_copy(value) for value in obj)
    return copy.deepcopy(obj)


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

    def append(self, row: Dict[str, Any]) -> None:
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise KeyError(f"{self.path.name}: row lacks columns {missing}")
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow([_format(row[c]) for c in self.columns])
        data = buffer.getvalue().encode()
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

    def count(self) -> int:
        return len(self.rows())

    def truncate(self, keep: int) -> None:
        rows = self.rows()
        if len(rows) == keep and self.path.exists():
            return
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(rows[:keep])
        atomic_write_bytes(self.path, buffer.getvalue().encode())


def _format(value: Any) -> str:
    if isinstance(value, float):
        return repr(round(value, 6)) if abs(value) >= 1e-4 or value == 0 else f"{value:.6g}"
    return str(value)


@dataclass
class ExperimentFiles:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

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
    def launch_id(self) -> Path:
        """The torchrun launch (TORCHELASTIC_RUN_ID) that created the directory: an elastic
        restart of that launch finds its directory again by it."""
        return self.checkpoints / "launch_id.txt"

    def masks(self, level: int) -> Path:
        return self.root / "masks" / f"level_{level}.pt"

    @property
    def epochs(self) -> CsvLog:
        return CsvLog(self.root / "epochs.csv", EPOCH_COLUMNS)

    @property
    def levels(self) -> CsvLog:
        return CsvLog(self.root / "levels.csv", LEVEL_COLUMNS)

    @property
    def layers(self) -> CsvLog:
        return CsvLog(self.root / "layers.csv", LAYER_COLUMNS)

    def logs(self) -> Dict[str, CsvLog]:
        return {"epochs": self.epochs, "levels": self.levels, "layers": self.layers}


# ---------------------------------------------------------------- experiment directory
@dataclass
class DirDecision:
    action: str          # "fresh", "resume" or "finished"
    root: Path
    note: str = ""


def config_yaml(resolved: Dict[str, Any]) -> bytes:
    return yaml.safe_dump(harness_params.as_tree(resolved), sort_keys=True).encode()


def read_config_yaml(path: Path) -> Dict[str, Any]:
    with open(path) as handle:
        tree = yaml.safe_load(handle) or {}
    return {f"{section}.{key}": value for section, keys in tree.items() for key, value in keys.items()}


def semantic_difference(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    return [k for k in harness_params.differing_keys(a, b) if k not in NON_SEMANTIC_KEYS]


def _checkpoint_finished(files: ExperimentFiles) -> bool:
    if not files.last_checkpoint.exists():
        return False
    try:  # mmap: only the few bytes of the flag are read, not the whole model
        state = torch.load(files.last_checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False  # a corrupt checkpoint is refused, with a message, when resume loads it
    return isinstance(state, dict) and bool(state.get("finished", False))


def _launch_id_of(path: Path) -> Optional[str]:
    try:
        return ExperimentFiles(path).launch_id.read_text().strip()
    except OSError:
        return None


def usable_launch_id(launch_id: Optional[str]) -> Optional[str]:
    """torchrun's run id names one launch only when it is set and not the default 'none'
    (--standalone draws a fresh uuid; a multi-node job passes its own --rdzv-id)."""
    return launch_id if launch_id and launch_id != "none" else None


def decide_experiment_dir(resolved: Dict[str, Any], *, restarted: bool,
                          launch_id: Optional[str] = None) -> DirDecision:
    """Where this run goes and whether it resumes.  Creates nothing.

    * a new name -> fresh;
    * same config there -> resume (or 'finished' when the run is done);
    * another config there -> refuse, naming the keys that differ, unless
      experiment.resume=false, which starts fresh in NAME_1, NAME_2, ... (never overwriting);
    * an elastic restart (torchrun restarted the workers: ``restarted``) resumes the
      directory its own launch created (found by ``launch_id``, torchrun's run id, which
      ``start_fresh`` records); when that launch created none, it decides as the first
      attempt did.  Without a usable launch id, a restart of a resume=false run resumes
      the newest directory with the same config.
    """
    base = Path(resolved["experiment.base_dir"])
    name = resolved["experiment.name"]
    if "/" in name or name in ("", ".", ".."):
        raise UserError(f"experiment.name={name!r} must be a plain directory name (no '/')")
    candidates = [base / name] + [base / f"{name}_{k}" for k in range(1, 10_000)]
    existing = []
    for path in candidates:
        if not path.exists():
            break
        existing.append(path)
    first_free = candidates[len(existing)]

    def matches(path: Path) -> bool:
        files = ExperimentFiles(path)
        try:
            return files.config.exists() and not semantic_difference(read_config_yaml(files.config), resolved)
        except Exception:  # an unreadable config is nobody's match
            return False

    def resume_or_finished(path: Path) -> DirDecision:
        if _checkpoint_finished(ExperimentFiles(path)):
            return DirDecision("finished", path)
        return DirDecision("resume", path)

    if restarted:
        launch_id = usable_launch_id(launch_id)
        if launch_id is not None:
            for path in existing:
                if _launch_id_of(path) == launch_id and matches(path):
                    return resume_or_finished(path)
        elif not resolved["experiment.resume"]:
            for path in reversed(existing):
                if matches(path):
                    return resume_or_finished(path)
    if not resolved["experiment.resume"]:
        return DirDecision("fresh", first_free)
    root = base / name
    if not root.exists():
        return DirDecision("fresh", root)
    files = ExperimentFiles(root)
    if not files.config.exists():
        if root.is_dir() and not any(root.iterdir()):
            return DirDecision("fresh", root)
        raise UserError(f"{root} exists but is not an experiment directory (no config.yaml); "
                        f"choose another experiment.name or experiment.base_dir")
    try:
        previous = read_config_yaml(files.config)
    except Exception as error:
        raise UserError(f"{files.config} cannot be read ({_one_line(error)}); "
                        f"move the directory away or choose another experiment.name") from None
    differing = semantic_difference(previous, resolved)
    if differing:
        shown = ", ".join(f"{k} ({previous.get(k)!r} there, {resolved.get(k)!r} now)" for k in differing[:6])
        more = f" and {len(differing) - 6} more" if len(differing) > 6 else ""
        raise UserError(f"{root} holds a run with a different config: {shown}{more}; "
                        f"use another experiment.name, or --experiment.resume=false to start fresh in a new directory")
    return resume_or_finished(root)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())[:300]


# --------------------------------------------------------------------------- optimizer
OPTIMIZERS = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c["lr"], momentum=c["momentum"],
                                             nesterov=c["nesterov"], weight_decay=c["weight_decay"]),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c["lr"], betas=tuple(c["betas"]),
                                               weight_decay=c["weight_decay"]),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c["lr"], betas=tuple(c["betas"]),
                                                 weight_decay=c["weight_decay"]),
}


def build_optimizer(parameters: Iterable[torch.nn.Parameter], *, name: str, lr: float, momentum: float = 0.9,
                    nesterov: bool = False, weight_decay: float = 0.0, betas=(0.9, 0.999)) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(sorted(OPTIMIZERS))}")
    settings = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, betas=betas)
    return OPTIMIZERS[name](list(parameters), settings)


# ------------------------------------------------------------------------------ RNG state
def rng_state() -> Dict[str, Any]:
    """All RNG states as tensors / plain lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- checkpoints
LAST_CHECKPOINT_KEYS = ("config", "level", "next_epoch", "phase", "finished", "model", "optimizer", "schedule",
                        "scaler", "rng", "level_stats", "csv_rows")


def load_checkpoint(path: Path, resolved: Optional[Dict[str, Any]] = None,
                    required: Sequence[str] = ()) -> Dict[str, Any]:
    """Safe load (weights_only=True: tensors and plain containers only, no code runs).

    Refused with a one-line UserError: a missing, corrupt or truncated file, a file that is
    not a checkpoint of this harness (format, ``required`` keys), and a checkpoint of
    another config (the keys that differ are named).
    """
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} is missing; the experiment directory is incomplete: "
                        f"move it away to start over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise UserError(f"checkpoint {path} cannot be read ({type(error).__name__}: {first_line}); "
                        f"it is corrupt or not a checkpoint of this harness: move it away to start over") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} is not a format-{CHECKPOINT_FORMAT} checkpoint of this harness; "
                        f"move it away to start over")
    missing = [key for key in required if key not in state]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}; it is damaged or from another "
                        f"version of this harness: move it away to start over")
    if resolved is not None:
        differing = semantic_difference(state.get("config", {}), resolved)
        if differing:
            raise UserError(f"checkpoint {path} belongs to another config (differs in {', '.join(differing[:6])}); "
                            f"use the config it was made with, or move it away")
    return state
