"""Masked Conv2d / Linear layers and the helpers that read and write their masks.

Design (see ../shared/DESIGN.md section 5):

* ``prepare_model`` turns every ``nn.Conv2d`` and ``nn.Linear`` of a model into a masked
  layer *in place*, by swapping the module's class for a subclass that carries a boolean
  ``mask`` buffer.  Nothing else about the layer changes: its parameters (the same tensor
  objects, so the model's own initialisation is kept), groups, dilation, padding mode,
  bias, and any behaviour of a Conv2d/Linear subclass.  Depthwise convolutions stay
  depthwise.
* The mask is a buffer, so ``state_dict`` carries it (key ``<layer>.mask``).
* The forward pass is the plain layer's forward: pruned weights are kept exactly zero by
  ``apply_masks_`` after every optimizer step (and whenever masks change), so no
  ``weight * mask`` multiply is paid in every forward.  ``bench/masked_overhead.py``
  measures the cost of this choice.
* Layers whose names match a pattern in ``exclude`` are left as they are: dense, never
  pruned, not counted in densities.
"""
from __future__ import annotations

import fnmatch
import hashlib
import weakref
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
from torch import nn

PRUNABLE_TYPES: Tuple[type, ...] = (nn.Conv2d, nn.Linear)

Masks = Dict[str, torch.Tensor]  # layer name -> bool tensor shaped like the layer's weight


class MaskError(ValueError):
    """A mask dict that does not fit the model (names, shapes, dtype or values)."""


class MaskedLayer:
    """Mixin marking a layer as prunable; the ``mask`` buffer lives on the instance."""

    mask: torch.Tensor

    @torch.no_grad()
    def apply_mask_(self) -> None:
        self.weight.mul_(self.mask)

    def extra_repr(self) -> str:  # shows up in print(model)
        if self.mask.device.type == "meta":
            return super().extra_repr()
        alive = int(self.mask.sum())
        return f"{super().extra_repr()}, density={alive / self.mask.numel():.4f}"


_masked_classes: Dict[type, type] = {}


def _masked_class_for(cls: type) -> type:
    """A subclass of ``cls`` that also inherits ``MaskedLayer`` (made once per class)."""
    if cls not in _masked_classes:
        name = f"Masked{cls.__name__}"
        if name in globals() and globals()[name] is not _masked_classes.get(cls):
            name = f"Masked{cls.__module__.replace('.', '_')}_{cls.__name__}"
        masked = type(name, (MaskedLayer, cls), {"__module__": __name__, "__qualname__": name})
        # Registered under its name in this module so torch.save(model) can pickle it.
        globals()[name] = masked
        _masked_classes[cls] = masked
    return _masked_classes[cls]


MaskedConv2d = _masked_class_for(nn.Conv2d)
MaskedLinear = _masked_class_for(nn.Linear)


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """fnmatch-style match of a module name (``fc``, ``layer1.*``, ``features.0``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def prepare_model(model: nn.Module, exclude: Sequence[str] = ()) -> nn.Module:
    """Make every Conv2d/Linear of ``model`` prunable (in place) and return the model.

    Masks start all-True (dense).  ``exclude`` holds fnmatch patterns of module names to
    keep dense and uncounted.  Calling it twice is harmless.
    """
    for name, module in model.named_modules():
        if isinstance(module, MaskedLayer) or not isinstance(module, PRUNABLE_TYPES):
            continue
        if matches_any(name, exclude):
            continue
        module.__class__ = _masked_class_for(type(module))
        module.register_buffer(
            "mask", torch.ones_like(module.weight, dtype=torch.bool), persistent=True
        )
    if not any(True for _ in masked_layers(model)):
        raise MaskError("prepare_model: the model has no prunable Conv2d/Linear layer left "
                        f"after exclude={list(exclude)}")
    return model


def masked_layers(model: nn.Module) -> Iterator[Tuple[str, MaskedLayer]]:
    """(name, layer) for every prunable layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, MaskedLayer):
            yield name, module


def prunable_layer_names(model: nn.Module) -> List[str]:
    return [name for name, _ in masked_layers(model)]


def mask_buffer_names(model: nn.Module) -> List[str]:
    """Fully qualified state_dict names of the mask buffers (for DDP's ignore list)."""
    return [f"{name}.mask" for name, _ in masked_layers(model)]


# layer -> (mask tensor, its version counter, its data pointer, the weight's dtype, the mask as
# that dtype).  Weak keys: a layer that is garbage collected takes its entry with it; nothing is
# stored on the model itself, so deepcopy / pickle / state_dict never see the cache.
_weight_dtype_masks: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _mask_as_weight_dtype(layer: MaskedLayer) -> torch.Tensor:
    """``layer.mask`` in the weight's dtype, cached until the mask changes.

    The cache entry is valid while the mask is the same tensor object (``.to(device)`` and
    ``load_state_dict(assign=True)`` replace it), at the same storage, with the same version
    counter (every in-place write bumps it: ``set_masks``' ``copy_``, ``load_state_dict``'s
    in-place copy, ``mask[...] = ...``) and the weight's dtype is unchanged.  A write that
    bypasses the version counter (through ``.numpy()`` or ``.data``) is not seen: change masks
    with ``set_masks`` or in-place tensor ops.
    """
    mask, weight = layer.mask, layer.weight
    try:
        version = mask._version
    except RuntimeError:  # an inference-mode tensor has no version counter: do not cache
        return mask.to(weight.dtype)
    key = (version, mask.data_ptr(), weight.dtype)
    entry = _weight_dtype_masks.get(layer)
    if entry is not None and entry[0] is mask and entry[1] == key:
        return entry[2]
    converted = mask.to(weight.dtype)
    _weight_dtype_masks[layer] = (mask, key, converted)
    return converted


@torch.no_grad()
def apply_masks_(model: nn.Module) -> None:
    """Zero every pruned weight.  Call after each optimizer step and after changing masks.

    One fused call: ``torch._foreach_mul_`` over all masked weights with the masks cast to
    the weights' dtype (cached, see ``_mask_as_weight_dtype``).  On CUDA, tensors of one
    dtype and device take the multi-tensor-apply path (a few kernel launches for the whole
    model instead of one per layer); mixed dtypes or devices fall back to a per-tensor loop
    inside torch, still correct.  The list of layers is walked every call (microseconds), so
    layers added or replaced since the last call are never missed.
    """
    weights, masks = [], []
    for _, layer in masked_layers(model):
        weights.append(layer.weight)
        masks.append(_mask_as_weight_dtype(layer))
    if weights:
        torch._foreach_mul_(weights, masks)


@torch.no_grad()
def apply_masks_per_layer_(model: nn.Module) -> None:
    """The reference: ``weight.mul_(bool_mask)`` layer by layer (what ``apply_masks_`` fuses)."""
    for _, layer in masked_layers(model):
        layer.weight.mul_(layer.mask)


def get_masks(model: nn.Module) -> Masks:
    """A copy of the current masks, on CPU."""
    return {name: layer.mask.detach().to("cpu", copy=True) for name, layer in masked_layers(model)}


def validate_masks(model: nn.Module, masks: Masks) -> None:
    layers = dict(masked_layers(model))
    missing = sorted(set(layers) - set(masks))
    unknown = sorted(set(masks) - set(layers))
    if missing or unknown:
        raise MaskError(f"masks do not fit the model: missing layers {missing}, unknown layers {unknown}")
    for name, mask in masks.items():
        weight = layers[name].weight
        if tuple(mask.shape) != tuple(weight.shape):
            raise MaskError(f"mask for {name} has shape {tuple(mask.shape)}, the weight has {tuple(weight.shape)}")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise MaskError(f"mask for {name} holds values other than 0 and 1")


@torch.no_grad()
def set_masks(model: nn.Module, masks: Masks) -> None:
    """Install ``masks`` (validated) and zero the weights they prune."""
    validate_masks(model, masks)
    for name, layer in masked_layers(model):
        layer.mask.copy_(masks[name].to(device=layer.mask.device, dtype=torch.bool))
    apply_masks_(model)


def count_alive(masks: Masks) -> int:
    return int(sum(int(m.sum()) for m in masks.values()))


def count_total(masks: Masks) -> int:
    return int(sum(m.numel() for m in masks.values()))


def overall_density(masks_or_model) -> float:
    masks = get_masks(masks_or_model) if isinstance(masks_or_model, nn.Module) else masks_or_model
    return count_alive(masks) / count_total(masks)


def density_report(masks_or_model) -> List[dict]:
    """One row per prunable layer: layer, numel, alive, density."""
    masks = get_masks(masks_or_model) if isinstance(masks_or_model, nn.Module) else masks_or_model
    rows = []
    for name, mask in masks.items():
        alive = int(mask.sum())
        rows.append({"layer": name, "numel": mask.numel(), "alive": alive, "density": alive / mask.numel()})
    return rows


def masks_checksum(masks: Masks) -> str:
    """Stable hex digest of a mask dict (names, shapes and bits), for cross-rank checks."""
    digest = hashlib.sha256()
    for name in sorted(masks):
        mask = masks[name].detach().to("cpu", dtype=torch.bool).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(mask.shape)).encode())
        digest.update(mask.numpy().tobytes())
    return digest.hexdigest()


def is_subset(smaller: Masks, larger: Masks) -> bool:
    """True when every weight alive in ``smaller`` is alive in ``larger`` (masks only shrink)."""
    if set(smaller) != set(larger):
        raise MaskError(f"mask dicts cover different layers: {sorted(set(smaller) ^ set(larger))}")
    return all(bool((smaller[n] & ~larger[n]).sum() == 0) for n in smaller)


def all_true_masks(model: nn.Module) -> Masks:
    return {name: torch.ones_like(layer.mask, device="cpu") for name, layer in masked_layers(model)}


def save_masks(masks: Masks, path) -> None:
    torch.save({name: m.to("cpu", dtype=torch.bool) for name, m in masks.items()}, path)


def load_masks(path) -> Masks:
    masks = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(masks, dict) or not all(isinstance(v, torch.Tensor) for v in masks.values()):
        raise MaskError(f"{path} does not hold a dict of layer name -> mask tensor")
    return {name: m.to(torch.bool) for name, m in masks.items()}
