"""Dataset specs: the registry and the rules that come with a dataset.

* ``DATASETS`` / ``get_dataset_spec`` / ``register_dataset``: one ``DatasetSpec`` per dataset:
  resolution, channels, classes, mean/std, the default training augmentation, how
  ``utils/data/writer.py`` stores the images and reads the source (``utils/data/sources.py``),
  whether a mirror flip changes labels.  ``package.module:NAME`` names an outside entry.
  ``folder`` is completed from its training file's write record
  (``utils.data.records.resolve_dataset_spec``).
* ``AUGMENTATIONS``: the training augmentation policies; ``dataset.augment`` replaces a
  dataset's default (``with_augment``), refused where it does not fit the images.
* ``STORAGES``: how images are stored in a ``.beton`` (raw, jpg, gray)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional

from utils.core.registry import lookup
from utils.data import idx, sources
from utils.data.sources import DataError, SourceFormat


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: what the harness needs, and how ``utils/data/writer.py`` reads its source."""
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
                    source=idx.MNIST, classes=idx.MNIST_CLASSES),
        # Fashion-MNIST (Xiao et al. 2017): 28x28 grey photos of clothing; statistics over the 60,000
        # training images.
        DatasetSpec("fashion_mnist", 28, 1, 10, (0.2860,), (0.3530,), "none", "gray", flip_changes_labels=True,
                    source=idx.FASHION_MNIST, classes=idx.FASHION_MNIST_CLASSES),
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



def get_dataset_spec(name: str) -> DatasetSpec:
    """The registry entry ``name``, or the ``DatasetSpec`` that ``package.module:NAME`` names
    (an outside dataset: registered on first use under its own ``spec.name``)."""
    from utils.core.user_code import UserCodeError, import_object, is_import_path
    if not is_import_path(name):
        return lookup(DATASETS, "dataset", name, DataError)
    try:
        spec = import_object(name)
    except UserCodeError as error:
        raise DataError(str(error)) from None
    if not isinstance(spec, DatasetSpec):
        raise DataError(f"{name} is a {type(spec).__name__}, not a utils.data.specs.DatasetSpec")
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
    return lookup(AUGMENTATIONS, "augmentation", name, DataError)


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
    return lookup(STORAGES, "storage", name, DataError)


def storage_for(channels: int, jpg: bool) -> str:
    """The STORAGES key of images with ``channels`` channels, JPEG-compressed or not."""
    if channels == 1:
        if jpg:
            raise DataError("greyscale images are stored raw (JPEG storage is for RGB images)")
        return "gray"
    return "rgb_jpg" if jpg else "rgb_raw"


