"""The report's training-cost axis: the epochs of training spent to produce each point.

The rule is the run's training type's (``TrainingType.training_cost_epochs(level, epochs,
rewind_epoch)``, utils/training/training_types.py): IMP and LRR (L + 1) x E, WR E + L x (E - rewind
epoch), fine-tuning E + L x E_ft, one-shot types E.  Here it is only applied to a finished run's
config: E is ``training.epochs`` and the rewind point is ``prune.rewind_epoch``, or
``prune.rewind_iteration`` / (optimizer steps per epoch) -- a fraction of an epoch -- with the steps
per epoch read from the run's last checkpoint (``run_facts.recorded_iterations_per_epoch``).

What is not known is NaN, never a guess: a training type that cannot be imported here, or a rewind
iteration of a run whose checkpoint does not record its steps per epoch.  A control counts as its
own training type says: its masks come from its source's level L, found at that cost."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional

COLUMN = "train_cost_epochs"


def rewind_epoch(config: Mapping[str, Any], iterations_per_epoch: Optional[int]) -> float:
    """Where a rewinding run restarts its later levels, in epochs (NaN when a rewind iteration
    cannot be converted: steps per epoch unknown)."""
    iteration = int(config.get("prune.rewind_iteration") or 0)
    if iteration:
        return iteration / iterations_per_epoch if iterations_per_epoch else math.nan
    return float(config.get("prune.rewind_epoch") or 0)


def needs_iterations_per_epoch(config: Mapping[str, Any]) -> bool:
    """Whether the cost of this run's levels needs its steps per epoch (a rewind iteration)."""
    return bool(config.get("prune.rewind_iteration"))


def level_cost(config: Mapping[str, Any], level: int, iterations_per_epoch: Optional[int] = None) -> float:
    """Epochs of training spent to produce ``level`` of a run with this config (NaN when unknown)."""
    from utils.training.training_types import TrainingTypeError, get_training_type
    try:
        kind = get_training_type(str(config.get("prune.training_type") or "imp"))
    except TrainingTypeError:
        return math.nan
    epochs = config.get("training.epochs")
    if not isinstance(epochs, int):
        return math.nan
    start = rewind_epoch(config, iterations_per_epoch) if kind.captures_rewind else 0.0
    if math.isnan(start):
        return math.nan
    return float(kind.training_cost_epochs(int(level), epochs, start))


def iterations_per_epoch_of(root: Path, config: Mapping[str, Any]) -> Optional[int]:
    """The run's steps per epoch when its cost needs them (read from its last checkpoint), else None."""
    if not needs_iterations_per_epoch(config):
        return None
    from utils.runs import run_facts
    return run_facts.recorded_iterations_per_epoch(root)
