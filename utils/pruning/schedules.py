"""Density schedules: what a level keeps.

* ``target_keep_count(density, N) = round(density * N)`` (Python ``round``): the exact count
  kept at a density; ``density`` is always a fraction of ALL prunable weights, never of the
  remaining ones.
* Level L of an iterative run removing ``rate`` per level keeps (1 - rate) ** L
  (``iterative_densities``); SynFlow's rounds follow an exponential schedule
  (``synflow_density_schedule``).
* Per-layer rates (``prune.layer_rates``): layer l keeps round((1 - rate_l) ** L * numel_l)
  at level L (``layer_rate_plan``)."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from utils.models.mask_layers import masked_layers

# Densities and counts
# --------------------------------------------------------------------------------------


def target_keep_count(density: float, total: int) -> int:
    """Number of weights kept at ``density`` out of ``total``: the target rounded (``round``)."""
    return int(round(density * total))


def level_density(level: int, rate: float) -> float:
    """Target density of level ``level`` of an iterative run removing ``rate`` per level."""
    if level < 0:
        raise ValueError(f"level must be >= 0, got {level}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    return (1.0 - rate) ** level


# Relative slack when comparing a level's density with target_density: 0.8 ** 3 is
# 0.5120000000000001 in floating point and must count as reaching a target of 0.512.
_DENSITY_RELATIVE_TOLERANCE = 1e-9


def iterative_densities(rate: float, levels: Optional[int] = None,
                        target_density: Optional[float] = None) -> List[float]:
    """Target densities of levels 0, 1, ... (level 0 is dense, 1.0).

    ``levels``: that many levels (level 0 included).  ``target_density``: stop at the first
    level whose density is at or below it.  Both: whichever comes first.
    """
    if levels is None and target_density is None:
        raise ValueError("iterative_densities needs levels or target_density")
    if levels is not None and levels < 1:
        raise ValueError(f"levels must be >= 1 (level 0 is the dense level), got {levels}")
    if target_density is not None:
        if not 0.0 < target_density <= 1.0:
            raise ValueError(f"target_density must be in (0, 1], got {target_density}")
        if rate <= 0.0 and target_density < 1.0:
            raise ValueError(f"rate {rate} never reaches target_density {target_density}")
    densities: List[float] = []
    for level in itertools.count():
        if levels is not None and level >= levels:
            break
        density = level_density(level, rate)
        densities.append(density)
        if target_density is not None and density <= target_density * (1 + _DENSITY_RELATIVE_TOLERANCE):
            break
    return densities


def synflow_density_schedule(start: float, target: float, iterations: int) -> List[float]:
    """Densities of SynFlow's rounds 1..K: start * (target / start) ** (k / K); the last is target."""
    if iterations < 1:
        raise ValueError(f"synflow iterations must be >= 1, got {iterations}")
    if not 0.0 < target <= start <= 1.0:
        raise ValueError(f"synflow schedule needs 0 < target <= start <= 1, got start={start}, target={target}")
    schedule = [start * (target / start) ** (k / iterations) for k in range(1, iterations + 1)]
    schedule[-1] = target  # exact, not start * (target/start) ** 1.0 with its rounding error
    return schedule


# --------------------------------------------------------------------------------------
# Per-layer pruning rates (Frankle & Carbin 2019 prune conv layers at one rate, fully
# connected layers at another and the output layer at half the fully connected rate)
# --------------------------------------------------------------------------------------


def parse_layer_rates(items: Sequence[str]) -> List[Tuple[str, float]]:
    """``["fc*=0.2", "conv*=0.1"]`` -> ``[("fc*", 0.2), ("conv*", 0.1)]``, in the order given.

    A pattern is an fnmatch pattern of layer names (as ``prune.exclude``); a rate is the
    fraction of the layer's remaining weights removed per level, in [0, 1).  ValueError
    (one line, naming the item) otherwise, and for a pattern given twice.
    """
    if isinstance(items, str):
        items = [items]
    rules: List[Tuple[str, float]] = []
    for item in items:
        if not isinstance(item, str) or item.count("=") != 1:
            raise ValueError(f"layer rate {item!r} is not of the form pattern=rate")
        pattern, raw_rate = (part.strip() for part in item.split("="))
        try:
            rate = float(raw_rate)
        except ValueError:
            raise ValueError(f"layer rate {item!r}: {raw_rate!r} is not a number") from None
        if not pattern:
            raise ValueError(f"layer rate {item!r} has an empty layer-name pattern")
        if not 0.0 <= rate < 1.0:  # also refuses nan
            raise ValueError(f"layer rate {item!r}: the rate must be in [0, 1)")
        if pattern in (known for known, _ in rules):
            raise ValueError(f"layer rate pattern {pattern!r} is given twice")
        rules.append((pattern, rate))
    return rules


def rates_by_layer(layer_names: Sequence[str], rules: Sequence[Tuple[str, float]],
                   default_rate: float) -> Dict[str, float]:
    """Each layer's rate: the FIRST rule whose pattern matches its name, else ``default_rate``
    (``prune.rate``).  A pattern that matches no prunable layer is refused (ValueError): a
    typo must not silently leave the layers it meant at the default rate."""
    import fnmatch

    rates = {}
    for name in layer_names:
        rates[name] = next((rate for pattern, rate in rules if fnmatch.fnmatchcase(name, pattern)), default_rate)
    unused = [pattern for pattern, _ in rules if not any(fnmatch.fnmatchcase(n, pattern) for n in layer_names)]
    if unused:
        shown = ", ".join(list(layer_names)[:8]) + (", ..." if len(layer_names) > 8 else "")
        raise ValueError(f"layer rate pattern(s) {unused} match no prunable layer (layers: {shown})")
    return rates


def layer_rate_counts(numels: Mapping[str, int], rates: Mapping[str, float], level: int) -> Dict[str, int]:
    """Weights layer l keeps at ``level``: round((1 - rate_l) ** level * numel_l) (``round``).

    Non-increasing in ``level`` for every layer, so the masks of successive levels nest.
    """
    return {name: target_keep_count(level_density(level, rates[name]), numels[name]) for name in numels}


@dataclasses.dataclass(frozen=True)
class LayerRatePlan:
    """Per-layer rates of a run and what they give at each level."""

    rates: Dict[str, float]            # layer -> rate
    counts: List[Dict[str, int]]       # counts[L][layer]: weights kept at level L
    densities: List[float]             # densities[L]: kept / all prunable weights at level L (target_density)


def layer_rate_plan(model: nn.Module, layer_rates: Sequence[str], default_rate: float, levels: int) -> LayerRatePlan:
    """Levels 0 .. levels-1 of an iterative run with ``prune.layer_rates`` on ``model``
    (prepared: its masked layers are the prunable ones).  ValueError (one line) for bad rules."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    numels = {name: layer.weight.numel() for name, layer in masked_layers(model)}
    rates = rates_by_layer(list(numels), parse_layer_rates(layer_rates), default_rate)
    counts = [layer_rate_counts(numels, rates, level) for level in range(levels)]
    total = sum(numels.values())
    return LayerRatePlan(rates=rates, counts=counts, densities=[sum(c.values()) / total for c in counts])


