"""Late resetting: weight rewinding to an optimizer step of level 0 (``prune.rewind_iteration``).

Frankle et al. 2020 ("Linear Mode Connectivity and the Lottery Ticket Hypothesis") rewind
to iteration k of the dense run (e.g. k = 500 for ResNet-20 on CIFAR-10) rather than to
an epoch boundary.  Iteration k is the state AFTER k optimizer steps of level 0, counted
from 0 at the first step of epoch 0: with ``iterations_per_epoch = I`` (batches per epoch
of this process's loader, the same on every rank), it lies in epoch ``k // I`` after
``k % I`` of its batches.  ``k % I == 0`` is an epoch boundary: exactly
``prune.rewind_epoch = k // I``.

Later levels restart from that state (weights, optimizer state, LR-schedule position)
and train the rest of the level: from epoch ``k // I``, batch ``k % I`` to the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from utils.core.callbacks import Callback


class RewindError(ValueError):
    """A rewind iteration that the run cannot reach; one line."""


@dataclass(frozen=True)
class RewindPoint:
    iteration: int   # optimizer steps of level 0 before the state is taken
    epoch: int       # the epoch in which it lies (the state is taken after `batch` of its batches)
    batch: int       # batches of `epoch` done at that point; 0 = the epoch's start

    @property
    def at_epoch_boundary(self) -> bool:
        return self.batch == 0


def rewind_point(rewind_iteration: int, *, epochs: int, iterations_per_epoch: int) -> RewindPoint:
    """Where iteration ``rewind_iteration`` lies in level 0.

    Refused (RewindError) when it is not inside level 0: ``rewind_iteration`` must be
    below ``epochs * iterations_per_epoch`` (rewinding to the end would leave nothing to
    train, as ``rewind_epoch < epochs`` requires).
    """
    if isinstance(rewind_iteration, bool) or not isinstance(rewind_iteration, int) or rewind_iteration < 0:
        raise RewindError(f"prune.rewind_iteration must be an integer >= 0, got {rewind_iteration!r}")
    if iterations_per_epoch < 1 or epochs < 1:
        raise RewindError(f"level 0 has no iterations ({epochs} epochs of {iterations_per_epoch} batches)")
    total = epochs * iterations_per_epoch
    if rewind_iteration >= total:
        raise RewindError(f"prune.rewind_iteration={rewind_iteration} is beyond level 0, which has {total} iterations "
                          f"({epochs} epochs x {iterations_per_epoch} batches per epoch); use fewer than {total}")
    return RewindPoint(rewind_iteration, rewind_iteration // iterations_per_epoch,
                       rewind_iteration % iterations_per_epoch)


class CaptureAtIteration(Callback):
    """Calls ``capture()`` once, right after optimizer step ``point.iteration`` of level 0.

    Point 0, and any point at an epoch boundary, falls at an epoch start, where no step
    hook runs: the harness captures those itself (as for ``rewind_epoch``; ``capture_now``
    says when).  ``EpochState.level`` and ``EpochState.epoch`` must be set (utils.training).
    """

    def __init__(self, point: RewindPoint, capture: Callable[[], None]):
        self.point, self.capture = point, capture

    def capture_now(self, level: int, epoch: int, batches_done: int) -> bool:
        return level == 0 and epoch == self.point.epoch and batches_done == self.point.batch

    def on_step_end(self, state) -> None:
        if self.point.batch and self.capture_now(state.level, state.epoch, state.batches_done):
            self.capture()


def start_of_later_levels(point: Optional[RewindPoint], rewind_epoch: int) -> tuple:
    """(epoch, batches already done in it) at which a level >= 1 of a wr run starts training."""
    if point is None:
        return rewind_epoch, 0
    return point.epoch, point.batch
