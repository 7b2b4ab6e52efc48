"""The loaders over ``.beton`` files.

* ``make_loader(path, spec, train=..., batch_size=GLOBAL, ...)`` -> a ``BetonLoader``
  whose ``batches(epoch, start_batch)`` yields ``(images, labels)``: float32 normalized
  NCHW images on ``device`` (``torch.channels_last`` when asked) and int64 labels.
  Three back-ends (``LOADER_BACKENDS``) read the same file:

  - ``'ffcv'``: ffcv 1.0.2's ``Loader`` (numba-compiled decoding and augmentation).  Our
    order is plugged in as a custom ``TraversalOrder``; ffcv's own distributed sampler is
    not used (``distributed=False``; every rank passes its own shard of the order).  The
    training augmentations are our own ffcv operations (``utils/data/ffcv_augment.py``).
  - ``'torch'``: no ffcv, no numba.  The file is parsed here (``BetonFile``), images are
    decoded with numpy / OpenCV and augmented with torch ops.  For debugging and fast tests.
  - ``'memory'`` (``utils/data/memory_loader.py``): small fixed-size datasets decoded once into
    one uint8 tensor on the device; batches by tensor ops there.

  Every back-end draws its augmentation numbers from ``utils/data/augment.py`` as a function of
  ``(seed, epoch, sample index)`` only, so for raw-stored (and gray) images all three give
  bit-identical batches, training and evaluation (on the same device)."""
from __future__ import annotations

import queue
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from utils.core.registry import lookup
from utils.data.augment import (
    EVAL_CROP_RATIO,
    FLIP_UNIFORM,
    RRC_FLIP_UNIFORM,
    RRC_RATIO,
    RRC_SCALE,
    RRC_UNIFORMS,
    TRANSLATE_UNIFORMS,
    augment_uniforms,
    center_crop_box,
    default_random_crop_box,
)
from utils.data.beton import IMAGE_FIELD, LABEL_FIELD, BetonFile, _validate
from utils.data.order import _check_int, batches_per_epoch, epoch_order
from utils.data.records import _check_record, require_complete
from utils.data.sources import DataError
from utils.data.specs import DatasetSpec, _one_line, get_augment_policy
from utils.data.validation import check_indices

# --------------------------------------------------------------------------- loaders
Batch = Tuple[torch.Tensor, torch.Tensor]


class BetonLoader:
    """What both back-ends implement.

    ``batches(epoch, start_batch)`` yields this rank's batches of epoch ``epoch`` in the
    order ``epoch_order`` defines: float32 images normalized with the spec's mean/std,
    NCHW on ``device`` (``torch.channels_last`` when ``channels_last``), int64 labels (B,).
    Breaking out of the loop early is fine (the generator cleans up when closed).
    """

    backend = ""

    def __init__(self, beton: BetonFile, spec: DatasetSpec, *, train: bool, global_batch_size: int,
                 num_workers: int, device, rank: int, world_size: int, seed: int, channels_last: bool,
                 output_resolution: Optional[int], drop_last: bool, indices: Optional[np.ndarray] = None):
        self.path = beton.path
        self.spec = spec
        self.train = bool(train)
        self.shuffle = bool(train)
        self.drop_last = bool(drop_last)
        self.global_batch_size = global_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.channels_last = bool(channels_last)
        self.policy = get_augment_policy(spec.train_augment)
        self.output_resolution = output_resolution     # None: stored size
        # ``indices``: the file's samples this loader reads (a validation split, utils/data/validation.py);
        # the order is drawn over them and maps back to their index in the file, which is also the index
        # the augmentation's random numbers are drawn for.  None: every sample of the file.
        self.indices = None if indices is None else check_indices(indices, beton.num_samples, beton.path)
        self.num_samples = beton.num_samples if self.indices is None else len(self.indices)
        # Validates rank / world size / divisibility once, here.
        epoch_order(0, seed=seed, epoch=0, rank=rank, world_size=world_size,
                    global_batch_size=global_batch_size)
        self.batch_size = global_batch_size // world_size
        self._length = batches_per_epoch(self.num_samples, rank=rank, world_size=world_size,
                                         global_batch_size=global_batch_size, drop_last=self.drop_last)
        channels = spec.channels
        # Normalization in 0..255 units: x = (pixel - 255 * mean) / (255 * std).
        self._mean255 = (torch.tensor(spec.mean, dtype=torch.float32) * 255).view(1, channels, 1, 1).to(self.device)
        self._std255 = (torch.tensor(spec.std, dtype=torch.float32) * 255).view(1, channels, 1, 1).to(self.device)
        self._memory_format = torch.channels_last if self.channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return self._length

    @classmethod
    def check_spec(cls, spec: DatasetSpec) -> None:
        """DataError when this back-end cannot serve ``spec`` (before the file is read)."""

    def order(self, epoch: int, start_batch: int = 0) -> np.ndarray:
        """The file's sample indices this rank reads in ``epoch`` (see ``epoch_order``; with
        ``indices``, the order of positions among them, mapped to their indices in the file)."""
        positions = epoch_order(self.num_samples, seed=self.seed, epoch=epoch, rank=self.rank,
                                world_size=self.world_size, global_batch_size=self.global_batch_size,
                                shuffle=self.shuffle, drop_last=self.drop_last, start_batch=start_batch)
        return positions if self.indices is None else self.indices[positions]

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        epoch = _check_int("epoch", epoch, 0)
        start_batch = _check_int("start_batch", start_batch, 0)
        if start_batch > len(self):
            raise DataError(f"start_batch={start_batch} is past the end of the epoch ({len(self)} batches)")
        return self._batches(epoch, start_batch)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        raise NotImplementedError

    def _finish(self, images_nchw_uint8: torch.Tensor, labels: torch.Tensor) -> Batch:
        """uint8 NCHW (any strides, any device) -> normalized float32 on device; the same
        arithmetic in both back-ends, so equal pixels give bit-equal tensors."""
        images = images_nchw_uint8.to(self.device, non_blocking=True)
        # dtype and memory format in one copy (ffcv hands out a channels_last view).
        images = images.to(dtype=torch.float32, memory_format=self._memory_format)
        images.sub_(self._mean255).div_(self._std255)
        # copy=True: ffcv's label buffers are reused a few batches later.
        labels = labels.to(self.device, dtype=torch.int64, non_blocking=True, copy=True).view(-1)
        return images, labels


# -- ffcv back-end
class FFCVBetonLoader(BetonLoader):
    """ffcv 1.0.2's Loader with our order.

    ffcv 1.0.2 wiring (ffcv/loader/loader.py): ``Loader(order=X)`` accepts a TraversalOrder
    *instance* (``isinstance(order, TraversalOrder)``) and then calls ``order(loader)`` to
    get the object it uses, so the instance here is callable and returns itself bound to
    that loader.  ffcv asks ``sample_order(loader.next_epoch)`` at construction (epoch 0:
    ``len(loader)`` comes from that first order) and at every ``iter()``, after which it
    increments ``next_epoch``; ``batches`` sets ``next_epoch``, the pending
    ``start_batch`` and the epoch of ``_augment_state`` (read by the compiled augmentation
    operations) just before ``iter()``, after stopping any earlier epoch iterator of this
    loader.  Orders are uint64 like ffcv's own.
    """

    backend = "ffcv"

    def __init__(self, beton: BetonFile, spec: DatasetSpec, *, os_cache: bool = True, batches_ahead: int = 3,
                 **kwargs):
        super().__init__(beton, spec, **kwargs)
        # ffcv's Compiler.set_num_threads(n) also calls torch.set_num_threads(n): at import
        # (n=1!), in Loader() and in every iter().  Keep the caller's torch thread count.
        torch_threads = torch.get_num_threads()
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
        from ffcv.traversal_order.base import TraversalOrder

        owner = self

        class EpochOrder(TraversalOrder):
            def __init__(self):  # bound to the ffcv loader in __call__
                pass

            def __call__(self, ffcv_loader):
                TraversalOrder.__init__(self, ffcv_loader)
                return self

            def sample_order(self, epoch: int):
                return owner.order(int(epoch), owner._pending_start_batch).astype(np.uint64)

        self._pending_start_batch = 0
        self._live = None                        # the running ffcv EpochIterator, if any
        from utils.data.ffcv_augment import AugmentState
        self._augment_state = AugmentState(self.seed)
        image_ops = self._image_decoding(beton)
        # ToTorchImage(channels_last=True) is a free permuted view; _finish makes the
        # requested memory format while converting to float (one copy instead of two).
        image_pipeline = image_ops + [ToTensor(), ToDevice(self.device, non_blocking=True),
                                      ToTorchImage(channels_last=True)]
        label_pipeline = [IntDecoder(), ToTensor(), Squeeze(), ToDevice(self.device, non_blocking=True)]
        threads = self._numba_threads(self.num_workers)
        try:
            self._loader = Loader(self.path, batch_size=self.batch_size, num_workers=threads, os_cache=os_cache,
                                  order=EpochOrder(), distributed=False, seed=self.seed,
                                  pipelines={IMAGE_FIELD: image_pipeline, LABEL_FIELD: label_pipeline},
                                  drop_last=False,  # our order already holds whole batches when drop_last
                                  batches_ahead=batches_ahead)
        except Exception as error:  # ffcv's own errors on a file our parser accepted
            raise DataError(f"{self.path}: ffcv cannot load this .beton ({type(error).__name__}: "
                            f"{_one_line(error)})") from None
        finally:
            torch.set_num_threads(torch_threads)

    @staticmethod
    def _numba_threads(num_workers: int) -> int:
        import numba
        limit = int(numba.config.NUMBA_NUM_THREADS)
        return limit if num_workers < 1 else min(int(num_workers), limit)

    def _image_decoding(self, beton: BetonFile) -> list:
        """Decoder and augmentation operations; training ones are seeded by (seed, epoch,
        sample index) through ``self._augment_state`` (utils/data/ffcv_augment.py)."""
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, NDArrayDecoder, SimpleRGBImageDecoder

        from utils.data import ffcv_augment as fa
        policy, train, state = self.policy, self.train, self._augment_state
        if beton.fields[IMAGE_FIELD].kind == "ndarray":
            ops = [NDArrayDecoder()]
        elif policy.resized_crop:
            size = (self.output_resolution, self.output_resolution)
            ops = [fa.SeededRandomResizedCropDecoder(state, size, scale=RRC_SCALE, ratio=RRC_RATIO) if train
                   else CenterCropRGBImageDecoder(size, ratio=EVAL_CROP_RATIO)]
        else:
            ops = [SimpleRGBImageDecoder()]
        if train and policy.horizontal_flip:
            ops.append(fa.SeededHorizontalFlip(state, RRC_FLIP_UNIFORM if policy.resized_crop else FLIP_UNIFORM))
        if train and policy.translate_padding:
            ops.append(fa.SeededTranslate(state, policy.translate_padding, TRANSLATE_UNIFORMS))
        return ops

    def _stop(self, iterator) -> None:
        """Close an epoch iterator and let its prefetch thread end.

        Its queued batches are dropped: nobody reads them (so the thread reading the next
        epoch in ``_augment_state`` would not matter either).  ffcv 1.0.2's thread sees the
        close only when a put into its full queue times out (0.5 s), and at the end of its
        order it puts its end marker with no timeout: with a full queue it would wait
        forever, holding its batch buffers.  So: wait a little, drop what is queued, repeat."""
        iterator.close()
        deadline = time.monotonic() + 10
        while iterator.is_alive() and time.monotonic() < deadline:
            iterator.join(timeout=0.6)
            try:
                while True:
                    iterator.output_queue.get_nowait()
            except queue.Empty:
                pass
        if self._live is iterator:
            self._live = None

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        if start_batch >= len(self):
            return
        if self._live is not None:           # an unfinished generator of an earlier call
            self._stop(self._live)
        torch_threads = torch.get_num_threads()
        self._pending_start_batch = start_batch
        self._loader.next_epoch = epoch
        self._augment_state.set_epoch(epoch)
        iterator = self._live = iter(self._loader)
        self._pending_start_batch = 0
        torch.set_num_threads(torch_threads)
        try:
            while True:
                batch = self._next(iterator)
                if batch is None:
                    return
                yield self._finish(*batch)
        finally:
            self._stop(iterator)   # stops ffcv's prefetch thread when the caller breaks early

    @staticmethod
    def _next(iterator):
        """ffcv's ``EpochIterator.__next__`` (None at the end) that does not wait forever
        when the prefetch thread died: ffcv 1.0.2 prints the thread's exception and leaves
        the consumer blocked on the queue."""
        while True:
            try:
                item = iterator.output_queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not iterator.is_alive() and iterator.output_queue.empty():
                    raise DataError("ffcv's loader thread stopped with an error (its traceback is printed above)") \
                        from None
        if item is None:
            return None
        slot, result = item
        if getattr(iterator, "cuda_streams", [None])[slot] is not None:
            iterator.current_stream.wait_stream(iterator.cuda_streams[slot])   # as ffcv's __next__
        return result


# -- torch back-end
def flip_translate(batch: torch.Tensor, uniforms: torch.Tensor, *, flip: bool, padding: int) -> torch.Tensor:
    """Flip, then translate, a uint8 (B, H, W, C) batch with the uniforms of its samples
    ((B, >= 3) float64 from ``augment_uniforms``, on the batch's device): a flip where
    ``u0 < 0.5``; a shift by ``floor(u * (2 * padding + 1)) - padding`` rows (u1) and columns
    (u2) with zero fill.  Batched tensor ops only (no host synchronisation on a GPU); the
    torch and memory back-ends share it."""
    if flip:
        flipped = (uniforms[:, FLIP_UNIFORM] < 0.5).view(-1, 1, 1, 1)
        batch = torch.where(flipped, batch.flip(2), batch)
    if padding:
        n, height, width, channels = batch.shape
        padded = batch.new_zeros((n, height + 2 * padding, width + 2 * padding, channels))
        padded[:, padding:padding + height, padding:padding + width] = batch
        span = 2 * padding + 1
        dy = (uniforms[:, TRANSLATE_UNIFORMS[0]] * span).to(torch.int64)
        dx = (uniforms[:, TRANSLATE_UNIFORMS[1]] * span).to(torch.int64)
        device = batch.device
        rows = dy[:, None] + torch.arange(height, device=device)          # (B, H)
        cols = dx[:, None] + torch.arange(width, device=device)           # (B, W)
        batch = padded[torch.arange(n, device=device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return batch


class TorchBetonLoader(BetonLoader):
    """Reads the .beton with ``BetonFile``: no ffcv Loader, no numba compile.

    Decoding: raw RGB and gray bytes as stored; JPEG with OpenCV (ffcv uses libjpeg-turbo
    with TJFLAG_FASTDCT, so JPEG pixels may differ by a few levels between back-ends).
    Crops are resized with cv2.INTER_AREA like ffcv.  Decoded images are cached in memory
    when they fit in ``cache_bytes``: fixed-size datasets as one (N, H, W, C) array decoded
    at the first batch (CIFAR-10 train: 150 MB, well under a second), variable-size ones
    image by image.  ``num_workers > 1`` decodes in that many threads.

    Augmentation (training): flip (p=0.5), then translate by -p..p with zero fill (the
    order of ffcv's CIFAR example); ImageNet: random resized crop then flip.  Random
    numbers come from ``augment_uniforms(seed, epoch, sample index)``.
    """

    backend = "torch"
    cache_bytes = 2 << 30

    def __init__(self, beton: BetonFile, spec: DatasetSpec, **kwargs):
        super().__init__(beton, spec, **kwargs)
        self._beton = beton
        self._labels = np.asarray(beton.metadata[LABEL_FIELD], dtype=np.int64)
        records = beton.metadata[IMAGE_FIELD]
        if beton.fields[IMAGE_FIELD].kind == "ndarray":
            decoded_bytes = beton.num_samples * int(np.prod(beton.fields[IMAGE_FIELD].shape))
        else:
            decoded_bytes = int((records["height"].astype(np.int64) * records["width"] * 3).sum())
        fits = decoded_bytes <= self.cache_bytes
        self._fixed_size = not self.policy.resized_crop       # validated: every image H x W x C
        self._array: Optional[np.ndarray] = None              # fixed size: all images, filled at first use
        self._cache: Optional[List[Optional[np.ndarray]]] = (
            [None] * beton.num_samples if fits and not self._fixed_size else None)
        self._cache_all = fits and self._fixed_size
        self._pool = ThreadPoolExecutor(self.num_workers) if self.num_workers > 1 else None

    def _images_at(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, C) stored images of a fixed-size dataset."""
        if self._cache_all:
            if self._array is None:
                self._array = np.stack(self._map(self._image, range(self._beton.num_samples)))
            return self._array[indices]
        return np.stack(self._map(self._image, [int(i) for i in indices]))

    def _image(self, index: int) -> np.ndarray:
        if self._cache is None:
            return self._beton.decode_image(index)     # callers copy (np.stack, crops)
        cached = self._cache[index]
        if cached is None:
            cached = self._cache[index] = np.array(self._beton.decode_image(index))
        return cached

    def _map(self, function: Callable, items) -> list:
        if self._pool is None:
            return [function(item) for item in items]
        return list(self._pool.map(function, items))

    def _batch_images(self, indices: np.ndarray, epoch: int) -> torch.Tensor:
        """uint8 (B, H, W, C) of this batch, augmented when training."""
        policy, train = self.policy, self.train
        if policy.resized_crop:
            res = self.output_resolution
            uniforms = augment_uniforms(self.seed, epoch, indices, RRC_UNIFORMS + 1) if train else None

            def crop(k: int) -> np.ndarray:
                import cv2
                image = self._image(int(indices[k]))
                height, width = image.shape[:2]
                i, j, h, w = (default_random_crop_box(height, width, uniforms[k]) if train
                              else center_crop_box(height, width))
                out = cv2.resize(np.ascontiguousarray(image[i:i + h, j:j + w]), (res, res),
                                 interpolation=cv2.INTER_AREA)
                return out.reshape(res, res, image.shape[2])

            batch = torch.from_numpy(np.stack(self._map(crop, range(len(indices)))))
            if train and policy.horizontal_flip:
                flip = torch.from_numpy(uniforms[:, RRC_FLIP_UNIFORM] < 0.5)
                batch[flip] = batch[flip].flip(2)
            return batch
        batch = torch.from_numpy(self._images_at(indices))
        if not train or not (policy.horizontal_flip or policy.translate_padding):
            return batch
        uniforms = torch.from_numpy(augment_uniforms(self.seed, epoch, indices, 3))
        return flip_translate(batch, uniforms, flip=policy.horizontal_flip, padding=policy.translate_padding)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        order = self.order(epoch, start_batch)
        for begin in range(0, len(order), self.batch_size):
            indices = order[begin:begin + self.batch_size]
            images = self._batch_images(indices, epoch).permute(0, 3, 1, 2)   # NCHW view
            yield self._finish(images, torch.from_numpy(self._labels[indices]))


# A class, or "module:Class" for back-ends in modules that import this one (imported on first use).
LOADER_BACKENDS: Dict[str, Any] = {"ffcv": FFCVBetonLoader, "torch": TorchBetonLoader,
                                   "memory": "utils.data.memory_loader:MemoryBetonLoader"}


def get_loader_backend(name: str) -> type:
    backend = lookup(LOADER_BACKENDS, "loader back-end", name, DataError)
    if isinstance(backend, str):
        import importlib
        module, attribute = backend.split(":")
        backend = LOADER_BACKENDS[name] = getattr(importlib.import_module(module), attribute)
    return backend


def make_loader(path, spec: DatasetSpec, *, train: bool, batch_size: int, num_workers: int, device,
                rank: int = 0, world_size: int = 1, seed: int = 0, channels_last: bool = False,
                backend: str = "ffcv", resolution: Optional[int] = None,
                drop_last: Optional[bool] = None, indices: Optional[np.ndarray] = None,
                **backend_options) -> BetonLoader:
    """A loader over ``path`` for ``spec`` (validated first with ``validate_beton``).

    ``batch_size`` is the GLOBAL batch size: each of ``world_size`` ranks gets
    ``batch_size // world_size`` per batch.  ``train`` shuffles, augments (the spec's
    ``train_augment``) and drops the last partial global batch; evaluation does none of
    that and covers every sample exactly once over all ranks.  ``drop_last`` overrides
    the default.  ``indices``: read only these samples of the file (sorted indices; e.g. one side
    of ``utils.data.validation.split_indices``), the same ones on every rank and back-end.
    ``resolution``: output size for datasets with resized crops (ImageNet:
    RandomResizedCrop size for training, center crop size for evaluation); other datasets
    are used at their stored size, which ``resolution`` may only repeat.
    ``backend_options``: ffcv back-end ``os_cache`` (default True) and ``batches_ahead``.
    """
    require_complete(spec)
    loader_class = get_loader_backend(backend)
    loader_class.check_spec(spec)
    beton = BetonFile(path)
    _validate(beton, spec, None)
    _check_record(beton, spec, verify_checksum=False)     # the harness hashes once, in validate_beton
    policy = get_augment_policy(spec.train_augment)
    if resolution is not None:
        resolution = _check_int("resolution", resolution, 1)
    if policy.resized_crop:
        output_resolution = resolution or spec.resolution
    else:
        if resolution not in (None, spec.resolution):
            raise DataError(f"resolution={resolution}: {spec.name} images are used at their stored size "
                            f"{spec.resolution}x{spec.resolution}; leave resolution unset or use {spec.resolution}")
        output_resolution = None
    batch_size = _check_int("batch_size", batch_size, 1)
    return loader_class(beton, spec, train=train, global_batch_size=batch_size, num_workers=int(num_workers),
                        device=device, rank=rank, world_size=world_size, seed=seed,
                        channels_last=channels_last, output_resolution=output_resolution,
                        drop_last=bool(train) if drop_last is None else bool(drop_last), indices=indices,
                        **backend_options)
