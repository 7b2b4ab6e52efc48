"""Reading a ``.beton`` file without ffcv: ``BetonFile`` (fields, metadata, decoded images),
``inspect_beton`` (what is in it) and the checks of its contents against a dataset spec.

The ``.beton`` layout (ffcv/types.py, format version 2; all little-endian):
header (version u2, num_fields u2, page_size u4, num_samples u8, alloc_table_ptr u8) |
one 1041-byte descriptor per field (type id, 16-byte name, 1024 bytes of arguments) |
a metadata table, one aligned record per sample with one entry per field (an int label
is stored inline; an image stores mode/width/height and a pointer to its bytes) | the
data pages | the allocation table at ``alloc_table_ptr``: (sample_id, ptr, size) u8
triples, one per stored data region.

Field names: ``image`` and ``label`` (the names ffcv's own examples and ffcv-imagenet
use).  Gray images are stored as an ``NDArrayField`` of uint8 with shape (H, W, 1), i.e.
the same HWC layout the RGB decoders produce, so the rest of the pipeline is shared."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from utils.data.sources import DataError
from utils.data.specs import DatasetSpec, _one_line, get_storage

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
                        f"({storage.field_kind}) and '{LABEL_FIELD}' (int), as utils/data/writer.py writes them")
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


