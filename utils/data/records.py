"""Write records and statistics, and the dataset spec a run trains on.

A ``.beton`` written by ``python -m utils.write_beton`` has a write record beside it
(``NAME.beton.json``): dataset, split, samples, classes and the samples of each, image size,
channels, mean/std, storage, how it was written (source folder, options), file size, SHA-256
(the file's fingerprint, hashed once, right after writing) and the file's modification time
when the record was written (``beton_mtime_ns``).  ``make_record`` / ``read_record`` write and read it,
``pixel_statistics`` measures mean/std, ``resolve_dataset_spec`` completes a spec from it
(``folder``), and ``validate_beton`` refuses a file that does not fit its dataset:

* ``inspect_beton`` / ``validate_beton``: read a ``.beton`` without ffcv and say what is
  in it, or refuse it for a dataset with one-line ``DataError`` messages (missing,
  truncated or garbage file, images of the wrong size or channels, labels out of range,
  written for another dataset or changed since, per its write record ``NAME.beton.json``).

Cheap and full checks.  A record *vouches* for its file when the file's size and modification
time are the ones the record was written with (``record_vouches``: one ``stat``); its SHA-256
is then taken as the file's fingerprint without reading the file, so checking a 1 GB file at a
run's start costs a stat and a small JSON read.  A file its record does not vouch for (copied
without its times, touched, or a record written by an earlier version, without
``beton_mtime_ns``) is re-hashed at validation when it is at most ``CHECKSUM_AUTO_LIMIT``;
``python -m utils.write_beton --verify FILE`` re-hashes any file on request and, when the
content is the recorded one, stamps the record with the file's time so it vouches again."""
from __future__ import annotations

import os
from dataclasses import replace
from typing import List, Optional, Tuple

import numpy as np

from utils.data.beton import LABEL_FIELD, BetonFile, _summarize, _validate
from utils.data.sources import DataError
from utils.data.specs import DEFAULT_AUGMENT, DatasetSpec, _one_line, get_dataset_spec, storage_for, with_augment

# -- the write record: what utils/data/writer.py wrote, next to the file
RECORD_SUFFIX = ".json"
RECORD_FORMAT = "beton-write-record/3"
# Still read: /2 lacks per-class counts, how it was written and beton_mtime_ns (a /2 record never
# vouches for its file: the file is re-hashed as before); /1 also classes, size, channels, mean/std.
OLD_RECORD_FORMATS = ("beton-write-record/2", "beton-write-record/1")
SPEC_RECORD_FORMATS = (RECORD_FORMAT, "beton-write-record/2")   # complete enough for a folder run's spec
CHECKSUM_AUTO_LIMIT = 1 << 30     # verify_checksum=None hashes files up to this size when their record
                                  # does not vouch for them (CIFAR train: 0.16 GB)
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


def class_counts(beton: BetonFile, num_classes: int) -> List[int]:
    """Samples of each label 0 .. num_classes - 1 (labels must be in range: ``_validate``)."""
    if not beton.num_samples:
        return [0] * int(num_classes)
    labels = np.asarray(beton.metadata[LABEL_FIELD], dtype=np.int64)
    return [int(n) for n in np.bincount(labels, minlength=int(num_classes))]


def make_record(path, spec: DatasetSpec, split: str, *, name: Optional[str] = None,
                classes: Optional[List[str]] = None, written_from: Optional[dict] = None) -> dict:
    """The write record of a validated .beton (see ``write_beton``): dataset, the files' name,
    split, sample count, classes (names in label order, when known) and the samples of each
    (``class_counts``), image size ([H, W], None: varying) and channels, per-channel mean/std
    measured here from the file (all images of a fixed-size dataset, else ``STATISTICS_SAMPLE``
    of them), storage as written, ``written_from`` (what the writer was asked: source folder,
    options; ``--skip-existing`` compares it), size and SHA-256 of the file.  The writer adds
    ``beton_mtime_ns`` once the file has its final name (``stamp_record``)."""
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
            "class_counts": class_counts(beton, spec.num_classes), "written_from": written_from,
            "file_size": os.path.getsize(path), "sha256": file_sha256(path)}


def stamp_record(path, record: dict) -> dict:
    """``record`` with the size and modification time ``path`` has now (``beton_mtime_ns``): the
    record then vouches for the file as long as neither changes (``record_vouches``)."""
    status = os.stat(path)
    return {**record, "file_size": int(status.st_size), "beton_mtime_ns": int(status.st_mtime_ns)}


def record_vouches(record: Optional[dict], status: os.stat_result) -> bool:
    """Whether ``record`` speaks for the file whose ``os.stat`` is ``status`` without reading it:
    the file has the size and modification time the record was stamped with."""
    return (isinstance(record, dict) and isinstance(record.get("beton_mtime_ns"), int)
            and record.get("file_size") == status.st_size and record["beton_mtime_ns"] == status.st_mtime_ns)


def write_record(path, record: dict) -> str:
    """``PATH.json`` (the record of the .beton ``PATH``) written atomically (temporary file,
    fsync, rename); -> its path."""
    import json
    from utils.core.atomic_io import atomic_write_text
    target = record_path(path)
    atomic_write_text(target, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return target


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
                        f"rewrite the .beton with utils/data/writer.py or delete this file") from None
    keys = ("format", "dataset", "split", "num_samples", "num_classes", "file_size", "sha256")
    if (not isinstance(record, dict) or record.get("format") not in (RECORD_FORMAT, *OLD_RECORD_FORMATS)
            or any(k not in record for k in keys)):
        raise DataError(f"{where}: not a write record of utils/data/writer.py (expected format {RECORD_FORMAT!r} "
                        f"with keys {', '.join(keys)}); rewrite the .beton or delete this file")
    return record


def spec_from_record(spec: DatasetSpec, train_path) -> DatasetSpec:
    """``spec`` (an entry with ``from_record``, e.g. ``folder``) completed from the write record
    of its training file: image size, channels, classes, mean/std, storage."""
    where = os.fspath(train_path)
    command = f"python -m utils.write_beton --dataset {spec.name} --root DIR --name NAME --out DIR"
    if not os.path.isfile(where):  # the file itself first: a wrong path is not a missing record
        raise DataError(f"{where}: .beton file not found (dataset.name={spec.name} trains on the .beton files "
                        f"written by {command})")
    record = read_record(where)
    if record is None:
        raise DataError(f"{where}: dataset.name={spec.name} reads its classes, image size, channels and "
                        f"normalisation from the file's write record {os.path.basename(record_path(where))}, "
                        f"which is missing; write the files with {command}")
    if record["dataset"] != spec.name or record["format"] not in SPEC_RECORD_FORMATS:
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
                      f"utils/data/writer.py writes one")
    if record["dataset"] != spec.name or record["num_classes"] != spec.num_classes:
        raise DataError(f"{where}: written for {record['dataset']} ({record['split']} split, {record['num_classes']} "
                        f"classes; see {os.path.basename(record_path(where))}), not for {spec.name} "
                        f"({spec.num_classes} classes): pass the {spec.name} file")
    if spec.classes is not None and record.get("classes") is not None and list(record["classes"]) != list(spec.classes):
        differ = next(i for i, (a, b) in enumerate(zip(record["classes"], spec.classes)) if a != b)
        raise DataError(f"{where}: its classes ({os.path.basename(record_path(where))}) differ from the training "
                        f"file's: class {differ} is {record['classes'][differ]!r}, not {spec.classes[differ]!r}; "
                        f"write both splits together with utils/data/writer.py")
    stale = []
    if record["num_samples"] != beton.num_samples:
        stale.append(f"{beton.num_samples} samples, the record says {record['num_samples']}")
    if record["file_size"] != beton.file_size:
        stale.append(f"{beton.file_size} bytes, the record says {record['file_size']}")
    vouched = record_vouches(record, os.stat(where))
    if not stale and (verify_checksum or (verify_checksum is None and not vouched
                                          and beton.file_size <= CHECKSUM_AUTO_LIMIT)):
        if file_sha256(where) != record["sha256"]:
            stale.append("its SHA-256 differs from the record's")
    if stale:
        raise DataError(f"{where}: does not match its write record {os.path.basename(record_path(where))} "
                        f"({'; '.join(stale)}): changed since it was written; rewrite it with "
                        f"utils/data/writer.py or delete the record")
    return record, None


def validate_beton(path, spec: DatasetSpec, num_classes: Optional[int] = None, *,
                   verify_checksum: Optional[bool] = None) -> dict:
    """``inspect_beton`` + refuse a file that does not fit ``spec`` (one-line DataError).

    Checks: the file exists and parses as a .beton (header, tables, every image pointer in
    the allocation table, raw sizes consistent); fields ``image`` (the kind the spec's
    storage uses) and ``label`` (int); channels; for datasets used at their stored size,
    every image is ``resolution x resolution``; labels in ``0 .. num_classes - 1``
    (``num_classes`` defaults to the spec's).  Then the write record ``PATH.json`` (written
    by utils/data/writer.py): a file written for another dataset is refused, and so is one
    that no longer matches its record (sample count, size, and the SHA-256 of the content
    when ``verify_checksum``; None: only when the record does not vouch for the file, see
    ``record_vouches``, and the file is at most 1 GiB).

    The summary gains ``record`` (the record, None without one) and ``note`` (one line to
    print for a file without a record, else None).
    """
    require_complete(spec)
    beton = BetonFile(path)
    summary = _validate(beton, spec, num_classes)
    summary["record"], summary["note"] = _check_record(beton, spec, verify_checksum)
    return summary




def verify_file(path) -> Tuple[dict, Optional[str]]:
    """A full check of ``path`` against its write record, on request (``write_beton --verify``):
    -> (the record, None when the file's size and SHA-256 are the recorded ones, else what
    differs).  DataError when the file or its record is missing or unreadable."""
    where = os.fspath(path)
    size = BetonFile(where).file_size           # refuses a missing or non-.beton file first
    record = read_record(where)
    if record is None:
        raise DataError(f"{where}: no write record ({os.path.basename(record_path(where))}) to verify it against")
    if size != record["file_size"]:
        return record, f"{size} bytes, the record says {record['file_size']}"
    if file_sha256(where) != record["sha256"]:
        return record, "its SHA-256 differs from the record's"
    return record, None
