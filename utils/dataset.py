"""Dataset registry, the data order, and the loaders over FFCV ``.beton`` files.

What is here:

* ``DATASETS`` / ``get_dataset_spec`` / ``register_dataset``: one ``DatasetSpec`` per dataset:
  resolution, channels, classes, mean/std, the default training augmentation, how
  ``utils/write_beton.py`` stores the images and reads the source (``utils/data_sources.py``),
  whether a mirror flip changes labels.  ``package.module:NAME`` names an outside entry.
  ``folder`` is completed from its training file's write record (``resolve_dataset_spec``);
  ``dataset.augment`` replaces the default augmentation (``with_augment``).
* ``epoch_order``: THE definition of which samples a rank sees in which batch.  Both
  loader back-ends use it, so 1 process and N processes see the same global batches, and
  a run resumed in the middle of an epoch (``start_batch``) sees exactly the batches it
  had not seen yet.
* ``make_loader(path, spec, train=..., batch_size=GLOBAL, ...)`` -> a ``BetonLoader``
  whose ``batches(epoch, start_batch)`` yields ``(images, labels)``: float32 normalized
  NCHW images on ``device`` (``torch.channels_last`` when asked) and int64 labels.
  Three back-ends (``LOADER_BACKENDS``) read the same file:

  - ``'ffcv'``: ffcv 1.0.2's ``Loader`` (numba-compiled decoding and augmentation).  Our
    order is plugged in as a custom ``TraversalOrder``; ffcv's own distributed sampler is
    not used (``distributed=False``; every rank passes its own shard of the order).  The
    training augmentations are our own ffcv operations (``utils/ffcv_augment.py``).
  - ``'torch'``: no ffcv, no numba.  The file is parsed here (``BetonFile``), images are
    decoded with numpy / OpenCV and augmented with torch ops.  For debugging and fast tests.
  - ``'memory'`` (``utils/memory_loader.py``): small fixed-size datasets decoded once into
    one uint8 tensor on the device; batches by tensor ops there.

  Every back-end draws its augmentation numbers from ``utils/augment.py`` as a function of
  ``(seed, epoch, sample index)`` only, so for raw-stored (and gray) images all three give
  bit-identical batches, training and evaluation (on the same device).

* ``inspect_beton`` / ``validate_beton``: read a ``.beton`` without ffcv and say what is
  in it, or refuse it for a dataset with one-line ``DataError`` messages (missing,
  truncated or garbage file, images of the wrong size or channels, labels out of range,
  written for another dataset or changed since, per its write record ``NAME.beton.json``).

The ``.beton`` layout (ffcv/types.py, format version 2; all little-endian):
header (version u2, num_fields u2, page_size u4, num_samples u8, alloc_table_ptr u8) |
one 1041-byte descriptor per field (type id, 16-byte name, 1024 bytes of arguments) |
a metadata table, one aligned record per sample with one entry per field (an int label
is stored inline; an image stores mode/width/height and a pointer to its bytes) | the
data pages | the allocation table at ``alloc_table_ptr``: (sample_id, ptr, size) u8
triples, one per stored data region.

Field names: ``image`` and ``label`` (the names ffcv's own examples and ffcv-imagenet
use).  Gray images are stored as an ``NDArrayField`` of uint8 with shape (H, W, 1), i.e.
the same HWC layout the RGB decoders produce, so the rest of the pipeline is shared.
"""
from __future__ import annotations

import math
import os
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from utils import data_sources as sources
from utils.augment import (EVAL_CROP_RATIO, FLIP_UNIFORM, RRC_FLIP_UNIFORM, RRC_RATIO, RRC_SCALE, RRC_UNIFORMS,
                           TRANSLATE_UNIFORMS, augment_uniforms, center_crop_box, default_random_crop_box)
from utils.data_sources import DataError, SourceFormat


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: what the harness needs, and how ``utils/write_beton.py`` reads its source."""
    name: str
    resolution: int          # stored side length (px); ImageNet: default training crop size
    channels: int
    num_classes: int
    mean: tuple              # per channel, [0, 1] units
    std: tuple               # per channel, [0, 1] units
    train_augment: str       # key of AUGMENTATIONS: the default of dataset.augment
    storage: str             # key of STORAGES: how write_beton stores the images
    flip_changes_labels: bool = False    # a mirror image is another class (digits): no flips, no test-time flip
    fixed_size: bool = True              # every image is resolution x resolution (False: ImageNet-like)
    source: Optional[SourceFormat] = None    # how write_beton reads it (None: nothing to write from)
    classes: Optional[tuple] = None      # class names in label order, when known
    from_record: bool = False            # size, channels, classes, mean/std come from the write record (folder)


DATASETS: Dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to the registry under ``spec.name`` (refused when the name is taken)."""
    if spec.name in DATASETS and DATASETS[spec.name] != spec:
        raise DataError(f"dataset name {spec.name!r} is taken; give the new dataset a name of its own")
    DATASETS[spec.name] = spec
    return spec


for _spec in (
        # CIFAR statistics: per-channel mean / std over the 50,000 training images.
        DatasetSpec("cifar10", 32, 3, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                    "flip_crop", "rgb_raw", source=sources.CIFAR10),
        DatasetSpec("cifar100", 32, 3, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                    "flip_crop", "rgb_raw", source=sources.CIFAR100),
        # SVHN: digits are not mirror symmetric, so no flip.
        DatasetSpec("svhn", 32, 3, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                    "crop", "rgb_raw", flip_changes_labels=True, source=sources.SVHN),
        DatasetSpec("mnist", 28, 1, 10, (0.1307,), (0.3081,), "none", "gray", flip_changes_labels=True,
                    source=sources.MNIST),
        DatasetSpec("fashionmnist", 28, 1, 10, (0.2860,), (0.3530,), "none", "gray", flip_changes_labels=True,
                    source=sources.FASHIONMNIST),
        DatasetSpec("imagenet", 224, 3, 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                    "rrc", "rgb_jpg", fixed_size=False, source=sources.IMAGENET),
        # sklearn's 8x8 digits (values 0..16 stored as round(v * 255 / 16)); statistics over
        # all 1797 images.
        DatasetSpec("digits", 8, 1, 10, (0.3053,), (0.3759,), "none", "gray", flip_changes_labels=True,
                    source=sources.DIGITS),
        # Any ImageFolder tree of one square size: the rest is measured when it is written and read
        # back from the training file's write record (``spec_from_record``).
        DatasetSpec("folder", 0, 0, 0, (), (), "none", "", source=sources.FOLDER, from_record=True),
):
    register_dataset(_spec)


def _lookup(registry: Dict[str, Any], kind: str, name: str) -> Any:
    """registry[name], or a DataError naming the valid names."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(registry))}") from None


def get_dataset_spec(name: str) -> DatasetSpec:
    """The registry entry ``name``, or the ``DatasetSpec`` that ``package.module:NAME`` names
    (an outside dataset: registered on first use under its own ``spec.name``)."""
    from utils.user_code import UserCodeError, import_object, is_import_path
    if not is_import_path(name):
        return _lookup(DATASETS, "dataset", name)
    try:
        spec = import_object(name)
    except UserCodeError as error:
        raise DataError(str(error)) from None
    if not isinstance(spec, DatasetSpec):
        raise DataError(f"{name} is a {type(spec).__name__}, not a utils.dataset.DatasetSpec")
    if spec.name in DATASETS and DATASETS[spec.name] != spec:
        raise DataError(f"{name} is named {spec.name!r}, the name of another registered dataset; "
                        f"give it a name of its own")
    return register_dataset(spec)


def dataset_names() -> List[str]:
    """The registered datasets' names (what dataset.name and write_beton --dataset accept, besides
    package.module:NAME)."""
    return sorted(DATASETS)


@dataclass(frozen=True)
class AugmentPolicy:
    """What a training loader does to each image (evaluation loaders never augment)."""
    resized_crop: bool       # train: RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) to the output
                             # size; eval: center crop of side EVAL_CROP_RATIO * short side, resized.
                             # False: images are used at their stored (constant) size.
    horizontal_flip: bool    # probability 0.5
    translate_padding: int   # px; shift uniformly by -p..p in x and y, zero fill (== pad p + random crop)


# dataset.augment: these names, or ``default`` (the dataset's own, DatasetSpec.train_augment).
AUGMENTATIONS: Dict[str, AugmentPolicy] = {
    "none": AugmentPolicy(resized_crop=False, horizontal_flip=False, translate_padding=0),
    "flip_crop": AugmentPolicy(resized_crop=False, horizontal_flip=True, translate_padding=4),   # CIFAR-style
    "crop": AugmentPolicy(resized_crop=False, horizontal_flip=False, translate_padding=4),        # SVHN: no flip
    "rrc": AugmentPolicy(resized_crop=True, horizontal_flip=True, translate_padding=0),          # ImageNet-style
}
DEFAULT_AUGMENT = "default"


def augment_names() -> List[str]:
    """What dataset.augment accepts."""
    return [DEFAULT_AUGMENT, *AUGMENTATIONS]


def get_augment_policy(name: str) -> AugmentPolicy:
    return _lookup(AUGMENTATIONS, "augmentation", name)


def _augment_misfit(spec: DatasetSpec, policy: AugmentPolicy) -> Optional[str]:
    """Why ``policy`` does not suit ``spec`` (None: it does)."""
    if policy.horizontal_flip and spec.flip_changes_labels:
        return f"it mirrors images, and a mirrored {spec.name} image is another class (or none)"
    if not policy.resized_crop and not spec.fixed_size:
        return f"it uses images at their stored size, and {spec.name}'s images vary in size"
    if policy.resized_crop and spec.storage == "gray":
        return f"resized crops are made for RGB images and {spec.name} is greyscale"
    return None


def with_augment(spec: DatasetSpec, augment: str = DEFAULT_AUGMENT) -> DatasetSpec:
    """``spec`` training with ``augment`` (``default``: its own); a combination that does not
    apply is a one-line DataError."""
    if augment in (None, DEFAULT_AUGMENT):
        return spec
    why = _augment_misfit(spec, get_augment_policy(augment))
    if why:
        allowed = [name for name, policy in AUGMENTATIONS.items() if _augment_misfit(spec, policy) is None]
        raise DataError(f"dataset.augment={augment} does not suit dataset.name={spec.name}: {why}; "
                        f"allowed: {', '.join([DEFAULT_AUGMENT, *allowed])}")
    return replace(spec, train_augment=augment)


def uses_resized_crops(spec: DatasetSpec, augment: str = DEFAULT_AUGMENT) -> bool:
    """Whether ``spec`` trained with ``augment`` takes random resized crops (so its training
    resolution is free, e.g. progressive resizing)."""
    name = spec.train_augment if augment in (None, DEFAULT_AUGMENT) else augment
    return get_augment_policy(name).resized_crop


@dataclass(frozen=True)
class StorageFormat:
    """How write_beton stores a dataset's images, and which ffcv field a loader expects."""
    field_kind: str          # 'rgb_image' (ffcv RGBImageField) or 'ndarray' (NDArrayField uint8 (H, W, 1))
    write_mode: str          # RGBImageField write_mode ('raw' / 'proportion'); '' for ndarray
    jpeg: bool = False       # write_beton's max_resolution / jpeg_quality / compress_probability apply


STORAGES: Dict[str, StorageFormat] = {
    "rgb_raw": StorageFormat("rgb_image", "raw"),
    # JPEG with probability compress_probability (ffcv-imagenet's 'proportion' mode), the
    # rest raw; both are decoded by the same loaders.
    "rgb_jpg": StorageFormat("rgb_image", "proportion", jpeg=True),
    "gray": StorageFormat("ndarray", ""),
}


def get_storage(name: str) -> StorageFormat:
    return _lookup(STORAGES, "storage", name)


def storage_for(channels: int, jpg: bool) -> str:
    """The STORAGES key of images with ``channels`` channels, JPEG-compressed or not."""
    if channels == 1:
        if jpg:
            raise DataError("greyscale images are stored raw (JPEG storage is for RGB images)")
        return "gray"
    return "rgb_jpg" if jpg else "rgb_raw"


# --------------------------------------------------------------------------- data order
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def epoch_order(num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int,
                global_batch_size: int, shuffle: bool = True, drop_last: bool = True,
                start_batch: int = 0) -> np.ndarray:
    """Indices (int64) that rank ``rank`` reads in epoch ``epoch``, in order.

    ``perm`` is ``np.random.default_rng([seed, epoch]).permutation(n)`` when ``shuffle``,
    else ``arange(n)``.  With G = global_batch_size, W = world_size, L = G / W:

    * ``drop_last=True`` (training): the first (n // G) * G entries of ``perm`` form the
      global batches ``perm[b*G:(b+1)*G]``; rank r takes the r-th contiguous chunk of L of
      every global batch (``perm.reshape(nb, W, L)[:, r]``).  So the union of the ranks'
      b-th local batches is the b-th global batch whatever W is.
    * ``drop_last=False`` (evaluation): every sample exactly once over all ranks; rank r
      takes the r-th **contiguous** part of ``np.array_split(perm, W)`` (sizes differ by at
      most one; ranks may hold different numbers of batches, the last one partial).

    ``start_batch`` skips the first ``start_batch`` local batches (``start_batch * L``
    indices) for an exact mid-epoch resume.  G not divisible by W is a DataError.
    """
    num_samples = _check_int("num_samples", num_samples, 0)
    seed = _check_int("seed", seed, 0)
    epoch = _check_int("epoch", epoch, 0)
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise DataError(f"rank={rank} must be < world_size={world_size}")
    global_batch_size = _check_int("global batch size", global_batch_size, 1)
    start_batch = _check_int("start_batch", start_batch, 0)
    if global_batch_size % world_size:
        raise DataError(f"global batch size {global_batch_size} is not divisible by world_size={world_size}; "
                        f"use a multiple of {world_size}")
    local_batch = global_batch_size // world_size

    if shuffle:
        perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
    else:
        perm = np.arange(num_samples)
    if drop_last:
        num_batches = num_samples // global_batch_size
        mine = perm[:num_batches * global_batch_size].reshape(num_batches, world_size, local_batch)[:, rank]
        mine = mine.reshape(-1)
    else:
        mine = np.array_split(perm, world_size)[rank]
    return np.ascontiguousarray(mine[start_batch * local_batch:], dtype=np.int64)


def batches_per_epoch(num_samples: int, *, rank: int, world_size: int, global_batch_size: int,
                      drop_last: bool) -> int:
    """len(epoch_order(...)) in local batches, without building the order."""
    local_batch = global_batch_size // world_size
    if drop_last:
        return num_samples // global_batch_size
    part = num_samples // world_size + (1 if rank < num_samples % world_size else 0)
    return math.ceil(part / local_batch)


# --------------------------------------------------------------------------- the .beton format
_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                    ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
_FIELD_DESCRIPTOR = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))],
                             align=True)
_ALLOC_ENTRY = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
_RGB_METADATA = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
_PTR_SIZE_METADATA = np.dtype([("ptr", "<u8"), ("size", "<u8")])
_NDARRAY_ARGS = np.dtype([("shape", "<u8", 32), ("type_length", "<u8")])
_FORMAT_VERSION = 2
_RGB_MODES = {0: "jpg", 1: "raw"}          # ffcv.fields.rgb_image.IMAGE_MODES
_MAX_FIELDS = 64                            # sanity bound while parsing an unknown file

# type id -> (kind, metadata dtype); ffcv/types.py TYPE_ID_HANDLER
_FIELD_TYPES = {
    0: ("float", np.dtype("<f8")),
    1: ("int", np.dtype("<i8")),
    2: ("rgb_image", _RGB_METADATA),
    3: ("bytes", _PTR_SIZE_METADATA),
    4: ("ndarray", np.dtype("<u8")),
    5: ("json", _PTR_SIZE_METADATA),
    6: ("torch_tensor", np.dtype("<u8")),
}


@dataclass(frozen=True)
class BetonField:
    name: str
    kind: str
    shape: Optional[tuple] = None           # ndarray fields
    dtype: Optional[np.dtype] = None        # ndarray fields


def _parse_ndarray_args(arguments: np.ndarray) -> Tuple[tuple, np.dtype]:
    import json
    header = arguments[:_NDARRAY_ARGS.itemsize].view(_NDARRAY_ARGS)[0]
    type_length = int(header["type_length"])
    if type_length > arguments.size - _NDARRAY_ARGS.itemsize:
        raise ValueError("ndarray field arguments are corrupt")
    type_desc = json.loads(arguments[_NDARRAY_ARGS.itemsize:][:type_length].tobytes().decode("ascii"))
    dtype = np.dtype([tuple(x) for x in type_desc])["f0"]
    shape = [int(s) for s in header["shape"]]
    while shape and shape[-1] == 0:
        shape.pop()
    return tuple(shape), dtype


class BetonFile:
    """A ``.beton`` parsed with numpy only (no ffcv, no numba).

    Every structural inconsistency (too short, wrong format version, unknown field type,
    tables beyond the end of the file, image data not in the allocation table) is a
    one-line DataError naming the file.  ``data(ptr)`` returns the bytes stored at a
    pointer, the way ffcv's memory managers find them (the size comes from the allocation
    table).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        where = self.path
        if not os.path.exists(where):
            raise DataError(f"{where}: .beton file not found")
        if not os.path.isfile(where):
            raise DataError(f"{where}: not a file (expected an FFCV .beton file)")
        size = os.path.getsize(where)
        self.file_size = size
        if size < _HEADER.itemsize:
            raise DataError(f"{where}: not an FFCV .beton file ({size} bytes, shorter than the "
                            f"{_HEADER.itemsize}-byte header; truncated or empty)")
        header = np.fromfile(where, dtype=_HEADER, count=1)[0]
        version = int(header["version"])
        if version != _FORMAT_VERSION:
            raise DataError(f"{where}: not an FFCV .beton file (format version field is {version}; "
                            f"ffcv 1.0 writes {_FORMAT_VERSION})")
        self.num_samples = int(header["num_samples"])
        self.page_size = int(header["page_size"])
        num_fields = int(header["num_fields"])
        if not 1 <= num_fields <= _MAX_FIELDS:
            raise DataError(f"{where}: corrupt .beton header ({num_fields} fields)")
        descriptors_end = _HEADER.itemsize + num_fields * _FIELD_DESCRIPTOR.itemsize
        if descriptors_end > size:
            raise DataError(f"{where}: truncated .beton ({size} bytes, field descriptors need {descriptors_end})")
        descriptors = np.fromfile(where, dtype=_FIELD_DESCRIPTOR, count=num_fields, offset=_HEADER.itemsize)
        fields: List[BetonField] = []
        for descriptor in descriptors:
            type_id = int(descriptor["type_id"])
            name = bytes(descriptor["name"]).split(b"\0", 1)[0].decode("ascii", errors="replace")
            if type_id not in _FIELD_TYPES:
                raise DataError(f"{where}: corrupt .beton (field {name!r} has unknown type id {type_id})")
            kind = _FIELD_TYPES[type_id][0]
            shape = dtype = None
            if kind in ("ndarray", "torch_tensor"):
                try:
                    shape, dtype = _parse_ndarray_args(np.asarray(descriptor["arguments"]))
                except Exception as error:  # any parse failure means a damaged descriptor
                    raise DataError(f"{where}: corrupt .beton (field {name!r}: {_one_line(error)})") from None
            fields.append(BetonField(name, kind, shape, dtype))
        self.fields: Dict[str, BetonField] = {f.name: f for f in fields}
        # Same construction as ffcv.types.get_metadata_type: unnamed members -> f0, f1, ...
        self.metadata_type = np.dtype([("", _FIELD_TYPES[t][1]) for t in descriptors["type_id"]], align=True)
        metadata_end = descriptors_end + self.num_samples * self.metadata_type.itemsize
        alloc_ptr = int(header["alloc_table_ptr"])
        if metadata_end > size or alloc_ptr > size:
            raise DataError(f"{where}: truncated .beton ({size} bytes; its header says the tables reach "
                            f"byte {max(metadata_end, alloc_ptr)})")
        if alloc_ptr < metadata_end or (size - alloc_ptr) % _ALLOC_ENTRY.itemsize:
            raise DataError(f"{where}: truncated or corrupt .beton (allocation table at byte {alloc_ptr} "
                            f"does not fit a {size}-byte file)")
        raw_metadata = np.fromfile(where, dtype=self.metadata_type, count=self.num_samples, offset=descriptors_end)
        # Rename f0, f1, ... to the field names so callers can index by name.
        self.metadata = raw_metadata.view(np.dtype({
            "names": [f.name for f in fields],
            "formats": [self.metadata_type.fields[n][0] for n in self.metadata_type.names],
            "offsets": [self.metadata_type.fields[n][1] for n in self.metadata_type.names],
            "itemsize": self.metadata_type.itemsize}))
        alloc = np.fromfile(where, dtype=_ALLOC_ENTRY, offset=alloc_ptr)
        if alloc.size and (int(alloc["ptr"].min()) < metadata_end
                           or int((alloc["ptr"] + alloc["size"]).max()) > alloc_ptr
                           or int(alloc["sample_id"].max()) >= self.num_samples):
            raise DataError(f"{where}: corrupt .beton (allocation table points outside the data region)")
        order = np.argsort(alloc["ptr"], kind="stable")
        self._ptrs = np.ascontiguousarray(alloc["ptr"][order])
        self._sizes = np.ascontiguousarray(alloc["size"][order])
        self._data_end = alloc_ptr
        self._mmap: Optional[np.memmap] = None

    # -- pointers and bytes
    def sizes_of(self, ptrs: np.ndarray) -> np.ndarray:
        """Allocation size of each pointer; DataError when a pointer is not an allocation."""
        ptrs = np.asarray(ptrs, dtype=np.uint64)
        if ptrs.size == 0:
            return np.zeros(0, dtype=np.uint64)
        where = np.searchsorted(self._ptrs, ptrs)
        found = where < self._ptrs.size
        found[found] = self._ptrs[where[found]] == ptrs[found]
        if not found.all():
            missing = int(np.count_nonzero(~found))
            raise DataError(f"{self.path}: truncated or corrupt .beton ({missing} sample(s) point to data "
                            f"missing from the allocation table)")
        return self._sizes[where]

    def data(self, ptr: int) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        ptr = int(ptr)
        size = int(self.sizes_of(np.array([ptr], dtype=np.uint64))[0])
        return self._mmap[ptr:ptr + size]

    # -- image decoding (the torch back-end)
    def image_field(self) -> BetonField:
        return self.fields[IMAGE_FIELD]

    def decode_image(self, index: int) -> np.ndarray:
        """uint8 HWC image of sample ``index`` (RGB: C=3; ndarray field: its stored shape)."""
        field = self.image_field()
        record = self.metadata[IMAGE_FIELD][index]
        if field.kind == "ndarray":
            raw = self.data(record)
            return raw.view(field.dtype).reshape(field.shape)
        raw = self.data(record["data_ptr"])
        height, width = int(record["height"]), int(record["width"])
        if _RGB_MODES.get(int(record["mode"])) == "raw":
            return raw.reshape(height, width, 3)
        import cv2
        bgr = cv2.imdecode(np.asarray(raw), cv2.IMREAD_COLOR)
        if bgr is None or bgr.shape[:2] != (height, width):
            raise DataError(f"{self.path}: sample {index}: stored JPEG does not decode to {height}x{width}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


IMAGE_FIELD = "image"
LABEL_FIELD = "label"


def _summarize(beton: BetonFile) -> dict:
    """Check the image data pointers and describe the file (no judgement about a dataset)."""
    summary = {
        "path": beton.path,
        "num_samples": beton.num_samples,
        "fields": {name: field.kind for name, field in beton.fields.items()},
        "image_kind": None, "channels": None, "image_shape": None,
        "min_height": None, "min_width": None, "max_resolution": None, "jpg_fraction": None,
        "label_min": None, "label_max": None,
    }
    image = beton.fields.get(IMAGE_FIELD)
    if image is not None and image.kind == "rgb_image" and beton.num_samples:
        records = beton.metadata[IMAGE_FIELD]
        heights = records["height"].astype(np.int64)
        widths = records["width"].astype(np.int64)
        sizes = beton.sizes_of(records["data_ptr"]).astype(np.int64)
        raw = records["mode"] == 1
        if (records["mode"] > 1).any() or (sizes[raw] != heights[raw] * widths[raw] * 3).any() \
                or (heights == 0).any() or (widths == 0).any():
            raise DataError(f"{beton.path}: corrupt .beton (image records disagree with their stored sizes)")
        constant = heights.min() == heights.max() and widths.min() == widths.max()
        summary.update(image_kind="rgb_image", channels=3,
                       image_shape=(int(heights[0]), int(widths[0]), 3) if constant else None,
                       min_height=int(heights.min()), min_width=int(widths.min()),
                       max_resolution=int(max(heights.max(), widths.max())),
                       jpg_fraction=float(np.mean(records["mode"] == 0)))
    elif image is not None and image.kind == "ndarray" and beton.num_samples:
        sizes = beton.sizes_of(beton.metadata[IMAGE_FIELD])
        expected = int(np.prod(image.shape)) * image.dtype.itemsize
        if (sizes != expected).any():
            raise DataError(f"{beton.path}: corrupt .beton (image records disagree with their stored sizes)")
        shape = tuple(image.shape)
        summary.update(image_kind="ndarray", image_shape=shape,
                       channels=shape[2] if len(shape) == 3 else None,
                       min_height=shape[0] if len(shape) >= 2 else None,
                       min_width=shape[1] if len(shape) >= 2 else None,
                       max_resolution=max(shape[:2]) if len(shape) >= 2 else None)
    label = beton.fields.get(LABEL_FIELD)
    if label is not None and label.kind == "int" and beton.num_samples:
        labels = beton.metadata[LABEL_FIELD]
        summary.update(label_min=int(labels.min()), label_max=int(labels.max()))
    return summary


def inspect_beton(path) -> dict:
    """Describe a .beton (sizes, fields, image shape / resolution range, label range).

    Raises DataError only when the file is missing or not a readable .beton.
    """
    return _summarize(BetonFile(path))


def _describe_images(summary: dict) -> str:
    shape = summary["image_shape"]
    if shape is not None and len(shape) == 3:
        return f"{shape[0]}x{shape[1]} images with {shape[2]} channel(s)"
    if summary["image_kind"] == "rgb_image":
        return f"RGB images of varying size (up to {summary['max_resolution']} px)"
    return f"image field of shape {shape}"


def _validate(beton: BetonFile, spec: DatasetSpec, num_classes: Optional[int]) -> dict:
    where = beton.path
    summary = _summarize(beton)
    fields = summary["fields"]
    if beton.num_samples == 0:
        raise DataError(f"{where}: the .beton holds no samples")
    storage = get_storage(spec.storage)
    shape = summary["image_shape"]
    wanted = f"{spec.resolution}x{spec.resolution} images with {spec.channels} channel(s)"
    # Sizes first: "28x28 images with 1 channel(s), cifar10 expects 32x32 ..." says more
    # than "wrong field type" when someone passes another dataset's file.
    if summary["image_kind"] is not None and shape is not None and len(shape) == 3 and (
            summary["channels"] != spec.channels
            or (spec.fixed_size and shape != (spec.resolution, spec.resolution, spec.channels))):
        raise DataError(f"{where}: holds {_describe_images(summary)}, {spec.name} expects {wanted} "
                        f"(is this the .beton of another dataset?)")
    if fields.get(IMAGE_FIELD) != storage.field_kind or fields.get(LABEL_FIELD) != "int":
        found = ", ".join(f"{name}:{kind}" for name, kind in fields.items())
        raise DataError(f"{where}: fields are ({found}); {spec.name} needs '{IMAGE_FIELD}' "
                        f"({storage.field_kind}) and '{LABEL_FIELD}' (int), as utils/write_beton.py writes them")
    if storage.field_kind == "ndarray" and (len(shape) != 3 or beton.fields[IMAGE_FIELD].dtype != np.uint8):
        raise DataError(f"{where}: image field is {beton.fields[IMAGE_FIELD].dtype} of shape {shape}; "
                        f"{spec.name} needs uint8 (H, W, {spec.channels})")
    if summary["channels"] != spec.channels or (
            spec.fixed_size and shape != (spec.resolution, spec.resolution, spec.channels)):
        raise DataError(f"{where}: holds {_describe_images(summary)}, {spec.name} expects {wanted} "
                        f"(is this the .beton of another dataset?)")
    classes = spec.num_classes if num_classes is None else int(num_classes)
    if summary["label_min"] < 0 or summary["label_max"] >= classes:
        raise DataError(f"{where}: labels span {summary['label_min']}..{summary['label_max']}, "
                        f"{spec.name} allows 0..{classes - 1}")
    return summary


# -- the write record: what utils/write_beton.py wrote, next to the file
RECORD_SUFFIX = ".json"
RECORD_FORMAT = "beton-write-record/2"
OLD_RECORD_FORMATS = ("beton-write-record/1",)   # still read (no classes, size, channels, mean/std)
CHECKSUM_AUTO_LIMIT = 1 << 30     # verify_checksum=None hashes files up to this size (CIFAR train: 0.16 GB)
STATISTICS_SAMPLE = 20_000        # images of varying size: mean/std over this many, evenly spread
_STATISTICS_CHUNK = 4096


def record_path(path) -> str:
    """``NAME.beton`` -> ``NAME.beton.json``: where the write record of a .beton lives."""
    return os.fspath(path) + RECORD_SUFFIX


def file_sha256(path, chunk: int = 1 << 22) -> str:
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def pixel_statistics(path, limit: Optional[int] = None) -> Tuple[List[float], List[float], int]:
    """(mean, std, images counted): per channel, in [0, 1] units, over every pixel of the
    images as the loaders decode them (before augmentation); ``limit``: at most that many
    images, evenly spread over the file."""
    beton = BetonFile(path)
    count = beton.num_samples
    indices = np.arange(count)
    if limit is not None and count > limit:
        indices = np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))
    sums = squares = None
    pixels = 0
    for begin in range(0, len(indices), _STATISTICS_CHUNK):
        chunk = indices[begin:begin + _STATISTICS_CHUNK]
        for image in _statistics_batches(beton, chunk):
            values = image.reshape(-1, image.shape[-1]).astype(np.float64)
            if sums is None:
                sums, squares = np.zeros(values.shape[1]), np.zeros(values.shape[1])
            sums += values.sum(axis=0)
            squares += (values * values).sum(axis=0)     # exact: integers below 2**53
            pixels += values.shape[0]
    mean = sums / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean * mean, 0.0))
    return [round(float(v) / 255, 6) for v in mean], [round(float(v) / 255, 6) for v in std], int(len(indices))


def _statistics_batches(beton: "BetonFile", indices: np.ndarray):
    """The decoded images at ``indices``: stacked when they share a size, else one by one."""
    images = [beton.decode_image(int(i)) for i in indices]
    if all(image.shape == images[0].shape for image in images):
        yield np.stack(images)
    else:
        yield from images


def stored_as(summary: dict) -> str:
    """How the images of a file are stored, as written: raw, jpg, or raw+jpg (some of each)."""
    fraction = summary.get("jpg_fraction") or 0.0
    return "raw" if fraction == 0 else "jpg" if fraction == 1 else "raw+jpg"


def make_record(path, spec: DatasetSpec, split: str, *, name: Optional[str] = None,
                classes: Optional[List[str]] = None) -> dict:
    """The write record of a validated .beton (see ``write_beton``): dataset, the files' name,
    split, sample count, classes (names in label order, when known), image size ([H, W], None:
    varying) and channels, per-channel mean/std measured here from the file (all images of a
    fixed-size dataset, else ``STATISTICS_SAMPLE`` of them), storage as written, size and
    SHA-256 of the file."""
    beton = BetonFile(path)
    summary = _summarize(beton)
    shape = summary["image_shape"]
    mean, std, counted = pixel_statistics(path, None if shape is not None else STATISTICS_SAMPLE)
    return {"format": RECORD_FORMAT, "dataset": spec.name, "name": name or spec.name, "split": split,
            "num_samples": summary["num_samples"], "num_classes": spec.num_classes,
            "classes": None if classes is None else [str(c) for c in classes],
            "size": None if shape is None else [int(shape[0]), int(shape[1])], "channels": summary["channels"],
            "mean": mean, "std": std, "statistics_images": counted,
            "storage": stored_as(summary), "jpg_fraction": summary["jpg_fraction"] or 0.0,
            "file_size": os.path.getsize(path), "sha256": file_sha256(path)}


def read_record(path) -> Optional[dict]:
    """The write record of ``path`` (a .beton), None when there is none; DataError when it
    exists but is not a record."""
    import json
    where = record_path(path)
    if not os.path.exists(where):
        return None
    try:
        with open(where) as f:
            record = json.load(f)
    except (OSError, ValueError) as error:
        raise DataError(f"{where}: unreadable write record ({type(error).__name__}: {_one_line(error)}); "
                        f"rewrite the .beton with utils/write_beton.py or delete this file") from None
    keys = ("format", "dataset", "split", "num_samples", "num_classes", "file_size", "sha256")
    if (not isinstance(record, dict) or record.get("format") not in (RECORD_FORMAT, *OLD_RECORD_FORMATS)
            or any(k not in record for k in keys)):
        raise DataError(f"{where}: not a write record of utils/write_beton.py (expected format {RECORD_FORMAT!r} "
                        f"with keys {', '.join(keys)}); rewrite the .beton or delete this file")
    return record


def spec_from_record(spec: DatasetSpec, train_path) -> DatasetSpec:
    """``spec`` (an entry with ``from_record``, e.g. ``folder``) completed from the write record
    of its training file: image size, channels, classes, mean/std, storage."""
    where = os.fspath(train_path)
    record = read_record(where)
    command = f"python -m utils.write_beton --dataset {spec.name} --root DIR --name NAME --out DIR"
    if record is None:
        raise DataError(f"{where}: dataset.name={spec.name} reads its classes, image size, channels and "
                        f"normalisation from the file's write record {os.path.basename(record_path(where))}, "
                        f"which is missing; write the files with {command}")
    if record["dataset"] != spec.name or record["format"] != RECORD_FORMAT:
        raise DataError(f"{where}: written for {record['dataset']} ({os.path.basename(record_path(where))}), "
                        f"not by {command}")
    classes, size, channels = record.get("classes"), record.get("size"), record.get("channels")
    mean, std = record.get("mean"), record.get("std")
    complete = (isinstance(classes, list) and len(classes) >= 1 and isinstance(size, list) and len(size) == 2
                and size[0] == size[1] and channels in (1, 3) and isinstance(mean, list) and isinstance(std, list)
                and len(mean) == len(std) == channels and record.get("storage") in ("raw", "jpg"))
    if not complete:
        raise DataError(f"{record_path(where)}: incomplete write record (classes, square size, channels 1 or 3, "
                        f"mean/std per channel, storage raw or jpg); rewrite the files with {command}")
    if min(std) <= 0:
        raise DataError(f"{record_path(where)}: a channel has the same value in every pixel (std {std}); "
                        f"nothing to normalise or learn from")
    return replace(spec, resolution=int(size[0]), channels=int(channels), num_classes=len(classes),
                   classes=tuple(classes), mean=tuple(float(m) for m in mean), std=tuple(float(v) for v in std),
                   storage=storage_for(int(channels), record["storage"] == "jpg"))


def require_complete(spec: DatasetSpec) -> None:
    """DataError for an entry still waiting for its write record (``folder`` before ``spec_from_record``)."""
    if spec.from_record and not spec.channels:
        raise DataError(f"dataset {spec.name}: its size, channels and classes come from the training file's write "
                        f"record; complete the spec with resolve_dataset_spec(name, train_path=...) first")


def resolve_dataset_spec(name: str, *, train_path=None, augment: str = DEFAULT_AUGMENT) -> DatasetSpec:
    """What a run trains on: the registry entry (or ``package.module:NAME``), completed from
    the training file's write record when the entry says so (``folder``), with
    ``dataset.augment`` applied.  One-line DataError for anything that does not fit."""
    spec = get_dataset_spec(name)
    if spec.from_record:
        spec = spec_from_record(spec, train_path)
    return with_augment(spec, augment)


def _check_record(beton: BetonFile, spec: DatasetSpec, verify_checksum: Optional[bool]) -> Tuple[Optional[dict],
                                                                                                Optional[str]]:
    """(record, note): refuse a file whose record names another dataset or no longer
    describes it; a file without a record gets a note instead."""
    where = beton.path
    record = read_record(where)
    if record is None:
        return None, (f"{where}: no write record ({os.path.basename(record_path(where))}), so the dataset it was "
                      f"written for is not checked (only image size, channels and label range); "
                      f"utils/write_beton.py writes one")
    if record["dataset"] != spec.name or record["num_classes"] != spec.num_classes:
        raise DataError(f"{where}: written for {record['dataset']} ({record['split']} split, {record['num_classes']} "
                        f"classes; see {os.path.basename(record_path(where))}), not for {spec.name} "
                        f"({spec.num_classes} classes): pass the {spec.name} file")
    if spec.classes is not None and record.get("classes") is not None and list(record["classes"]) != list(spec.classes):
        differ = next(i for i, (a, b) in enumerate(zip(record["classes"], spec.classes)) if a != b)
        raise DataError(f"{where}: its classes ({os.path.basename(record_path(where))}) differ from the training "
                        f"file's: class {differ} is {record['classes'][differ]!r}, not {spec.classes[differ]!r}; "
                        f"write both splits together with utils/write_beton.py")
    stale = []
    if record["num_samples"] != beton.num_samples:
        stale.append(f"{beton.num_samples} samples, the record says {record['num_samples']}")
    if record["file_size"] != beton.file_size:
        stale.append(f"{beton.file_size} bytes, the record says {record['file_size']}")
    if not stale and (verify_checksum or (verify_checksum is None and beton.file_size <= CHECKSUM_AUTO_LIMIT)):
        if file_sha256(where) != record["sha256"]:
            stale.append("its SHA-256 differs from the record's")
    if stale:
        raise DataError(f"{where}: does not match its write record {os.path.basename(record_path(where))} "
                        f"({'; '.join(stale)}): changed since it was written; rewrite it with "
                        f"utils/write_beton.py or delete the record")
    return record, None


def validate_beton(path, spec: DatasetSpec, num_classes: Optional[int] = None, *,
                   verify_checksum: Optional[bool] = None) -> dict:
    """``inspect_beton`` + refuse a file that does not fit ``spec`` (one-line DataError).

    Checks: the file exists and parses as a .beton (header, tables, every image pointer in
    the allocation table, raw sizes consistent); fields ``image`` (the kind the spec's
    storage uses) and ``label`` (int); channels; for datasets used at their stored size,
    every image is ``resolution x resolution``; labels in ``0 .. num_classes - 1``
    (``num_classes`` defaults to the spec's).  Then the write record ``PATH.json`` (written
    by utils/write_beton.py): a file written for another dataset is refused, and so is one
    that no longer matches its record (sample count, size, and the SHA-256 of the content
    when ``verify_checksum``; None: only for files up to 1 GiB).

    The summary gains ``record`` (the record, None without one) and ``note`` (one line to
    print for a file without a record, else None).
    """
    require_complete(spec)
    beton = BetonFile(path)
    summary = _validate(beton, spec, num_classes)
    summary["record"], summary["note"] = _check_record(beton, spec, verify_checksum)
    return summary


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
                 output_resolution: Optional[int], drop_last: bool):
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
        self.num_samples = beton.num_samples
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
        """The sample indices this rank reads in ``epoch`` (see ``epoch_order``)."""
        return epoch_order(self.num_samples, seed=self.seed, epoch=epoch, rank=self.rank,
                           world_size=self.world_size, global_batch_size=self.global_batch_size,
                           shuffle=self.shuffle, drop_last=self.drop_last, start_batch=start_batch)

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
        from utils.ffcv_augment import AugmentState
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
        sample index) through ``self._augment_state`` (utils/ffcv_augment.py)."""
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, NDArrayDecoder, SimpleRGBImageDecoder
        from utils import ffcv_augment as fa
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
                self._array = np.stack(self._map(self._image, range(self.num_samples)))
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
                                   "memory": "utils.memory_loader:MemoryBetonLoader"}


def get_loader_backend(name: str) -> type:
    backend = _lookup(LOADER_BACKENDS, "loader back-end", name)
    if isinstance(backend, str):
        import importlib
        module, attribute = backend.split(":")
        backend = LOADER_BACKENDS[name] = getattr(importlib.import_module(module), attribute)
    return backend


def make_loader(path, spec: DatasetSpec, *, train: bool, batch_size: int, num_workers: int, device,
                rank: int = 0, world_size: int = 1, seed: int = 0, channels_last: bool = False,
                backend: str = "ffcv", resolution: Optional[int] = None,
                drop_last: Optional[bool] = None, **backend_options) -> BetonLoader:
    """A loader over ``path`` for ``spec`` (validated first with ``validate_beton``).

    ``batch_size`` is the GLOBAL batch size: each of ``world_size`` ranks gets
    ``batch_size // world_size`` per batch.  ``train`` shuffles, augments (the spec's
    ``train_augment``) and drops the last partial global batch; evaluation does none of
    that and covers every sample exactly once over all ranks.  ``drop_last`` overrides
    the default.  ``resolution``: output size for datasets with resized crops (ImageNet:
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
                        drop_last=bool(train) if drop_last is None else bool(drop_last), **backend_options)
