"""The prune section of a config as a typed view: what the pruning pieces may read of a config.

Only the harness layer reads a whole config.  The pieces below it that need the pruning
settings of a run -- a structure, the level plan, a control reading its source, the report
reading a finished run -- take a ``PruneSettings``, built from a config's ``prune.*`` keys
(``PruneSettings.from_config``).  A config written by an older version may lack keys: the
caller completes it with the harness's defaults first (``defaults=``), so a key missing from
an old ``config.yaml`` counts as its default everywhere.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple


class SettingsError(ValueError):
    """A config whose prune section lacks a key (and no default was given); one line."""


@dataclasses.dataclass(frozen=True)
class PruneSettings:
    """The ``prune.*`` keys a structure, the level plan, controls and reports read."""

    structure: str                   # unit of pruning: a name of utils.pruning.structures or package.module:Name
    criterion: str                   # what scores a weight (or a channel): utils.pruning.criteria
    allocation: str                  # how many each layer keeps: utils.pruning.allocations
    training_type: str               # what happens between levels: utils.training.training_types
    rate: float                      # fraction removed per level
    levels: Optional[int]            # levels in all (level 0 included), or None
    target_density: Optional[float]  # stop at (iterative) or prune once to (at_init) this density
    layer_rates: Tuple[str, ...]     # per-layer rates "pattern=rate"
    nm: str                          # N:M pattern "N:M" (structure nm)
    min_channel_fraction: float      # floor of a channel group (structure channel)
    score_batches: int               # batches a criterion that needs them scores on
    synflow_iterations: int          # rounds of an iterative criterion
    snip_mode: str                   # BatchNorm mode while snip scores
    masks_from: str                  # a control's source run directory ("" when not a control)
    control: str                     # none, reinit, shuffle

    @classmethod
    def from_config(cls, config: Mapping[str, Any], defaults: Optional[Mapping[str, Any]] = None) -> "PruneSettings":
        """The view of ``config`` (dotted keys); a key it lacks is taken from ``defaults``."""
        values = {}
        for field in dataclasses.fields(cls):
            key = f"prune.{field.name}"
            if key in config:
                value = config[key]
            elif defaults is not None and key in defaults:
                value = defaults[key]
            else:
                raise SettingsError(f"the config has no {key} (and no default was given)")
            if field.name == "layer_rates":
                value = tuple(value or ())
            values[field.name] = value
        return cls(**values)

    @property
    def is_control(self) -> bool:
        return bool(self.masks_from)
