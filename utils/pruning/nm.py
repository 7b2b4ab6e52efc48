"""N:M sparsity: in every group of M consecutive inputs, exactly N weights kept.

The pattern GPU tensor cores run faster (2:4 since Ampere).  Here every function takes plain
arguments (shapes, tensors, counts); ``utils.pruning.masks.compute_masks(nm=(keep, M))`` is
the one mask path that uses them, so every criterion scores N:M masks the same way it scores
unstructured ones.

Groups.  A weight ``[out, in, *kernel]`` (a conv's ``[out, in, kh, kw]``, a linear layer's or
an attention projection's ``[out, in]``) is cut into groups of M consecutive entries along
``in``, at one output and one kernel position: the groups of a conv run along its input
channels at one (kh, kw).  A weight whose ``in`` is not a multiple of M (a 3-channel stem, a
depthwise conv's single input) has no groups: that layer stays dense, and the run names it at
its start.  Every weight of a grouped layer belongs to exactly one group.

Levels.  ``prune.levels`` = K >= 2 levels step the count kept per group evenly from M (level
0, dense) to N (the last level): level L keeps ``round(M - L * (M - N) / (K - 1))`` per group
(Python's ``round``), so K = 2 is one-shot N:M after a dense level.  The counts never grow,
and the selection below only keeps weights that are alive, so the masks of successive levels
nest.  ``at_init`` prunes once, to N per group.  The density of a level (``levels.csv``) is
counted as usual over all prunable weights, the dense layers included.

Selection.  The criterion's scores (bigger = kept first) rank the weights of each group; the
``keep`` best alive ones are kept, ties going to the lower position in the group, NaN ranking
lowest.  An iterative criterion (SynFlow) re-scores between rounds, and its rounds apply per
group: round k keeps ``round(a * (keep / a) ** (k / K))`` per group (a: the count alive per
group before pruning; K: its rounds), the last exactly ``keep``; a round whose count equals
the previous one would change nothing and is skipped.

``prune.allocation`` does not apply (each group has its own count) and ``prune.layer_rates``
is refused.  On a CUDA GPU of compute capability >= 8.0, ``to_semi_structured_`` turns the
2:4 linear layers of a model into torch's semi-structured sparse tensors (``python -m
utils.compact --format semi-structured`` measures their speed against dense).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from utils.core.callbacks import Callback, LevelInfo

Shape = Tuple[int, ...]
SEMI_STRUCTURED = (2, 4)         # the only N:M pattern torch's semi-structured sparse tensors hold
SEMI_STRUCTURED_CAPABILITY = (8, 0)


class NMError(ValueError):
    """N:M sparsity cannot be done as asked; the message is one line."""


# ------------------------------------------------------------------------------ the pattern
def parse_nm(text) -> Tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: N kept of every M, 1 <= N < M.  NMError (one line) otherwise."""
    parts = text.split(":") if isinstance(text, str) else []
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise NMError(f"N:M pattern {text!r} is not of the form N:M with whole numbers (e.g. 2:4)")
    n, m = (int(part) for part in parts)
    if not 1 <= n < m:
        raise NMError(f"N:M pattern {text!r} must keep 1 <= N < M weights of every M")
    return n, m


def level_keeps(n: int, m: int, levels: int) -> List[int]:
    """Weights kept per group at levels 0 .. levels-1: round(M - L (M - N) / (levels - 1))."""
    if levels < 2:
        raise NMError(f"N:M over levels needs prune.levels >= 2 (level 0 dense, the last keeping {n} of {m}), "
                      f"got {levels}")
    return [int(round(m - level * (m - n) / (levels - 1))) for level in range(levels)]


def groupable(shape: Sequence[int], m: int) -> bool:
    """Whether a weight of ``shape`` splits into groups of ``m`` along its input dimension."""
    return len(shape) >= 2 and shape[1] % m == 0 and shape[1] > 0


def grouped(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """``[out, in, *kernel]`` -> ``[groups, m]``: row g is one group (m consecutive inputs at one
    output and kernel position).  A copy when the input dimension is not the last."""
    return tensor.movedim(1, -1).reshape(-1, m)


def ungrouped(groups: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of ``grouped`` for a weight of ``shape``."""
    moved = (shape[0], *shape[2:], shape[1])
    return groups.reshape(moved).movedim(-1, 1)


def keep_in_groups(scores: torch.Tensor, alive: torch.Tensor, keep: int, m: int) -> torch.Tensor:
    """Bool mask shaped like ``scores``: in every group of ``m``, the ``keep`` best-scoring alive
    weights (ties: lower position in the group; NaN lowest).  NMError when a group has fewer than
    ``keep`` alive (masks only shrink)."""
    group_scores = grouped(torch.nan_to_num(scores.to(torch.float64), nan=-math.inf), m)
    group_alive = grouped(alive.to(torch.bool), m)
    short = int((group_alive.sum(1) < keep).sum())
    if short:
        raise NMError(f"{short} groups have fewer than {keep} of {m} weights alive; masks only shrink")
    # Alive first, then by score, then by position: two stable sorts, the secondary key first.
    by_score = torch.sort(group_scores, dim=1, descending=True, stable=True).indices
    alive_in_order = group_alive.gather(1, by_score)
    order = by_score.gather(1, torch.sort(alive_in_order.to(torch.int8), dim=1, descending=True, stable=True).indices)
    kept = torch.zeros_like(group_alive)
    kept.scatter_(1, order[:, :keep], True)
    return ungrouped(kept, tuple(scores.shape)).contiguous()


def group_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Weights alive in each group of ``mask`` (LongTensor [groups])."""
    return grouped(mask.to(torch.bool), m).sum(1)


def kept_per_group(mask: torch.Tensor, m: int) -> Optional[int]:
    """The count every group of ``mask`` keeps, or None when the groups differ (or it has none)."""
    if not groupable(tuple(mask.shape), m):
        return None
    counts = group_counts(mask, m)
    first = int(counts[0])
    return first if bool((counts == first).all()) else None


def pattern_of(mask: torch.Tensor, m: int) -> str:
    """What ``layers.csv`` says of a layer: ``K:M`` when every group keeps K, ``dense`` for a layer
    without groups (input size not a multiple of M), ``irregular`` otherwise."""
    if not groupable(tuple(mask.shape), m):
        return "dense"
    keep = kept_per_group(mask, m)
    return "irregular" if keep is None else f"{keep}:{m}"


def round_keeps(alive_per_group: int, keep: int, rounds: int) -> List[int]:
    """Counts kept per group after each of an iterative criterion's rounds (repeats dropped):
    round(a * (keep / a) ** (k / rounds)), k = 1 .. rounds, the last exactly ``keep``."""
    if rounds < 1:
        raise NMError(f"rounds must be >= 1, got {rounds}")
    if keep > alive_per_group:
        raise NMError(f"cannot keep {keep} per group: {alive_per_group} are alive; masks only shrink")
    counts: List[int] = []
    for k in range(1, rounds + 1):
        count = keep if k == rounds or keep == 0 else int(round(alive_per_group * (keep / alive_per_group) ** (k / rounds)))
        count = max(keep, min(alive_per_group, count))
        if count != (counts[-1] if counts else alive_per_group):
            counts.append(count)
    return counts or [keep]


# ------------------------------------------------------------------------------ a run's plan
@dataclass(frozen=True)
class NMPlan:
    """What an N:M run does: the count kept per group at each level and the layers it groups."""

    n: int
    m: int
    keeps: List[int]                 # keeps[L]: weights kept per group of m at level L
    densities: List[float]           # densities[L]: kept / all prunable weights (dense layers included)
    grouped_layers: List[str]        # layers cut into groups (module order)
    dense_layers: Dict[str, int]     # layer -> its input size (not a multiple of m): kept dense

    def target(self, level: int) -> Tuple[int, int]:
        """``compute_masks(nm=...)`` of ``level``: (weights kept per group, group size)."""
        return self.keeps[level], self.m


def nm_plan(shapes: Mapping[str, Shape], n: int, m: int, levels: Optional[int]) -> NMPlan:
    """The plan of an N:M run over prunable weights of ``shapes`` (layer -> weight shape, module
    order).  ``levels``: the iterative run's levels (>= 2); None: one-shot (at_init), N per group."""
    keeps = [n] if levels is None else level_keeps(n, m, levels)
    grouped_layers = [name for name, shape in shapes.items() if groupable(shape, m)]
    dense_layers = {name: int(shape[1]) if len(shape) > 1 else 0
                    for name, shape in shapes.items() if not groupable(shape, m)}
    if not grouped_layers:
        raise NMError(f"no prunable layer has an input size that is a multiple of {m}: N:M {n}:{m} prunes nothing")
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    total = sum(numels.values())
    dense = sum(numels[name] for name in dense_layers)
    densities = [(dense + sum(numels[name] * keep // m for name in grouped_layers)) / total for keep in keeps]
    return NMPlan(n=n, m=m, keeps=keeps, densities=densities, grouped_layers=grouped_layers, dense_layers=dense_layers)


def start_line(plan: NMPlan, allocation: str) -> str:
    """The run's start line: the counts per level, the layers kept dense, allocation not used."""
    steps = ", ".join(str(keep) for keep in plan.keeps)
    if plan.dense_layers:
        shown = ", ".join(f"{name} ({size} inputs)" for name, size in list(plan.dense_layers.items())[:8])
        more = f" and {len(plan.dense_layers) - 8} more" if len(plan.dense_layers) > 8 else ""
        dense = f"kept dense (input size not a multiple of {plan.m}): {shown}{more}"
    else:
        dense = "no layer kept dense"
    return (f"N:M {plan.n}:{plan.m}: levels keep {steps} of every {plan.m} consecutive inputs in "
            f"{len(plan.grouped_layers)} layers; {dense}; prune.allocation={allocation} does not apply "
            f"(every group keeps its own count)")


def shuffled_nm_masks(masks: Mapping[str, torch.Tensor], m: int, seed: int) -> Dict[str, torch.Tensor]:
    """The shuffle control of an N:M source: every group keeps as many weights as in ``masks``, at
    positions of highest random priority (priorities from a CPU generator seeded with (seed, layer
    index), the same at every level, so successive levels nest); layers without groups are
    returned as they are."""
    shuffled = {}
    for index, (name, mask) in enumerate(masks.items()):
        if not groupable(tuple(mask.shape), m):
            shuffled[name] = mask.clone()
            continue
        keep = kept_per_group(mask, m)
        if keep is None:
            raise NMError(f"mask of {name} is not N:M (its groups of {m} keep different counts)")
        digest = hashlib.sha256(f"nm-shuffle-control:{seed}:{index}".encode()).digest()
        generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        priority = torch.rand(mask.shape, generator=generator, dtype=torch.float64)
        shuffled[name] = keep_in_groups(priority, torch.ones_like(mask, dtype=torch.bool), keep, m)
    return shuffled


class NMReport(Callback):
    """``layers.csv`` column ``nm``: each layer's pattern at the level's end (``pattern_of``)."""

    def __init__(self, m: int):
        self.m = m

    def on_level_end(self, info: LevelInfo) -> None:
        from utils.models.mask_layers import get_masks

        masks = get_masks(info.model)
        for row in info.extra["layers"]:
            row["nm"] = pattern_of(masks[row["layer"]], self.m)


# ------------------------------------------------------------------- semi-structured (CUDA)
def semi_structured_unavailable() -> Optional[str]:
    """Why torch's 2:4 semi-structured sparse tensors cannot run here (one line), or None."""
    need = (f"needs a CUDA GPU with compute capability >= {SEMI_STRUCTURED_CAPABILITY[0]}."
            f"{SEMI_STRUCTURED_CAPABILITY[1]} (torch's 2:4 semi-structured sparse kernels)")
    if not torch.cuda.is_available():
        return f"{need}; no CUDA GPU is visible here"
    capability = torch.cuda.get_device_capability()
    if capability < SEMI_STRUCTURED_CAPABILITY:
        return f"{need}; {torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}"
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        return f"{need}; this torch ({torch.__version__}) has no torch.sparse.to_sparse_semi_structured"
    return None


def to_semi_structured_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Tuple[List[str], Dict[str, str]]:
    """Replace the weight of every ``nn.Linear`` of ``model`` (on CUDA, fp16 or bf16) whose mask
    keeps exactly 2 of every 4 by a semi-structured sparse tensor, in place.  -> (layers
    converted, {layer: why not} for every other masked layer).  Weights used outside a module's
    own forward (the Q/K/V projections of ``nn.MultiheadAttention``) and convs stay dense."""
    from torch.sparse import to_sparse_semi_structured

    converted: List[str] = []
    skipped: Dict[str, str] = {}
    modules = dict(model.named_modules())
    for name in masks:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            skipped[name] = f"a {type(module).__name__}, not a linear layer"
            continue
        keep = kept_per_group(masks[name], SEMI_STRUCTURED[1])
        if keep != SEMI_STRUCTURED[0]:
            skipped[name] = f"keeps {keep if keep is not None else 'varying counts'} of 4, not 2"
            continue
        try:
            sparse = to_sparse_semi_structured(module.weight.detach())
        except (RuntimeError, ValueError, TypeError) as error:  # shapes or dtypes its kernels refuse
            skipped[name] = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
            continue
        module.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(name)
    return converted, skipped
