"""The level plan: which levels a run trains, which of them prune, and each level's target.

One object per run, built once from its prune settings (``plan_of_config``), and asked by
everything that needs to know a run's levels: the harness's level loop, a control reading its
source's plan, the report counting a run's levels, the sweep's dry run describing them.

* Levels: an iterative run has the levels of ``utils.pruning.schedules.iterative_densities``
  (``prune.levels``, or down to ``prune.target_density``); a one-shot training type (at_init)
  has one level, pruned to ``prune.target_density``.
* Which prune: the training type says (``TrainingType.prunes_at``: every level after 0; at_init:
  its one level).  A control takes its source's masks at every level, level 0 included
  (``LevelPlan.for_control``), and has at most its source's levels.
* Targets: the structure turns the densities into what its masks take
  (``Structure.level_targets``: a density, per-layer counts, a count per N:M group) and the
  density of all prunable weights each target gives (``levels.csv``'s ``target_density``).
  Without the layers' shapes (a report) a density that needs them is None; the count of levels
  never does.
* Going deeper (``deepening``): a config that differs from a run's only in ``DEPTH_KEYS``
  continues that run when the run's plan is the start of the new one, level for level
  (``LevelPlan.extends``); the run directory's decision and the checkpoint check ask this one
  rule (through the harness, which knows the defaults and a control's source).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Collection, List, Mapping, Optional, Tuple

from utils.pruning.schedules import iterative_densities
from utils.pruning.settings import PruneSettings, SettingsError
from utils.pruning.structures import StructureRegistryError, get_structure
from utils.pruning.structures.base import Shapes, Structure
from utils.training.training_types import TrainingType, TrainingTypeError, get_training_type


# The keys whose change can only lengthen (or shorten) a run's list of levels: a run's levels
# so far do not depend on them except through the plan, which ``deepening`` compares.
DEPTH_KEYS = frozenset({"prune.levels", "prune.target_density"})


class PlanError(ValueError):
    """A run's levels cannot be planned (a user's training type or structure that cannot be
    imported here, settings that name no levels); one line."""


@dataclass(frozen=True)
class Level:
    index: int
    target_density: Optional[float]   # kept / all prunable weights (None: needs the model's shapes)
    target: Any                        # what the structure's masks take for this level
    prunes: bool                       # the level starts by setting new masks


@dataclass(frozen=True)
class LevelPlan:
    levels: Tuple[Level, ...]
    start_line: Optional[str] = None   # what the structure says of the plan at the run's start

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, level: int) -> Level:
        return self.levels[level]

    @property
    def densities(self) -> List[Optional[float]]:
        """Target density of every level (levels.csv ``target_density``)."""
        return [level.target_density for level in self.levels]

    def prunes_at(self, level: int) -> bool:
        return self.levels[level].prunes

    def target(self, level: int) -> Any:
        return self.levels[level].target

    def extends(self, earlier: "LevelPlan") -> bool:
        """Whether ``earlier``'s levels are this plan's first levels, each identical (index,
        target density, target, whether it prunes): a run of ``earlier`` goes on into this one."""
        return len(self.levels) >= len(earlier.levels) and self.levels[:len(earlier.levels)] == earlier.levels

    def for_control(self, levels: Optional[int]) -> "LevelPlan":
        """A control's plan of this (source's) plan: its first ``levels`` levels (all when None),
        every one taking the source's masks."""
        count = len(self.levels) if levels is None else min(int(levels), len(self.levels))
        return LevelPlan(tuple(replace(level, prunes=True) for level in self.levels[:count]), self.start_line)


def plan_levels(settings: PruneSettings, training_type: TrainingType, structure: Structure,
                shapes: Optional[Shapes] = None) -> LevelPlan:
    """The plan of a run that prunes by itself (a control's: its source's, ``for_control``).
    ValueError (one line) for settings that name no levels or that the structure refuses."""
    if training_type.one_shot:
        if settings.target_density is None and not structure.fixes_densities:
            raise ValueError(f"prune.training_type={settings.training_type} needs prune.target_density in (0, 1]")
        densities: List[Optional[float]] = [settings.target_density]
    else:
        if settings.levels is None and settings.target_density is None:
            raise ValueError(f"prune.training_type={settings.training_type} needs prune.levels (>= 1) or "
                             f"prune.target_density (in (0, 1])")
        densities = iterative_densities(settings.rate, levels=settings.levels, target_density=settings.target_density)
    targets = structure.level_targets(densities, shapes, training_type.one_shot)
    levels = tuple(Level(index, density, target, training_type.prunes_at(index))
                   for index, (density, target) in enumerate(targets))
    return LevelPlan(levels, structure.start_line() if shapes is not None else None)


def parts_of(config: Mapping[str, Any], defaults: Optional[Mapping[str, Any]] = None
             ) -> Tuple[PruneSettings, TrainingType, Structure]:
    """(prune settings, training type, structure instance) of a config; PlanError (one line)
    for a training type or structure that cannot be had here."""
    try:
        settings = PruneSettings.from_config(config, defaults)
        training_type = get_training_type(settings.training_type)
        structure = get_structure(settings.structure)(settings)
    except (SettingsError, TrainingTypeError, StructureRegistryError) as error:
        raise PlanError(str(error)) from None
    return settings, training_type, structure


def plan_of_config(config: Mapping[str, Any], defaults: Optional[Mapping[str, Any]] = None,
                   shapes: Optional[Shapes] = None) -> LevelPlan:
    """The plan of a run that prunes by itself, from its config (dotted keys; a key it lacks
    counts as its default).  PlanError (one line) when it cannot be built."""
    settings, training_type, structure = parts_of(config, defaults)
    try:
        return plan_levels(settings, training_type, structure, shapes)
    except ValueError as error:
        raise PlanError(str(error)) from None


def deepening(differing: Collection[str], plans: Callable[[], Tuple[LevelPlan, LevelPlan]]) -> Optional[int]:
    """The number of levels of a run of a new config in a directory holding a run of another
    (``differing``: the keys in which they differ in what they compute), when the new config is
    that run's or goes deeper: every differing key is one of ``DEPTH_KEYS`` and the run's plan
    is the start of the new one (``LevelPlan.extends``).  None: another run (a plan that cannot
    be built counts as not the start).  ``plans``: () -> (the run's plan, the new config's plan),
    asked only when the keys allow it."""
    if not set(differing) <= DEPTH_KEYS:
        return None
    try:
        stored, new = plans()
    except (PlanError, ValueError):
        return None
    if differing and not new.extends(stored):
        return None
    return len(new)
