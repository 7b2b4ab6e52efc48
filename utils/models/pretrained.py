"""Tickets from given weights: ``model.weights=FILE`` (Chen et al. 2021, the lottery ticket in
pre-trained networks).

``load_given_weights(model, path)`` reads a state dict -- what ``torch.save(model.state_dict())``
writes, a torchvision weights file, or a dict holding one under ``model`` or ``state_dict``
(this project's checkpoints, many training scripts) -- with ``torch.load(weights_only=True)``
(tensors only, never arbitrary pickled objects) and copies it into a model that
``mask_layers.prepare_model`` has prepared, before anything else happens to it.  The harness
does that right after building the model and before level 0, so ``checkpoints/init.pt`` holds
the given weights and IMP rewinds to them; every training type then works unchanged.

What must fit (else ``WeightsError``, one line naming up to three keys):

* every name of the model's state dict (masks aside) is in the file and every name in the
  file is in the model.  torch's own names of attention weights (``in_proj_weight``) are read
  as the prepared model's (``in_proj.weight``, ``mask_layers.state_dict_aliases``).  BatchNorm's
  ``num_batches_tracked`` counters may be missing (older files): the model's stay.
* every shape matches, with one exception: the classifier head (the last Conv2d/Linear in
  module order, whose output is the logits) may have another number of classes (its first
  dimension; weight and bias both).  Then the head keeps the model's fresh initialisation and
  one line says so (a network pre-trained on ImageNet's 1000 classes, fine-tuned on 10).
* a file that holds masks (``*.mask``) is refused: masks come from pruning, or from another
  experiment through ``prune.masks_from``.

A ticket file (``python -m utils.ticket export``; ``utils.models.ticket_file``) is read as its
initial weights, or as another of its groups with a suffix: ``FILE:init`` (the same),
``FILE:trained`` (the level's trained weights, pruned ones zero), ``FILE:rewind`` (WR's rewind
point).  Its checksums are checked first; an unknown suffix is refused in one line.

Controls (``prune.masks_from``): a ``reinit`` control trains a fresh initialisation, so it
ignores the given weights (and says so); ``none`` and ``shuffle`` start from their source's
``init.pt``, which holds the source's given weights -- a control asking for another file than
its source's is refused (``check_control_weights``).

Plain arguments only; nothing here reads the global config.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from utils.models import ticket_file
from utils.models.mask_layers import apply_masks_, mask_buffer_names, state_dict_aliases

# State-dict entries a file may lack (counters, not weights).
OPTIONAL_SUFFIXES = (".num_batches_tracked",)
# Keys under which a file may nest its state dict.
NESTED_KEYS = ("model", "state_dict")


class WeightsError(ValueError):
    """Given weights that cannot be used: one line naming the file and what does not fit."""


def _some(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The state dict in ``path`` (tensors only; nested under ``model``/``state_dict`` accepted;
    a ticket file's group, ``FILE[:GROUP]``)."""
    try:
        file, group = ticket_file.parse_reference(path)
        if ticket_file.is_ticket(file):
            return ticket_file.read_ticket(file).weights(group or "init")
    except ticket_file.TicketError as error:
        raise WeightsError(f"model.weights={error}") from None
    if not os.path.isfile(path):
        raise WeightsError(f"model.weights={path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- unreadable, or objects weights_only refuses
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise WeightsError(f"model.weights={path}: cannot be read as a state dict of tensors with "
                           f"weights_only=True ({first})") from None
    if isinstance(loaded, Mapping) and not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        nested = next((loaded[key] for key in NESTED_KEYS if isinstance(loaded.get(key), Mapping)), None)
        if nested is not None:
            loaded = nested
    if not isinstance(loaded, Mapping) or not loaded or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise WeightsError(f"model.weights={path}: holds a {type(loaded).__name__}, not a state dict "
                           f"(a dict of parameter name -> tensor, as torch.save(model.state_dict()) writes)")
    return dict(loaded)


def classifier_head(model: nn.Module) -> Optional[str]:
    """Name of the layer that produces the logits: the last Conv2d/Linear in module order."""
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            name = module_name
    return name


def _head_keys(model: nn.Module) -> Tuple[Optional[str], List[str]]:
    head = classifier_head(model)
    if head is None:
        return None, []
    prefix = f"{head}." if head else ""
    return head, [prefix + "weight", prefix + "bias"]


def fit_state_dict(model: nn.Module, given: Mapping[str, torch.Tensor], path: str) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """-> (the entries to load, a note naming a re-initialised head or None); WeightsError when
    the file does not fit ``model`` (prepared: its masks are not expected in the file)."""
    masks = set(mask_buffer_names(model))
    aliases = state_dict_aliases(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in masks}
    holding_masks = [k for k in given if k.endswith(".mask")]
    if holding_masks:
        raise WeightsError(f"model.weights={path} holds masks ({_some(holding_masks)}); give plain weights "
                           f"(masks come from pruning, or from another experiment through prune.masks_from)")
    renamed = {aliases.get(k, k): v for k, v in given.items()}
    unexpected = [k for k in renamed if k not in expected]
    missing = [k for k in expected if k not in renamed and not k.endswith(OPTIONAL_SUFFIXES)]
    if unexpected or missing:
        parts = ([f"missing {_some(missing)}"] if missing else []) + (
            [f"not in the model {_some(unexpected)}"] if unexpected else [])
        raise WeightsError(f"model.weights={path} does not fit model: {'; '.join(parts)}")
    head, head_keys = _head_keys(model)
    misfits = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in renamed.items()
               if tuple(v.shape) != tuple(expected[k].shape)}
    note = None
    if misfits and set(misfits) <= set(head_keys) and _only_class_count_differs(renamed, expected, head_keys):
        given_classes = renamed[head_keys[0]].shape[0]
        note = (f"model.weights={path}: classifier head {head} keeps its fresh initialisation (the file's has "
                f"{given_classes} classes, this model {expected[head_keys[0]].shape[0]}); everything else is loaded")
        renamed = {k: v for k, v in renamed.items() if k not in head_keys}
    elif misfits:
        shapes = "; ".join(f"{k} {list(a)} in the file, {list(b)} in the model"
                           for k, (a, b) in sorted(misfits.items())[:3])
        more = f" (and {len(misfits) - 3} more)" if len(misfits) > 3 else ""
        raise WeightsError(f"model.weights={path} does not fit model: shapes differ: {shapes}{more}")
    return renamed, note


def _only_class_count_differs(given, expected, head_keys) -> bool:
    """The head's weight and bias differ from the model's in their first dimension only, by the
    same class count."""
    counts = set()
    for key in head_keys:
        if key not in given:
            continue
        a, b = tuple(given[key].shape), tuple(expected[key].shape)
        if len(a) != len(b) or a[1:] != b[1:]:
            return False
        counts.add(a[0])
    return len(counts) == 1


@torch.no_grad()
def load_given_weights(model: nn.Module, path: str) -> List[str]:
    """Copy the weights in ``path`` into ``model`` (prepared, masks dense) -> the lines to print.
    Nothing in the model changes when WeightsError is raised."""
    given = read_state_dict(path)
    entries, note = fit_state_dict(model, given, path)
    result = model.load_state_dict(entries, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # fit_state_dict checked the names
    apply_masks_(model)  # masks are dense before level 0; kept for a model given pruned masks
    count = sum(v.numel() for v in entries.values() if v.is_floating_point())
    lines = [f"model.weights={path}: {len(entries)} tensors ({count:,} values) loaded as the initial weights"]
    return lines + ([note] if note else [])


def apply_given_weights(model: nn.Module, path: str, control: Optional[str] = None) -> List[str]:
    """The harness's entry point: load ``path`` unless the run is a ``reinit`` control (which
    trains its own fresh initialisation) -> the lines to print."""
    if not path:
        return []
    if control == "reinit":
        return [f"model.weights={path} is not used: prune.control=reinit trains a fresh random initialisation"]
    return load_given_weights(model, path)


def check_control_weights(own: str, source: str, control: str, source_root) -> None:
    """A ``none``/``shuffle`` control starts from its source's initial weights (the source's
    ``model.weights`` when it had one): refuse a control that names another file."""
    if control == "reinit" or not own:
        return
    try:
        file, group = ticket_file.parse_reference(own)
    except ticket_file.TicketError as error:
        raise WeightsError(f"model.weights={error}") from None
    if group in (None, "init") and os.path.realpath(file) == os.path.realpath(str(source_root)):
        return  # a ticket file's own initial weights: what the control starts from anyway
    if not source or os.path.realpath(own) != os.path.realpath(source):
        theirs = f"model.weights={source}" if source else "its own random initialisation"
        raise WeightsError(f"model.weights={own}: prune.control={control} starts from the initial weights of "
                           f"prune.masks_from={source_root} ({theirs}); leave model.weights unset or give the same file")
