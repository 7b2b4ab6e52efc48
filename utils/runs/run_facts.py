"""How a run was executed, read back from its directory: what its config alone does not say.

A config says ``training.device: auto`` and nothing about the number of processes; both can
change a run's numbers.  With BatchNorm and per-rank statistics (no SyncBatchNorm: any CPU
run, or ``distributed.sync_bn: false``) N processes normalise over batches of B/N and train
another model than 1 process does.  The report (which runs may be pooled) and the controls
(whether a control's level 0 is its source's) both ask the same question through
``batchnorm_processes``.

Read from ``checkpoints/last.pt`` (the progress the harness saves with every checkpoint:
``world_size``, ``iterations_per_epoch``; a CUDA RNG state is saved only when CUDA was in use) and
``checkpoints/init.pt`` (the initial weights: BatchNorm layers carry ``running_mean``).
Everything takes plain arguments; nothing here imports the harness.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from utils.runs.rundir import RunFiles


@dataclass(frozen=True)
class Execution:
    world_size: int           # processes of the run's latest launch
    device_type: str          # "cuda" or "cpu"


def _load(path: Path) -> Any:
    import torch
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _last_checkpoint(root) -> Optional[dict]:
    """The run's ``checkpoints/last.pt`` as a dict, or None when it is missing or unreadable."""
    path = RunFiles(root).last_checkpoint
    if not path.is_file():
        return None
    try:
        state = _load(path)
    except Exception:  # noqa: BLE001 -- torch raises several types for a bad file
        return None
    return state if isinstance(state, dict) else None


def recorded_execution(root, requested_device: Optional[str] = None) -> Optional[Execution]:
    """World size and device type of the run in ``root`` as its last checkpoint records them
    (None when there is no readable ``checkpoints/last.pt``).  ``requested_device``: the
    config's ``training.device``; ``cpu``/``cuda`` are taken as said, ``auto`` (or None) is
    CUDA exactly when the checkpoint holds a CUDA RNG state."""
    state = _last_checkpoint(root)
    if state is None:
        return None
    world_size = state.get("world_size", 1)
    if requested_device in ("cpu", "cuda"):
        device = requested_device
    else:
        rng = state.get("rng")
        device = "cuda" if isinstance(rng, dict) and "cuda" in rng else "cpu"
    return Execution(int(world_size) if isinstance(world_size, int) else 1, device)


def recorded_iterations_per_epoch(root) -> Optional[int]:
    """Optimizer steps per epoch of the run in ``root`` (the progress its ``checkpoints/last.pt``
    saves: ``iterations_per_epoch``); None when it is not recorded (a run older than that field)
    or the file cannot be read.  The report turns a ``prune.rewind_iteration`` into epochs with it."""
    state = _last_checkpoint(root)
    value = state.get("iterations_per_epoch") if state is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def state_has_batchnorm(state_dict: Mapping[str, Any]) -> bool:
    """Whether a model state dict holds BatchNorm layers (their running statistics)."""
    return any(str(key).endswith(".running_mean") or str(key) == "running_mean" for key in state_dict)


def initial_weights_have_batchnorm(root) -> Optional[bool]:
    """Whether the model of the run in ``root`` has BatchNorm (from ``checkpoints/init.pt``);
    None when that file cannot be read."""
    path = RunFiles(root).init_checkpoint
    try:
        state = _load(path)
    except Exception:  # noqa: BLE001
        return None
    model = state.get("model") if isinstance(state, dict) else None
    return state_has_batchnorm(model) if isinstance(model, dict) else None


def batchnorm_processes(*, world_size: int, device_type: str, sync_bn: Any, has_batchnorm: bool) -> int:
    """The number of processes a run's BatchNorm statistics were split over: ``world_size``
    when each rank normalised over its own share of the batch, else 1 (one process, no
    BatchNorm, or SyncBatchNorm: ``sync_bn`` true, or ``auto`` on CUDA, as the harness decides).
    Runs with different values train different models; runs with the same value train the
    same model up to floating-point reduction order."""
    synced = sync_bn is True or (sync_bn in ("auto", None) and device_type == "cuda")
    return int(world_size) if has_batchnorm and world_size > 1 and not synced else 1
