"""BlurPool: an anti-aliasing blur before every strided convolution (Zhang 2019; ffcv ImageNet recipe).

``add_blurpool_(model)`` makes every ``nn.Conv2d`` with a stride > 1 and at least
``min_in_channels`` input channels (16 by default, as ffcv-imagenet: the RGB stem is left
alone) first blur its input with a fixed 3x3 binomial filter ([1 2 1]^T [1 2 1] / 16, one per
channel, stride 1, zero padding 1), then convolve as before.

How, and why this way: ffcv-imagenet wraps the conv in a new module (``BlurPoolConv2d(conv)``),
which renames the conv's weight from ``layer2.0.conv1.weight`` to ``layer2.0.conv1.conv.weight``.
Here the conv stays where it is and only its class changes (the way ``mask_layers.prepare_model``
makes layers prunable): a subclass whose forward blurs, then calls the conv's own forward.  So

* parameter, mask and state_dict names are the same as without BlurPool; the blur filter is a
  non-persistent buffer (a constant): checkpoints and mask files of a blurred and a plain model
  are interchangeable;
* the conv stays a masked, prunable layer whichever is applied first: ``add_blurpool_`` after
  ``prepare_model`` keeps the mask, ``prepare_model`` after ``add_blurpool_`` masks the blurred
  conv (the masked class derives from the blurred one).  Recommended order: ``add_blurpool_``
  right after building the model, before ``prepare_model`` and before moving to the device, so
  pruning sees the final network;
* the conv's weight, bias, stride and padding are the same tensors and values as before.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from utils.models.mask_layers import mixed_class

MIN_IN_CHANNELS = 16  # ffcv-imagenet: convs reading fewer channels (the RGB stem) are not blurred


def binomial_filter(channels: int) -> torch.Tensor:
    """(channels, 1, 3, 3) depthwise filter: the outer product of [1, 2, 1] / 4 with itself."""
    taps = torch.tensor([1.0, 2.0, 1.0]) / 4
    return (taps[:, None] * taps[None, :]).expand(channels, 1, 3, 3).contiguous()


class BlurPoolMixin:
    """Mixin for a Conv2d subclass: blur the input (depthwise, stride 1), then convolve."""

    blur_filter: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Conv2d's name)
        blur = self.blur_filter
        if blur.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
            blur = blur.to(input.dtype)
        blurred = F.conv2d(input, blur, stride=1, padding=1, groups=self.in_channels)
        return super().forward(blurred)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blurpool"


_blurred_classes: Dict[type, type] = {}


def _blurred_class_for(cls: type) -> type:
    """A subclass of ``cls`` (a Conv2d class) that blurs first, made once per class."""
    return mixed_class(BlurPoolMixin, cls, "BlurPool", globals(), _blurred_classes)


BlurPoolConv2d = _blurred_class_for(nn.Conv2d)


def wants_blur(conv: nn.Module, min_in_channels: int = MIN_IN_CHANNELS) -> bool:
    return (isinstance(conv, nn.Conv2d) and not isinstance(conv, BlurPoolMixin)
            and max(conv.stride) > 1 and conv.in_channels >= min_in_channels)


def add_blurpool_(model: nn.Module, min_in_channels: int = MIN_IN_CHANNELS) -> List[str]:
    """Blur before every strided Conv2d of ``model`` (in place); -> the names of the convs changed.

    Calling it twice changes nothing the second time.  Works on a model before or after
    ``utils.models.mask_layers.prepare_model`` (see the module docstring).
    """
    changed = []
    for name, module in model.named_modules():
        if not wants_blur(module, min_in_channels):
            continue
        module.__class__ = _blurred_class_for(type(module))
        weight = module.weight
        module.register_buffer("blur_filter", binomial_filter(module.in_channels).to(weight.device, weight.dtype),
                               persistent=False)
        changed.append(name)
    return changed


def blurred_layer_names(model: nn.Module) -> List[str]:
    return [name for name, module in model.named_modules() if isinstance(module, BlurPoolMixin)]
