"""Extension points of the level loop and of the training epoch.

A ``Callback`` is an object with any of the methods below; every method is a no-op here,
so a callback overrides only what it needs.  The harness calls the level-loop hooks,
``utils.training.step.train_epoch`` calls the epoch hooks; both call every callback in the order
the list holds them, on every rank (a callback that writes checks ``is_primary`` itself).

Level loop (``LevelInfo``: the level, its target density, the bare model, the run's
directory and whether this rank writes; a hook may set ``info.end_level = True`` in
``on_epoch_logged`` to end the level after that epoch, e.g. Early-Bird)::

    on_run_start(info)        set-up done, fresh or resumed; info.level = the first level to run
    on_masks_agreed(info)     a level's new masks (info.extra['masks']), rank 0's broadcast to every
                              rank, before the ranks check they agree and before they are set
    on_level_start(info)      the level's masks are set and written, weights reset, training not started
                              (info.extra: start_epoch, start_batch)
    on_epoch_logged(info)     the epoch's epochs.csv row is written (info.row), its checkpoint not yet
    on_level_end(info)        the level's training is done; its levels.csv row (info.row) and layers.csv
                              rows (info.extra['layers']) are about to be written: a hook may add columns
    on_level_logged(info)     the level's levels.csv / layers.csv rows are written (info.row), checkpoint not yet
    on_run_end(info)          the last level is done (not called when the run stops on request)

Training epoch (``EpochState``, utils.training)::

    on_epoch_start(state)     before the first batch (state.batches_done > 0 when resuming mid-epoch)
    on_step_end(state)        after each optimizer step; setting ``state.stop = True`` ends the epoch
                              early (the caller checkpoints mid-epoch); the last batch cannot be stopped
    on_epoch_end(state)       after the last batch, before the epoch's sums are reduced across ranks

Inside every optimizer step (``utils.training.step.TrainingStep``)::

    after_backward            None, or ``fn(model)`` called after backward, before the step
                              (e.g. network slimming's L1 penalty on BatchNorm scales)

State that must survive a resume (e.g. Early-Bird's recent masks, a tracker's last step):
a callback whose ``name`` is set has ``state_dict()`` written into every ``last.pt`` under
``callbacks[name]`` and ``load_state_dict(state)`` called with it on resume (tensors and plain
containers only: checkpoints load with weights_only=True).

``in_every_training = True``: the callback also runs when the stability analysis trains its
second copy (e.g. channel zeroing; trackers and Early-Bird do not).  ``close()`` is called
once when the run ends, however it ends.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch


@dataclass
class LevelInfo:
    level: int
    density: float
    model: torch.nn.Module                   # the bare model (not the DDP / compiled wrapper)
    root: Optional[Path] = None              # the experiment directory
    is_primary: bool = True                  # whether this rank writes files
    epoch: Optional[int] = None              # on_epoch_logged: the epoch just logged
    row: Optional[Dict[str, Any]] = None     # the CSV row just written (epochs.csv or levels.csv)
    final_epoch: bool = False                # on_epoch_logged: the level's last epoch (its checkpoint is the level's)
    end_level: bool = False                  # set by a hook in on_epoch_logged: stop the level after this epoch
    extra: Dict[str, Any] = field(default_factory=dict)


class Callback:
    name: Optional[str] = None            # set: state_dict() goes into last.pt under this name
    in_every_training = False             # also runs in the stability analysis' second copy
    after_backward: Optional[Callable[[torch.nn.Module], None]] = None

    # level loop
    def on_run_start(self, info: LevelInfo) -> None: ...
    def on_masks_agreed(self, info: LevelInfo) -> None: ...
    def on_level_start(self, info: LevelInfo) -> None: ...
    def on_epoch_logged(self, info: LevelInfo) -> None: ...
    def on_level_end(self, info: LevelInfo) -> None: ...
    def on_level_logged(self, info: LevelInfo) -> None: ...
    def on_run_end(self, info: LevelInfo) -> None: ...
    # training epoch
    def on_epoch_start(self, state) -> None: ...
    def on_step_end(self, state) -> None: ...
    def on_epoch_end(self, state) -> None: ...
    # resume and teardown
    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class AfterBackward(Callback):
    """Puts ``hook(model)`` into every training step, after backward (e.g. training.bn_l1)."""
    in_every_training = True

    def __init__(self, hook: Callable[[torch.nn.Module], None]):
        self.after_backward = hook


def fire(callbacks: Iterable[Callback], hook: str, argument: Any) -> None:
    """Call ``hook(argument)`` on every callback, in order."""
    for callback in callbacks:
        getattr(callback, hook)(argument)


class Callbacks(List[Callback]):
    """A list of callbacks with ``fire``."""

    def fire(self, hook: str, argument: Any) -> None:
        fire(self, hook, argument)

