"""Training types: what happens between pruning levels, one object per type.

A training type says, for the level loop and for resume alike:

* ``one_shot``: whether the run trains once, one level at ``prune.target_density`` (``at_init``,
  ``gmp``, ``rigl``, ``set``) instead of level after level; ``prunes_at(level)``: whether a level
  starts by setting new masks (``gmp``'s one level starts dense);
* ``updates_masks`` and ``mask_rule(...)``: whether the masks change during training, and how
  (``utils.training.sparse_training``: the harness runs the rule after the steps of the
  ``prune.update_*`` schedule); ``config_defaults``: defaults of other keys for this type (rigl
  and set prune with ``erk`` + ``random``), used where the user gave none;
* ``captures_rewind``: whether level 0 keeps a state that later levels restart from (WR);
* ``optimizer_and_schedule(level, config, build)``: the optimizer and LR schedule a level trains
  with; ``build()`` makes the config's, ``build({"optimizer.lr": 0.01, "schedule.name":
  "constant"})`` the config's with those keys changed.
  The harness calls it at the start of a level AND when resuming inside one, so a resumed
  run can never train at another learning rate than the uninterrupted one;
* ``reset(level, run)``: the weights (and optimizer state) a level starts from, and the
  (epoch, batch) its training starts at;
* ``check(config)``: a one-line refusal of config values the type cannot honour, or None;
* ``training_cost_epochs(level, epochs, rewind_epoch)``: the epochs of training spent to produce
  level ``level``'s network, earlier levels included (the report's cost axis; docs/design.md,
  "Training cost");
* ``describe()``: what it does, in one line (``description``, or the first line of the class
  docstring): ``--help`` lists the types with it, and a type that has neither is refused.

The registry ``TRAINING_TYPES`` maps names to instances; ``get_training_type`` also takes a
user's ``package.module:Name`` (a ``TrainingType`` subclass or instance).  Adding a type is
one class and one registry line (docs/extending.md).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple

from utils.core.registry import lookup_or_import
from utils.training import sparse_training


class LevelRun(Protocol):
    """What a training type may touch when a level starts (the harness's experiment)."""
    model: Any
    optimizer: Any
    schedule: Any
    init_state: Dict[str, Any]                 # the initial weights (init.pt)
    rewind_state: Optional[Dict[str, Any]]     # WR: weights, optimizer, schedule at the rewind point
    rewind_at: Any                             # WR: utils.training.rewind.RewindPoint


def restore_state(state: Mapping[str, Any], run: LevelRun, *, optimizer: bool = False) -> None:
    """Load ``state``'s weights (and optimizer + schedule) into ``run``, keeping the masks."""
    from utils.runs import checkpointing
    checkpointing.restore(state, model=run.model, optimizer=run.optimizer if optimizer else None,
                          schedule=run.schedule if optimizer else None)


class TrainingType:
    """The base of every training type (docs/extending.md, "A training type")."""
    name = "base"
    one_shot = False          # one level at prune.target_density (at_init, gmp, rigl, set) instead of level after level
    updates_masks = False     # the masks change during training (mask_rule; gmp, rigl, set)
    config_defaults: Mapping[str, Any] = {}   # other keys' defaults for this type (where the user gave none)
    captures_rewind = False   # level 0 keeps a state later levels restart from (prune.rewind_epoch / _iteration)
    resets_to_init = False    # every level starts from the initial weights (a control may then reuse level 0)
    fine_tunes = False        # levels after 0 train at one constant rate (prune.finetune_lr applies)
    description = ""          # one line; empty: the first line of the class docstring (``describe``)

    def describe(self) -> str:
        """What the type does, in one line: ``description``, else the first line of the class's own
        docstring ("" when it has neither: such a type is refused)."""
        if self.description.strip():
            return " ".join(self.description.split())
        lines = (type(self).__doc__ or "").strip().splitlines()
        return lines[0].strip() if lines else ""

    def prunes_at(self, level: int) -> bool:
        return self.one_shot or level > 0

    def optimizer_and_schedule(self, level: int, config: Mapping[str, Any],
                               build: Callable[..., Tuple[Any, Any]]) -> Tuple[Any, Any]:
        return build()

    def reset(self, level: int, run: LevelRun) -> Tuple[int, int]:
        """Set the level's starting weights; -> (first epoch, batches of it already done)."""
        return 0, 0

    def check(self, c: Mapping[str, Any]) -> Optional[str]:
        return None

    def mask_rule(self, *, select: Callable[[float], Any], target_density: Optional[float], seed: int,
                  drop_fraction: float) -> Optional[sparse_training.MaskRule]:
        """How the masks change during training (``updates_masks``), or None: ``select(density)``
        gives the structure's masks of the run's criterion and allocation at a density."""
        return None

    def training_cost_epochs(self, level: int, epochs: int, rewind_epoch: float) -> float:
        """Epochs of training spent to produce level ``level``'s network, every earlier level
        included: ``epochs`` per level (``training.epochs``), so (level + 1) x epochs.
        ``rewind_epoch``: where a rewinding type restarts (fractional for a rewind iteration)."""
        return (level + 1) * epochs


class IMP(TrainingType):
    name = "imp"
    resets_to_init = True
    description = "weights reset to the initial ones (masked); fresh optimizer; schedule from 0"

    def reset(self, level, run):
        if level > 0:
            restore_state(run.init_state, run)
        return 0, 0


class WeightRewinding(TrainingType):
    name = "wr"
    captures_rewind = True
    description = ("weights, optimizer state and schedule position restored to level 0's rewind point; "
                   "the rest of the epochs trained")

    def reset(self, level, run):
        if level == 0:
            return 0, 0
        restore_state(run.rewind_state, run, optimizer=True)
        return run.rewind_at.epoch, run.rewind_at.batch

    def training_cost_epochs(self, level, epochs, rewind_epoch):
        """Level 0 in full, then each later level from the rewind point: E + L x (E - rewind epoch)."""
        return epochs + level * (epochs - rewind_epoch)

    def check(self, c):
        if c["prune.rewind_epoch"] >= c["training.epochs"]:
            return (f"prune.rewind_epoch={c['prune.rewind_epoch']} must be less than "
                    f"training.epochs={c['training.epochs']}")
        return None


class LearningRateRewinding(TrainingType):
    name = "lrr"
    description = "trained weights kept (masked); fresh optimizer; schedule from 0"


class FineTuning(TrainingType):
    """Renda et al. 2020's fine-tuning baseline: after pruning, the trained weights are kept
    (masked) and trained for the level's epochs at ONE constant learning rate, the original
    schedule's final rate (the rate of its last step: ``schedulers.final_lr_factor``), or
    ``prune.finetune_lr`` when set; no warmup; a fresh optimizer (momentum from 0).  Level 0
    trains with the config's schedule.  A resumed fine-tuning level is given the same optimizer
    and schedule by this method (the harness asks it on resume too), so it keeps its rate."""
    name = "finetune"
    fine_tunes = True
    description = ("trained weights kept (masked); later levels at a constant LR, the schedule's final rate or "
                   "prune.finetune_lr (Renda et al. 2020)")

    def optimizer_and_schedule(self, level, config, build):
        if level == 0:
            return build()
        rate = config["prune.finetune_lr"]
        if rate is None:
            rate = build()[1].final_lr  # the config's own schedule says where it ends
        return build({"optimizer.lr": rate, "schedule.name": "constant", "schedule.warmup_epochs": 0.0})

    def training_cost_epochs(self, level, epochs, rewind_epoch):
        """E + L x E_ft, E_ft the fine-tuning epochs of a level: training.epochs, as every level's."""
        finetune_epochs = epochs
        return epochs + level * finetune_epochs


class AtInit(TrainingType):
    name = "at_init"
    one_shot = True
    description = "pruned once before training, to prune.target_density; trained once"
    # (the target density itself is the level plan's rule: utils/training/level_plan.py, which
    # knows when the structure fixes it, as N:M does)

    def training_cost_epochs(self, level, epochs, rewind_epoch):
        """Trained once: E."""
        return epochs

    def check(self, c):
        if c["prune.levels"] not in (None, 1):
            return (f"prune.levels={c['prune.levels']} contradicts prune.training_type={self.name}, which trains once "
                    f"(leave levels unset or 1)")
        return None


class SparseTraining(AtInit):
    """The base of the types whose masks change during training (docs/design.md, "Sparse training"):
    one level at prune.target_density, trained once."""
    updates_masks = True

    def check(self, c):
        refusal = super().check(c)
        if refusal:
            return refusal
        if c["prune.update_start"] >= c["prune.update_end"]:
            return (f"prune.update_start={c['prune.update_start']} must be less than prune.update_end="
                    f"{c['prune.update_end']} (the mask-update window, fractions of the run's steps)")
        if c["analysis.stability"]:
            return (f"analysis.stability=true contradicts prune.training_type={self.name}: its second copy "
                    f"would train fixed masks while the first one's change")
        return None

    def training_cost_epochs(self, level: int, epochs: int, rewind_epoch: int) -> float:
        """Epochs of training that produced this run's point: it trains once, E epochs."""
        return float(epochs)


class GradualMagnitudePruning(SparseTraining):
    name = "gmp"
    description = ("one run from dense: the kept count follows Zhu & Gupta's cubic schedule down to "
                   "prune.target_density between prune.update_start and prune.update_end")

    def prunes_at(self, level):
        return False   # level 0 starts dense; the masks shrink during training

    def mask_rule(self, *, select, target_density, seed, drop_fraction):
        return sparse_training.GradualPruning(select, target_density)


class RigL(SparseTraining):
    name = "rigl"
    description = ("pruned before training to prune.target_density (erk + random by default); every "
                   "prune.update_every steps each layer drops its smallest |w| and grows the largest |gradient|")
    config_defaults = {"prune.allocation": "erk", "prune.criterion": "random", "prune.update_start": 0.0}

    def mask_rule(self, *, select, target_density, seed, drop_fraction):
        return sparse_training.DropAndGrow(by_gradient=True, seed=seed, fraction=drop_fraction)


class SET(SparseTraining):
    name = "set"
    description = ("pruned before training to prune.target_density (erk + random by default); every "
                   "prune.update_every steps each layer drops its smallest |w| and grows as many at random")
    config_defaults = {"prune.allocation": "erk", "prune.criterion": "random", "prune.update_start": 0.0}

    def mask_rule(self, *, select, target_density, seed, drop_fraction):
        return sparse_training.DropAndGrow(by_gradient=False, seed=seed, fraction=drop_fraction)


class TrainingTypeError(ValueError):
    """An unknown training type or a user's type that is not one; one line."""


def _described(kind: TrainingType, origin: str) -> TrainingType:
    """``kind``, refused in one line when it cannot say what it does (``describe``)."""
    if not kind.describe():
        raise TrainingTypeError(f"{origin} has no description: give {type(kind).__name__} a class docstring or "
                                f"description = \"...\" (one line; docs/extending.md)")
    return kind


TRAINING_TYPES: Dict[str, TrainingType] = {t.name: _described(t, f"training type {t.name!r}")
                                           for t in (IMP(), WeightRewinding(), LearningRateRewinding(), FineTuning(),
                                                     AtInit(), GradualMagnitudePruning(), RigL(), SET())}


def get_training_type(name: str) -> TrainingType:
    """The registered type ``name``, or a user's ``package.module:Name``."""
    obj = lookup_or_import(TRAINING_TYPES, "training type", name, TrainingTypeError)
    if isinstance(obj, type) and issubclass(obj, TrainingType):
        obj = obj()
    if not isinstance(obj, TrainingType):
        raise TrainingTypeError(f"{name} is a {type(obj).__name__}, not a utils.training.training_types.TrainingType "
                                f"(subclass it: docs/extending.md)")
    return _described(obj, name)
