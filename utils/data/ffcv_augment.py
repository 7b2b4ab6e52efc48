"""FFCV operations whose random numbers come from (seed, epoch, sample index).

ffcv 1.0.2's RandomHorizontalFlip, RandomTranslate and RandomResizedCropRGBImageDecoder
draw from numba's global, unseeded generator, so two runs (or an interrupted and an
uninterrupted one) augment differently.  The operations here draw the numbers of
``utils/data/augment.py`` instead, the same ones the torch and memory back-ends use, so for
raw-stored images all back-ends produce the same pixels (docs/data-loaders.md).

How the numbers reach numba-compiled code:

* the sample indices: ffcv passes the batch's sample indices to a decoder (its first
  argument) and to a transform whose code function carries ``with_indices = True`` (ffcv
  1.0.2, ``pipeline/graph.py``: ``Node.func_call_ast`` appends ``batch_indices``);
* the seed and the epoch: the pipeline is compiled once, and numba freezes global arrays
  into the machine code, so they cannot be closure constants.  ``AugmentState`` keeps
  ``[seed, epoch]`` in a numpy array that the loader updates before each epoch's ``iter()``;
  the compiled code copies those 16 bytes from the array's address at the start of every
  batch (through ffcv's own ctypes ``my_memcpy``, callable from nopython code).  The
  ``AugmentState`` object must outlive the loader (the loader holds it).

The per-sample math (``mix``, ``uniform_at``, ``random_crop_box``) is compiled with
``numba.njit`` WITHOUT fastmath (ffcv compiles operation code with fastmath=True, which
may contract or reorder floating-point operations): called from the fastmath code, these
functions keep their strict IEEE semantics, so crop boxes equal the plain-Python ones.
"""
from __future__ import annotations

from dataclasses import replace
from types import FunctionType
from typing import Callable, Optional, Tuple

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import ctypes_memcopy, imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba import njit

from utils.data import augment as A


def _jit(function, **jitted):
    """``numba.njit`` of a function of utils/data/augment.py (same code), whose calls to other
    functions there go to their jitted versions ``jitted``."""
    scope = {**vars(A), **jitted}
    return njit(FunctionType(function.__code__, scope, function.__name__, function.__defaults__))


_mix = _jit(A.mix)
_sample_base = _jit(A.sample_base, mix=_mix)
_uniform_at = _jit(A.uniform_at, mix=_mix)
_random_crop_box = _jit(A.random_crop_box)


@njit
def _epoch_key_from(address):
    """mix(mix(seed) ^ epoch) from the two uint64 at ``address`` (an AugmentState)."""
    state = np.empty(2, dtype=np.uint64)
    ctypes_memcopy(address, state.ctypes.data, 16)
    return _mix(_mix(state[0]) ^ state[1])


class AugmentState:
    """``[seed, epoch]`` (uint64) read by the compiled operations at every batch."""

    def __init__(self, seed: int):
        self.array = np.array([int(seed), 0], dtype=np.uint64)

    @property
    def address(self) -> int:
        return int(self.array.ctypes.data)

    def set_epoch(self, epoch: int) -> None:
        self.array[1] = np.uint64(int(epoch))

    @property
    def key(self) -> np.uint64:
        return A.epoch_key(int(self.array[0]), int(self.array[1]))


class SeededHorizontalFlip(Operation):
    """Mirror image i (HWC uint8) when its uniform number ``uniform`` is below 0.5."""

    def __init__(self, state: AugmentState, uniform: int = A.FLIP_UNIFORM):
        super().__init__()
        self.state, self.uniform = state, int(uniform)

    def generate_code(self) -> Callable:
        loop = Compiler.get_iterator()
        address, which = self.state.address, self.uniform

        def seeded_flip(images, dst, indices):
            key = _epoch_key_from(address)
            for i in loop(images.shape[0]):
                if _uniform_at(_sample_base(key, indices[i]), which) < 0.5:
                    dst[i] = images[i, :, ::-1]
                else:
                    dst[i] = images[i]
            return dst

        seeded_flip.is_parallel = True
        seeded_flip.with_indices = True
        return seeded_flip

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class SeededTranslate(Operation):
    """Shift image i by ``floor(u * (2p + 1)) - p`` rows (u = uniform ``uniforms[0]``) and
    columns (``uniforms[1]``), zero fill: a CIFAR-style pad-by-p-and-random-crop, written
    straight into the output (no padded copy)."""

    def __init__(self, state: AugmentState, padding: int, uniforms: Tuple[int, int] = A.TRANSLATE_UNIFORMS):
        super().__init__()
        self.state, self.padding = state, int(padding)
        self.uniforms = (int(uniforms[0]), int(uniforms[1]))

    def generate_code(self) -> Callable:
        loop = Compiler.get_iterator()
        address, pad = self.state.address, self.padding
        span = float(2 * pad + 1)
        row_uniform, col_uniform = self.uniforms

        def seeded_translate(images, dst, indices):
            n, height, width = images.shape[0], images.shape[1], images.shape[2]
            key = _epoch_key_from(address)
            for i in loop(n):
                base = _sample_base(key, indices[i])
                dy = int(_uniform_at(base, row_uniform) * span) - pad    # out[y] = in[y + dy]
                dx = int(_uniform_at(base, col_uniform) * span) - pad
                top, bottom = max(0, -dy), min(height, height - dy)
                left, right = max(0, -dx), min(width, width - dx)
                dst[i] = 0
                if top < bottom and left < right:
                    dst[i, top:bottom, left:right] = images[i, top + dy:bottom + dy, left + dx:right + dx]
            return dst

        seeded_translate.is_parallel = True
        seeded_translate.with_indices = True
        return seeded_translate

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class SeededRandomResizedCropDecoder(ResizedCropRGBImageDecoder):
    """RandomResizedCrop decoder for ``RGBImageField`` (raw or JPEG, any size): the crop box
    is ``utils.data.augment.random_crop_box`` on uniforms u0..u39 of the sample, then ffcv's
    resize (``resize_crop``: OpenCV INTER_AREA).  Memory and state as ffcv's own
    ResizedCropRGBImageDecoder (output buffer + a decode buffer for JPEGs)."""

    def __init__(self, state: AugmentState, output_size, scale=A.RRC_SCALE, ratio=A.RRC_RATIO):
        super().__init__(output_size)
        self.state = state
        self.scale, self.ratio = tuple(map(float, scale)), tuple(map(float, ratio))

    @property
    def get_crop_generator(self):          # abstract in ffcv; the crop is chosen in generate_code
        return None

    def generate_code(self) -> Callable:
        import math
        loop = Compiler.get_iterator()
        read = self.memory_read
        decode_jpeg = Compiler.compile(imdecode)
        resize = Compiler.compile(resize_crop)
        address = self.state.address
        jpg = IMAGE_MODES["jpg"]
        scale_low, scale_high = self.scale
        ratio_low, ratio_high = min(self.ratio), max(self.ratio)
        log_low, log_high = math.log(ratio_low), math.log(ratio_high)
        count = A.RRC_UNIFORMS

        def seeded_rrc_decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch = my_storage
            key = _epoch_key_from(address)
            for k in loop(len(batch_indices)):
                sample = batch_indices[k]
                record = metadata[sample]
                stored = read(record["data_ptr"], storage_state)
                height, width = np.int64(record["height"]), np.int64(record["width"])
                if record["mode"] == jpg:
                    pixels = scratch[k]
                    decode_jpeg(stored, pixels, np.uint32(height), np.uint32(width), np.uint32(height),
                                np.uint32(width), 0, 0, 1, 1, False, False)
                    image = pixels[:height * width * 3].reshape(height, width, 3)
                else:
                    image = stored.reshape(height, width, 3)
                base = _sample_base(key, sample)
                u = np.empty(count, dtype=np.float64)
                for j in range(count):
                    u[j] = _uniform_at(base, j)
                top, left, h, w = _random_crop_box(height, width, u, scale_low, scale_high, log_low, log_high,
                                                   ratio_low, ratio_high)
                resize(image, top, top + h, left, left + w, destination[k])
            return destination[:len(batch_indices)]

        seeded_rrc_decode.is_parallel = True
        return seeded_rrc_decode
