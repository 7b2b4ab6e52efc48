"""Progressive resizing: the training resolution of each epoch (the ffcv ImageNet recipe).

Training starts at low resolution and ramps up linearly, which makes the early epochs much
cheaper (cost ~ resolution^2) at little loss in accuracy.  The rule is ffcv-imagenet's
(``train_imagenet.py``, ``get_resolution``), restated here on plain arguments:

* epochs (0-based) up to and including ``start_epoch`` train at ``start_res``;
* epochs from ``end_epoch`` on train at ``end_res``;
* in between, the linear interpolation between (start_epoch, start_res) and
  (end_epoch, end_res), rounded to the nearest multiple of ``multiple`` (32 px: the total
  stride of a ResNet), ties to even as numpy's ``np.round`` does.

With ``start_res`` / ``end_res`` that are multiples of ``multiple`` every resolution lies
between them; otherwise a ramp value may round to just outside (as in ffcv-imagenet, kept so
that its configs give the same schedule).  ffcv-imagenet's ResNet-50 configs use e.g.
``start_res=160, end_res=192, start_epoch=E-23, end_epoch=E-12`` for E epochs (validated at 256).

Wiring: before each training epoch, ``resolution_for_epoch(epoch, ...)`` gives the side
length; the training loader must produce it (see docs/speed.md).
"""
from __future__ import annotations

import math

RESOLUTION_MULTIPLE = 32  # px: ResNets downsample by 32, so feature maps stay whole


def _check(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return value


def resolution_for_epoch(epoch: int, *, start_res: int, end_res: int, start_epoch: int, end_epoch: int,
                         multiple: int = RESOLUTION_MULTIPLE) -> int:
    """Side length (px) of the training images in ``epoch`` (0-based)."""
    _check("epoch", epoch, 0)
    _check("start_res", start_res, 1)
    _check("end_res", end_res, 1)
    _check("start_epoch", start_epoch, 0)
    _check("end_epoch", end_epoch, 0)
    _check("multiple", multiple, 1)
    if start_res > end_res:
        raise ValueError(f"start_res={start_res} must be <= end_res={end_res} (resolution only grows)")
    if start_epoch > end_epoch:
        raise ValueError(f"start_epoch={start_epoch} must be <= end_epoch={end_epoch}")
    if epoch <= start_epoch:
        return start_res
    if epoch >= end_epoch:
        return end_res
    fraction = (epoch - start_epoch) / (end_epoch - start_epoch)
    interpolated = start_res + fraction * (end_res - start_res)
    steps = interpolated / multiple
    nearest = math.floor(steps + 0.5)
    if nearest - steps == 0.5 and nearest % 2 == 1:  # an exact tie: to even, like np.round
        nearest -= 1
    return int(nearest) * multiple


def resolution_schedule(epochs: int, **ramp) -> list:
    """``resolution_for_epoch`` for epochs 0 .. epochs - 1 (for printing and for tests)."""
    return [resolution_for_epoch(epoch, **ramp) for epoch in range(_check("epochs", epochs, 0))]
