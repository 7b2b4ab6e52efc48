"""``dataset.loader=memory``: the whole dataset as one uint8 tensor on the training device.

For any dataset whose images share one size and that fits (CIFAR-10/100, SVHN, MNIST,
Fashion-MNIST, digits, image folders, an outside dataset).  At construction the ``.beton`` is
decoded once, through ``BetonFile`` (the reader of the torch back-end), into an (N, H, W, C)
uint8 tensor and an (N,) int64 label tensor on ``device``.  Each batch is then a handful of
batched tensor ops on the device: gather the batch's rows, flip and translate
(``utils.data.loaders.flip_translate``, the torch back-end's function), convert and normalize
(``BetonLoader._finish``, shared by every back-end).  The order is ``epoch_order`` (the same
global batches for 1 and N processes, rank r takes its chunk of each) and the random numbers
are ``augment_uniforms(seed, epoch, sample index)``, so for raw-stored images the batches equal
the ffcv and torch back-ends' bit for bit (on the same device).  Per epoch, the order and the
uniforms go to the device once; batches never synchronize with the host.  JPEG-stored images
are decoded with OpenCV, as in the torch back-end (ffcv's decoder may differ by a few levels).

With ``indices`` (a validation split: ``utils/data/validation.py``) only those samples are decoded
and held; the order and the random numbers are still those of their indices in the file.

Refused with a one-line DataError: images of varying size (ImageNet: use ``ffcv``), random
resized crops (``dataset.augment=rrc``), and a dataset that would not fit: on CUDA it may take
at most ``MEMORY_FRACTION`` of the free memory that ``torch.cuda.mem_get_info`` reports
(the rest is for the model, activations and batches), on CPU at most that fraction of the
available RAM (``MemAvailable`` in /proc/meminfo).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np
import torch

from utils.data.augment import augment_uniforms
from utils.data.beton import IMAGE_FIELD, LABEL_FIELD, BetonFile
from utils.data.loaders import Batch, BetonLoader, flip_translate
from utils.data.sources import DataError
from utils.data.specs import DatasetSpec

MEMORY_FRACTION = 0.5          # at most this share of the free device memory / available RAM
_CHUNK = 4096                  # images decoded and copied to the device per step


def available_ram() -> Optional[int]:
    """Bytes of RAM available to new allocations (MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_memory(device: torch.device) -> Optional[int]:
    """Free bytes where the dataset would live: the CUDA device's, or the host's RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return available_ram()


def _gib(count: int) -> str:
    return f"{count / (1 << 30):.2f} GiB"


def check_memory_loader_spec(spec: DatasetSpec) -> None:
    """DataError unless ``spec`` has images of one size and no resized crops (any storage:
    JPEG images are decoded once, with OpenCV, like the torch back-end)."""
    from utils.data.specs import get_augment_policy
    if not spec.fixed_size:
        raise DataError(f"dataset.loader=memory holds images of one size; {spec.name} has images of varying size "
                        f"(random resized crops): use dataset.loader=ffcv")
    if get_augment_policy(spec.train_augment).resized_crop:
        raise DataError(f"dataset.loader=memory flips and pad-and-crops on the device, without resized crops; "
                        f"{spec.name} trains with dataset.augment={spec.train_augment}: use dataset.loader=ffcv "
                        f"or torch, or another dataset.augment")


class MemoryBetonLoader(BetonLoader):
    """The dataset decoded once into device memory; batches by tensor ops there."""

    backend = "memory"

    @classmethod
    def check_spec(cls, spec: DatasetSpec) -> None:
        check_memory_loader_spec(spec)

    def __init__(self, beton: BetonFile, spec: DatasetSpec, **kwargs):
        check_memory_loader_spec(spec)
        super().__init__(beton, spec, **kwargs)
        field = beton.fields[IMAGE_FIELD]
        if field.kind == "ndarray":
            shape = tuple(field.shape)
        else:
            shape = (spec.resolution, spec.resolution, spec.channels)    # validated: every image
        # with ``indices`` (a validation split) only those samples are decoded; row k holds indices[k]
        rows = np.arange(beton.num_samples) if self.indices is None else self.indices
        count = len(rows)
        needed = count * int(np.prod(shape)) + count * 8
        free = free_memory(self.device)
        where = str(self.device) if self.device.type == "cuda" else "RAM"
        if free is not None and needed > MEMORY_FRACTION * free:
            raise DataError(f"{beton.path}: dataset.loader=memory needs {_gib(needed)} on {where} for "
                            f"{count} images of {shape[0]}x{shape[1]}x{shape[2]}, {_gib(free)} free (it may "
                            f"use {MEMORY_FRACTION:.0%}); use dataset.loader=ffcv")
        self._images = self._decode_all(beton, shape, rows)
        labels = np.asarray(beton.metadata[LABEL_FIELD], dtype=np.int64)[rows]
        self._labels = torch.from_numpy(labels.copy()).to(self.device)
        self._uses_uniforms = self.train and (self.policy.horizontal_flip or self.policy.translate_padding > 0)

    def _decode_all(self, beton: BetonFile, shape: tuple, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), H, W, C) uint8 on the device: the file's samples ``rows``, filled chunk by
        chunk (a CPU staging chunk, never a whole host copy when the device is a GPU)."""
        count = len(rows)
        on_cpu = self.device.type == "cpu"
        images = torch.empty((count, *shape), dtype=torch.uint8, device=self.device)
        staging = images if on_cpu else torch.empty((min(_CHUNK, count), *shape), dtype=torch.uint8,
                                                      pin_memory=torch.cuda.is_available())
        for begin in range(0, count, _CHUNK):
            end = min(count, begin + _CHUNK)
            target = staging[begin:end] if on_cpu else staging[:end - begin]
            array = target.numpy()
            for i in range(begin, end):
                array[i - begin] = beton.decode_image(int(rows[i])).reshape(shape)
            if not on_cpu:
                images[begin:end].copy_(target)      # synchronous: the staging chunk is reused
        return images

    @property
    def nbytes(self) -> int:
        """Device bytes held (images + labels)."""
        return self._images.numel() + self._labels.numel() * 8

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        order = self.order(epoch, start_batch)
        if len(order) == 0:
            return
        rows = order if self.indices is None else np.searchsorted(self.indices, order)   # file index -> row
        indices = torch.from_numpy(rows).to(self.device, non_blocking=True)
        uniforms = None
        if self._uses_uniforms:
            uniforms = torch.from_numpy(augment_uniforms(self.seed, epoch, order, 3)).to(self.device, non_blocking=True)
        policy = self.policy
        for begin in range(0, len(order), self.batch_size):
            rows = indices[begin:begin + self.batch_size]
            batch = self._images.index_select(0, rows)                 # (B, H, W, C) uint8, a copy
            if uniforms is not None:
                batch = flip_translate(batch, uniforms[begin:begin + self.batch_size],
                                       flip=policy.horizontal_flip, padding=policy.translate_padding)
            yield self._finish(batch.permute(0, 3, 1, 2), self._labels.index_select(0, rows))
