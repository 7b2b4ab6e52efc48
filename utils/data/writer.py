"""Write FFCV ``.beton`` files from the datasets' own on-disk formats.

    python -m utils.write_beton --dataset cifar10 --root data/raw --out data/beton
    python -m utils.write_beton --dataset folder --root ~/my_images --name shapes --out data
    python -m utils.write_beton --dataset imagenet --root /data/imagenet --out data/beton \\
        --max-resolution 500 --compress-probability 0.5 --jpeg-quality 90 --num-workers 16

writes ``OUT/NAME_train.beton`` and ``OUT/NAME_test.beton`` (NAME: ``--name``, by default the
dataset's) with fields ``image`` and ``label`` (what ``utils/data/specs.py`` loads).  The
dataset is a registry name (``utils.data.specs.DATASETS``) or ``package.module:NAME`` naming an
outside ``DatasetSpec``; its entry says how its files are read (``utils/data/sources.py``
lists what each built-in reads from ``--root``).

* ``folder``: any ImageFolder tree, one sub-folder per class, images of one square size;
  split folders ``train`` and ``test`` (else ``val``), or ``--splits train=A,test=B``.  Grey
  when every image is single-channel, RGB when every image is colour; a mix is refused unless
  ``--channels 1|3`` says what to convert them to.  A training class folder without images is
  refused; a class without test images is named in a warning.  Stored raw, or JPEG with
  ``--storage jpg`` (RGB only; quality ``--jpeg-quality``).
* ``imagenet``: stored like ffcv-imagenet: longest side at most ``--max-resolution`` (500),
  JPEG (quality ``--jpeg-quality`` 90) with probability ``--compress-probability`` (0.5),
  raw otherwise.

``--download`` lets torchvision fetch the files first (cifar10, cifar100, svhn, mnist,
fashion_mnist); tests never use it.  An output file that exists already is refused in one line
unless ``--overwrite`` (runs trained on it would otherwise meet other data under the same
name).  ``--skip-existing`` keeps both files when they exist and their records match the
request (dataset, name, source folder, split folders, channels, storage options; say so in a
line each), and refuses when they do not (``make data`` uses it; ``ensure_digits`` is the same
for digits in Python).  ``--verify FILE ...`` re-hashes files and compares them with their
records; a file that matches gets its record stamped with its current time, so the cheap
start-up check (size and time, utils/data/records.py) vouches for it again.

Every problem with the input (missing root or files, wrong shapes, an option that does not
apply) is a one-line DataError; the CLI prints it and exits with status 2.  Each ``.beton``
is written to a temporary name in ``OUT``, validated with ``utils.data.records.validate_beton``
and renamed when complete, so a reader never sees half a file.  Next to each file goes its
write record ``NAME.beton.json`` (``utils.data.records.make_record``: dataset, split, sample
count, classes, size, channels, per-channel mean/std measured from the file, storage as
written, file size, SHA-256 hashed right after writing, per-class counts, the file's time;
written atomically after the rename): ``validate_beton``
refuses a file whose record names another dataset, and a ``folder`` run takes its classes,
size, channels and normalisation from it.  A sidecar, because the .beton format has no
free-form header (its header is five fixed numbers, every field is per sample, and ffcv's
Reader takes every byte after the allocation table for allocation entries).  ffcv's writer
forks worker processes and waits for them without noticing when one dies (it would spin
forever); a watchdog here turns a worker's exception into a DataError and stops the
remaining workers; the failing worker leaves quietly (its one line is the error, without
the worker's traceback).
"""
from __future__ import annotations

import _thread
import argparse
import multiprocessing
import os
import re
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from utils.core.atomic_io import commit, temporary_beside
from utils.data.beton import IMAGE_FIELD, LABEL_FIELD
from utils.data.existing_files import keep_existing, verify_files
from utils.data.records import (  # noqa: F401  (write_record: re-exported, bench/synthetic_beton.py uses it)
    make_record,
    record_path,
    resolve_dataset_spec,
    stamp_record,
    validate_beton,
    write_record,
)
from utils.data.sources import ArraySource, DataError, ImageSource, ReadOptions
from utils.data.specs import DatasetSpec, dataset_names, get_dataset_spec, get_storage, storage_for

DEFAULT_MAX_RESOLUTION = 500      # ffcv-imagenet's example: write_imagenet.sh 500 0.50 90
DEFAULT_COMPRESS_PROBABILITY = 0.5
DEFAULT_JPEG_QUALITY = 90
STORAGE_CHOICES = ("raw", "jpg")  # --storage, for datasets whose entry takes it from the source (folder)
MIN_PAGE_SIZE = 1 << 21           # ffcv.writer.MIN_PAGE_SIZE (2 MiB)
DEFAULT_PAGE_SIZE = 1 << 23       # ffcv's default (8 MiB)


# --------------------------------------------------------------------------- writing
class _WorkerFailure:
    """Lets ffcv's forked writer processes report an exception to the parent."""

    def __init__(self):
        self.event = multiprocessing.Event()
        self.messages = multiprocessing.Queue()

    def report(self, message: str) -> None:
        self.messages.put(" ".join(message.split()))
        self.messages.close()
        self.messages.join_thread()     # the line is in the pipe before the parent is told
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
            if multiprocessing.parent_process() is not None:
                # one of ffcv's writer processes: the parent reports the line and stops the others;
                # leaving here keeps the worker's traceback off the user's terminal
                os._exit(1)
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
        wanted = (spec.resolution, spec.resolution, spec.channels)
        if (spec.fixed_size and shape != wanted) or shape[-1] != spec.channels:
            raise DataError(f"{what}: images are {shape}, {spec.name} stores {wanted}")
        labels = source.labels
        if labels.min() < 0 or labels.max() >= spec.num_classes:
            raise DataError(f"{what}: labels span {labels.min()}..{labels.max()}, {spec.name} allows "
                            f"0..{spec.num_classes - 1}")


def _write_one(source: ImageSource, path: Path, spec: DatasetSpec, *, split: str, num_workers: int,
               page_size: Optional[int], field_options: dict, files_name: str, classes,
               written_from: Optional[dict] = None) -> Path:
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter
    temporary = temporary_beside(path)
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
        record = make_record(temporary, spec, split, name=files_name, classes=classes, written_from=written_from)
        # Old record out first: a crash in between leaves a .beton without a record (a note
        # at validation), never a record describing another file.
        stale = Path(record_path(path))
        if stale.exists():
            stale.unlink()
        commit(temporary, path)
        write_record(path, stamp_record(path, record))   # the file's final time: the record vouches for it
        return path
    finally:
        stop.set()
        if in_main:
            signal.signal(signal.SIGINT, previous_handler)
        if temporary.exists():
            temporary.unlink()


FILES_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_splits(text: Optional[str]) -> Optional[Dict[str, str]]:
    """``train=A,test=B`` -> {"train": "A", "test": "B"} (the split folders under --root)."""
    if text is None:
        return None
    pairs = [part.split("=", 1) for part in str(text).split(",") if part.strip()]
    splits = {key.strip(): value.strip() for key, value in (p for p in pairs if len(p) == 2)}
    if len(pairs) != 2 or set(splits) != {"train", "test"} or not all(splits.values()):
        raise DataError(f"--splits {text!r}: give both split folders as train=DIR,test=DIR (e.g. train=train,test=val)")
    return splits


def _field_options(spec: DatasetSpec, *, storage: Optional[str], max_resolution, jpeg_quality,
                   compress_probability) -> Tuple[dict, bool]:
    """(ffcv image-field options, whether JPEG is asked for): the storage options that apply to
    ``spec``, each option that does not refused in one line."""
    given = {k: v for k, v in dict(max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                                    compress_probability=compress_probability).items() if v is not None}
    if jpeg_quality is not None and not 1 <= int(jpeg_quality) <= 100:
        raise DataError(f"jpeg_quality={jpeg_quality} must be in 1..100")
    if spec.from_record:       # folder: one size, stored as the user says
        if storage not in (None, *STORAGE_CHOICES):
            raise DataError(f"--storage {storage}: allowed: {', '.join(STORAGE_CHOICES)}")
        jpg = storage == "jpg"
        wrong = [k for k in given if k != "jpeg_quality" or not jpg]
        if wrong:
            raise DataError(f"{', '.join(wrong)}: {spec.name} images are stored at their own size, all raw or all "
                            f"JPEG (--storage jpg, with --jpeg-quality)")
        return dict(max_resolution=None, jpeg_quality=int(jpeg_quality or DEFAULT_JPEG_QUALITY),
                    compress_probability=1.0 if jpg else 0.0), jpg
    if storage is not None:
        raise DataError(f"--storage {storage}: only for datasets stored as the writer is told (folder); "
                        f"{spec.name} is stored as {spec.storage}")
    if not get_storage(spec.storage).jpeg:
        if given:
            raise DataError(f"{', '.join(given)}: only for JPEG-stored datasets (imagenet, folder with --storage jpg); "
                            f"{spec.name} is stored as {spec.storage}")
        return dict(max_resolution=None, jpeg_quality=DEFAULT_JPEG_QUALITY, compress_probability=0.0), False
    max_resolution = DEFAULT_MAX_RESOLUTION if max_resolution is None else int(max_resolution)
    jpeg_quality = DEFAULT_JPEG_QUALITY if jpeg_quality is None else int(jpeg_quality)
    compress_probability = DEFAULT_COMPRESS_PROBABILITY if compress_probability is None else float(compress_probability)
    if max_resolution < 1 or not 0.0 <= compress_probability <= 1.0:
        raise DataError(f"max_resolution={max_resolution} (>= 1), compress_probability={compress_probability} (0..1): "
                        f"a value is out of range")
    return dict(max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                compress_probability=compress_probability), True


def _spec_of_sources(spec: DatasetSpec, train: ImageSource, jpg: bool) -> DatasetSpec:
    """An entry that takes its size, channels and classes from its source (folder) completed
    from the training source.  Its mean/std are measured after writing (the write record's);
    the placeholders here are used by no one."""
    if train.shape is None or train.classes is None:
        raise DataError(f"{spec.name}: its reader must say the image shape and the class names "
                        f"(ImageSource.shape, ImageSource.classes)")
    height, width, channels = train.shape
    try:
        storage = storage_for(channels, jpg)
    except DataError as error:
        raise DataError(f"--storage jpg: {error}; these images are greyscale") from None
    return replace(spec, resolution=int(height), channels=int(channels), num_classes=len(train.classes),
                   classes=tuple(train.classes), mean=(0.0,) * channels, std=(1.0,) * channels, storage=storage)


def write_dataset(name: str, root, out_dir, *, download: bool = False, max_resolution: Optional[int] = None,
                  jpeg_quality: Optional[int] = None, compress_probability: Optional[float] = None,
                  num_workers: Optional[int] = None, page_size: Optional[int] = None,
                  skip_existing: bool = False, files_name: Optional[str] = None,
                  splits: Optional[Dict[str, str]] = None, storage: Optional[str] = None,
                  overwrite: bool = False, channels: Optional[int] = None,
                  say: Callable[[str], None] = lambda line: None) -> Tuple[Path, Path]:
    """Write ``out_dir/{files_name}_train.beton`` and ``out_dir/{files_name}_test.beton`` (and their
    records); returns their paths.

    ``name``: a registry name or ``package.module:NAME``.  ``files_name`` defaults to the
    dataset's name (``folder`` needs one).  ``splits``: the split folders of an image-folder
    dataset.  ``storage``: ``raw`` (default) or ``jpg`` for ``folder``.  ``max_resolution`` /
    ``compress_probability`` apply to imagenet, ``jpeg_quality`` to JPEG storage;
    ``num_workers`` defaults to the number of CPUs.  ``channels``: ``folder`` only, convert every
    image to 1 (grey) or 3 (RGB) channels (a mix of grey and colour images needs it).

    An output file that exists is refused (DataError) unless ``overwrite``.  ``skip_existing``:
    when both files exist and their records match this request (``request_mismatch``), write
    nothing and ``say`` so; when they do not match, refuse (or, with ``overwrite`` too, rewrite).
    """
    spec = get_dataset_spec(name)
    source_format = spec.source
    if source_format is None:
        raise DataError(f"{name}: its DatasetSpec has no source (DatasetSpec.source), so there is nothing to write from")
    if files_name is None and spec.from_record:
        raise DataError(f"--dataset {name} needs --name NAME: the files are OUT/NAME_train.beton and "
                        f"OUT/NAME_test.beton")
    files_name = spec.name if files_name is None else str(files_name)
    if not FILES_NAME.match(files_name):
        raise DataError(f"--name {files_name!r}: use letters, digits, '.', '_' and '-' (it names the files)")
    outputs = tuple(Path(out_dir) / f"{files_name}_{split}.beton" for split in ("train", "test"))
    if splits is not None and not source_format.takes_splits:
        raise DataError(f"--splits: only for image-folder datasets (folder, imagenet); {name} has fixed files")
    if channels is not None and (not spec.from_record or int(channels) not in (1, 3)):
        raise DataError(f"--channels {channels}: 1 or 3, and only for datasets that take their channels from the "
                        f"images (folder); {name} stores {spec.channels or 'its own'} channel(s)")
    field_options, jpg = _field_options(spec, storage=storage, max_resolution=max_resolution,
                                        jpeg_quality=jpeg_quality, compress_probability=compress_probability)
    written_from = {"root": None if root is None or not source_format.needs_root else os.path.abspath(root),
                    "splits": dict(splits) if splits else None, "channels": channels, "jpg": jpg, **field_options}
    if keep_existing(outputs, spec.name, files_name, written_from, skip_existing=skip_existing,
                     overwrite=overwrite, say=say):
        return outputs
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
    train, test = source_format.read(root, ReadOptions(max_resolution=field_options["max_resolution"], splits=splits,
                                                       channels=channels))
    if spec.from_record:
        spec = _spec_of_sources(spec, train, jpg)
    _check_source(train, spec, f"{name} train")
    _check_source(test, spec, f"{name} test")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for split, source, path in zip(("train", "test"), (train, test), outputs):
        _write_one(source, path, spec, split=split, num_workers=workers, page_size=page_size,
                   field_options=field_options, files_name=files_name, classes=train.classes,
                   written_from=written_from)
    return outputs


def ensure_digits(out_dir, *, num_workers: int = 1) -> Tuple[Path, Path]:
    """The digits .beton files in ``out_dir``, written only when one is missing (or was written otherwise)."""
    return write_dataset("digits", None, out_dir, num_workers=num_workers, skip_existing=True, overwrite=True)


# --------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.write_beton", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None,
                        help=f"one of: {', '.join(dataset_names())}; or package.module:NAME (an outside DatasetSpec)")
    parser.add_argument("--root", default=None, help="folder holding the dataset's files (not needed for digits)")
    parser.add_argument("--out", default=None, help="output folder for NAME_train.beton and NAME_test.beton")
    parser.add_argument("--name", default=None, help="NAME of the files (default: the dataset's; folder: required)")
    parser.add_argument("--splits", default=None,
                        help="image folders: the split folders under --root, train=DIR,test=DIR "
                             "(default: train, and test or else val)")
    parser.add_argument("--storage", default=None, choices=STORAGE_CHOICES,
                        help="folder: raw (default) or jpg (RGB only; --jpeg-quality)")
    parser.add_argument("--download", action="store_true", help="let torchvision download the files into --root first")
    parser.add_argument("--max-resolution", type=int, default=None,
                        help=f"imagenet: longest side in px (default {DEFAULT_MAX_RESOLUTION})")
    parser.add_argument("--jpeg-quality", type=int, default=None,
                        help=f"JPEG storage: 1..100 (default {DEFAULT_JPEG_QUALITY})")
    parser.add_argument("--compress-probability", type=float, default=None,
                        help=f"imagenet: fraction stored as JPEG, the rest raw (default {DEFAULT_COMPRESS_PROBABILITY})")
    parser.add_argument("--num-workers", type=int, default=None, help="writer processes (default: number of CPUs)")
    parser.add_argument("--channels", type=int, default=None, choices=(1, 3),
                        help="folder: convert every image to 1 (grey) or 3 (RGB) channels (needed for a mix)")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that exist already")
    parser.add_argument("--skip-existing", action="store_true",
                        help="keep both output files when they exist and their records match this request")
    parser.add_argument("--verify", nargs="+", default=None, metavar="FILE",
                        help="instead of writing: re-hash these .beton files and compare them with their records")
    args = parser.parse_args(argv)
    if args.verify is not None:
        return verify_files(args.verify)
    if args.dataset is None or args.out is None:
        parser.error("--dataset and --out are required (or --verify FILE ...)")
    try:
        train, test = write_dataset(args.dataset, args.root, args.out, download=args.download,
                                    max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                                    compress_probability=args.compress_probability, num_workers=args.num_workers,
                                    skip_existing=args.skip_existing, files_name=args.name,
                                    splits=parse_splits(args.splits), storage=args.storage,
                                    overwrite=args.overwrite, channels=args.channels, say=print)
        spec = resolve_dataset_spec(args.dataset, train_path=train)
        for path in (train, test):
            summary = validate_beton(path, spec)
            print(f"{path}: {describe_record(summary)}")
    except DataError as error:
        print(f"write_beton: error: {error}", file=sys.stderr)
        return 2
    return 0


def describe_record(summary: dict) -> str:
    """One line about a validated file: samples, labels, and what its record says."""
    line = f"{summary['num_samples']} samples, labels {summary['label_min']}..{summary['label_max']}"
    record = summary.get("record")
    if record and record.get("channels"):
        size = "x".join(map(str, record["size"])) if record.get("size") else "varying size"
        mean = ", ".join(f"{v:.4f}" for v in record["mean"])
        std = ", ".join(f"{v:.4f}" for v in record["std"])
        line += (f", {record['num_classes']} classes, {size}, {record['channels']} channel(s), "
                 f"mean ({mean}), std ({std}), stored {record['storage']}")
    if record and record.get("class_counts"):
        counts = record["class_counts"]
        line += f", {min(counts)}..{max(counts)} samples per class"
    if record:
        line += f", SHA-256 {record['sha256'][:12]}"
    return line


if __name__ == "__main__":
    sys.exit(main())
