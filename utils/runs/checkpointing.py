"""Checkpoint state in one place: what goes into ``init.pt``, ``rewind.pt`` and ``last.pt``,
how it is written (atomically: temporary file, fsync, rename) and how it is restored.

    training_snapshot(model, optimizer, schedule) -> CPU copies that later training cannot change
    save_checkpoint(path, kind, config=..., snapshot=..., **progress)    state -> file
    load_checkpoint(path, kind)              file -> state (safe load, keys checked; UserError)
    restore(state, model=..., optimizer=..., schedule=..., scaler=...)   state -> live objects

Kinds: ``init`` (the initial weights IMP resets to), ``rewind`` (weights, optimizer and
schedule WR rewinds to), ``last`` (everything resume needs: the snapshot, grad scaler, every
RNG state, where the run is, the CSV row counts, callbacks' state).  Plain arguments only:
nothing here reads a config or knows the experiment directory's layout.
"""
from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from utils.core.atomic_io import (  # noqa: F401  (re-exported: checkpoints are written through these)
    TEMPORARY_SUFFIX,
    WriteFailed,
    atomic_write,
    atomic_write_bytes,
    make_dirs,
    remove_stale_temporaries,
    write_failure_cause,
    writing,
)
from utils.core.errors import UserError

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = {
    "init": ("model",),
    "rewind": ("model", "optimizer", "schedule"),
    "last": ("config", "level", "next_epoch", "phase", "finished", "model", "optimizer", "schedule",
             "scaler", "rng", "level_stats", "csv_rows"),
}
LAST_CHECKPOINT_KEYS = REQUIRED_KEYS["last"]


class CorruptCheckpoint(UserError):
    """A checkpoint file that cannot be read or is not one of ours (see load_checkpoint)."""


def atomic_torch_save(obj: Any, path, keep_previous=None) -> None:
    """torch.save through a temporary file + fsync + rename (no whole-file copy in memory)."""
    atomic_write(path, lambda handle: torch.save(obj, handle), keep_previous)


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


# -------------------------------------------------------------------------- RNG state
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


# ------------------------------------------------------------------------ state, both ways
def model_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def training_snapshot(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
             schedule: Any = None) -> Dict[str, Any]:
    """Model (masks included), optimizer and schedule state as CPU copies that later training
    cannot change (``optimizer.state_dict()`` alone returns the live momentum buffers)."""
    state: Dict[str, Any] = {"model": model_state(model)}
    if optimizer is not None:
        state["optimizer"] = detached_copy(optimizer.state_dict())
    if schedule is not None:
        state["schedule"] = dict(schedule.state_dict())
    return state


def save_checkpoint(path, kind: str, *, config: Dict[str, Any], snapshot: Optional[Dict[str, Any]] = None,
                    model: Optional[torch.nn.Module] = None, optimizer=None, schedule=None, scaler=None,
                    callbacks: Sequence[Any] = (), **progress: Any) -> None:
    """Write a ``kind`` checkpoint atomically: the format, the resolved config, the training
    state (``snapshot``, or one taken of ``model`` / ``optimizer`` / ``schedule``) and, for
    ``last``, the grad scaler, every RNG state, the state of the callbacks that keep one, and
    the run's ``progress`` (level, next_epoch, phase, finished, level_stats, csv_rows,
    world_size, iterations_per_epoch, partial_epoch).  A replaced ``last`` is kept as ``previous.pt``."""
    state = {"format": CHECKPOINT_FORMAT, "config": config,
             **(snapshot if snapshot is not None else training_snapshot(model, optimizer, schedule)), **progress}
    if kind == "last":
        state.update(scaler=scaler.state_dict(), rng=rng_state())
        kept = {cb.name: cb.state_dict() for cb in callbacks if getattr(cb, "name", None)}
        if kept:
            state["callbacks"] = kept
    missing = [key for key in REQUIRED_KEYS[kind] if key not in state]
    if missing:
        raise ValueError(f"a {kind} checkpoint needs {', '.join(missing)}")
    atomic_torch_save(state, path, keep_previous=previous_of(path) if kind == "last" else None)


def previous_of(path) -> Path:
    """Where the checkpoint a ``last`` checkpoint replaced is kept (``previous.pt`` beside it)."""
    return Path(path).with_name("previous" + Path(path).suffix)


def restore(state: Dict[str, Any], *, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
            schedule: Any = None, scaler: Optional[torch.amp.GradScaler] = None, keep_masks: bool = True,
            rng: bool = False, callbacks: Sequence[Any] = ()) -> None:
    """Put ``state`` back into live objects (each one given is restored from its key).

    ``keep_masks``: weights and buffers from the state, the model's current masks kept and its
    pruned weights zeroed (IMP / WR resets after pruning); otherwise the whole state dict,
    masks included (resume).  The optimizer state is copied first: ``load_state_dict`` adopts
    the tensors it is given and a kept snapshot must not change with training.  ``rng``: also
    the Python / NumPy / torch (and CUDA) RNG states.  ``callbacks``: those with a state in the
    checkpoint get it back (``load_state_dict``).
    """
    from utils.models import mask_layers

    if keep_masks:
        masks = set(mask_layers.mask_buffer_names(model))
        own = model.state_dict()
        with torch.no_grad():
            for key, value in state["model"].items():
                if key not in masks:
                    own[key].copy_(value)
        mask_layers.apply_masks_(model)
    else:
        model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(detached_copy(state["optimizer"]))
    if schedule is not None:
        schedule.load_state_dict(state["schedule"])
    if scaler is not None:
        scaler.load_state_dict(state["scaler"])
    if rng:
        set_rng_state(state["rng"])
    for cb in callbacks:
        if getattr(cb, "name", None) and cb.name in state.get("callbacks", {}):
            cb.load_state_dict(state["callbacks"][cb.name])


def load_checkpoint(path, kind: Optional[str] = None, required: Sequence[str] = ()) -> Dict[str, Any]:
    """Safe load (weights_only=True: tensors and plain containers only, no code runs).

    Refused with a one-line UserError: a missing, corrupt or truncated file, a file that is
    not a checkpoint of this harness (format, the keys of ``kind`` and ``required``).
    """
    if not Path(path).is_file():
        raise CorruptCheckpoint(f"checkpoint {path} is missing; the experiment directory is incomplete: "
                        f"move it away to start over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise CorruptCheckpoint(f"checkpoint {path} cannot be read ({type(error).__name__}: {first_line}); "
                        f"it is corrupt or not a checkpoint of this harness: move it away to start over") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CorruptCheckpoint(f"checkpoint {path} is not a format-{CHECKPOINT_FORMAT} checkpoint of this harness; "
                        f"move it away to start over")
    missing = [key for key in (*REQUIRED_KEYS.get(kind, ()), *required) if key not in state]
    if missing:
        raise CorruptCheckpoint(f"checkpoint {path} lacks {', '.join(missing)}; it is damaged or from another "
                        f"version of this harness: move it away to start over")
    return state


