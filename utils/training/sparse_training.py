"""Sparse training: masks that change during training (gradual magnitude pruning, RigL, SET).

The schedule math and the per-layer drop/grow selection are plain-argument functions; the
callback ``MaskUpdates`` runs them after the optimizer steps the schedule names (the training
types ``gmp``, ``rigl`` and ``set`` in ``utils.training.training_types`` say which rule).

Steps.  ``t`` counts optimizer steps of the run (1 after the first); an epoch has ``S`` steps (the
loader's batches, the same for any number of processes: the batch size is global) and the run
``T = epochs * S``.  The window is ``t0 = floor(update_start * T)``, ``t1 = floor(update_end * T)``.

* gmp (Zhu & Gupta 2017): masks are updated after step ``t0 + k * update_every`` (k >= 0, t >= 1)
  while it is below ``t1``, and after ``t1`` itself (so the last update reaches the target).  At
  update step t the run keeps ``round(d_t * N)`` of its N prunable weights,
  ``d_t = d_f + (1 - d_f) (1 - (t - t0) / (t1 - t0))^3`` (``gmp_density``), chosen by the run's
  criterion and allocation from the weights alive (the structure's ``masks``; masks only shrink).
* rigl and set (Evci et al. 2020; Mocanu et al. 2018): the density stays where the run's pruning
  before training put it.  After step ``t0 + k * update_every`` (t >= 1) while it is below ``t1``,
  every layer drops the ``n`` alive weights of smallest |w| and grows ``n`` others,
  ``n = min(round(f_t * alive), dead)`` with ``f_t = (a / 2)(1 + cos(pi t / t1))``
  (``drop_fraction``) and ``dead`` the layer's weights not alive before the update.  rigl grows
  the weights of largest |dL/dw| (the dense gradient of the effective weight on the step's batch,
  averaged over every process: DDP's all-reduce, or an explicit one without DDP); set grows at
  random, with priorities drawn from ``(experiment.seed, t, layer index)`` alone, so no generator
  state has to be carried by a checkpoint.  Grown weights are set to 0 and so is their optimizer
  state (momentum buffers, Adam's moments: every state tensor shaped like the weight).
* A weight dropped in an update is never grown back by the same update: the candidates to grow
  are the weights that were dead before it, so every update changes exactly ``n`` weights one way
  and ``n`` the other and each layer keeps its count.  (The RigL authors' code,
  ``rigl/sparse_optimizers.py``, ranks the just-dropped weights among the candidates to grow; a
  weight regrown there keeps its value and optimizer state.)  ``n`` is therefore capped by the
  layer's dead weights, so a dense layer (ERK can make one) never changes.
* Ties: smallest |w| ties are dropped at the highest flat index, largest scores are grown at the
  lowest (``utils.pruning.topk``): deterministic on every device.

Every update is agreed on by the processes: rank 0's masks are broadcast (as a level's masks
are) before they are set, so every rank trains the same masks.  Rank 0 appends one row per
update and layer to ``mask_updates.csv`` (``step, epoch, layer, density, dropped, grown``) and
rewrites ``masks/level_0.pt``, so the file always holds the masks being trained.  The update
count is in every checkpoint (``state_dict``); the masks are in the model's state.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from utils.core.callbacks import Callback, LevelInfo
from utils.models import mask_layers
from utils.models.mask_layers import Masks
from utils.pruning.topk import keep_top_k_alive
from utils.runs.checkpointing import atomic_torch_save
from utils.runs.rundir import RunFiles


# ------------------------------------------------------------------------- schedule math
def gmp_density(t: int, t0: int, t1: int, final_density: float) -> float:
    """Zhu & Gupta's cubic schedule: the density at step ``t`` (1 before t0, ``final_density`` from t1)."""
    if t1 <= t0:
        raise ValueError(f"the update window must hold a step: t0={t0}, t1={t1}")
    progress = min(max((t - t0) / (t1 - t0), 0.0), 1.0)
    return final_density + (1.0 - final_density) * (1.0 - progress) ** 3


def drop_fraction(t: int, t_end: int, initial: float) -> float:
    """RigL's cosine decay of the drop fraction: (initial / 2)(1 + cos(pi t / t_end)), 0 from t_end."""
    if t_end <= 0:
        raise ValueError(f"t_end must be >= 1, got {t_end}")
    return 0.5 * initial * (1.0 + math.cos(math.pi * min(t, t_end) / t_end))


def drop_count(fraction: float, alive: int, dead: int) -> int:
    """Weights a layer drops (and grows): round(fraction * alive), at most its dead weights."""
    return max(0, min(int(round(fraction * alive)), dead))


@dataclass(frozen=True)
class UpdateSchedule:
    """When masks change: every ``every`` steps from ``start`` to ``end`` (fractions of the run)."""
    every: int
    start: float
    end: float
    epochs: int
    final_step: bool       # also update after step t1 (gmp: the last update reaches the target)

    def window(self, steps_per_epoch: int) -> Tuple[int, int]:
        total = self.epochs * steps_per_epoch
        return int(math.floor(self.start * total)), int(math.floor(self.end * total))

    def is_update(self, t: int, steps_per_epoch: int) -> bool:
        t0, t1 = self.window(steps_per_epoch)
        if t < 1 or t < t0 or t > t1:
            return False
        return (t < t1 and (t - t0) % self.every == 0) or (t == t1 and self.final_step)

    def steps(self, steps_per_epoch: int) -> List[int]:
        """Every update step of the run, in order."""
        t0, t1 = self.window(steps_per_epoch)
        return [t for t in range(max(t0, 1), t1 + 1) if self.is_update(t, steps_per_epoch)]

    def refusal(self, steps_per_epoch: int) -> Optional[str]:
        """One line when the window holds no update step of this run, else None."""
        t0, t1 = self.window(steps_per_epoch)
        if t1 <= t0 or not self.steps(steps_per_epoch):
            return (f"the mask-update window (prune.update_start={self.start}, prune.update_end={self.end}, "
                    f"prune.update_every={self.every}) holds no update step of this run's "
                    f"{self.epochs * steps_per_epoch} steps (steps {t0} to {t1}); widen it or update more often")
        return None


# -------------------------------------------------------------------- drop and grow, per layer
def drop_and_grow(weight: torch.Tensor, mask: torch.Tensor, n: int, grow_score: torch.Tensor) -> torch.Tensor:
    """The layer's new mask: its ``n`` alive weights of smallest |w| dropped, ``n`` of the weights
    dead before the update grown (largest ``grow_score``).  CPU tensors; the count is unchanged."""
    alive = mask.to(torch.bool)
    dead = ~alive
    n_alive = int(alive.count_nonzero())
    if not 0 <= n <= min(n_alive, alive.numel() - n_alive):
        raise ValueError(f"cannot drop and grow {n} weights of a layer with {n_alive} of {alive.numel()} alive")
    if n == 0:
        return alive.clone()
    magnitude = weight.detach().abs().to(torch.float64).masked_fill(dead, -math.inf)
    kept = keep_top_k_alive(magnitude, alive, n_alive - n)
    score = grow_score.to(torch.float64).masked_fill(alive, -math.inf)
    grown = keep_top_k_alive(score, dead, n)
    return kept | grown


def random_grow_score(seed: int, step: int, layer_index: int, shape: Sequence[int]) -> torch.Tensor:
    """SET's priorities for layer ``layer_index`` at step ``step``: i.i.d. U(0, 1), float64, from a
    generator seeded by (seed, step, layer index) alone."""
    digest = hashlib.sha256(f"set-grow:{seed}:{step}:{layer_index}".encode()).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float64)


def zero_grown_(parameter: torch.Tensor, optimizer: Optional[torch.optim.Optimizer], grown: torch.Tensor) -> None:
    """Grown weights start at 0, and so does their optimizer state (every state tensor of the
    parameter shaped like it: SGD's momentum buffer, Adam's exp_avg and exp_avg_sq, ...)."""
    grown = grown.to(parameter.device)
    with torch.no_grad():
        parameter.masked_fill_(grown, 0.0)
        state = optimizer.state.get(parameter, {}) if optimizer is not None else {}
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
                value.masked_fill_(grown.to(value.device), 0)


# ------------------------------------------------------------------------------ the rules
class MaskRule:
    """What one update does; a training type's ``mask_rule`` gives one."""
    needs_gradients = False   # the callback captures the step's dense gradients for it
    final_step = False        # the schedule also updates after step t1
    only_shrinks = False      # an update may only remove weights

    def schedule_value(self, t: int, t0: int, t1: int) -> float:
        """The schedule's value at update step ``t`` (a density, a drop fraction)."""
        raise NotImplementedError

    def new_masks(self, step: int, value: float, masks: Masks, weights: Mapping[str, torch.Tensor],
                  gradients: Optional[Mapping[str, torch.Tensor]]) -> Masks:
        """The masks after the update at ``step`` (CPU bool), from the current ``masks``, the
        weights after the step and (``needs_gradients``) the step's dense gradients."""
        raise NotImplementedError


class GradualPruning(MaskRule):
    """gmp: ``select(density)`` (the run's structure, criterion and allocation) keeps round(d_t N)."""
    final_step = True
    only_shrinks = True

    def __init__(self, select: Callable[[float], Masks], final_density: float):
        self.select, self.final_density = select, final_density

    def schedule_value(self, t, t0, t1):
        return gmp_density(t, t0, t1, self.final_density)

    def new_masks(self, step, value, masks, weights, gradients):
        return self.select(value)


class DropAndGrow(MaskRule):
    """rigl (grow by |gradient|) and set (grow at random): each layer drops its n smallest |w| and
    grows n of its dead weights."""

    def __init__(self, *, by_gradient: bool, seed: int, fraction: float):
        self.needs_gradients, self.seed, self.fraction = by_gradient, seed, fraction

    def schedule_value(self, t, t0, t1):
        return drop_fraction(t, t1, self.fraction)

    def new_masks(self, step, value, masks, weights, gradients):
        new = {}
        for index, (name, mask) in enumerate(masks.items()):
            alive = int(mask.count_nonzero())
            n = drop_count(value, alive, mask.numel() - alive)
            score = gradients[name].abs() if self.needs_gradients else random_grow_score(self.seed, step, index, mask.shape)
            new[name] = drop_and_grow(weights[name], mask, n, score)
        return new


# ---------------------------------------------------------------------------- the callback
class MaskUpdates(Callback):
    """Runs a ``MaskRule`` after the update steps of an ``UpdateSchedule`` (module docstring).

    ``optimizer()``: the optimizer training now (the harness rebuilds it at a level's start and on
    resume); ``agree(masks)``: rank 0's masks on every rank; ``average(tensor)``: the mean of a
    tensor over the processes, in place, or None when the gradients are averaged already (DDP)."""
    name = "mask_updates"

    def __init__(self, rule: MaskRule, schedule: UpdateSchedule, model: torch.nn.Module,
                 optimizer: Callable[[], Optional[torch.optim.Optimizer]], *,
                 agree: Callable[[Masks], Masks] = lambda masks: masks,
                 average: Optional[Callable[[torch.Tensor], Any]] = None, is_primary: bool = True):
        self.rule, self.schedule, self.model, self.optimizer = rule, schedule, model, optimizer
        self.agree, self.average, self.is_primary = agree, average, is_primary
        self.root = None
        self.updates = 0                 # updates done (in the checkpoint: a resumed run goes on counting)
        self.step = 0                    # optimizer steps of the run done so far
        self.steps_per_epoch = 0
        self.gradients: Optional[Dict[str, torch.Tensor]] = None
        if rule.needs_gradients:
            self.after_backward = self.capture_gradients

    # --------------------------------------------------------------------------- hooks
    def on_run_start(self, info: LevelInfo) -> None:
        self.root, self.model = info.root, info.model   # the bare model as trained (on its device)

    def on_epoch_start(self, state) -> None:
        self.steps_per_epoch = state.total_batches
        self.step = state.epoch * state.total_batches + state.batches_done

    def capture_gradients(self, model: torch.nn.Module) -> None:
        """After backward, before clipping and the step: the dense gradients, when the step
        about to end is an update step (RigL scores the step's own batch)."""
        if not self.schedule.is_update(self.step + 1, self.steps_per_epoch):
            self.gradients = None
            return
        gradients = {}
        for name, layer in mask_layers.masked_layers(model):
            grad = layer.weight.grad
            gradients[name] = torch.zeros_like(layer.weight) if grad is None else grad.detach().clone()
            if self.average is not None:
                self.average(gradients[name])
        self.gradients = {name: grad.to("cpu") for name, grad in gradients.items()}

    def on_step_end(self, state) -> None:
        self.steps_per_epoch = state.total_batches
        self.step = state.epoch * state.total_batches + state.batches_done
        if self.schedule.is_update(self.step, self.steps_per_epoch):
            self.update(self.step, state.epoch)

    # --------------------------------------------------------------------------- the update
    def update(self, step: int, epoch: int) -> None:
        if self.rule.needs_gradients and self.gradients is None:
            raise RuntimeError(f"mask update at step {step}: no gradients were captured for it")
        masks = mask_layers.get_masks(self.model)
        weights = {name: layer.weight.detach().to("cpu") for name, layer in mask_layers.masked_layers(self.model)}
        t0, t1 = self.schedule.window(self.steps_per_epoch)
        value = self.rule.schedule_value(step, t0, t1)
        new = self.agree(self.rule.new_masks(step, value, masks, weights, self.gradients))
        self.gradients = None
        rows = []
        optimizer = self.optimizer()
        for name, layer in mask_layers.masked_layers(self.model):
            old, now = masks[name], new[name].to(torch.bool)
            grown = now & ~old
            if self.rule.only_shrinks and bool(grown.any()):
                raise RuntimeError(f"mask update at step {step}: layer {name} grew, and masks only shrink here")
            if bool(grown.any()):
                zero_grown_(layer.weight, optimizer, grown)
            rows.append({"step": step, "epoch": epoch, "layer": name, "density": int(now.count_nonzero()) / now.numel(),
                         "dropped": int((old & ~now).count_nonzero()), "grown": int(grown.count_nonzero())})
        mask_layers.set_masks(self.model, new)
        self.updates += 1
        if self.is_primary and self.root is not None:
            files = RunFiles(self.root)
            for row in rows:
                files.mask_updates.append(row)
            atomic_torch_save(mask_layers.get_masks(self.model), files.masks(0))

    # --------------------------------------------------------------------------- resume
    def state_dict(self) -> Dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.updates = int(state["updates"])
