"""The pruning structure: the unit a mask keeps or drops, as one extension point.

A structure (``prune.structure``) is a ``Structure`` subclass; the registry
(``utils.pruning.structures``) holds the built-in ones (unstructured, channel, nm) and takes a
user's ``package.module:Name``.  A run makes one instance from its prune settings
(``Structure(settings)``) and asks it, never its name:

* before anything runs -- which criteria it takes (``accepts``: a criterion declares whether it
  scores weights or channels), which training types (``accepts_training``: a type that changes
  single weights' masks during training, as rigl does, needs a structure that says it can), which
  allocations (``allocations``), and the rest of its
  refusals (``refusal``: one line, or None); whether a control of a source made with another
  structure can train that source's masks (``control_refusal``);
* the plan of the run's levels -- each level's target density and the target its ``masks``
  takes (``level_targets``: a density, per-layer counts, a count per N:M group, ...) and the
  line the run prints at its start (``start_line``);
* during the run -- set-up on the prepared model (``attach``), the masks of a level from a
  criterion's scores (``masks``), the shuffle control's masks (``shuffle``: the same count of
  kept units, at random positions, successive levels nested), the callbacks it adds (zeroing
  dead channels, extra ``levels.csv``/``layers.csv`` columns), the vector of kept units
  Early-Bird compares (``unit_vector``; None: the structure has no such units);
* in reports -- the words its runs are labelled with (``label``), its extra columns
  (``level_columns``, ``layer_columns``) and what its target density counts (``target_unit``);
  what ``python -m utils.compact`` can make of its masks (``compaction``).

Every structure's masks are the harness's ordinary weight masks (``utils.models.mask_layers``):
a subset of the current masks (masks only shrink), the same on every rank.  ``docs/extending.md``
adds one from an outside module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from utils.models.mask_layers import Masks
from utils.pruning.settings import PruneSettings

Shapes = Mapping[str, Tuple[int, ...]]   # prunable layer -> weight shape, in module order


@dataclass
class Scoring:
    """What a level's masks are scored with: the criterion and everything it may need.

    The harness and the pruning command fill it; a structure passes it on to
    ``utils.pruning.masks.compute_masks`` (``as_kwargs``) or reads the fields it needs."""

    criterion: str                       # a name of utils.pruning.criteria.SCORES or package.module:function
    allocation: Optional[str]            # how many each layer keeps (a structure may take its own)
    seed: int                            # the level's seed (utils.pruning.criteria.level_seed)
    device: Any = None                   # where scoring runs (default: the model's)
    batches: Optional[Iterable] = None   # training batches, for a criterion that needs them
    loss_fn: Optional[Callable] = None
    num_batches: int = 1
    synflow_iterations: int = 100        # rounds of an iterative criterion
    input_shape: Optional[Sequence[int]] = None
    criterion_options: Optional[Mapping[str, Any]] = None   # the criterion's own options (snip: snip_mode)

    def as_kwargs(self) -> dict:
        """The keyword arguments of ``compute_masks`` (target and allocation aside)."""
        return dict(criterion=self.criterion, batches=self.batches, loss_fn=self.loss_fn,
                    num_batches=self.num_batches, synflow_iterations=self.synflow_iterations,
                    input_shape=self.input_shape, seed=self.seed, device=self.device,
                    criterion_options=self.criterion_options)


class Structure:
    """The base of every pruning structure; see the module docstring for what each method answers."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""                   # one line, for --help and the docs
    level_columns: ClassVar[Tuple[str, ...]] = ()     # extra levels.csv columns its callbacks fill
    layer_columns: ClassVar[Tuple[str, ...]] = ()     # extra layers.csv columns its callbacks fill
    compaction: ClassVar[Optional[str]] = None        # "channels", "semi-structured": what utils.compact makes of it
    compares_units: ClassVar[bool] = False            # Early-Bird can compare its kept units (unit_vector)
    fixes_densities: ClassVar[bool] = False           # its settings fix every level's density (N:M's pattern)
    density_targets: ClassVar[bool] = True            # a level's target is a density (the pruning command's --density)
    setting_keys: ClassVar[Tuple[str, ...]] = ()      # config keys of its own (a report names them with it)
    target_unit: ClassVar[str] = "weight"             # what levels.csv's target_density is a density of: prunable
    #                                                   weights, or its own units ("channel"); the report's column names

    def __init__(self, settings: PruneSettings):
        self.settings = settings

    # ------------------------------------------------------------------ words
    def label(self) -> str:
        """What a report's label says of this structure ("" for plain unstructured weights)."""
        return self.name

    # ------------------------------------------------------------------ refusals
    def accepts(self, criterion: Any) -> bool:
        """Whether ``criterion`` (a ``utils.pruning.criteria.Criterion``) can score this structure's units."""
        return criterion.score is not None

    def accepts_training(self, training_type: Any) -> bool:
        """Whether ``training_type`` (a ``utils.training.training_types.TrainingType``) can train this
        structure's masks: by default not one whose masks change during training (``updates_masks``:
        gmp, rigl, set drop and grow single weights between optimizer steps)."""
        return not training_type.updates_masks

    def allocations(self) -> Optional[Tuple[str, ...]]:
        """The allocations it takes (None: every registered one)."""
        return None

    def refusal(self, one_shot: bool) -> Optional[str]:
        """A one-line refusal of prune settings this structure cannot honour, or None.
        ``one_shot``: the run's training type prunes once (at_init)."""
        return None

    def control_refusal(self, source: "Structure") -> Optional[str]:
        """None when a control with this structure can train the masks of a run made with
        ``source`` (by default: the same structure with the same label), else why not (a phrase
        that follows "prune.masks_from=DIR")."""
        if type(source) is type(self) and source.label() == self.label():
            return None
        return (f"was made with prune.structure={source.describe_setting()}, this run has "
                f"prune.structure={self.describe_setting()}: a control trains its source's masks with the "
                f"source's structure")

    def describe_setting(self) -> str:
        """How the settings name this structure in messages (nm adds its pattern)."""
        return self.settings.structure

    # ------------------------------------------------------------------ the plan
    def level_targets(self, densities: Sequence[float], shapes: Optional[Shapes],
                      one_shot: bool) -> List[Tuple[Optional[float], Any]]:
        """(target density -- of all prunable weights, or of the units ``target_unit`` names --, the
        target ``masks`` takes) of every level, given the iterative (or one-shot) densities of the
        run.  ``shapes`` may be None (a report counting levels): then a density that needs the model
        is None.  By default the density is the target."""
        return [(density, density) for density in densities]

    def start_line(self) -> Optional[str]:
        """A line the run prints at its start (after ``level_targets``), or None."""
        return None

    # ------------------------------------------------------------------ the run
    def attach(self, model: nn.Module, input_shape: Sequence[int], densities: Sequence[float]) -> None:
        """Set-up on the run's prepared model (before any training); ``densities``: the target
        densities of the levels this run prunes to itself (empty for a control).  Raise
        ValueError (one line) for what cannot be done."""

    def masks(self, model: nn.Module, target: Any, scoring: Scoring) -> Masks:
        """New masks (CPU bool, a subset of the model's current masks) for ``target``."""
        raise NotImplementedError(f"structure {self.name} does not compute masks")

    def shuffle(self, masks: Masks, seed: int) -> Masks:
        """The shuffle control: as many units kept as in ``masks``, at random positions drawn
        from ``seed``, the same priorities at every level (so successive levels nest)."""
        raise NotImplementedError(f"structure {self.name} has no shuffle control")

    def callbacks(self, model: nn.Module) -> List[Any]:
        """Callbacks the run adds for this structure (``utils.core.callbacks.Callback``)."""
        return []

    def unit_vector(self, model: nn.Module, target: Any, scoring: Scoring) -> Optional[torch.Tensor]:
        """A flat bool vector of the units ``target`` would keep now (Early-Bird compares these
        between epochs), or None when this structure has no units for it."""
        return None
