"""Allocations: how many weights each layer keeps (registry ``ALLOCATIONS``; ``prune.allocation``).


``global``     one ranking of all prunable weights together; keep the top
               round(density * N).
``uniform``    every layer the same density: layer l's share is density * numel_l.
``erk``        Erdos-Renyi-Kernel (Evci et al. 2020, RigL): layer l's density is
               eps * sum(shape_l) / prod(shape_l) (kernel dims included for conv; for a
               linear layer (n_in + n_out) / (n_in * n_out)), eps solved so the kept total is
               the target.
``balanced``   every layer keeps the same number of weights k.

For the three per-layer rules the real-valued shares are share_l = t * w_l (w_l = numel_l,
sum(shape_l), 1 respectively) with one scale t for all layers.  A layer whose share
would exceed its capacity (weights alive now: the whole layer when dense, less after
earlier levels, because masks only shrink) keeps all it has, and t is re-solved over the
remaining layers, repeatedly (water-filling; for ERK on dense masks this is RigL's
"make the densest layer dense and re-solve eps" loop, and it ends at the same set of dense
layers because t only grows as layers are capped).  The real shares are turned into
integer counts by largest-remainder apportionment: every layer gets floor(share_l), and
the weights still missing to reach the exact total go one each to the layers with the
largest fractional parts (ties: earlier layer in module order first), never above a
layer's capacity.  So every layer is within one weight of its exact share, and the total
is exact.  (For ``uniform`` this can differ from rounding each layer separately by one
weight in some layers; per-layer rounding alone would miss the total.)  For ``balanced``
all fractional parts are equal, so the remainder goes to the first layers in module order."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Tuple

import torch

from utils.core.registry import lookup
from utils.models.mask_layers import Masks
from utils.pruning.criteria import Scores
from utils.pruning.topk import keep_top_k_alive

# --------------------------------------------------------------------------------------
# Allocations
# --------------------------------------------------------------------------------------

# A layer-share rule gives each layer a positive weight w_l; layer l's share is t * w_l.
LayerShareRule = Callable[[Mapping[str, int], Mapping[str, Tuple[int, ...]]], Dict[str, float]]


def uniform_shares(numels, shapes) -> Dict[str, float]:
    return {name: float(numels[name]) for name in numels}


def erk_densities_unscaled(shapes) -> Dict[str, float]:
    """RigL's raw ERK density per layer: sum(shape) / prod(shape) (before the scale eps)."""
    return {name: sum(shape) / math.prod(shape) for name, shape in shapes.items()}


def erk_shares(numels, shapes) -> Dict[str, float]:
    raw = erk_densities_unscaled(shapes)
    return {name: raw[name] * numels[name] for name in numels}


def balanced_shares(numels, shapes) -> Dict[str, float]:
    return {name: 1.0 for name in numels}


LAYER_SHARE_RULES: Dict[str, LayerShareRule] = {
    "uniform": uniform_shares,
    "erk": erk_shares,
    "balanced": balanced_shares,
}


def _water_fill(weights: Mapping[str, float], capacities: Mapping[str, int], total_keep: int) -> Dict[str, float]:
    """Real shares min(capacity_l, t * w_l) summing to total_keep (cap, re-solve, repeat)."""
    capped: set = set()
    scale = 0.0
    while True:
        free = [name for name in weights if name not in capped]
        budget = total_keep - sum(capacities[name] for name in capped)
        weight_sum = sum(weights[name] for name in free)
        scale = budget / weight_sum if weight_sum > 0 else 0.0
        newly_capped = [name for name in free if scale * weights[name] >= capacities[name]]
        if not newly_capped:
            break
        capped.update(newly_capped)
    return {name: float(capacities[name]) if name in capped else scale * weights[name] for name in weights}


def _apportion(shares: Mapping[str, float], capacities: Mapping[str, int], total_keep: int) -> Dict[str, int]:
    """Integer counts: floor of each share, then the remainder by largest fractional part."""
    names = list(shares)
    counts = {name: min(capacities[name], max(0, math.floor(shares[name]))) for name in names}
    order = sorted(names, key=lambda name: (-(shares[name] - math.floor(shares[name])), names.index(name)))
    missing = total_keep - sum(counts.values())
    # One pass suffices in exact arithmetic (0 <= missing < number of layers); the loop only
    # guards against floating-point error in the shares.
    while missing != 0:
        step = 1 if missing > 0 else -1
        candidates = order if step > 0 else reversed(order)
        progressed = False
        for name in candidates:
            if missing == 0:
                break
            if 0 <= counts[name] + step <= capacities[name]:
                counts[name] += step
                missing -= step
                progressed = True
        if not progressed:
            raise ValueError(f"cannot place {total_keep} weights in layers holding {sum(capacities.values())}")
    return counts


def layer_keep_counts(allocation: str, capacities: Mapping[str, int], numels: Mapping[str, int],
                      shapes: Mapping[str, Tuple[int, ...]], total_keep: int) -> Dict[str, int]:
    """Weights each layer keeps under a per-layer allocation, summing exactly to ``total_keep``.

    ``capacities``: weights alive now per layer (a count never exceeds it); ``numels`` and
    ``shapes``: of each layer's weight.  ``global`` has no per-layer rule (its counts follow
    the scores).
    """
    rule = lookup(LAYER_SHARE_RULES, "per-layer allocation", allocation)
    if set(capacities) != set(numels) or set(numels) != set(shapes):
        raise ValueError("layer_keep_counts: capacities, numels and shapes must name the same layers")
    available = sum(capacities.values())
    if not 0 <= total_keep <= available:
        raise ValueError(f"cannot keep {total_keep} weights: {available} are alive")
    shares = _water_fill(rule(numels, shapes), capacities, total_keep)
    return _apportion(shares, capacities, total_keep)


def allocate_counts(scores: Scores, masks: Masks, counts: Mapping[str, int]) -> Masks:
    """Each layer keeps exactly ``counts[layer]`` of its alive weights, by top score."""
    return {name: keep_top_k_alive(scores[name], masks[name], counts[name]) for name in masks}


def _layer_count_schedule(alive: Mapping[str, int], targets: Mapping[str, int], rounds: int) -> List[Dict[str, int]]:
    """Per-layer counts of SynFlow's rounds: layer l follows alive_l * (target_l / alive_l) ** (k / K)
    (each layer's own exponential schedule), rounded; the last round is the target exactly."""
    schedule = []
    for k in range(1, rounds + 1):
        counts = {}
        for name, target in targets.items():
            if k == rounds or alive[name] == 0 or target == 0:
                counts[name] = target if k == rounds or target == 0 else alive[name]
            else:
                counts[name] = max(target, min(alive[name], round(alive[name] * (target / alive[name]) ** (k / rounds))))
        schedule.append(counts)
    return schedule


# An allocation turns (scores with -inf at pruned weights, current masks, total to keep)
# into new masks, a subset of the current ones with exactly total_keep weights.
AllocationFn = Callable[[Scores, Masks, int], Masks]


def allocate_global(scores: Scores, masks: Masks, total_keep: int) -> Masks:
    names = list(masks)
    flat_scores = torch.cat([scores[name].reshape(-1) for name in names])
    flat_alive = torch.cat([masks[name].reshape(-1) for name in names])
    flat_keep = keep_top_k_alive(flat_scores, flat_alive, total_keep)
    pieces = flat_keep.split([masks[name].numel() for name in names])
    return {name: piece.view(masks[name].shape) for name, piece in zip(names, pieces)}


def _per_layer_allocation(rule_name: str) -> AllocationFn:
    def allocate(scores: Scores, masks: Masks, total_keep: int) -> Masks:
        counts = layer_keep_counts(
            rule_name,
            capacities={name: int(mask.count_nonzero()) for name, mask in masks.items()},
            numels={name: mask.numel() for name, mask in masks.items()},
            shapes={name: tuple(mask.shape) for name, mask in masks.items()},
            total_keep=total_keep,
        )
        return {name: keep_top_k_alive(scores[name], masks[name], counts[name]) for name in masks}

    allocate.__name__ = f"allocate_{rule_name}"
    return allocate


ALLOCATIONS: Dict[str, AllocationFn] = {
    "global": allocate_global,
    **{name: _per_layer_allocation(name) for name in LAYER_SHARE_RULES},
}


def get_allocation(name: str) -> AllocationFn:
    return lookup(ALLOCATIONS, "allocation", name)


