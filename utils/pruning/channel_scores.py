"""Channel pruning, 2: what a channel unit scores.

Scores of a unit (bigger = kept first; units already pruned score -inf and stay pruned) come
from the criteria that score channels (``utils.pruning.criteria``: ``Criterion.score_channels``):

``magnitude``  L1 norm of the unit's filters (Li et al. 2017), averaged over the layers
               producing the unit (a residual-stream unit made by 7 convs is not favoured
               over a single conv's unit for having 7 filters).
``bn_gamma``   |gamma| of the BatchNorm(s) that normalise the unit (network slimming, Liu et
               al. 2017), averaged over them.  Refused (``StructureError``) for a network
               whose prunable groups have no BatchNorm.
``random``     i.i.d. U(0, 1) float64 from a CPU generator seeded with ``seed``, drawn group by
               group in structure order (the same on every rank and device).

Scores are compared across layers on a common scale (``CHANNEL_NORMALIZERS``, default ``mean``):
each member's scores (one producing layer, one BatchNorm, one random draw) are divided by the
mean over the group's alive units before the mean over members.  Raw filter L1 norms grow with
fan-in (sqrt(fan-in) at a Kaiming initialisation), so a raw global ranking empties the layers
with small fan-in; the choice of ``mean`` was measured (bench/channel_normalizers.py)."""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
from torch import nn

from utils.pruning.channel_graph import ChannelKeep, ChannelStructure, StructureError
from utils.pruning.criteria import channel_criteria, get_criterion


# A normaliser maps one member's raw scores over the units it is ranked among (alive and
# covered; a 1-d float64 tensor, never empty) to a common scale.  Scale-free ones (mean, max,
# gaussian) make a layer with a larger fan-in -- whose filter L1 norms are larger just because
# they sum more weights -- and a wide or narrow group comparable under ``global``.
def _normalise_none(values: torch.Tensor) -> torch.Tensor:
    return values


def _divide_by(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    scale = float(scale)
    return values / scale if math.isfinite(scale) and scale > 0 else torch.ones_like(values)


def _normalise_mean(values: torch.Tensor) -> torch.Tensor:
    return _divide_by(values, values.mean())


def _normalise_max(values: torch.Tensor) -> torch.Tensor:
    return _divide_by(values, values.max())


def _normalise_gaussian(values: torch.Tensor) -> torch.Tensor:
    centred = values - values.mean()
    if values.numel() < 2:
        return torch.zeros_like(values)
    return _divide_by(centred, centred.std())


CHANNEL_NORMALIZERS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": _normalise_none,        # raw scores (a filter's L1 norm grows with its fan-in)
    "mean": _normalise_mean,        # score / mean score of the member's ranked units
    "max": _normalise_max,          # score / largest score
    "gaussian": _normalise_gaussian,  # (score - mean) / standard deviation
}
# The measured best at equal FLOPs (docs/structured.md, bench/channel_normalizers.py).
DEFAULT_CHANNEL_NORMALIZER = "mean"



def channel_scores(model: nn.Module, structure: ChannelStructure, criterion: str, seed: int = 0, *,
                   normalizer: str = "none", alive: Optional[ChannelKeep] = None) -> Dict[str, torch.Tensor]:
    """group name -> float64 score per unit (CPU): the mean, over the members covering a unit,
    of each member's score after ``normalizer`` (fitted on the member's ``alive`` units; all
    units when ``alive`` is None).  ``normalizer="none"``: the raw scores' mean."""
    scorer = channel_score_function(criterion)
    if normalizer not in CHANNEL_NORMALIZERS:
        raise StructureError(f"unknown channel normalizer {normalizer!r}; valid: {', '.join(CHANNEL_NORMALIZERS)}")
    normalise = CHANNEL_NORMALIZERS[normalizer]
    result = {}
    member_scores = scorer(model, structure, seed)
    for group in structure.groups:
        ranked_among = alive[group.name].to("cpu", torch.bool) if alive is not None else torch.ones(group.size, dtype=torch.bool)
        total = torch.zeros(group.size, dtype=torch.float64)
        count = torch.zeros(group.size, dtype=torch.float64)
        for member in member_scores[group.name]:
            where = member.covered & ranked_among
            values = member.values.clone()
            if bool(where.any()):
                values[where] = normalise(values[where])
            total += torch.where(member.covered, values, torch.zeros_like(values))
            count += member.covered.double()
        result[group.name] = total / count.clamp(min=1)
    return result




def channel_score_function(criterion: str):
    """The per-channel score of ``criterion`` (a criterion's ``score_channels``); StructureError
    (one line) for one that scores weights only."""
    try:
        spec = get_criterion(criterion)
    except ValueError as error:
        raise StructureError(str(error)) from None
    if spec.score_channels is None:
        raise StructureError(f"criterion {criterion} scores weights, not channels; criteria that score channels: "
                             f"{', '.join(channel_criteria())}")
    return spec.score_channels
