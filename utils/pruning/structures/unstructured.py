"""The unstructured structure: single weights, chosen by any per-weight criterion and allocation.

A level's target is a density of all prunable weights, shared among layers by the
allocation, or -- with per-layer rates (``prune.layer_rates``) -- each layer's own count
(``utils.pruning.schedules.layer_rate_plan``).  The shuffle control keeps each layer's count of
kept weights at the positions of highest priority: priorities i.i.d. U(0, 1) in float64 from a
generator seeded with (seed, layer index), the same for every level, so fewer kept weights give
a subset (the masks of successive levels nest, as in every run).
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar, List, Optional, Sequence, Tuple

import torch
from torch import nn

from utils.models.mask_layers import Masks
from utils.pruning.masks import compute_masks
from utils.pruning.schedules import layer_rate_counts, parse_layer_rates, rates_by_layer
from utils.pruning.structures.base import Scoring, Shapes, Structure
from utils.pruning.topk import keep_top_k


def _layer_seed(seed: int, layer_index: int) -> int:
    digest = hashlib.sha256(f"shuffle-control:{seed}:{layer_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def shuffled_masks(masks: Masks, seed: int) -> Masks:
    """Each layer keeps as many weights as ``masks`` keeps there, at the positions of
    highest priority: priorities i.i.d. U(0, 1) in float64 from a generator seeded with
    (seed, layer index), the same for every level, so fewer kept weights -> a subset."""
    shuffled = {}
    for index, (name, mask) in enumerate(masks.items()):
        generator = torch.Generator(device="cpu").manual_seed(_layer_seed(seed, index))
        priority = torch.rand(mask.shape, generator=generator, dtype=torch.float64)
        shuffled[name] = keep_top_k(priority, int(mask.count_nonzero()))
    return shuffled


class Unstructured(Structure):
    name: ClassVar[str] = "unstructured"
    description: ClassVar[str] = "single weights, by any per-weight criterion and allocation"

    def label(self) -> str:
        return ""

    def accepts_training(self, training_type: Any) -> bool:
        return True   # single weights: the sparse-training types (gmp, rigl, set) update these masks

    def level_targets(self, densities: Sequence[float], shapes: Optional[Shapes],
                      one_shot: bool) -> List[Tuple[Optional[float], Any]]:
        if not self.settings.layer_rates:
            return [(density, density) for density in densities]
        if shapes is None:  # per-layer counts need the layers' sizes
            return [(None, None) for _ in densities]
        numels = {name: math.prod(shape) for name, shape in shapes.items()}
        rates = rates_by_layer(list(numels), parse_layer_rates(self.settings.layer_rates), self.settings.rate)
        total = sum(numels.values())
        targets = []
        for level in range(len(densities)):
            counts = layer_rate_counts(numels, rates, level)
            targets.append((sum(counts.values()) / total, counts))
        return targets

    def masks(self, model: nn.Module, target: Any, scoring: Scoring) -> Masks:
        if isinstance(target, dict):  # per-layer counts (prune.layer_rates)
            return compute_masks(model, layer_counts=target, allocation=scoring.allocation, **scoring.as_kwargs())
        return compute_masks(model, density=target, allocation=scoring.allocation, **scoring.as_kwargs())

    def shuffle(self, masks: Masks, seed: int) -> Masks:
        return shuffled_masks(masks, seed)
