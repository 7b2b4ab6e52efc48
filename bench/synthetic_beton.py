"""Synthetic ``.beton`` files for the benchmarks, written without ffcv.

The lent GPU machine has no ffcv (a compiled extension), but the benchmarks and the device check
need ``.beton`` files of every dataset format for the ``torch`` and ``memory`` loaders, which read
the file with numpy alone (``utils.data.beton.BetonFile``).  This module writes that format (ffcv 1.0
layout, version 2, the one ``utils/data/specs.py`` documents) with numpy and OpenCV:

  header | one descriptor per field (``image``, ``label``) | one aligned metadata record per
  sample | zero padding to the first page boundary | pages of ``page_size`` bytes holding the
  samples' image bytes (a sample never straddles two pages) | the allocation table
  (sample_id, ptr, size), one entry per stored image.

Images come from the same sources ``utils.write_beton`` reads (``ArraySource``, the ImageFolder
reader for ImageNet-format trees), and each file gets the same write record (``NAME.beton.json``)
and passes ``utils.data.records.validate_beton`` before it is renamed into place, so the harness takes
it like any other.  JPEG-stored datasets (ImageNet) follow ffcv's ``proportion`` mode: the longest
side cut to ``max_resolution`` (area interpolation), then JPEG with probability
``compress_probability`` (seeded), raw otherwise.

    python bench/synthetic_beton.py --smoke        # write every format small, read it back, MB/s

tests/test_bench.py checks that a file written here decodes to the same images as one written by
ffcv's writer (where ffcv is installed).
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from utils.core.atomic_io import atomic_output
from utils.data import beton as beton_format
from utils.data import records, sources
from utils.data import specs as data_specs
from utils.data import writer as wb
from utils.data.sources import ArraySource, ImageSource, ReadOptions

_FIELD_TYPE_ID = {"int": 1, "rgb_image": 2, "ndarray": 4}     # ffcv/types.py's type ids
_RGB_MODE = {"jpg": 0, "raw": 1}                               # ffcv.fields.rgb_image.IMAGE_MODES
_LABEL_DTYPE = np.dtype("<i8")


def _descriptor(type_id: int, name: str, arguments: bytes = b"") -> np.ndarray:
    descriptor = np.zeros(1, dtype=beton_format._FIELD_DESCRIPTOR)
    descriptor["type_id"] = type_id
    encoded = np.frombuffer(name.encode("ascii"), dtype=np.uint8)
    descriptor["name"][0, :len(encoded)] = encoded
    if arguments:
        descriptor["arguments"][0, :len(arguments)] = np.frombuffer(arguments, dtype=np.uint8)
    return descriptor


def _ndarray_arguments(shape: Tuple[int, ...], dtype: np.dtype) -> bytes:
    """An NDArrayField's descriptor arguments: 32 shape slots, the length of the dtype text, the text."""
    header = np.zeros(1, dtype=beton_format._NDARRAY_ARGS)
    header["shape"][0, :len(shape)] = shape
    text = json.dumps(np.dtype([("", dtype)]).descr).encode("ascii")
    header["type_length"] = len(text)
    return header.tobytes() + text


def _encode_rgb(image: np.ndarray, rng: np.random.Generator, *, max_resolution: Optional[int],
                jpeg_quality: int, compress_probability: float) -> Tuple[int, np.ndarray, tuple]:
    """(mode, bytes, stored shape) of one RGB image, as ffcv's RGBImageField in 'proportion' mode stores it."""
    import cv2
    height, width = image.shape[:2]
    if max_resolution and max(height, width) > max_resolution:
        ratio = max_resolution / max(height, width)
        image = cv2.resize(image, (round(width * ratio), round(height * ratio)), interpolation=cv2.INTER_AREA)
    image = np.ascontiguousarray(image)
    if compress_probability > 0 and rng.random() < compress_probability:
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                   [int(cv2.IMWRITE_JPEG_QUALITY), int(jpeg_quality)])
        if not ok:
            raise sources.DataError("OpenCV could not encode a JPEG")
        return _RGB_MODE["jpg"], encoded.reshape(-1), image.shape
    return _RGB_MODE["raw"], image.reshape(-1), image.shape


def write_beton_numpy(source: ImageSource, path, spec: data_specs.DatasetSpec, *, split: str,
                      max_resolution: Optional[int] = None, jpeg_quality: int = wb.DEFAULT_JPEG_QUALITY,
                      compress_probability: float = 0.0, page_size: int = wb.MIN_PAGE_SIZE, seed: int = 0,
                      classes=None) -> Path:
    """Write ``source`` (``source[i] -> (uint8 HWC image, label)``) as ``path`` with its write record
    (``classes``: the class names in label order; default: the source's, when it knows them)."""
    path = Path(path)
    storage = data_specs.get_storage(spec.storage)
    if not storage.jpeg:
        max_resolution, compress_probability = None, 0.0
    count = len(source)
    if count == 0:
        raise sources.DataError(f"{path.name}: no samples")
    image_kind = storage.field_kind
    if image_kind == "ndarray":
        image_shape = (spec.resolution, spec.resolution, spec.channels)
        image_descriptor = _descriptor(_FIELD_TYPE_ID["ndarray"], beton_format.IMAGE_FIELD,
                                       _ndarray_arguments(image_shape, np.dtype(np.uint8)))
    else:
        image_descriptor = _descriptor(_FIELD_TYPE_ID["rgb_image"], beton_format.IMAGE_FIELD)
    descriptors = np.concatenate([image_descriptor, _descriptor(_FIELD_TYPE_ID["int"], beton_format.LABEL_FIELD)])
    metadata_type = np.dtype([("image", beton_format._FIELD_TYPES[_FIELD_TYPE_ID[image_kind]][1]),
                              ("label", _LABEL_DTYPE)], align=True)
    metadata = np.zeros(count, dtype=metadata_type)
    metadata_start = beton_format._HEADER.itemsize + descriptors.nbytes
    first_page = -(-(metadata_start + metadata.nbytes) // page_size) * page_size
    rng = np.random.default_rng(seed)
    allocations = []
    with atomic_output(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(b"\0" * first_page)
            page = np.zeros(page_size, dtype=np.uint8)
            page_index, used = 0, 0
            for index in range(count):
                image, label = source[index]
                image = np.asarray(image, dtype=np.uint8)
                if image.ndim == 2:
                    image = image[..., None]
                if image_kind == "ndarray":
                    if image.shape != image_shape:
                        raise sources.DataError(f"{path.name}: sample {index} is {image.shape}, {spec.name} stores {image_shape}")
                    data = image.reshape(-1)
                else:
                    mode, data, (height, width, _) = _encode_rgb(
                        image, rng, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                        compress_probability=compress_probability)
                if data.size > page_size:
                    raise sources.DataError(f"{path.name}: sample {index} needs {data.size} bytes, more than a "
                                       f"{page_size}-byte page")
                if used + data.size > page_size:              # the sample starts a fresh page
                    handle.write(page.tobytes())
                    page[:] = 0
                    page_index, used = page_index + 1, 0
                pointer = first_page + page_index * page_size + used
                page[used:used + data.size] = data
                used += data.size
                allocations.append((index, pointer, data.size))
                if image_kind == "ndarray":
                    metadata["image"][index] = pointer
                else:
                    metadata["image"][index] = (mode, width, height, pointer)
                metadata["label"][index] = int(label)
            handle.write(page.tobytes())
            alloc_table_ptr = handle.tell()
            handle.write(np.array(allocations, dtype=beton_format._ALLOC_ENTRY).tobytes())
            header = np.zeros(1, dtype=beton_format._HEADER)
            header["version"], header["num_fields"] = beton_format._FORMAT_VERSION, len(descriptors)
            header["page_size"], header["num_samples"] = page_size, count
            header["alloc_table_ptr"] = alloc_table_ptr
            handle.seek(0)
            handle.write(header.tobytes() + descriptors.tobytes() + metadata.tobytes())
        records.validate_beton(temporary, spec)
        record = records.make_record(temporary, spec, split, classes=classes if classes is not None else source.classes)
        # as utils.write_beton: the old record out first, so no record ever describes another file
        stale = Path(records.record_path(path))
        if stale.exists():
            stale.unlink()
    wb.write_record(path, records.stamp_record(path, record))   # stamped: the record vouches for the file
    return path


# ------------------------------------------------------------------------------ synthetic images
def random_images(spec: data_specs.DatasetSpec, count: int, seed: int = 0) -> ArraySource:
    """``count`` images of the dataset's stored size and channels, uniform noise, random labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, spec.resolution, spec.resolution, spec.channels), dtype=np.uint8)
    return ArraySource(images, rng.integers(0, spec.num_classes, count))


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth colour gradient with noise: JPEG compresses it like a photograph, unlike pure noise."""
    ramp_y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    ramp_x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    base = (ramp_y + ramp_x) / 2 * rng.uniform(0.3, 1.0, 3).astype(np.float32)
    noise = rng.normal(0, 20, (height, width, 3)).astype(np.float32)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def photo_like_images(count: int, side: int, num_classes: int, seed: int = 0) -> ArraySource:
    rng = np.random.default_rng(seed)
    images = np.stack([photo_like(rng, side, side) for _ in range(count)]) if count else np.zeros((0, side, side, 3))
    return ArraySource(images, rng.integers(0, num_classes, count))


def write_jpeg_image_folder(root: Path, *, train: int, test: int, classes: int, side: int, seed: int = 0) -> Path:
    """An ImageNet-format tree ``root/{train,val}/<class>/*.jpg`` of generated photo-like JPEGs
    (sizes vary around ``side``, as real photographs do)."""
    import cv2
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", test)):
        for index in range(count):
            folder = root / split / f"n{index % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            height, width = (int(side * rng.uniform(0.8, 1.25)) for _ in range(2))
            image = photo_like(rng, height, width)
            cv2.imwrite(str(folder / f"{split}_{index:06d}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                        [int(cv2.IMWRITE_JPEG_QUALITY), 90])
    return root


def write_cifar_pickles(root: Path, dataset: str, *, train: int, test: int, seed: int = 0) -> Path:
    """CIFAR-10/100 in torchvision's pickle layout under ``root`` (random pixels and labels)."""
    rng = np.random.default_rng(seed)
    if dataset == "cifar10":
        folder, label_key = root / "cifar-10-batches-py", b"labels"
        per = -(-train // 5)
        files = [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", test)]
        classes = 10
    else:
        folder, label_key = root / "cifar-100-python", b"fine_labels"
        files, classes = [("train", train), ("test", test)], 100
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in files:
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 label_key: [int(v) for v in rng.integers(0, classes, count)]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    return root


def write_from_root(dataset: str, root, out_dir, *, seed: int = 0) -> Tuple[Path, Path]:
    """``utils.data.writer.write_dataset`` without ffcv: the dataset's own reader on ``root`` (its
    files in their usual layout; None for digits), both splits written here with their records as
    ``out_dir/{dataset}_{train,test}.beton``.  JPEG-stored datasets (ImageNet) take the writer's
    defaults (longest side 500, quality 90, half JPEG)."""
    spec = data_specs.get_dataset_spec(dataset)
    options = {}
    if data_specs.get_storage(spec.storage).jpeg:
        options = dict(max_resolution=wb.DEFAULT_MAX_RESOLUTION, jpeg_quality=wb.DEFAULT_JPEG_QUALITY,
                       compress_probability=wb.DEFAULT_COMPRESS_PROBABILITY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # "not the standard files (MD5)": synthetic ones are not
        train, test = spec.source.read(None if root is None else Path(root),
                                       ReadOptions(max_resolution=options.get("max_resolution")))
    outputs = tuple(Path(out_dir) / f"{dataset}_{split}.beton" for split in ("train", "test"))
    for split, source, path in zip(("train", "test"), (train, test), outputs):
        write_beton_numpy(source, path, spec, split=split, seed=seed, classes=train.classes, **options)
    return outputs


def synthetic_dataset(dataset: str, out_dir, *, train: int, test: int, imagenet_side: int = 160,
                      seed: int = 0) -> Tuple[Path, Path]:
    """``out_dir/{dataset}_train.beton`` and ``_test.beton`` of the dataset's format, written here
    (kept when both exist).

    digits: sklearn's real digits (the writer's own reader; ``train``/``test`` ignored);
    cifar10/cifar100: random pixels in the CIFAR pickle layout, read by the writer's reader;
    imagenet: generated JPEGs in an ImageFolder tree, read by the writer's ImageFolder reader
    (``imagenet_side`` px, 10 classes of folders; the spec's 1000 classes are the label range);
    other datasets (mnist, fashion_mnist, svhn): random arrays of the stored size.
    """
    out_dir = Path(out_dir)
    outputs = tuple(out_dir / f"{dataset}_{split}.beton" for split in ("train", "test"))
    if all(p.is_file() for p in outputs):
        return outputs
    spec = data_specs.get_dataset_spec(dataset)
    with tempfile.TemporaryDirectory(prefix=f"synthetic-{dataset}-") as scratch:
        scratch = Path(scratch)
        if dataset == "digits":
            return write_from_root(dataset, None, out_dir, seed=seed)
        if dataset in ("cifar10", "cifar100"):
            root = write_cifar_pickles(scratch, dataset, train=train, test=test, seed=seed)
            return write_from_root(dataset, root, out_dir, seed=seed)
        if dataset == "imagenet":
            root = write_jpeg_image_folder(scratch, train=train, test=test, classes=10, side=imagenet_side, seed=seed)
            return write_from_root(dataset, root, out_dir, seed=seed)
    for split, source, path in zip(("train", "test"), (random_images(spec, train, seed), random_images(spec, test, seed + 1)),
                                   outputs):
        write_beton_numpy(source, path, spec, split=split, seed=seed)
    return outputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every format small (seconds)")
    parser.add_argument("--datasets", default="digits,cifar10,mnist,imagenet", help="comma list")
    parser.add_argument("--images", type=int, default=0, help="training images per dataset (default 2048; smoke 64)")
    args = parser.parse_args(argv)
    count = args.images or (64 if args.smoke else 2048)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(data_specs.DATASETS))
    if unknown:
        parser.error(f"--datasets {','.join(unknown)}: unknown; valid: {', '.join(sorted(data_specs.DATASETS))}")
    with tempfile.TemporaryDirectory(prefix="synthetic-beton-") as scratch:
        for name in names:
            started = time.perf_counter()
            train, test = synthetic_dataset(name, scratch, train=count, test=max(8, count // 8),
                                            imagenet_side=64 if args.smoke else 160)
            seconds = time.perf_counter() - started
            summary = records.validate_beton(train, data_specs.get_dataset_spec(name))
            beton = beton_format.BetonFile(train)
            beton.decode_image(len(beton.metadata) - 1)      # the last sample decodes
            size = train.stat().st_size + test.stat().st_size
            print(f"{name:>9}: {summary['num_samples']} + {beton_format.BetonFile(test).num_samples} samples, "
                  f"{size / 1e6:.1f} MB in {seconds:.2f} s ({size / 1e6 / seconds:.1f} MB/s written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
