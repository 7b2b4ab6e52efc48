"""MNIST's idx format and the two datasets published in it: ``mnist`` and ``fashion_mnist``.

Each dataset is four files, ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzip-compressed
(``.gz``) or not, read where they lie under ``--root``:

* ``--root`` itself: a flat folder, e.g. Debian's packages (``dataset-fashion-mnist`` installs
  ``/usr/share/datasets/fashion-mnist/*.gz``);
* ``ROOT/FashionMNIST/raw`` (``ROOT/MNIST/raw``): torchvision's layout; or ``ROOT/raw``.

An idx file is a 4-byte magic number (0, 0, type code, number of dimensions), one big-endian
4-byte count per dimension, then the values.  ``read_idx`` checks the file's length against its
header's counts: a missing, truncated or damaged file (an incomplete download) is one line
naming it.  Files that are not the published ones (another count, or content whose MD5 differs:
the MD5 of the uncompressed content, so a re-compressed copy like Debian's counts as published)
give a warning, not a refusal: a subset or a modified copy is used as it is.
"""
from __future__ import annotations

import gzip
import hashlib
import warnings
import zlib
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from utils.data.sources import ArraySource, DataError, ReadOptions, Split, SourceFormat, _require_root

_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
# the four files of a split, images then labels
STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
PUBLISHED_COUNTS = {"train": 60000, "test": 10000}
# MD5 of the published files' uncompressed content (the same whoever compressed them)
PUBLISHED_MD5 = {
    "mnist": {"train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
              "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
              "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
              "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637"},
    "fashion_mnist": {"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                      "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
                      "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
                      "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"},
}
MNIST_CLASSES = tuple(str(digit) for digit in range(10))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


def read_idx_bytes(path: Path) -> bytes:
    """The file's idx content (decompressed when the name ends in .gz); one line when it cannot be
    read or its gzip stream ends early."""
    try:
        if str(path).endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return Path(path).read_bytes()
    except EOFError:
        raise DataError(f"{path}: truncated (the gzip stream ends early): an incomplete download? "
                        f"fetch or install it again") from None
    except (OSError, zlib.error) as error:
        raise DataError(f"{path}: cannot read ({error})") from None


def parse_idx(data: bytes, path) -> np.ndarray:
    """An idx file's content -> its array; a length that does not match the header is one line."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an idx file (bad magic number)")
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated (the file ends inside its idx header)")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) * dtype.itemsize
    held = len(data) - header
    if held < expected:
        raise DataError(f"{path}: truncated: its header says {' x '.join(map(str, shape))} values ({expected} bytes), "
                        f"the file holds {held}: an incomplete download? fetch or install it again")
    if held > expected:
        raise DataError(f"{path}: {held - expected} bytes more than its header's {' x '.join(map(str, shape))} values; "
                        f"not an idx file as written")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip-compressed when the name ends in .gz) -> its array."""
    return parse_idx(read_idx_bytes(path), path)


def find_idx_file(root: Path, torchvision_folder: str, stem: str) -> Path:
    """``stem`` or ``stem.gz`` under ``root/FOLDER/raw``, ``root/raw`` or ``root``; one line naming
    the file and the places looked in when it is in none."""
    places = (root / torchvision_folder / "raw", root / "raw", root)
    for where in places:
        for candidate in (where / stem, where / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(f"{stem}[.gz] not found in {', '.join(map(str, places))} (missing file; the four files are "
                    f"{', '.join(s for pair in STEMS.values() for s in pair)})")


def read_idx_split(name: str, split: str, image_path: Path, label_path: Path, classes: Sequence[str],
                   unusual: List[str]) -> ArraySource:
    """One split's (``train``, ``test``) images and labels; what differs from the published files goes
    to ``unusual``: another count or size, else content whose MD5 differs."""
    contents = {path: read_idx_bytes(path) for path in (image_path, label_path)}
    images, labels = (parse_idx(data, path) for path, data in contents.items())
    if images.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{image_path}: images {images.dtype} {images.shape} with labels {labels.shape} in "
                        f"{label_path.name}; {name} needs uint8 (N, H, W) images and N labels")
    count, height, width = images.shape
    if (count, height, width) != (PUBLISHED_COUNTS[split], 28, 28):
        unusual.append(f"{image_path.name} holds {count} images of {height}x{width} (the published {split} split: "
                       f"{PUBLISHED_COUNTS[split]} of 28x28)")
        return ArraySource(images, labels, classes)
    published = PUBLISHED_MD5.get(name, {})
    for path, data in contents.items():
        stem = path.name[:-3] if path.name.endswith(".gz") else path.name
        if stem in published and hashlib.md5(data).hexdigest() != published[stem]:
            unusual.append(f"{path.name} differs from the published file (MD5 of its content)")
    return ArraySource(images, labels, classes)


def idx_dataset(name: str, torchvision_folder: str, classes: Sequence[str]) -> Callable[[Optional[Path], ReadOptions], Split]:
    """The reader of an idx dataset: ``read(root, options) -> (train, test)`` ``ArraySource`` objects
    with the class names; a warning when the files are not the published ones."""
    def read(root: Optional[Path], options: ReadOptions = ReadOptions()) -> Split:
        root = _require_root(root, name)
        paths = {split: [find_idx_file(root, torchvision_folder, stem) for stem in stems]
                 for split, stems in STEMS.items()}    # every file found before any is read
        splits, unusual = [], []
        for split, (image_path, label_path) in paths.items():
            splits.append(read_idx_split(name, split, image_path, label_path, classes, unusual))
        if unusual:
            warnings.warn(f"{name}: not the published files: {'; '.join(unusual)}; a subset or modified copy? "
                          f"using them as they are", stacklevel=2)
        return splits[0], splits[1]
    return read


def _torchvision_download(dataset_class: str) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets
        for train in (True, False):
            getattr(torchvision.datasets, dataset_class)(str(root), train=train, download=True)
    return download


# The registry entries in utils/data/specs.py name these.
MNIST = SourceFormat(idx_dataset("mnist", "MNIST", MNIST_CLASSES), _torchvision_download("MNIST"))
FASHION_MNIST = SourceFormat(idx_dataset("fashion_mnist", "FashionMNIST", FASHION_MNIST_CLASSES),
                             _torchvision_download("FashionMNIST"))

