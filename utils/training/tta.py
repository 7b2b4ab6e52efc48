"""Test-time augmentation by horizontal flip (the ffcv ImageNet recipe's ``lr_tta``).

At evaluation the logits of an image and of its mirror image are averaged.  ffcv-imagenet
sums the two (``output += model(flip(images))``); the average has the same argmax and keeps
the loss on the usual scale.  Only for data whose labels survive a horizontal flip (ImageNet,
CIFAR; not digits or SVHN).

Two forms:

* ``flip_averaged_logits(model, images)``: a function, for a hand-written evaluation loop;
* ``FlipTTA(model)``: a module whose forward is that function, to hand to
  ``utils.training.step.evaluate`` in place of the model.  It holds no parameters or buffers of
  its own, so it never appears in a checkpoint; train/eval mode passes through to the model.
"""
from __future__ import annotations

import torch
from torch import nn


def flip_averaged_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(model(images) + model(images flipped left-right)) / 2.  ``images`` is N, C, H, W."""
    if images.dim() != 4:
        raise ValueError(f"flip test-time augmentation needs N, C, H, W images, got shape {tuple(images.shape)}")
    logits = model(images)
    # flip(3) keeps the memory format of a channels_last batch
    flipped_logits = model(images.flip(3))
    return (logits + flipped_logits) / 2


class FlipTTA(nn.Module):
    """Wraps a model: forward = ``flip_averaged_logits(model, x)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return flip_averaged_logits(self.model, images)

    def state_dict(self, *args, **kwargs):  # the wrapped model's keys, no "model." prefix
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.model.load_state_dict(*args, **kwargs)
