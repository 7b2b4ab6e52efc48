"""Write FFCV ``.beton`` files from the datasets' own on-disk formats.

    python -m utils.write_beton --dataset cifar10 --root data/raw --out data/beton
    python -m utils.write_beton --dataset imagenet --root /data/imagenet --out data/beton \\
        --max-resolution 500 --compress-probability 0.5 --jpeg-quality 90 --num-workers 16

writes ``OUT/<dataset>_train.beton`` and ``OUT/<dataset>_test.beton`` with fields
``image`` and ``label`` (what ``utils/dataset.py`` loads).  What is read from ``--root``:

=============  ==========================================================================
cifar10        ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` (torchvision's layout;
               ``--root`` may also be that folder): pickled dicts with ``data`` (N x 3072
               uint8, channel planes) and ``labels``.
cifar100       ``cifar-100-python/{train,test}``, labels from ``fine_labels``.
svhn           ``{train,test}_32x32.mat`` (``X``: 32x32x3xN, ``y``: 1..10, 10 means digit 0).
mnist          idx files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` under
fashionmnist   ``MNIST/raw`` / ``FashionMNIST/raw`` (torchvision's layout), ``raw`` or ``--root``.
imagenet       an ImageFolder tree ``train/<class>/*`` and ``val/<class>/*`` (class index =
               position of the name in the sorted train classes); any image PIL opens
               (JPEG, PNG, ...), converted to RGB.  Stored like ffcv-imagenet: longest side
               at most ``--max-resolution`` (500), JPEG (quality ``--jpeg-quality`` 90) with
               probability ``--compress-probability`` (0.5), raw otherwise.
digits         nothing: sklearn's bundled 8x8 digits (values 0..16 -> round(v*255/16)),
               split with ``train_test_split(test_size=360, stratify=labels,
               random_state=0)``: 1437 train / 360 test images.
=============  ==========================================================================

Files are read here, not through torchvision's dataset classes, so a subset or modified
copy is accepted: CIFAR and SVHN files whose MD5 differs from the published one give a
warning, not a refusal.  ``--download`` lets torchvision fetch the files first (cifar10,
cifar100, svhn, mnist, fashionmnist); tests never use it.

``--skip-existing`` writes nothing when both output files exist (``make data`` uses it;
``ensure_digits`` is the same for digits in Python).

Every problem with the input (missing root or files, wrong shapes) is a one-line
DataError; the CLI prints it and exits with status 2.  Each ``.beton`` is written to a
temporary name in ``OUT``, validated with ``utils.dataset.validate_beton`` and renamed
when complete, so a reader never sees half a file.  Next to each file goes its write
record ``NAME.beton.json`` (dataset, split, sample count, classes, image shape, storage,
file size, SHA-256; written atomically after the rename): ``validate_beton`` refuses a file
whose record names another dataset.  A sidecar, because the .beton format has no free-form
header (its header is five fixed numbers, every field is per sample, and ffcv's Reader takes
every byte after the allocation table for allocation entries).  ffcv's writer forks worker processes
and waits for them without noticing when one dies (it would spin forever); a watchdog
here turns a worker's exception into a DataError and stops the remaining workers.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import _thread
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from utils.dataset import (IMAGE_FIELD, LABEL_FIELD, DataError, DatasetSpec, get_augment_policy, get_dataset_spec,
                           get_storage, make_record, record_path, validate_beton)

Split = Tuple["ImageSource", "ImageSource"]     # (train, test)

DEFAULT_MAX_RESOLUTION = 500      # ffcv-imagenet's example: write_imagenet.sh 500 0.50 90
DEFAULT_COMPRESS_PROBABILITY = 0.5
DEFAULT_JPEG_QUALITY = 90
DIGITS_TEST_SIZE = 360            # of 1797 -> 1437 train / 360 test
DIGITS_SPLIT_SEED = 0
MIN_PAGE_SIZE = 1 << 21           # ffcv.writer.MIN_PAGE_SIZE (2 MiB)
DEFAULT_PAGE_SIZE = 1 << 23       # ffcv's default (8 MiB)


# --------------------------------------------------------------------------- sources
class ImageSource:
    """Indexable for ffcv's DatasetWriter: ``source[i] -> (uint8 HWC image, int label)``."""

    max_sample_bytes: Optional[int] = None       # largest stored image, when known up front

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int):
        raise NotImplementedError


class ArraySource(ImageSource):
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim == 3:
            images = images[..., None]       # gray (N, H, W) -> (N, H, W, 1)
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.max_sample_bytes = int(np.prod(self.images.shape[1:]))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderSource(ImageSource):
    """Files of an ImageFolder split, decoded with PIL in ffcv's writer processes."""

    def __init__(self, samples: Sequence[Tuple[str, int]], max_resolution: Optional[int]):
        self.samples = list(samples)
        self.max_sample_bytes = 3 * max_resolution * max_resolution if max_resolution else None

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
                array = np.asarray(image.convert("RGB"))
        except Exception as error:
            raise DataError(f"{path}: cannot read image ({type(error).__name__}: {error})") from None
        return array, label


def _list_image_folder(split_dir: Path, classes: Optional[List[str]]) -> Tuple[List[str], List[Tuple[str, int]]]:
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: ImageFolder split not found (expected {split_dir}/<class>/<image files>)")
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{split_dir}: class folders {unknown[:5]} are not among the {len(classes)} train classes")
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for name in found:
        for root, _, files in sorted(os.walk(split_dir / name)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS) and not file.startswith("."):
                    samples.append((os.path.join(root, file), index[name]))
    if not samples:
        raise DataError(f"{split_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under its class folders")
    return classes, samples


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


def _cifar(name: str) -> Callable[[Optional[Path]], Split]:
    layout = _CIFAR[name]

    def read(root: Optional[Path], max_resolution: Optional[int] = None) -> Split:
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


def _svhn(root: Optional[Path], max_resolution: Optional[int] = None) -> Split:
    root = _require_root(root, "svhn")
    folder = _find_folder(root, ["svhn", "SVHN"], list(_SVHN_MD5), "svhn")
    _warn_if_modified({folder / f: md5 for f, md5 in _SVHN_MD5.items()}, "svhn")
    return _read_svhn_mat(folder / "train_32x32.mat"), _read_svhn_mat(folder / "test_32x32.mat")


_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format; gzip-compressed when the name ends in .gz)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an idx file (bad magic number)")
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)) * dtype.itemsize:
        raise DataError(f"{path}: idx header says shape {shape} but the file holds {len(data) - header} data bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _mnist_like(name: str, folder: str) -> Callable[[Optional[Path]], Split]:
    stems = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

    def find(root: Path, stem: str) -> Path:
        for where in (root / folder / "raw", root / "raw", root):
            for candidate in (where / stem, where / f"{stem}.gz"):
                if candidate.is_file():
                    return candidate
        raise DataError(f"{name}: {stem}[.gz] not found in {root / folder / 'raw'}, {root / 'raw'} or {root}")

    def read(root: Optional[Path], max_resolution: Optional[int] = None) -> Split:
        root = _require_root(root, name)
        splits = []
        for split in ("train", "test"):
            image_path, label_path = (find(root, stem) for stem in stems[split])
            images, labels = read_idx(image_path), read_idx(label_path)
            if images.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise DataError(f"{image_path}: images {images.dtype} {images.shape} with labels {labels.shape}; "
                                f"{name} needs uint8 (N, H, W) images and N labels")
            splits.append(ArraySource(images, labels))
        return splits[0], splits[1]
    return read


def _imagenet(root: Optional[Path], max_resolution: Optional[int] = None) -> Split:
    root = _require_root(root, "imagenet")
    classes, train = _list_image_folder(root / "train", None)
    _, test = _list_image_folder(root / "val", classes)
    return ImageFolderSource(train, max_resolution), ImageFolderSource(test, max_resolution)


def _digits(root: Optional[Path], max_resolution: Optional[int] = None) -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_SIZE, stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
    return ArraySource(train_x, train_y), ArraySource(test_x, test_y)


def _torchvision_download(dataset_class: str, splits: Sequence[dict]) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets
        cls = getattr(torchvision.datasets, dataset_class)
        for kwargs in splits:
            cls(str(root), download=True, **kwargs)
    return download


@dataclass(frozen=True)
class SourceFormat:
    read: Callable[..., Split]           # (root or None, max_resolution or None) -> (train, test)
    download: Optional[Callable[[Path], None]] = None    # None: nothing to download / not possible
    needs_root: bool = True


SOURCES: Dict[str, SourceFormat] = {
    "cifar10": SourceFormat(_cifar("cifar10"), _torchvision_download("CIFAR10", [dict(train=True), dict(train=False)])),
    "cifar100": SourceFormat(_cifar("cifar100"),
                             _torchvision_download("CIFAR100", [dict(train=True), dict(train=False)])),
    "svhn": SourceFormat(_svhn, _torchvision_download("SVHN", [dict(split="train"), dict(split="test")])),
    "mnist": SourceFormat(_mnist_like("mnist", "MNIST"),
                          _torchvision_download("MNIST", [dict(train=True), dict(train=False)])),
    "fashionmnist": SourceFormat(_mnist_like("fashionmnist", "FashionMNIST"),
                                 _torchvision_download("FashionMNIST", [dict(train=True), dict(train=False)])),
    "imagenet": SourceFormat(_imagenet),
    "digits": SourceFormat(_digits, needs_root=False),
}


def get_source_format(name: str) -> SourceFormat:
    try:
        return SOURCES[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(SOURCES))}") from None


# --------------------------------------------------------------------------- writing
class _WorkerFailure:
    """Lets ffcv's forked writer processes report an exception to the parent."""

    def __init__(self):
        self.event = multiprocessing.Event()
        self.messages = multiprocessing.Queue()

    def report(self, message: str) -> None:
        self.messages.put(" ".join(message.split()))
        self.event.set()

    def message(self) -> str:
        try:
            return self.messages.get(timeout=1.0)
        except Exception:
            return "a writer process failed"


class _ReportingSource(ImageSource):
    """Wraps a source so that any exception in a writer process is reported."""

    def __init__(self, source: ImageSource, failure: _WorkerFailure):
        self.source, self.failure = source, failure

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            return self.source[index]
        except Exception as error:
            if not self.failure.event.is_set():
                self.failure.report(str(error) if isinstance(error, DataError)
                                    else f"sample {index}: {type(error).__name__}: {error}")
            raise


def _page_size(source: ImageSource, page_size: Optional[int]) -> int:
    if page_size:
        return int(page_size)
    if source.max_sample_bytes is None:
        return DEFAULT_PAGE_SIZE
    size = MIN_PAGE_SIZE
    while size < 4 * source.max_sample_bytes:    # a few samples per page at least
        size *= 2
    return size


def _image_field(spec: DatasetSpec, *, max_resolution, jpeg_quality, compress_probability):
    from ffcv.fields import NDArrayField, RGBImageField
    storage = get_storage(spec.storage)
    if storage.field_kind == "ndarray":
        return NDArrayField(np.dtype(np.uint8), (spec.resolution, spec.resolution, spec.channels))
    return RGBImageField(write_mode=storage.write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                         compress_probability=compress_probability)


def _check_source(source: ImageSource, spec: DatasetSpec, what: str) -> None:
    if len(source) == 0:
        raise DataError(f"{what}: no samples")
    if isinstance(source, ArraySource):
        shape = source.images.shape[1:]
        fixed = not get_augment_policy(spec.train_augment).resized_crop      # used at the stored size
        wanted = (spec.resolution, spec.resolution, spec.channels)
        if (fixed and shape != wanted) or shape[-1] != spec.channels:
            raise DataError(f"{what}: images are {shape}, {spec.name} stores {wanted}")
        labels = source.labels
        if labels.min() < 0 or labels.max() >= spec.num_classes:
            raise DataError(f"{what}: labels span {labels.min()}..{labels.max()}, {spec.name} allows "
                            f"0..{spec.num_classes - 1}")


def _write_one(source: ImageSource, path: Path, spec: DatasetSpec, *, split: str, num_workers: int,
               page_size: Optional[int], field_options: dict) -> Path:
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    failure = _WorkerFailure()
    fields = {IMAGE_FIELD: _image_field(spec, **field_options), LABEL_FIELD: IntField()}
    writer = DatasetWriter(str(temporary), fields, page_size=_page_size(source, page_size),
                           num_workers=max(1, min(num_workers, len(source))))
    children_before = set(multiprocessing.active_children())
    armed, lock, stop = [True], threading.Lock(), threading.Event()

    def watchdog() -> None:
        while not stop.wait(0.2):
            if failure.event.is_set():
                with lock:
                    if armed[0]:
                        armed[0] = False
                        _thread.interrupt_main()
                return

    thread = threading.Thread(target=watchdog, name="beton-writer-watchdog", daemon=True)
    # The watchdog's interrupt reaches the main thread through the SIGINT handler: make sure it is one
    # that raises (a program embedding the writer may have installed one that only sets a flag).
    in_main = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler) if in_main else None
    try:
        try:
            thread.start()
            writer.from_indexed_dataset(_ReportingSource(source, failure), chunksize=100)
            with lock:
                armed[0] = False
            stop.set()
            thread.join()
        except KeyboardInterrupt:
            if not failure.event.is_set():
                raise
        if failure.event.is_set():
            for process in set(multiprocessing.active_children()) - children_before:
                process.terminate()          # ffcv's writer processes (may spin on a dead peer's page)
                process.join(5)
            shared = getattr(writer, "metadata_sm", None)
            if shared is not None and not isinstance(shared, int):
                shared.close()
                shared.unlink()
            raise DataError(f"{path.name}: {failure.message()}")
        validate_beton(temporary, spec)
        record = make_record(temporary, spec, split)
        # Old record out first: a crash in between leaves a .beton without a record (a note
        # at validation), never a record describing another file.
        stale = Path(record_path(path))
        if stale.exists():
            stale.unlink()
        os.replace(temporary, path)
        write_record(path, record)
        return path
    finally:
        stop.set()
        if in_main:
            signal.signal(signal.SIGINT, previous_handler)
        if temporary.exists():
            temporary.unlink()


def write_record(path: Path, record: dict) -> Path:
    """``PATH.json`` written atomically (temporary file, fsync, rename)."""
    import json
    target = Path(record_path(path))
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()
    return target


def write_dataset(name: str, root, out_dir, *, download: bool = False, max_resolution: Optional[int] = None,
                  jpeg_quality: Optional[int] = None, compress_probability: Optional[float] = None,
                  num_workers: Optional[int] = None, page_size: Optional[int] = None,
                  skip_existing: bool = False) -> Tuple[Path, Path]:
    """Write ``out_dir/{name}_train.beton`` and ``out_dir/{name}_test.beton``; returns their paths.

    ``max_resolution`` / ``jpeg_quality`` / ``compress_probability`` apply to JPEG-stored
    datasets (imagenet) only; ``num_workers`` defaults to the number of CPUs.
    ``skip_existing``: when both files exist already, write nothing (they are not checked).
    """
    spec = get_dataset_spec(name)
    source_format = get_source_format(name)
    outputs = tuple(Path(out_dir) / f"{name}_{split}.beton" for split in ("train", "test"))
    if skip_existing and all(path.is_file() for path in outputs):
        return outputs
    jpeg_options = dict(max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                        compress_probability=compress_probability)
    if not get_storage(spec.storage).jpeg:
        given = [k for k, v in jpeg_options.items() if v is not None]
        if given:
            raise DataError(f"{', '.join(given)}: only for JPEG-stored datasets (imagenet); "
                            f"{name} is stored as {spec.storage}")
        field_options = dict(max_resolution=None, jpeg_quality=DEFAULT_JPEG_QUALITY, compress_probability=0.0)
    else:
        max_resolution = DEFAULT_MAX_RESOLUTION if max_resolution is None else int(max_resolution)
        jpeg_quality = DEFAULT_JPEG_QUALITY if jpeg_quality is None else int(jpeg_quality)
        compress_probability = (DEFAULT_COMPRESS_PROBABILITY if compress_probability is None
                                else float(compress_probability))
        if max_resolution < 1 or not 1 <= jpeg_quality <= 100 or not 0.0 <= compress_probability <= 1.0:
            raise DataError(f"max_resolution={max_resolution} (>= 1), jpeg_quality={jpeg_quality} (1..100), "
                            f"compress_probability={compress_probability} (0..1): a value is out of range")
        field_options = dict(max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                             compress_probability=compress_probability)
    workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
    if workers < 1:
        raise DataError(f"num_workers={num_workers} must be >= 1")
    if download and source_format.needs_root:
        if source_format.download is None:
            raise DataError(f"{name}: --download is not available for this dataset; put its files under --root")
        if root is None:
            raise DataError(f"{name}: --root is required (where to download)")
        Path(root).mkdir(parents=True, exist_ok=True)
        source_format.download(Path(root))
    root = None if root is None else Path(root)
    train, test = source_format.read(root, field_options["max_resolution"])
    _check_source(train, spec, f"{name} train")
    _check_source(test, spec, f"{name} test")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for split, source, path in zip(("train", "test"), (train, test), outputs):
        _write_one(source, path, spec, split=split, num_workers=workers, page_size=page_size,
                   field_options=field_options)
    return outputs


def ensure_digits(out_dir, *, num_workers: int = 1) -> Tuple[Path, Path]:
    """The digits .beton files in ``out_dir``, written only when one is missing."""
    return write_dataset("digits", None, out_dir, num_workers=num_workers, skip_existing=True)


# --------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.write_beton", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help=f"one of: {', '.join(sorted(SOURCES))}")
    parser.add_argument("--root", default=None, help="folder holding the dataset's files (not needed for digits)")
    parser.add_argument("--out", required=True, help="output folder for NAME_train.beton and NAME_test.beton")
    parser.add_argument("--download", action="store_true", help="let torchvision download the files into --root first")
    parser.add_argument("--max-resolution", type=int, default=None,
                        help=f"JPEG datasets: longest side in px (default {DEFAULT_MAX_RESOLUTION})")
    parser.add_argument("--jpeg-quality", type=int, default=None,
                        help=f"JPEG datasets: 1..100 (default {DEFAULT_JPEG_QUALITY})")
    parser.add_argument("--compress-probability", type=float, default=None,
                        help=f"JPEG datasets: fraction stored as JPEG, the rest raw "
                             f"(default {DEFAULT_COMPRESS_PROBABILITY})")
    parser.add_argument("--num-workers", type=int, default=None, help="writer processes (default: number of CPUs)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="write nothing when both output files exist already")
    args = parser.parse_args(argv)
    try:
        train, test = write_dataset(args.dataset, args.root, args.out, download=args.download,
                                    max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                                    compress_probability=args.compress_probability, num_workers=args.num_workers,
                                    skip_existing=args.skip_existing)
    except DataError as error:
        print(f"write_beton: error: {error}", file=sys.stderr)
        return 2
    for path in (train, test):
        summary = validate_beton(path, get_dataset_spec(args.dataset))
        print(f"{path}: {summary['num_samples']} samples, labels {summary['label_min']}..{summary['label_max']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
