"""Everything about the process group, driven by torchrun's environment.

This is the only module that reads torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE,
TORCHELASTIC_RESTART_COUNT).  Without them the program is one process (rank 0 of 1) and
no process group is created, so ``python harness.py`` and the debug harness need no
special casing: every collective below is a no-op for a single process.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def restart_count() -> int:
    """How many times torchrun has restarted this job (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` -> cuda:LOCAL_RANK when CUDA is present, else cpu.  Never the global rank."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("training.device=cuda but no CUDA device is visible")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup(device: str = "auto", backend: str = "auto", timeout_s: float = 1800) -> DistributedContext:
    """Create the process group when launched by torchrun; return this process's context."""
    if not launched_by_torchrun():
        return DistributedContext(device=pick_device(device, 0))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ["WORLD_SIZE"])
    torch_device = pick_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if world_size > 1 and not dist.is_initialized():
        kwargs = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if torch_device.type == "cuda":
            kwargs["device_id"] = torch_device  # binds NCCL to this GPU; avoids a guess on first collective
        dist.init_process_group(**kwargs)
    return DistributedContext(rank, local_rank, world_size, torch_device, backend if world_size > 1 else None)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (returns the tensor for chaining)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensors: List[torch.Tensor]) -> None:
    """In-place mean over ranks of each tensor (used for gradients outside DDP)."""
    if not _active():
        return
    world = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s Python object on every rank (pickled; CPU tensors travel too)."""
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any) -> List[Any]:
    if not _active():
        return [obj]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_tensors_(tensors: List[torch.Tensor], src: int = 0) -> None:
    if not _active():
        return
    for t in tensors:
        dist.broadcast(t, src=src)
