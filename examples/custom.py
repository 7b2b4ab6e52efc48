"""A user's own network and pruning criterion, plugged in by name (docs/science.md):

    python harness.py --config configs/quickstart.yaml \\
        --model.name=examples.custom:build_net --prune.criterion=examples.custom:lamp_scores

``build_net`` is a network factory: the harness calls it with ``num_classes=`` and, because
its signature takes them, ``in_channels=`` and ``image_size=`` of the dataset.  It returns
any ``torch.nn.Module`` mapping (N, C, H, W) images to (N, num_classes) logits; every
Conv2d and Linear in it becomes prunable.

``lamp_scores`` is a score function with the registry's signature
``(inputs: utils.pruning.criteria.ScoringInputs, masks) -> {layer name: scores}``: LAMP
(Lee et al. 2021, "Layer-adaptive sparsity for the magnitude-based pruning").  With
``prune.allocation=global`` it prunes by magnitude with per-layer densities chosen by the
score itself: a weight's score is its squared magnitude divided by the sum of the squared
magnitudes of the weights of its layer that are at least as large, so the largest weight
of every layer scores 1 and no layer is emptied first.
"""
from __future__ import annotations

import torch
from torch import nn


def build_net(num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = 16) -> nn.Module:
    """conv 3x3 (width) - BatchNorm - ReLU - 2x2 max-pool - fc 64 - ReLU - fc classes."""
    pooled = image_size // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(width * pooled * pooled, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def lamp_scores(inputs, masks):
    """LAMP score of every weight of every masked layer (bigger = more important)."""
    from utils.models.mask_layers import masked_layers

    scores = {}
    for name, layer in masked_layers(inputs.model):
        squared = (layer.weight.detach().to(inputs.device, torch.float64) ** 2).reshape(-1)
        squared = squared * masks[name].reshape(-1).to(squared.device)  # pruned weights do not count
        order = torch.argsort(squared)  # ascending
        sorted_squares = squared[order]
        # sum over the weights at least as large as each one: a reversed cumulative sum
        tail_sums = sorted_squares.flip(0).cumsum(0).flip(0)
        lamp_sorted = torch.where(tail_sums > 0, sorted_squares / tail_sums, torch.zeros_like(sorted_squares))
        lamp = torch.empty_like(lamp_sorted)
        lamp[order] = lamp_sorted
        scores[name] = lamp.view(layer.weight.shape)
    return scores


# LAMP reads the weights only: no training batches to prepare (undeclared, a criterion gets them).
lamp_scores.needs_batches = False
