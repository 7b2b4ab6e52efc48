"""Masks from scores: the one procedure, ``compute_masks``.

* Prunable weights are the ``weight`` of every masked layer (``utils.models.mask_layers``);
  excluded layers are not masked layers, so they are out of every count.
* ``compute_masks`` keeps exactly the target's count and its result is a subset of the
  current masks: weights already pruned score ``-inf`` and are never candidates, whatever
  their score or value.
* Three kinds of target, one procedure: a density shared by an allocation
  (``utils.pruning.allocations``), per-layer counts (``prune.layer_rates``) and N:M groups
  (``utils.pruning.nm``).  A pruning structure may give its own selection rounds
  (``compute_masks(..., rounds=...)``), so every criterion reaches it.

The model is never modified by scoring: snip and synflow run ``torch.func.functional_call``
on detached copies of the parameters and buffers, and train/eval flags are restored module
by module afterwards (``utils.pruning.criteria``).

Command line: ``python -m utils.pruning_utils --config FILE --checkpoint CKPT --density D
--out MASKS.pt`` (``utils/pruning/command.py``): a level's masks for a checkpoint, as the harness
computes them."""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from utils.models.mask_layers import Masks, masked_layers, set_masks, validate_masks
from utils.pruning import nm as nm_sparsity
from utils.pruning.allocations import AllocationFn, _layer_count_schedule, allocate_counts, get_allocation
from utils.pruning.criteria import Scores, ScoringInputs, get_criterion
from utils.pruning.schedules import synflow_density_schedule, target_keep_count

# --------------------------------------------------------------------------------------
# Masks from a model
# --------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


# One round of a mask computation: (the density it is announced with to ``on_round``, or None
# for the masks' own density; the selection: scores with -inf at pruned weights and the current
# masks -> the new masks, a subset of the current ones).
Round = Tuple[Optional[float], Callable[[Scores, Masks], Masks]]
# A structure's own selection: (current masks, weights alive per layer, the criterion's rounds or
# None) -> the rounds to run.
RoundsFn = Callable[[Masks, Mapping[str, int], Optional[int]], List[Round]]


def _density_rounds(current: Masks, alive_by_layer: Mapping[str, int], density: float, allocation: str,
                    rounds: Optional[int]) -> List[Round]:
    """A density of all prunable weights, shared among layers by ``allocation``."""
    allocate = get_allocation(allocation)
    total = sum(mask.numel() for mask in current.values())
    alive = sum(alive_by_layer.values())
    if not 0.0 < density <= 1.0:  # also refuses nan
        raise ValueError(f"density must be in (0, 1], got {density}")
    keep = target_keep_count(density, total)
    if keep > alive:
        raise ValueError(f"density {density} keeps {keep} of {total} weights but only {alive} are alive "
                         f"(density {alive / total:.6g}); masks only shrink")
    schedule = synflow_density_schedule(alive / total, density, rounds) if rounds is not None else [density]
    return [(round_density, functools.partial(_allocate_total, allocate, target_keep_count(round_density, total)))
            for round_density in schedule]


def _allocate_total(allocate: AllocationFn, total_keep: int, scores: Scores, masks: Masks) -> Masks:
    return allocate(scores, masks, total_keep)


def _layer_count_rounds(current: Masks, alive: Mapping[str, int], layer_counts: Mapping[str, int], allocation: str,
                        rounds: Optional[int]) -> List[Round]:
    """Per-layer counts (``prune.layer_rates``): a layer-wise allocation with the shares given."""
    if allocation != "uniform":
        raise ValueError(f"per-layer counts (prune.layer_rates) apply to allocation 'uniform' only, not {allocation!r}")
    if set(layer_counts) != set(current):
        raise ValueError(f"layer_counts must name exactly the prunable layers "
                         f"(missing {sorted(set(current) - set(layer_counts))[:3]}, "
                         f"unknown {sorted(set(layer_counts) - set(current))[:3]})")
    for name, count in layer_counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= alive[name]:
            raise ValueError(f"layer {name} cannot keep {count!r} weights: {alive[name]} are alive; masks only shrink")
    total = sum(mask.numel() for mask in current.values())
    schedule = _layer_count_schedule(alive, layer_counts, rounds) if rounds is not None else [dict(layer_counts)]
    return [(sum(counts.values()) / total, functools.partial(_allocate_layer_counts, counts)) for counts in schedule]


def _allocate_layer_counts(counts: Mapping[str, int], scores: Scores, masks: Masks) -> Masks:
    return allocate_counts(scores, masks, counts)


def _nm_rounds(current: Masks, nm: Tuple[int, int], allocation: Optional[str], rounds: Optional[int]) -> List[Round]:
    """N:M: every group of M consecutive inputs keeps ``keep`` (``utils.pruning.nm``)."""
    keep, group = nm
    if allocation is not None:
        raise ValueError(f"allocation {allocation!r} does not apply to N:M masks (every group keeps its own count); "
                         f"pass allocation=None")
    if isinstance(keep, bool) or not isinstance(keep, int) or not isinstance(group, int) or not 0 <= keep <= group:
        raise ValueError(f"nm=(keep, M) needs 0 <= keep <= M, got {nm!r}")
    grouped_layers = [name for name, mask in current.items() if nm_sparsity.groupable(tuple(mask.shape), group)]
    if not grouped_layers:
        raise ValueError(f"no prunable layer has an input size that is a multiple of {group}")
    alive = max(int(nm_sparsity.group_counts(current[name], group).max()) for name in grouped_layers)
    try:
        counts = nm_sparsity.round_keeps(alive, keep, 1 if rounds is None else rounds)
    except nm_sparsity.NMError as error:
        raise ValueError(str(error)) from None
    return [(None, functools.partial(_keep_in_groups, grouped_layers, count, group)) for count in counts]


def _keep_in_groups(layers: Sequence[str], keep: int, group: int, scores: Scores, masks: Masks) -> Masks:
    selected = dict(masks)  # layers without groups stay as they are
    for name in layers:
        try:
            selected[name] = nm_sparsity.keep_in_groups(scores[name], masks[name], keep, group)
        except nm_sparsity.NMError as error:
            raise ValueError(f"layer {name}: {error}") from None
    return selected


def compute_masks(model: nn.Module, *, density: Optional[float] = None, criterion: str,
                  allocation: Optional[str] = None, masks: Optional[Masks] = None, batches: Optional[Iterable] = None,
                  loss_fn: Optional[Callable] = None, num_batches: int = 1,
                  synflow_iterations: int = 100, input_shape: Optional[Sequence[int]] = None,
                  seed: int = 0, device=None, criterion_options: Optional[Mapping[str, Any]] = None,
                  on_round: Optional[Callable[[int, float, Masks], None]] = None,
                  layer_counts: Optional[Mapping[str, int]] = None,
                  nm: Optional[Tuple[int, int]] = None,
                  selection: Optional[RoundsFn] = None) -> Masks:
    """New masks (CPU bool tensors), a subset of ``masks`` (default: the model's current masks).

    The target is exactly one of:

    * ``density``: keep exactly round(density * N) of the N prunable weights, shared among the
      layers by ``allocation`` (``ALLOCATIONS``);
    * ``layer_counts`` (per-layer pruning rates, ``layer_rate_plan``): layer l keeps exactly
      ``layer_counts[l]``; only with ``allocation="uniform"`` (it IS a layer-wise allocation,
      with the shares given);
    * ``nm=(keep, M)``: every group of M consecutive inputs keeps exactly ``keep`` weights
      (``utils.pruning.nm``); layers whose input size is not a multiple of M stay as they
      are; ``allocation`` must be None (it does not apply);
    * ``selection(current, alive, rounds) -> [Round]``: a structure's own selection (a pruning
      structure from outside, e.g. blocks kept or dropped whole): the rounds to run, each
      ``(density announced or None, select(scores, masks) -> masks)``; ``rounds`` is the
      criterion's number of rounds (None: one scoring); ``allocation`` is the structure's to read.

    One procedure for all of them, so every option reaches each: the criterion (``SCORES`` or
    ``package.module:function``) scores the masked model from one ``ScoringInputs`` (batches,
    ``num_batches``, ``loss_fn``, ``input_shape``, ``seed``), with its own options
    (``criterion_options``, e.g. snip's ``snip_mode``); weights already pruned score -inf and
    are never kept; an iterative criterion (SynFlow) re-scores over ``synflow_iterations`` rounds
    (exponential in the density; per layer with layer_counts; per group with nm).
    ``on_round(k, density_k, masks_k)`` is called after each round.

    The model's weights, buffers, gradients and train/eval flags are left as they were.
    ``device``: where scoring runs (default: the model's).
    """
    spec = get_criterion(criterion)
    try:
        score = spec.scorer(criterion_options)
    except ValueError as error:
        raise ValueError(f"criterion {criterion}: {error}") from None
    if spec.iterative and synflow_iterations < 1:
        raise ValueError(f"synflow iterations must be >= 1, got {synflow_iterations}")
    if sum(target is not None for target in (density, layer_counts, nm, selection)) != 1:
        raise ValueError("compute_masks needs exactly one of density and layer_counts and nm and selection")
    # The model's own buffers are only read (selections build new tensors): no copy.
    current = {name: layer.mask for name, layer in masked_layers(model)} if masks is None else masks
    validate_masks(model, current)
    device = torch.device(device) if device is not None else _model_device(model)
    current = {name: mask.to(device=device, dtype=torch.bool) for name, mask in current.items()}
    rounds = synflow_iterations if spec.iterative else None  # None: one scoring
    alive = {name: int(mask.count_nonzero()) for name, mask in current.items()}  # note: one pass over the masks
    if selection is not None:
        plan = selection(current, alive, rounds)
    elif nm is not None:
        plan = _nm_rounds(current, tuple(nm), allocation, rounds)
    else:
        get_allocation(allocation)  # an unknown name is refused before any scoring
        plan = (_density_rounds(current, alive, density, allocation, rounds) if density is not None
                else _layer_count_rounds(current, alive, layer_counts, allocation, rounds))
    inputs = ScoringInputs(model=model, device=device, batches=batches, loss_fn=loss_fn,
                           num_batches=num_batches, seed=seed,
                           input_shape=tuple(input_shape) if input_shape is not None else None)
    total = sum(mask.numel() for mask in current.values())
    # Layers that may hold pruned weights: those with any before the first round, every layer
    # after it (a pass over a dense layer's mask to find out would cost what the fill costs).
    holding_pruned = [name for name, mask in current.items() if alive[name] < mask.numel()]
    for round_index, (round_density, select) in enumerate(plan, start=1):
        scores = score(inputs, current)
        for name in holding_pruned:
            scores[name].masked_fill_(~current[name], -math.inf)
        current = select(scores, current)
        holding_pruned = list(current)
        if on_round is not None:
            if round_density is None:
                round_density = sum(int(mask.count_nonzero()) for mask in current.values()) / total
            on_round(round_index, round_density, current)
    return {name: mask.to("cpu") for name, mask in current.items()}


def prune_model(model: nn.Module, **kwargs) -> Masks:
    """``compute_masks(model, **kwargs)``, then install the masks (zeroing pruned weights)."""
    new_masks = compute_masks(model, **kwargs)
    set_masks(model, new_masks)
    return new_masks

