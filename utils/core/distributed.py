"""Everything about the process group, driven by torchrun's environment.

This is the only module that reads torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE,
TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_MAX_RESTARTS, TORCHELASTIC_RUN_ID, TORCHELASTIC_ERROR_FILE; MASTER_ADDR and
MASTER_PORT are read by torch's env:// rendezvous).  Without them the program is one
process (rank 0 of 1) and no process group is created, so ``python harness.py`` and the
debug harness need no special casing: every collective below is a no-op for a single
process.

The device is ``cuda:LOCAL_RANK`` (never the global rank, which exceeds the GPU count on
every node but the first); the backend is nccl on CUDA and gloo on CPU unless
``distributed.backend`` says otherwise.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional

import torch
import torch.distributed as dist

from utils.core.errors import UserError


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


def started_by_torchrun_agent() -> bool:
    """Whether torchrun's elastic agent started this process as one of its workers (it sets
    TORCHELASTIC_MAX_RESTARTS; a bare RANK / WORLD_SIZE, as some tests set, does not count): then
    the parent process is torchrun, whose death the worker follows (utils/core/launcher_watch.py)."""
    return launched_by_torchrun() and "TORCHELASTIC_MAX_RESTARTS" in os.environ


def restart_count() -> int:
    """How many times torchrun has restarted this job (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def rank_from_env() -> int:
    """The global rank torchrun gave this process (0 without torchrun), readable before the
    process group exists (e.g. to keep the config parser's messages to rank 0)."""
    return int(os.environ.get("RANK", "0") or 0) if launched_by_torchrun() else 0


def launch_id() -> Optional[str]:
    """torchrun's id of this launch (--standalone: a fresh uuid; otherwise --rdzv-id, which
    the Slurm launcher sets to the job id); None without torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def record_error_for_launcher(error: BaseException, one_line: bool = False) -> None:
    """Under torchrun, write ``error`` to the file torchrun reads (TORCHELASTIC_ERROR_FILE),
    so its failure summary shows this message instead of "error_file: <N/A>".  ``one_line``
    (a refusal of the user's input, or a failed write): the file holds the line alone, so the
    summary shows it without the harness's stack frames.  Best effort."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        if one_line:
            import json

            from utils.core.atomic_io import atomic_write_text
            line = " ".join(f"error: {error}".split())
            atomic_write_text(path, json.dumps({"message": line, "timestamp": str(int(time.time()))}))
            return
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
        ErrorHandler().record_exception(error)
    except Exception:  # reporting must never mask the error being reported
        pass


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
    """Create the process group when launched by torchrun; return this process's context.

    Refused (RuntimeError, one line): a LOCAL_RANK without a GPU, training.device=cuda
    without CUDA, nccl without CUDA.  After an elastic restart the process group is built
    on this attempt's own keys (``_store_of_this_attempt``)."""
    if not launched_by_torchrun():
        return DistributedContext(device=pick_device(device, 0))
    rank = int(os.environ["RANK"])
    if started_by_torchrun_agent():
        from utils.core import launcher_watch
        launcher_watch.start(rank)  # a worker whose torchrun has died stops (never trains on, never waits in set-up)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ["WORLD_SIZE"])
    torch_device = pick_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if backend == "nccl" and torch_device.type != "cuda":
        raise RuntimeError(f"distributed.backend=nccl needs CUDA devices, this process runs on {torch_device.type}; "
                           f"use distributed.backend=gloo (or auto)")
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs = {"backend": backend, "timeout": timeout}
        if torch_device.type == "cuda":
            kwargs["device_id"] = torch_device  # binds NCCL to this GPU; avoids a guess on first collective
        store = _store_of_this_attempt(timeout)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world_size)
        dist.init_process_group(**kwargs)
    return DistributedContext(rank, local_rank, world_size, torch_device, backend if world_size > 1 else None)


def _store_of_this_attempt(timeout: datetime.timedelta) -> Optional["dist.Store"]:
    """After an elastic restart: torch's own env:// rendezvous store, under a prefix naming
    this attempt; None on a first attempt (init_process_group's default is then right).

    WORKAROUND for torchrun (seen with torch 2.15 and gloo by the harness's elastic tests):
    restarted workers reach the agent's TCPStore at the same MASTER_ADDR:MASTER_PORT as the
    attempt before, and the process group's keys carry no attempt number, so a restarted
    rank can read the address a dead worker of the previous attempt published and fail with
    "Gloo connectFullMesh failed ... Connection refused" (3 restarts in 5).
    """
    attempt = restart_count()
    if attempt == 0:
        return None
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    return dist.PrefixStore(f"harness/attempt_{attempt}", store)


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


def broadcast_buffers_(module: torch.nn.Module, exclude: Iterable[str] = (), src: int = 0) -> None:
    """Rank ``src``'s buffers (e.g. BatchNorm running statistics) on every rank, in place.

    DDP broadcasts rank 0's buffers at the start of each training forward, after which each
    rank's own batch updates them: at the end of an epoch every rank holds slightly
    different running statistics.  Call this before evaluating so that every rank evaluates
    the model rank 0 checkpoints.  ``exclude``: state_dict names to skip (the masks, which
    are identical on every rank by construction and checked).
    """
    skip = set(exclude)
    broadcast_tensors_([b for name, b in module.named_buffers() if name not in skip], src=src)


def ranks_disagreeing(value: Any) -> List[int]:
    """The ranks whose ``value`` (a checksum, say) differs from rank 0's; [] when all agree."""
    values = all_gather_object(value)
    return [rank for rank, v in enumerate(values) if v != values[0]]


# ------------------------------------------------------------ set-up steps every rank agrees on
def agreed(step: Callable[[], Any], error_type: type = UserError) -> Any:
    """Run a set-up ``step`` (no collectives inside) on every rank.  When it refuses the input
    (``error_type``) on any rank, every rank raises the same error: rank 0's message, or the
    first failing rank's naming that rank (e.g. a file missing on one node only).  So each
    refusal reaches the entry point on all ranks at once, and no rank is left waiting in a
    collective for one that has gone."""
    message, result = None, None
    try:
        result = step()
    except error_type as error:
        message = str(error)
    failed = [(rank, text) for rank, text in enumerate(all_gather_object(message)) if text is not None]
    if failed:
        rank, text = failed[0]
        raise error_type(text if rank == 0 else f"(rank {rank}) {text}")
    return result


def decided_by_primary(decide: Callable[[], Any], is_primary: bool, error_type: type = UserError) -> Any:
    """Rank 0 runs ``decide`` (it may read files only rank 0 writes); every rank gets its
    result, or raises the same ``error_type`` with rank 0's message."""
    outcome: Any = None
    if is_primary:
        try:
            outcome = decide()
        except error_type as error:
            outcome = _Refusal(str(error))
    outcome = broadcast_object(outcome)
    if isinstance(outcome, _Refusal):
        raise error_type(outcome.message)
    return outcome


@dataclass
class _Refusal:
    message: str


def report_agreed_refusal(ctx: DistributedContext, error: BaseException) -> None:
    """A refusal raised on every rank at once (``agreed``, ``decided_by_primary``, a mask
    check): rank 0 says it, once, and no rank exits before it has (torchrun stops the others as
    soon as one exits).  Rank 0 ends first, with its message in torchrun's error file, so
    torchrun's failure summary names it, and this line, as the root cause."""
    if ctx.is_primary:
        print(f"error: {error}", file=sys.stderr, flush=True)
        record_error_for_launcher(error, one_line=True)
    barrier()
    if not ctx.is_primary:
        time.sleep(1.0)


# ------------------------------------------------------------------ one process failing
LOST_PEER_GRACE_S = 2.0


def is_lost_peer(error: BaseException) -> bool:
    """A collective failed because another process went away (it failed, or torchrun
    stopped it), not because of anything on this rank."""
    if isinstance(error, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted"))


def report_failure_and_exit(ctx: DistributedContext, error: BaseException, exit_status: int = 1,
                            one_line: bool = False) -> None:
    """An error in one process of a multi-process job: say what happened and end this
    process NOW, without tearing down the process group (a collective with a rank that
    will never join can block teardown).  torchrun sees the exit within its monitor
    interval (0.1 s) and stops the other ranks (SIGTERM, then SIGKILL after 30 s); a rank
    blocked in a gloo collective with this one fails at once and says so in one line."""
    if one_line:  # already said in one line by the caller
        record_error_for_launcher(error, one_line=True)
    elif is_lost_peer(error):
        first = (str(error).strip().splitlines() or [""])[0][:200]
        print(f"error (rank {ctx.rank}): stopping: lost contact with another process, which probably failed "
              f"(its message is above) [{type(error).__name__}: {first}]", file=sys.stderr, flush=True)
        # Give torchrun time to see the failed process first: its failure summary then names
        # that process (and its message) as the root cause, not this one.  SIGTERM ends the wait.
        time.sleep(LOST_PEER_GRACE_S)
    else:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        print(f"error (rank {ctx.rank}): {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        record_error_for_launcher(error)  # torchrun's failure summary then shows this message
    sys.stdout.flush()
    os._exit(exit_status)
