"""The training epoch and the evaluation, on plain arguments.

Nothing here reads a config or writes a file: the harness, the debug harness, the stability
analysis and the benchmarks call the same two functions.  Everything periodic (stop
requests, the progress bar, fault injection, trackers) is a callback (utils.core.callbacks).

    state = EpochState(epoch=e, total_batches=len(loader), lr_at_start=schedule.lr)
    train_epoch(step, loader.batches(e), state, callbacks)
    loss_sum, correct, count = state.sums.tolist()

``TrainingStep`` holds what one optimizer step needs: the model as trained (a DDP or
compiled wrapper, or the bare model), the bare model (its masks, the parameters to clip),
optimizer, LR schedule, grad scaler, autocast dtype, label smoothing and gradient clipping.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from utils.models import mask_layers

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """torch.autocast for ``dtype`` on ``device``'s type; a no-op context for None (fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def clip_alive_grad_norm_(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradient norm of what trains: pruned weights' gradients are zeroed first (they
    are large, and the step discards them anyway), so the norm is that of the alive weights and
    the unpruned parameters.  -> the norm before clipping."""
    with torch.no_grad():
        for _, layer in mask_layers.masked_layers(model):
            if layer.weight.grad is not None:
                layer.weight.grad.mul_(layer.mask)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


@dataclass
class TrainingStep:
    train_model: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: object                                  # utils.training.schedulers.LRSchedule (step(), lr)
    scaler: Optional[torch.amp.GradScaler] = None
    autocast_dtype: Optional[torch.dtype] = None
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    # called with the bare model after backward (on unscaled gradients), before clipping and the step:
    # e.g. network slimming's L1 subgradient on BatchNorm scales
    after_backward: Sequence[Callable[[torch.nn.Module], None]] = ()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step; -> the batch's logits (detached).  Pruned weights are zero after it."""
        with autocast(images.device, self.autocast_dtype):
            logits = self.train_model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler
        if scaler is not None:
            scaler.scale(loss).backward()
            if self.grad_clip > 0 or self.after_backward:
                scaler.unscale_(self.optimizer)   # hooks and clipping see true gradients
            for hook in self.after_backward:
                hook(self.model)
            if self.grad_clip > 0:
                clip_alive_grad_norm_(self.model, self.grad_clip)
            scaler.step(self.optimizer)
            scaler.update()
        else:
            loss.backward()
            for hook in self.after_backward:
                hook(self.model)
            if self.grad_clip > 0:
                clip_alive_grad_norm_(self.model, self.grad_clip)
            self.optimizer.step()
        mask_layers.apply_masks_(self.model)
        self.schedule.step()
        self.last_loss = loss.detach()
        return logits.detach()


@dataclass
class EpochState:
    """One epoch's progress.  ``sums`` = (loss * n, correct, n) over this rank's batches, on
    the device, float64 (no host sync per step).  A mid-epoch resume starts from a state
    with ``batches_done``, ``sums``, ``lr_at_start`` and ``time_before`` of the interrupted
    epoch, so the epoch's row equals an uninterrupted one's."""
    epoch: int
    total_batches: int
    lr_at_start: float
    batches_done: int = 0
    sums: Optional[torch.Tensor] = None
    time_before: float = 0.0                  # seconds spent in this epoch before a resume
    started: float = 0.0                      # perf_counter() at this process's first batch
    stop: bool = False                        # set by a callback: end the epoch after this step
    stopped: bool = False                     # the epoch ended early (stop was honoured)
    level: Optional[int] = None               # for callbacks that name the level (fault injection, bars)
    steps_run: int = 0                        # steps taken by this call of train_epoch
    first_step_done: Optional[float] = None   # perf_counter() after this call's first step
    ended: Optional[float] = None             # perf_counter() after the epoch's last step
    extra: dict = field(default_factory=dict)

    @property
    def elapsed(self) -> float:
        return self.time_before + time.perf_counter() - self.started

    def steady_images_per_s(self, images: float, now: Optional[float] = None) -> Optional[float]:
        """Training throughput once warm: ``images`` (the epoch's count, all ranks) scaled to the
        steps after this call's first, over the time since that step ended.  The first step
        (FFCV's pipeline compilation, cuDNN autotuning, torch.compile) is left out.  None with
        fewer than two steps."""
        if self.steps_run < 2 or self.batches_done == 0:
            return None
        now = now if now is not None else (self.ended if self.ended is not None else time.perf_counter())
        seconds = now - self.first_step_done
        return images / self.batches_done * (self.steps_run - 1) / seconds if seconds > 0 else None


def train_epoch(step: TrainingStep, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], state: EpochState,
                callbacks: Sequence = (), device: Optional[torch.device] = None) -> EpochState:
    """Train over ``batches`` (those left of the epoch), calling the callbacks' epoch hooks.

    Stops early, with ``state.stopped = True``, when a callback sets ``state.stop`` after a
    step that is not the epoch's last.  -> ``state`` (its sums not yet reduced across ranks).
    """
    step.train_model.train()
    if state.sums is None:
        state.sums = torch.zeros(3, device=device, dtype=torch.float64)
    sums = state.sums
    for callback in callbacks:
        callback.on_epoch_start(state)
    state.started = time.perf_counter()
    for images, labels in batches:
        logits = step(images, labels)
        with torch.no_grad():  # on-device sums: no host sync per step
            n = labels.shape[0]
            sums[0] += step.last_loss.double() * n
            sums[1] += (logits.argmax(1) == labels).sum()
            sums[2] += n
        state.batches_done += 1
        state.steps_run += 1
        if state.steps_run == 1:
            state.first_step_done = time.perf_counter()
        for callback in callbacks:
            callback.on_step_end(state)
        if state.stop and state.batches_done < state.total_batches:
            state.stopped = True
            return state
        state.stop = False
    state.ended = time.perf_counter()
    for callback in callbacks:
        callback.on_epoch_end(state)
    return state


def share_of_partial_sums(every_rank: Sequence[torch.Tensor], rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of a mid-epoch checkpoint's per-rank partial sums.  With the world
    size they were written with, each rank continues its own sums (the row is bit-identical);
    with another, rank 0 carries their total (the loss mean may then differ in the last bits;
    the data order itself is defined per global batch, so it is unaffected)."""
    if len(every_rank) == world_size:
        return every_rank[rank]
    if rank == 0:
        return torch.stack(list(every_rank)).sum(0)
    return torch.zeros_like(every_rank[0])


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *,
             device: Optional[torch.device] = None, autocast_dtype: Optional[torch.dtype] = None,
             reduce: Optional[Callable[[torch.Tensor], None]] = None) -> Tuple[float, float, float]:
    """-> (summed loss, correct, count) of ``model`` in eval mode over ``batches``, summed in
    place across ranks by ``reduce`` (e.g. distributed_utils.all_reduce_sum) when given.
    The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    for images, labels in batches:
        with autocast(images.device, autocast_dtype):
            logits = model(images)
        sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        sums[1] += (logits.argmax(1) == labels).sum()
        sums[2] += labels.shape[0]
    if reduce is not None:
        reduce(sums)
    model.train(was_training)
    loss_sum, correct, count = sums.tolist()
    return loss_sum, correct, count
