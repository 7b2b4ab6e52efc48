"""The random numbers of training augmentation, and the crop boxes they choose.

The random numbers that augment sample ``i`` in epoch ``e`` are a
function of (``seed``, ``e``, ``i``) only.  Every loader back-end draws them here:

* ``augment_uniforms(seed, epoch, indices, count)``: numpy, vectorized (the torch and
  memory back-ends);
* ``sample_base`` / ``uniform_at``: the same numbers one at a time, written in the subset
  of Python that numba compiles (``utils/data/ffcv_augment.py`` jit-compiles them inside the
  ffcv pipeline; in plain Python they are only used by tests);
* ``random_crop_box`` / ``center_crop_box``: which rectangle a RandomResizedCrop (or the
  evaluation center crop) takes, as plain scalar code that both numpy callers and numba
  (compiled WITHOUT fastmath, so the floating-point operations are the same IEEE ones in
  the same order) run.

The generator: SplitMix64's finalizer ``mix``; ``key = mix(mix(seed) ^ epoch)``,
``base(i) = mix(key ^ i)``, uniform number ``j`` (0-based) of sample ``i`` is
``(mix(base(i) + (j + 1) * GOLDEN) >> 11) * 2**-53`` (53 random bits, in [0, 1)).
Which uniform drives what (the same in every back-end):

================  ========================================================================
flip + translate  u0 < 0.5: horizontal flip; dy = floor(u1 * (2p + 1)), dx = floor(u2 * (2p+1))
                  (p = padding): out[y, x] = flipped[y + dy - p, x + dx - p], zero outside.
                  Flip first, then translate (ffcv's CIFAR example order).
resized crop      u0..u39: ten tries of (scale, log ratio, row, column) of ``random_crop_box``;
+ flip            u40 < 0.5: horizontal flip of the resized crop.
================  ========================================================================
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np

EVAL_CROP_RATIO = 224 / 256      # ImageNet evaluation: center crop side / short side
RRC_SCALE = (0.08, 1.0)          # torchvision / ffcv RandomResizedCrop defaults
RRC_RATIO = (3 / 4, 4 / 3)
# log of the ratio bounds, computed once here (math.log: the same libm for every caller).
RRC_LOG_RATIO = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))

# Which uniform drives which decision (see the table above).
FLIP_UNIFORM = 0                 # flip + translate policies
TRANSLATE_UNIFORMS = (1, 2)      # dy, dx
RRC_TRIES = 10
RRC_UNIFORMS = 4 * RRC_TRIES     # u0 .. u39
RRC_FLIP_UNIFORM = RRC_UNIFORMS  # u40

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_ONE = np.uint64(1)
_UNIT = 1.0 / (1 << 53)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on a uint64 array (wrapping arithmetic)."""
    z = x + GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def epoch_key(seed: int, epoch: int) -> np.uint64:
    """``mix(mix(seed) ^ epoch)``: what every sample's numbers in this epoch start from."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed], dtype=np.uint64))
        return _splitmix64(key ^ np.array([epoch], dtype=np.uint64))[0]


def augment_uniforms(seed: int, epoch: int, sample_indices: np.ndarray, count: int) -> np.ndarray:
    """(B, count) float64 uniforms in [0, 1), a pure function of (seed, epoch, sample index):
    the augmentations do not depend on the back-end, the rank, the world size, the batch a
    sample lands in or ``start_batch``."""
    with np.errstate(over="ignore"):
        key = np.array([epoch_key(seed, epoch)], dtype=np.uint64)
        base = _splitmix64(key ^ np.asarray(sample_indices, dtype=np.uint64))
        counters = base[:, None] + np.arange(1, count + 1, dtype=np.uint64)[None, :] * GOLDEN
        bits = _splitmix64(counters)
    return (bits >> _S11).astype(np.float64) * _UNIT


# -- the same numbers one at a time (numba-compilable; uint64 throughout, wrapping)
def mix(x):
    """SplitMix64 finalizer of one np.uint64."""
    z = x + GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def sample_base(key, index):
    """``mix(key ^ index)`` for one sample (both np.uint64)."""
    return mix(key ^ np.uint64(index))


def uniform_at(base, j):
    """Uniform number ``j`` (0-based) of the sample whose base is ``base``."""
    bits = mix(base + np.uint64(j + 1) * GOLDEN)
    return np.float64(bits >> _S11) * _UNIT


# -- crop boxes (numba-compilable scalar code)
def random_crop_box(height, width, u, scale_low, scale_high, log_ratio_low, log_ratio_high,
                    ratio_low, ratio_high) -> Tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a RandomResizedCrop of a height x width
    image driven by the uniforms ``u[0:40]``: torchvision's get_params (also ffcv's
    get_random_crop) with ten tries of (scale, log ratio, row, column), then the
    center-crop fallback clamped to the ratio range."""
    area = height * width
    for t in range(RRC_TRIES):
        target_area = area * (scale_low + (scale_high - scale_low) * u[4 * t])
        aspect = math.exp(log_ratio_low + (log_ratio_high - log_ratio_low) * u[4 * t + 1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[4 * t + 2] * (height - h + 1))
            left = int(u[4 * t + 3] * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio_low:
        w = width
        h = int(round(width / ratio_low))
    elif in_ratio > ratio_high:
        h = height
        w = int(round(height * ratio_high))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def default_random_crop_box(height: int, width: int, u) -> Tuple[int, int, int, int]:
    """``random_crop_box`` with the project's scale and ratio ranges."""
    return random_crop_box(height, width, u, RRC_SCALE[0], RRC_SCALE[1], RRC_LOG_RATIO[0], RRC_LOG_RATIO[1],
                           min(RRC_RATIO), max(RRC_RATIO))


def center_crop_box(height: int, width: int) -> Tuple[int, int, int, int]:
    """ffcv's get_center_crop: a square of side EVAL_CROP_RATIO * short side, centered."""
    side = int(EVAL_CROP_RATIO * min(height, width))
    return (height - side) // 2, (width - side) // 2, side, side
