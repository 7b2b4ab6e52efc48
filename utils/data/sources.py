"""How a dataset's own files are read: the sources that ``utils/data/writer.py`` turns into ``.beton`` files.

A dataset's registry entry (``utils.data.specs.DatasetSpec``) says, in its ``source``
(a ``SourceFormat``), how to read it: ``read(root, options) -> (train, test)``, two
``ImageSource`` objects that ffcv's writer indexes (``source[i] -> (uint8 HWC image, label)``).
An outside dataset (``package.module:NAME``, see docs/extending.md, "A new dataset") uses the same
pieces: ``ArraySource`` for images already in memory, ``ImageFolderSource`` /
``read_image_folder`` for files on disk.

What the built-in readers take from ``--root``:

=============  ==========================================================================
cifar10        ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` (torchvision's layout;
               ``--root`` may also be that folder): pickled dicts with ``data`` (N x 3072
               uint8, channel planes) and ``labels``.
cifar100       ``cifar-100-python/{train,test}``, labels from ``fine_labels``.
svhn           ``{train,test}_32x32.mat`` (``X``: 32x32x3xN, ``y``: 1..10, 10 means digit 0).
mnist          idx files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in ``--root`` (a flat
fashion_mnist  folder: Debian's packages), ``MNIST/raw`` / ``FashionMNIST/raw`` (torchvision's layout)
               or ``raw``: read by ``utils/data/idx.py``.
imagenet       an ImageFolder tree ``train/<class>/*`` and ``val/<class>/*`` (class index =
               position of the name in the sorted train classes); any image PIL opens,
               converted to RGB, of any size.
folder         any ImageFolder tree: split folders ``train`` and ``test`` (else ``val``), or
               those ``--splits`` names, one sub-folder per class; every image of one square
               size; grey when every image is single-channel, RGB otherwise.
digits         nothing: sklearn's bundled 8x8 digits (values 0..16 -> round(v*255/16)),
               split with ``train_test_split(test_size=360, stratify=labels,
               random_state=0)``: 1437 train / 360 test images.
=============  ==========================================================================

Files are read here, not through torchvision's dataset classes, so a subset or modified
copy is accepted: CIFAR, SVHN and MNIST-format files that are not the published ones give a
warning, not a refusal.  Every problem with the input is a one-line ``DataError``.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np


class DataError(ValueError):
    """Bad data input: the message is one line naming the file or value and what is allowed."""


Split = Tuple["ImageSource", "ImageSource"]     # (train, test)

DIGITS_TEST_SIZE = 360            # of 1797 -> 1437 train / 360 test
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class ReadOptions:
    """What the writer's command line passes to a reader (each reader uses what applies)."""
    max_resolution: Optional[int] = None       # JPEG-stored images of varying size: longest side
    splits: Optional[Mapping[str, str]] = None  # image folders: {"train": dir, "test": dir} under the root
    channels: Optional[int] = None              # folder: convert every image to 1 (grey) or 3 (RGB) channels


@dataclass(frozen=True)
class SourceFormat:
    """How ``utils/data/writer.py`` reads a dataset from disk."""
    read: Callable[[Optional[Path], ReadOptions], Split]   # (root or None, options) -> (train, test)
    download: Optional[Callable[[Path], None]] = None     # None: nothing to download / not possible
    needs_root: bool = True
    takes_splits: bool = False                            # an image-folder tree: --splits applies


# --------------------------------------------------------------------------- sources
class ImageSource:
    """Indexable for ffcv's DatasetWriter: ``source[i] -> (uint8 HWC image, int label)``."""

    max_sample_bytes: Optional[int] = None       # largest stored image, when known up front
    classes: Optional[List[str]] = None          # class names in label order, when the source knows them
    shape: Optional[Tuple[int, int, int]] = None  # (H, W, C) of every image, when they share one

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int):
        raise NotImplementedError


class ArraySource(ImageSource):
    """Images already in memory: uint8 (N, H, W) grey or (N, H, W, C), and N integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Optional[Sequence[str]] = None):
        if images.ndim == 3:
            images = images[..., None]       # gray (N, H, W) -> (N, H, W, 1)
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.max_sample_bytes = int(np.prod(self.images.shape[1:]))
        self.classes = None if classes is None else [str(c) for c in classes]
        self.shape = tuple(int(d) for d in self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")     # PIL modes read as one channel


class ImageFolderSource(ImageSource):
    """Files of an ImageFolder split, decoded with PIL in ffcv's writer processes.

    ``channels``: 3 converts every image to RGB, 1 to grey (an (H, W, 1) array)."""

    def __init__(self, samples: Sequence[Tuple[str, int]], max_resolution: Optional[int],
                 classes: Optional[Sequence[str]] = None, channels: int = 3, size: Optional[int] = None):
        self.samples = list(samples)
        self.channels = int(channels)
        self.shape = None if size is None else (int(size), int(size), self.channels)
        self.max_sample_bytes = 3 * max_resolution * max_resolution if max_resolution else None
        self.classes = None if classes is None else list(classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image
        path, label = self.samples[index]
        # RGBImageField's 'proportion' mode draws np.random.rand() per image: seeding with
        # the index makes the JPEG/raw choice reproducible (workers are throwaway processes).
        np.random.seed(index % (1 << 32))
        try:
            with Image.open(path) as image:
                if self.channels == 1:
                    array = np.asarray(image.convert("L"))[..., None]
                else:
                    array = np.asarray(image.convert("RGB"))
        except Exception as error:
            raise DataError(f"{path}: cannot read image ({type(error).__name__}: {error})") from None
        return np.ascontiguousarray(array), label


def list_image_folder(split_dir: Path, classes: Optional[List[str]]) -> Tuple[List[str], List[Tuple[str, int]]]:
    """(class names, [(file, label)]) of one split: a sub-folder per class; ``classes`` (the
    training split's) fixes the labels of another split."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: ImageFolder split not found (expected {split_dir}/<class>/<image files>)")
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    training = classes is None
    if training:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{split_dir}: class folders {unknown[:5]} are not among the {len(classes)} train classes")
    index = {name: i for i, name in enumerate(classes)}
    samples, empty = [], []
    for name in found:
        before = len(samples)
        for root, _, files in sorted(os.walk(split_dir / name)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS) and not file.startswith("."):
                    samples.append((os.path.join(root, file), index[name]))
        if len(samples) == before:
            empty.append(name)
    if not samples:
        raise DataError(f"{split_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under its class folders")
    if empty and training:  # a class without images: a label the network never sees, counted among the classes
        raise DataError(f"{split_dir}: class folder{'s' * (len(empty) > 1)} {', '.join(empty[:5])} "
                        f"hold{'s' * (len(empty) == 1)} no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                        f"add images or remove the folder")
    missing = [name for name in classes if name not in found or name in empty]
    if missing:  # another split (test): named, not refused (a subset may lack a class; its count says 0)
        warnings.warn(f"{split_dir}: no images of class{'es' * (len(missing) > 1)} {', '.join(missing[:5])}"
                      f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of the {len(classes)} train classes): "
                      f"this split does not test {'them' if len(missing) > 1 else 'it'}", stacklevel=3)
    return classes, samples


def split_folders(root: Path, splits: Optional[Mapping[str, str]], default_test: Sequence[str]) -> Dict[str, Path]:
    """{"train": folder, "test": folder} under ``root``: ``splits`` names them, else ``train`` and
    the first of ``default_test`` that exists."""
    if splits:
        return {split: root / splits[split] for split in ("train", "test")}
    test = next((name for name in default_test if (root / name).is_dir()), default_test[0])
    if not (root / test).is_dir():
        raise DataError(f"{root}: no test split folder ({' or '.join(default_test)}); name the folders with "
                        f"--splits train=DIR,test=DIR")
    return {"train": root / "train", "test": root / test}


# --------------------------------------------------------------------------- readers
def _require_root(root: Optional[Path], name: str) -> Path:
    if root is None:
        raise DataError(f"{name}: --root is required (the folder holding the {name} files)")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: root folder not found")
    return root


def _find_folder(root: Path, candidates: Sequence[str], needed: Sequence[str], what: str) -> Path:
    """The first of root/candidate (then root itself) holding every file in ``needed``."""
    for folder in [root / c for c in candidates] + [root]:
        if all((folder / n).is_file() for n in needed):
            return folder
    looked = ", ".join(str(root / c) for c in candidates) + f", {root}"
    raise DataError(f"{what}: files {', '.join(needed)} not found in any of: {looked}")


def _warn_if_modified(files: Dict[Path, str], dataset: str) -> None:
    differing = [p.name for p, md5 in files.items() if hashlib.md5(p.read_bytes()).hexdigest() != md5]
    if differing:
        warnings.warn(f"{dataset}: {', '.join(differing)} differ from the published files (MD5); "
                      f"a subset or modified copy? using them as they are", stacklevel=3)


# Published MD5s (the ones torchvision checks).
_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", label_key="labels",
                    train={f"data_batch_{i}": md5 for i, md5 in enumerate(
                        ["c99cafc152244af753f735de768cd75f", "d4bba439e000b95fd0a9bffe97cbabec",
                         "54ebc095f3ab1f0389bbae665268c751", "634d18415352ddfa80567beed471001a",
                         "482c414d41f54cd18b22e5b47cb7c3cb"], start=1)},
                    test={"test_batch": "40351d587109b95175f43aff81a1287e"}),
    "cifar100": dict(folder="cifar-100-python", label_key="fine_labels",
                     train={"train": "16019d7e3df5f24257cddd939b257f8d"},
                     test={"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"}),
}


def _dict_get(batch: dict, key: str, path: Path):
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise DataError(f"{path}: CIFAR batch has no {key!r} entry (keys: {sorted(map(str, batch))[:6]})")


def _read_cifar_batches(folder: Path, names: Sequence[str], label_key: str) -> ArraySource:
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")   # the CIFAR format is a (Python 2) pickle
        except Exception as error:
            raise DataError(f"{path}: not a CIFAR pickle batch ({type(error).__name__}: {error})") from None
        if not isinstance(batch, dict):
            raise DataError(f"{path}: not a CIFAR pickle batch (holds a {type(batch).__name__}, not a dict)")
        data = np.asarray(_dict_get(batch, "data", path))
        batch_labels = np.asarray(_dict_get(batch, label_key, path)).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
            raise DataError(f"{path}: data is {data.dtype} {data.shape} with {len(batch_labels)} labels; "
                            f"CIFAR stores uint8 (N, 3072) and N labels")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    return ArraySource(np.concatenate(images), np.concatenate(labels))


def _cifar(name: str) -> Callable[[Optional[Path], ReadOptions], Split]:
    layout = _CIFAR[name]

    def read(root: Optional[Path], options: ReadOptions = ReadOptions()) -> Split:
        root = _require_root(root, name)
        folder = _find_folder(root, [layout["folder"]], [*layout["train"], *layout["test"]], name)
        _warn_if_modified({folder / f: md5 for f, md5 in {**layout["train"], **layout["test"]}.items()}, name)
        return (_read_cifar_batches(folder, list(layout["train"]), layout["label_key"]),
                _read_cifar_batches(folder, list(layout["test"]), layout["label_key"]))
    return read


_SVHN_MD5 = {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
             "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}


def _read_svhn_mat(path: Path) -> ArraySource:
    import scipy.io
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as error:
        raise DataError(f"{path}: not a readable .mat file ({type(error).__name__}: {error})") from None
    if "X" not in mat or "y" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: SVHN .mat needs variables X and y (found {found})")
    images, labels = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if (images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != len(labels)
            or images.dtype != np.uint8):
        raise DataError(f"{path}: X is {images.dtype} {images.shape} with {len(labels)} labels; "
                        f"SVHN stores uint8 32x32x3xN")
    if len(labels) and (labels.min() < 1 or labels.max() > 10):
        raise DataError(f"{path}: labels span {labels.min()}..{labels.max()}; SVHN uses 1..10 (10 = digit 0)")
    labels[labels == 10] = 0
    return ArraySource(images.transpose(3, 0, 1, 2), labels)


def _svhn(root: Optional[Path], options: ReadOptions = ReadOptions()) -> Split:
    root = _require_root(root, "svhn")
    folder = _find_folder(root, ["svhn", "SVHN"], list(_SVHN_MD5), "svhn")
    _warn_if_modified({folder / f: md5 for f, md5 in _SVHN_MD5.items()}, "svhn")
    return _read_svhn_mat(folder / "train_32x32.mat"), _read_svhn_mat(folder / "test_32x32.mat")


def _imagenet(root: Optional[Path], options: ReadOptions = ReadOptions()) -> Split:
    root = _require_root(root, "imagenet")
    folders = split_folders(root, options.splits, ("val",))
    classes, train = list_image_folder(folders["train"], None)
    _, test = list_image_folder(folders["test"], classes)
    return (ImageFolderSource(train, options.max_resolution, classes),
            ImageFolderSource(test, options.max_resolution, classes))


def read_image_folder(root: Optional[Path], options: ReadOptions = ReadOptions()) -> Split:
    """The ``folder`` dataset: an ImageFolder tree whose images share one square size.

    Every image's header is read here (size and mode; nothing decoded): grey when every
    image of both splits is single-channel, RGB when every image is colour.  A mix of grey
    and colour images is refused unless ``options.channels`` (``--channels 1|3``) says
    what to convert them all to.  Images of another size are refused, naming one."""
    from PIL import Image
    root = _require_root(root, "folder")
    folders = split_folders(root, options.splits, ("test", "val"))
    classes, train = list_image_folder(folders["train"], None)
    _, test = list_image_folder(folders["test"], classes)
    size, first, example = None, None, {True: None, False: None}
    counts = {True: 0, False: 0}   # grey -> images
    for path, _ in train + test:
        try:
            with Image.open(path) as image:
                shape, mode = image.size, image.mode
        except Exception as error:
            raise DataError(f"{path}: cannot read image ({type(error).__name__}: {error})") from None
        if size is None:
            size, first = shape, path
            if shape[0] != shape[1]:
                raise DataError(f"{path}: image is {shape[0]}x{shape[1]} (width x height); --dataset folder takes "
                                f"square images of one size: crop or resize them first")
        elif shape != size:
            raise DataError(f"{path}: image is {shape[0]}x{shape[1]}, {first} is {size[0]}x{size[1]}; "
                            f"--dataset folder takes images of one size: resize them first")
        is_grey = mode in GREY_MODES
        counts[is_grey] += 1
        example[is_grey] = example[is_grey] or path
    channels = options.channels or (1 if not counts[False] else 3)
    if options.channels is None and counts[True] and counts[False]:
        raise DataError(f"{root}: {counts[True]} grey and {counts[False]} colour images (e.g. grey {example[True]}, "
                        f"colour {example[False]}); pass --channels 3 to convert the grey ones to RGB or "
                        f"--channels 1 to convert all to grey")
    return (ImageFolderSource(train, None, classes, channels, size[0]),
            ImageFolderSource(test, None, classes, channels, size[0]))


def _digits(root: Optional[Path], options: ReadOptions = ReadOptions()) -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_SIZE, stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
    names = [str(d) for d in range(10)]
    return ArraySource(train_x, train_y, names), ArraySource(test_x, test_y, names)


def _torchvision_download(dataset_class: str, splits: Sequence[dict]) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets
        cls = getattr(torchvision.datasets, dataset_class)
        for kwargs in splits:
            cls(str(root), download=True, **kwargs)
    return download


# The built-in datasets' sources (their registry entries in utils/data/specs.py name these; MNIST and
# Fashion-MNIST: utils/data/idx.py).
CIFAR10 = SourceFormat(_cifar("cifar10"), _torchvision_download("CIFAR10", [dict(train=True), dict(train=False)]))
CIFAR100 = SourceFormat(_cifar("cifar100"), _torchvision_download("CIFAR100", [dict(train=True), dict(train=False)]))
SVHN = SourceFormat(_svhn, _torchvision_download("SVHN", [dict(split="train"), dict(split="test")]))
IMAGENET = SourceFormat(_imagenet, takes_splits=True)
FOLDER = SourceFormat(read_image_folder, takes_splits=True)
DIGITS = SourceFormat(_digits, needs_root=False)
