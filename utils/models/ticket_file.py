"""The ticket file: one lottery ticket in one ``.safetensors`` file (format ``lottery-ticket/1``).

safetensors holds named tensors and a string-to-string metadata header, and no pickle: a file
is read without running any code, and its header (names, dtypes, shapes, byte offsets, metadata)
is plain JSON at the start of the file, so ``read_header`` needs neither torch nor the tensors.

Tensors are stored as ``GROUP/NAME``, one group per kind of state:

``masks/LAYER``     the ticket's masks (level L), bool, shaped like the layer's weight.
``lineage/LAYER``   uint8 (int16 past 254 levels): at how many of the levels 0..L the weight is
                    kept.  Masks only shrink from level to level, so level k's mask is
                    ``lineage > k``: one tensor carries every level a control trains.
``init/KEY``        the run's initial weights and buffers (its ``checkpoints/init.pt``, masks aside).
``trained/KEY``     the weights and buffers at the end of level L, pruned weights exactly zero.
``rewind/KEY``      WR only: the rewind point's weights and buffers (``checkpoints/rewind.pt``).

The metadata has two keys: ``format`` and ``ticket``, a JSON object (what ``utils.lottery.tickets``
writes: model, data record, config, level, layers, accuracies, commit) with ``checksums``:
group -> SHA-256 over the group's tensors in name order, each as its name, dtype, shape and
the bytes stored in the file (``group_checksums``, the one rule for writing and checking).  A
reader refuses a file whose group does not match its checksum (changed after export), a group
without a checksum or a checksum without its group.

Plain arguments only; ``TicketError`` is one line naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

FORMAT = "lottery-ticket/1"
GROUPS = ("masks", "lineage", "init", "trained", "rewind")
WEIGHT_GROUPS = ("init", "trained", "rewind")   # what model.weights=FILE[:GROUP] loads (default init)
_HEADER_LIMIT = 1 << 27                          # a safetensors header is JSON; 128 MiB is far beyond any


class TicketError(ValueError):
    """A ticket file that cannot be used as asked: one line naming it."""


@dataclass(frozen=True)
class TicketHeader:
    path: str
    metadata: Dict                               # the ``ticket`` object
    tensors: Dict[str, Tuple[str, List[int]]]    # GROUP/NAME -> (dtype, shape)

    def group_names(self) -> List[str]:
        return sorted({name.split("/", 1)[0] for name in self.tensors})


@dataclass(frozen=True)
class Ticket:
    path: str
    metadata: Dict
    groups: Dict[str, Dict]                      # group -> {name: tensor}

    @property
    def level(self) -> int:
        return int(self.metadata["level"])

    @property
    def config(self) -> Dict:
        return dict(self.metadata["config"])

    def weights(self, group: str) -> Dict:
        if group not in self.groups:
            raise TicketError(f"{self.path} holds no {group!r} weights (it holds {', '.join(sorted(self.groups))})")
        return dict(self.groups[group])

    def masks_at(self, level: int) -> Dict:
        """Level ``level``'s masks (0 <= level <= the ticket's), from the lineage."""
        if not 0 <= level <= self.level:
            raise TicketError(f"{self.path} holds levels 0 to {self.level}; there is no level {level}")
        return {name: lineage > level for name, lineage in self.groups["lineage"].items()}


# ------------------------------------------------------------------------------- the header
def _split_header(data: bytes, path) -> Tuple[Dict, int]:
    """safetensors: 8 bytes little-endian header length, then the header JSON, then the data."""
    if len(data) < 8:
        raise TicketError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    length = int.from_bytes(data[:8], "little")
    if length > _HEADER_LIMIT or 8 + length > len(data):
        raise TicketError(f"{path}: not a safetensors file (header length {length} does not fit the file)")
    try:
        header = json.loads(bytes(data[8:8 + length]))
    except (UnicodeDecodeError, ValueError):
        raise TicketError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise TicketError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header, 8 + length


def _ticket_metadata(header: Mapping, path) -> Dict:
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise TicketError(f"{path}: a safetensors file but not a ticket (metadata format "
                          f"{metadata.get('format')!r}, expected {FORMAT!r}; write one with python -m utils.ticket export)")
    try:
        ticket = json.loads(metadata["ticket"])
    except (KeyError, TypeError, ValueError):
        raise TicketError(f"{path}: its 'ticket' metadata is missing or not JSON") from None
    if not isinstance(ticket, dict) or not isinstance(ticket.get("checksums"), dict):
        raise TicketError(f"{path}: its 'ticket' metadata has no checksums")
    return ticket


def read_header(path) -> TicketHeader:
    """The metadata and tensor index of ``path``, read without torch and without the tensors."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            start = handle.read(8)
            length = int.from_bytes(start, "little") if len(start) == 8 else 0
            data = start + handle.read(min(length, _HEADER_LIMIT))
            size = os.fstat(handle.fileno()).st_size
    except FileNotFoundError:
        raise TicketError(f"{path}: no such file") from None
    except OSError as error:
        raise TicketError(f"{path}: cannot be read ({error.strerror or error})") from None
    if len(start) == 8 and 8 + length > size:
        raise TicketError(f"{path}: not a safetensors file (header length {length} does not fit the file)")
    header, _ = _split_header(data, path)
    metadata = _ticket_metadata(header, path)
    tensors = {name: (str(entry.get("dtype")), list(entry.get("shape", [])))
               for name, entry in header.items() if name != "__metadata__" and isinstance(entry, dict)}
    return TicketHeader(path, metadata, tensors)


def is_ticket(path) -> bool:
    """Whether ``path`` is a file in this format (its header says so; nothing else is read)."""
    if not os.path.isfile(path):
        return False
    try:
        read_header(path)
    except TicketError:
        return False
    return True


# ------------------------------------------------------------------------------- checksums
def group_checksums(data: bytes) -> Dict[str, str]:
    """group -> SHA-256 of its tensors as stored in the safetensors bytes ``data`` (name order;
    each tensor's name, dtype, shape and bytes)."""
    header, start = _split_header(data, "<bytes>")
    digests: Dict[str, "hashlib._Hash"] = {}
    view = memoryview(data)
    for name in sorted(k for k in header if k != "__metadata__"):
        entry = header[name]
        group = name.split("/", 1)[0]
        begin, end = entry["data_offsets"]
        digest = digests.setdefault(group, hashlib.sha256())
        digest.update(f"{name}\0{entry['dtype']}\0{json.dumps(entry['shape'])}\0".encode())
        digest.update(view[start + begin:start + end])
    return {group: digest.hexdigest() for group, digest in sorted(digests.items())}


def verify(data: bytes, path) -> Dict:
    """The ticket metadata of the file bytes ``data``, every group checked against its checksum."""
    header, _ = _split_header(data, path)
    metadata = _ticket_metadata(header, path)
    recorded, found = metadata["checksums"], group_checksums(data)
    for group in sorted(set(recorded) | set(found)):
        if group not in found:
            raise TicketError(f"{path}: tensor group {group!r} has a checksum but no tensors; the file is damaged")
        if group not in recorded:
            raise TicketError(f"{path}: tensor group {group!r} has no checksum; it was added after export")
        if found[group] != recorded[group]:
            raise TicketError(f"{path}: tensor group {group!r} does not match its checksum (sha256 {found[group][:12]}..., "
                              f"recorded {recorded[group][:12]}...): the file changed after export; export it again")
    return metadata


def _read_bytes(path) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise TicketError(f"{path}: no such file") from None
    except OSError as error:
        raise TicketError(f"{path}: cannot be read ({error.strerror or error})") from None


def verify_file(path) -> Dict:
    """``verify`` of the file ``path`` (no torch: the checksums are over the stored bytes)."""
    return verify(_read_bytes(path), os.fspath(path))


# ------------------------------------------------------------------------------- read, write
def read_ticket(path) -> Ticket:
    """The whole ticket, its checksums checked; TicketError for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = os.fspath(path)
    data = _read_bytes(path)
    metadata = verify(data, path)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise TicketError(f"{path}: its tensors cannot be read ({str(error).splitlines()[0][:160]})") from None
    groups: Dict[str, Dict] = {}
    for name, tensor in tensors.items():
        group, _, key = name.partition("/")
        groups.setdefault(group, {})[key] = tensor
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown or "masks" not in groups or "lineage" not in groups or "init" not in groups:
        raise TicketError(f"{path}: groups {sorted(groups)}; a ticket holds masks, lineage, init "
                          f"(and trained, rewind), nothing else")
    return Ticket(path, metadata, {group: dict(sorted(groups[group].items())) for group in sorted(groups)})


def encode(groups: Mapping[str, Mapping], metadata: Mapping) -> bytes:
    """The file's bytes: ``groups`` (group -> {name: tensor}) and ``metadata`` with the checksums added."""
    from safetensors.torch import save

    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown tensor groups {unknown}; valid: {', '.join(GROUPS)}")
    tensors = {f"{group}/{name}": tensor.detach().to("cpu").contiguous().clone()
               for group, named in groups.items() for name, tensor in named.items()}
    checksums = group_checksums(save(tensors))  # the data bytes do not depend on the metadata
    ticket = json.dumps({**metadata, "checksums": checksums}, sort_keys=True)
    return save(tensors, metadata={"format": FORMAT, "ticket": ticket})


def lineage_of(level_masks: List[Mapping]) -> Dict:
    """Masks of levels 0..L (each only shrinking) -> the lineage tensors; ValueError naming the
    first layer and level where a mask grows."""
    import torch

    last = len(level_masks) - 1
    dtype = torch.uint8 if last < 255 else torch.int16
    lineage = {}
    for name in level_masks[-1]:
        count = torch.zeros(level_masks[-1][name].shape, dtype=torch.int16)
        for level, masks in enumerate(level_masks):
            if level and bool((masks[name] & ~level_masks[level - 1][name]).any()):
                raise ValueError(f"layer {name}: level {level}'s mask keeps weights level {level - 1}'s pruned; "
                                 f"the levels do not nest")
            count += masks[name].to(torch.int16)
        lineage[name] = count.to(dtype)
    return lineage


def parse_reference(text: str) -> Tuple[str, Optional[str]]:
    """``FILE`` or ``FILE:GROUP`` -> (path, group or None).  A path that exists as it is has no
    suffix; otherwise the text after the last ``:`` is the group (``init``, ``trained``,
    ``rewind``; TicketError for another, and for a suffix on a file that is not a ticket)."""
    if os.path.exists(text) or ":" not in text:
        return text, None
    path, _, group = text.rpartition(":")
    if group not in WEIGHT_GROUPS:
        raise TicketError(f"{text}: unknown suffix ':{group}'; a ticket file takes :{', :'.join(WEIGHT_GROUPS)} "
                          f"(none: init)")
    if not is_ticket(path):
        raise TicketError(f"{text}: the suffix ':{group}' names a group of a ticket file, and {path} is not one")
    return path, group
