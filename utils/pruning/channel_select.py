"""Channel pruning, 3: which units a level keeps, and the weight masks that say so.

* Every group keeps its floor: ``max(1, ceil(min_fraction * size))`` units (a group with no
  channel left would cut the network, one with a sliver starves it; ``prune.min_channel_fraction``).
  ``global`` first gives each group its best alive units up to the floor, then ranks the rest;
  ``uniform`` raises a group below its floor, one unit at a time from the group with the most
  units above its own.  A density that keeps fewer units than the floors need is refused
  (``check_channel_densities`` before a run, ``select_units`` at pruning).

Allocations: ``global`` ranks all units together (ties: the lower relative position index / size,
so equal scores give every group the same fraction; then structure order);
``uniform`` gives every group the same fraction of its units (largest-remainder
apportionment, ``utils.pruning.allocations.layer_keep_counts``), picked by score within the group.

* The masks are the harness's ordinary weight masks (``utils.models.mask_layers``): a pruned unit
  zeroes the rows (output channels) of every layer producing it and the columns (input
  channels) of every layer consuming it, so ``layers.csv`` weight densities are what a
  compacted network really holds.  BatchNorm scale and shift of pruned channels and the
  biases of the producing layers are not masked weights: (``utils.pruning.channel_zeroing``)."""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from utils.models.mask_layers import Masks, masked_layers, validate_masks
from utils.pruning.allocations import layer_keep_counts
from utils.pruning.channel_graph import CHANNEL_ALLOCATIONS, ChannelKeep, ChannelStructure, StructureError
from utils.pruning.channel_scores import DEFAULT_CHANNEL_NORMALIZER, channel_scores
from utils.pruning.schedules import target_keep_count


# ------------------------------------------------------------------------- masks <-> units
def units_alive(structure: ChannelStructure, masks: Masks) -> ChannelKeep:
    """group name -> bool per unit: alive when some producing layer still has a weight in that channel."""
    alive = {}
    for group in structure.groups:
        count = torch.zeros(group.size, dtype=torch.long)
        for member in group.producers:
            if member.layer in masks:
                rows = masks[member.layer].to("cpu").flatten(1).any(1)
                count.index_add_(0, member.unit, rows[member.index].long())
            else:  # an unmasked producer never appears in a prunable group; treat as alive
                count += 1
        alive[group.name] = count > 0
    return alive


def channel_density(structure: ChannelStructure, masks: Masks) -> float:
    """Fraction of the prunable units alive in ``masks``."""
    alive = units_alive(structure, masks)
    return sum(int(a.sum()) for a in alive.values()) / structure.total_units


def masks_for_units(structure: ChannelStructure, keep: ChannelKeep, masks: Masks) -> Masks:
    """``masks`` (copied) with the rows of every producer and the columns of every consumer of
    each unit not in ``keep`` set False."""
    out = {name: mask.to("cpu", dtype=torch.bool, copy=True) for name, mask in masks.items()}
    for group in structure.groups:
        dead = ~keep[group.name].to("cpu")
        if not bool(dead.any()):
            continue
        for member in group.producers:
            if member.layer in out:
                out[member.layer][member.index[dead[member.unit]]] = False
        for member in group.consumers:
            if member.layer in out:
                out[member.layer][:, member.index[dead[member.unit]]] = False
    return out


def channel_floors(structure: ChannelStructure, min_fraction: float) -> Dict[str, int]:
    """Units each group keeps at least: ceil(min_fraction * size), and never fewer than 1."""
    if not 0.0 <= min_fraction <= 1.0:
        raise StructureError(f"min_channel_fraction must be in [0, 1], got {min_fraction}")
    # the 1e-9 keeps 0.25 * 16 = 4.000000000000001 from becoming 5
    return {g.name: max(1, math.ceil(min_fraction * g.size - 1e-9)) for g in structure.groups}


def lowest_channel_density(structure: ChannelStructure, min_fraction: float) -> float:
    """The smallest channel density whose kept count leaves every group its floor."""
    return sum(channel_floors(structure, min_fraction).values()) / structure.total_units


def check_channel_densities(structure: ChannelStructure, densities: Sequence[float], min_fraction: float) -> None:
    """Refuse (``StructureError``, one line) a plan with a density too low for the floors,
    before anything runs."""
    need = sum(channel_floors(structure, min_fraction).values())
    for level, density in enumerate(densities):
        keep = target_keep_count(density, structure.total_units)
        if keep < need:
            raise StructureError(
                f"channel density {density:.4g} (level {level}) keeps {keep} of {structure.total_units} channels, "
                f"fewer than the {need} that give each of the {len(structure.groups)} coupled groups its floor "
                f"(at least one channel, and prune.min_channel_fraction={min_fraction:g} of its channels); the "
                f"lowest density is {need / structure.total_units:.4g}: raise prune.target_density or lower "
                f"prune.min_channel_fraction")


def _top_units(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best candidate units of one group (ties: lower index)."""
    keep = torch.zeros_like(candidates)
    if k > 0:
        order = sorted(torch.nonzero(candidates).flatten().tolist(), key=lambda i: (-float(scores[i]), i))
        keep[order[:k]] = True
    return keep


def select_units(structure: ChannelStructure, scores: Mapping[str, torch.Tensor], alive: ChannelKeep,
                 keep_count: int, allocation: str, *, min_fraction: float = 0.0) -> ChannelKeep:
    """Exactly ``keep_count`` alive units, chosen by score, every group keeping its floor
    (``channel_floors``; a group with fewer alive units than its floor keeps them all).

    ``global``: each group first gets its ``floor`` best alive units; the rest are ranked
    together by score (ties: the unit at the lower relative position index / size, so equal
    scores spread evenly over groups; then structure order).  ``uniform``: every group keeps
    the same fraction (``uniform_unit_counts``), raised to its floor.  Compare scores across
    groups only on a common scale (``channel_scores(..., normalizer=)``)."""
    groups = structure.groups
    alive_count = {g.name: int(alive[g.name].sum()) for g in groups}
    alive_total = sum(alive_count.values())
    if keep_count > alive_total:
        raise StructureError(f"cannot keep {keep_count} channels: only {alive_total} are alive (masks only shrink)")
    for g in groups:
        if alive_count[g.name] == 0:
            raise StructureError(f"group {g.name} has no alive channel left")
    floors = {name: min(count, alive_count[name]) for name, count in channel_floors(structure, min_fraction).items()}
    if keep_count < sum(floors.values()):
        raise StructureError(
            f"keeping {keep_count} of {structure.total_units} channels leaves fewer than one channel per coupled "
            f"group, or less than min_channel_fraction={min_fraction:g} of one ({len(groups)} groups need "
            f"{sum(floors.values())}): density too low")
    masked_scores = {}
    for g in groups:
        s = torch.nan_to_num(scores[g.name].to("cpu", torch.float64).clone(), nan=-math.inf)
        s[~alive[g.name].to("cpu")] = -math.inf
        masked_scores[g.name] = s
    if allocation == "global":
        reserved = {g.name: _top_units(masked_scores[g.name], alive[g.name].to("cpu"), floors[g.name]) for g in groups}
        names = [g.name for g in groups]
        candidates = torch.cat([alive[n].to("cpu") & ~reserved[n] for n in names])
        flat_scores = torch.cat([masked_scores[n] for n in names]).numpy()
        relative = torch.cat([torch.arange(g.size, dtype=torch.float64) / g.size for g in groups]).numpy()
        position = np.arange(len(flat_scores))
        order = np.lexsort((position, relative, -flat_scores))  # last key sorts first
        order = order[candidates.numpy()[order]][:keep_count - sum(floors.values())]
        flat_keep = torch.zeros(len(flat_scores), dtype=torch.bool)
        flat_keep[torch.from_numpy(order)] = True
        extra = dict(zip(names, flat_keep.split([g.size for g in groups])))
        return {g.name: reserved[g.name] | extra[g.name] for g in groups}
    if allocation == "uniform":
        counts = uniform_unit_counts(structure, alive_count, keep_count, floors=floors)
        return {g.name: _top_units(masked_scores[g.name], alive[g.name].to("cpu"), counts[g.name]) for g in groups}
    raise StructureError(f"unknown channel allocation {allocation!r}; valid: {', '.join(CHANNEL_ALLOCATIONS)}")


def uniform_unit_counts(structure: ChannelStructure, capacities: Mapping[str, int], keep_count: int,
                        floors: Optional[Mapping[str, int]] = None) -> Dict[str, int]:
    """Units each group keeps under ``uniform``: density * size, apportioned by largest
    remainder to sum exactly to ``keep_count`` (``utils.pruning.allocations.layer_keep_counts``); a group
    below its floor (default 1) is raised to it, one unit at a time taken from the group with
    the most units above its own floor (the last such group in structure order)."""
    groups = structure.groups
    floors = floors or {g.name: 1 for g in groups}
    counts = layer_keep_counts("uniform", capacities=capacities, numels={g.name: g.size for g in groups},
                               shapes={g.name: (g.size,) for g in groups}, total_keep=keep_count)
    for g in groups:
        while counts[g.name] < floors[g.name]:
            donor = max(reversed(groups), key=lambda other: counts[other.name] - floors[other.name]).name
            counts[donor] -= 1
            counts[g.name] += 1
    return counts


def select_channels(model: nn.Module, structure: ChannelStructure, *, density: float, criterion: str,
                    allocation: str, masks: Optional[Masks] = None, seed: int = 0, min_fraction: float = 0.0,
                    normalizer: str = DEFAULT_CHANNEL_NORMALIZER) -> ChannelKeep:
    """The units kept at channel ``density`` (a fraction of ALL prunable units): scores from
    ``criterion``, each member's put on a common scale by ``normalizer`` over the alive units,
    chosen by ``allocation`` with every group keeping ``min_fraction`` of its units (>= 1)."""
    if not 0.0 < density <= 1.0:
        raise StructureError(f"density must be in (0, 1], got {density}")
    current = {name: layer.mask for name, layer in masked_layers(model)} if masks is None else masks
    alive = units_alive(structure, current)
    scores = channel_scores(model, structure, criterion, seed, normalizer=normalizer, alive=alive)
    return select_units(structure, scores, alive, target_keep_count(density, structure.total_units), allocation,
                        min_fraction=min_fraction)


def compute_channel_masks(model: nn.Module, structure: ChannelStructure, *, density: float, criterion: str,
                          allocation: str, masks: Optional[Masks] = None, seed: int = 0, min_fraction: float = 0.0,
                          normalizer: str = DEFAULT_CHANNEL_NORMALIZER) -> Masks:
    """Weight masks (CPU bool, a subset of ``masks`` / the model's masks) keeping exactly
    round(density * units) coupled channel units (``select_channels``).  The model is not modified."""
    current = get_current_masks(model) if masks is None else masks
    validate_masks(model, current)
    keep = select_channels(model, structure, density=density, criterion=criterion, allocation=allocation,
                           masks=current, seed=seed, min_fraction=min_fraction, normalizer=normalizer)
    return masks_for_units(structure, keep, current)


def shuffled_channel_masks(structure: ChannelStructure, masks: Masks, seed: int) -> Masks:
    """The random-pruning control (``prune.control=shuffle``) for channel masks: every group
    keeps as many units as in ``masks``, at random positions (CPU generator seeded with
    ``seed``, groups in structure order); weights outside the structure are as in ``masks``'
    all-True version, i.e. only the channel pattern is redrawn."""
    alive = units_alive(structure, masks)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    keep = {}
    for group in structure.groups:
        chosen = torch.randperm(group.size, generator=generator)[:int(alive[group.name].sum())]
        keep[group.name] = torch.zeros(group.size, dtype=torch.bool)
        keep[group.name][chosen] = True
    return masks_for_units(structure, keep, {name: torch.ones_like(mask, dtype=torch.bool) for name, mask in masks.items()})


def get_current_masks(model: nn.Module) -> Masks:
    return {name: layer.mask.detach().to("cpu") for name, layer in masked_layers(model)}


def keep_vector(keep: ChannelKeep, structure: ChannelStructure) -> torch.Tensor:
    """The units of ``keep`` as one flat bool vector, in structure order (Early-Bird's mask)."""
    return torch.cat([keep[g.name].to("cpu", torch.bool) for g in structure.groups])


def channels_alive(masks: Masks) -> Dict[str, Tuple[int, int]]:
    """layer name -> (output channels alive, output channels): a channel is alive while its
    weight row holds a kept weight.  Pure function of the masks (for ``layers.csv``)."""
    result = {}
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1).any(1)
        result[name] = (int(rows.sum()), int(mask.shape[0]))
    return result


