"""Learning-rate schedules as a per-iteration multiplier of the base LR.

A schedule is a pure function of the iteration counter within a level, so "where the
schedule is" is one integer: restarting a schedule (IMP, LRR) sets it to 0 and rewinding
it (WR) sets it to the iteration saved at the rewind epoch.  Nothing else needs saving.

Every schedule takes an optional linear warmup (from ``warmup_start_factor`` to 1 over
``warmup_epochs``, counted in iterations); the named shape then runs over the remaining
iterations, with epoch arguments (milestones, step_size, peak_epoch) in absolute epochs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence


class ScheduleError(ValueError):
    pass


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    epochs: int
    iterations_per_epoch: int
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.0
    milestones: Sequence[float] = field(default_factory=tuple)  # epochs, for multistep
    gamma: float = 0.1                       # decay factor for step / multistep
    step_size: float = 30.0                  # epochs between decays, for step
    peak_epoch: float = 2.0                  # epoch of the peak, for triangular
    final_factor: float = 0.0                # end value of cosine / linear / triangular

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch


# Each shape maps (epoch as a float, spec) -> factor.  Epoch-based shapes make the same
# config mean the same thing for any batch size.
def _constant(epoch: float, spec: ScheduleSpec) -> float:
    return 1.0


def _step(epoch: float, spec: ScheduleSpec) -> float:
    return spec.gamma ** math.floor(epoch / spec.step_size)


def _multistep(epoch: float, spec: ScheduleSpec) -> float:
    return spec.gamma ** sum(1 for m in spec.milestones if epoch >= m)


def _cosine(epoch: float, spec: ScheduleSpec) -> float:
    start, end = spec.warmup_epochs, spec.epochs
    progress = min(max((epoch - start) / max(end - start, 1e-12), 0.0), 1.0)
    return spec.final_factor + (1 - spec.final_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def _linear(epoch: float, spec: ScheduleSpec) -> float:
    start, end = spec.warmup_epochs, spec.epochs
    progress = min(max((epoch - start) / max(end - start, 1e-12), 0.0), 1.0)
    return 1.0 + (spec.final_factor - 1.0) * progress


def _triangular(epoch: float, spec: ScheduleSpec) -> float:
    # One cycle: linear up from final_factor to 1 at peak_epoch, then linearly down to
    # final_factor at the last epoch (ffcv-imagenet's "triangular" / airbench's shape).
    if epoch <= spec.peak_epoch:
        t = epoch / max(spec.peak_epoch, 1e-12)
        return spec.final_factor + (1 - spec.final_factor) * t
    t = (epoch - spec.peak_epoch) / max(spec.epochs - spec.peak_epoch, 1e-12)
    return 1.0 + (spec.final_factor - 1.0) * min(t, 1.0)


SCHEDULES: Dict[str, Callable[[float, ScheduleSpec], float]] = {
    "constant": _constant,
    "step": _step,
    "multistep": _multistep,
    "cosine": _cosine,
    "linear": _linear,
    "triangular": _triangular,
}


def schedule_names() -> List[str]:
    return sorted(SCHEDULES)


def lr_factor(spec: ScheduleSpec, iteration: int) -> float:
    """Multiplier of the base LR for the step taken at ``iteration`` (0-based, per level)."""
    if spec.name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {spec.name!r}; valid: {', '.join(schedule_names())}")
    epoch = iteration / spec.iterations_per_epoch
    factor = SCHEDULES[spec.name](epoch, spec)
    warmup_iterations = spec.warmup_epochs * spec.iterations_per_epoch
    if iteration < warmup_iterations:
        # Linear warmup reaches the schedule's value at the end of warmup.
        t = (iteration + 1) / warmup_iterations
        factor *= spec.warmup_start_factor + (1 - spec.warmup_start_factor) * t
    return factor


def final_lr_factor(spec: ScheduleSpec) -> float:
    """The multiplier of the last step the schedule takes (iteration ``total_iterations - 1``): its
    final rate.  Fine-tuning (``prune.training_type=finetune``) trains at base LR times this.  The
    step at ``total_iterations`` is never taken, so a cosine schedule with ``final_factor=0`` ends
    at a small positive rate, not at 0."""
    return lr_factor(spec, max(spec.total_iterations - 1, 0))


class LRSchedule:
    """Sets ``lr = base_lr * factor(iteration)`` on every param group before each step."""

    def __init__(self, optimizer, spec: ScheduleSpec, iteration: int = 0):
        if spec.name not in SCHEDULES:
            raise ScheduleError(f"unknown schedule {spec.name!r}; valid: {', '.join(schedule_names())}")
        self.optimizer = optimizer
        self.spec = spec
        self.iteration = iteration
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.apply()

    def apply(self) -> float:
        factor = lr_factor(self.spec, self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> None:
        """Advance one iteration (call after optimizer.step())."""
        self.iteration += 1
        self.apply()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def final_lr(self) -> float:
        """The rate of the schedule's last step (``final_lr_factor``), of the first param group."""
        return self.optimizer.param_groups[0]["initial_lr"] * final_lr_factor(self.spec)

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.apply()
