"""Masked Conv2d / Linear / MultiheadAttention layers and the helpers that read and write their masks.

Design:

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
* ``nn.MultiheadAttention`` keeps its Q, K and V projections as bare parameters
  (``in_proj_weight``, packed ``[3E, E]``; or ``q_proj_weight``, ``k_proj_weight``,
  ``v_proj_weight`` when key/value sizes differ), not as ``nn.Linear`` layers.  Each of them
  moves into a child module of its own (``in_proj``, or ``q_proj`` / ``k_proj`` / ``v_proj``:
  an ``AttentionProjection`` holding ``weight`` and, once masked, ``mask``), and the attention
  module's class becomes a subclass whose ``in_proj_weight`` (etc.) attribute reads that
  child's weight.  So every prunable weight is ``<layer>.weight`` beside ``<layer>.mask``, as
  for Conv2d/Linear, and the criteria, allocations, ``functional_call`` (SNIP, SynFlow),
  checkpoints and the CSV reports need nothing special; the attention forward is torch's own,
  unchanged (same tensor objects, no multiply).  ``out_proj`` is an ``nn.Linear`` already.
  A state dict with torch's own names (``...self_attention.in_proj_weight``, e.g. a
  torchvision weights file) loads into a prepared model: the old name is read as the new one
  (``state_dict_aliases``).  An attention projection can be excluded on its own
  (``*.self_attention.in_proj``) or with its module (``*.self_attention``).
* Layers whose names match a pattern in ``exclude`` are left as they are: dense, never
  pruned, not counted in densities.
* What stays dense -- biases, normalisation layers, embeddings, position embeddings and
  class/distillation tokens, layer scales, excluded layers -- is counted by
  ``dense_parameter_report`` and said in one line by ``dense_summary`` (the harness prints it
  at start), so a density is never silently a fraction of a subset.
"""
from __future__ import annotations

import fnmatch
import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

PRUNABLE_TYPES: Tuple[type, ...] = (nn.Conv2d, nn.Linear)
ATTENTION_TYPES: Tuple[type, ...] = (nn.MultiheadAttention,)
# Attention parameter -> the child module that holds it once the attention module is prepared.
ATTENTION_PROJECTIONS: Dict[str, str] = {
    "in_proj_weight": "in_proj", "q_proj_weight": "q_proj", "k_proj_weight": "k_proj", "v_proj_weight": "v_proj",
}

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


def mixed_class(mixin: type, cls: type, prefix: str, namespace: Dict[str, Any], cache: Dict[type, type]) -> type:
    """The subclass of ``(mixin, cls)``, made once per ``cls`` (``cache``) and registered under
    its name in the module whose globals are ``namespace``, so that torch.save(model) can pickle
    it by module and name (``PrefixName``, or ``Prefixmodule_path_Name`` when that is taken)."""
    if cls not in cache:
        name = f"{prefix}{cls.__name__}"
        if name in namespace and namespace[name] is not cache.get(cls):
            name = f"{prefix}{cls.__module__.replace('.', '_')}_{cls.__name__}"
        made = type(name, (mixin, cls), {"__module__": namespace["__name__"], "__qualname__": name})
        namespace[name] = made
        cache[cls] = made
    return cache[cls]


def _masked_class_for(cls: type) -> type:
    """A subclass of ``cls`` that also inherits ``MaskedLayer`` (made once per class)."""
    return mixed_class(MaskedLayer, cls, "Masked", globals(), _masked_classes)


class AttentionProjection(nn.Module):
    """One projection matrix of an attention module (Q, K, V or the packed three), as a module of
    its own so that it can carry a mask like a Linear layer.  It is never called: the attention
    module reads ``weight`` through its ``in_proj_weight`` / ``q_proj_weight`` ... attribute."""

    def __init__(self, weight: Optional[nn.Parameter] = None):
        super().__init__()
        self.weight = weight

    def forward(self, *args, **kwargs):
        raise RuntimeError("an AttentionProjection holds a weight of its attention module; it is not called")

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}" if self.weight is not None else ""


def _projection_attribute(attribute: str, child: str) -> property:
    def read(self):
        holder = self._modules.get(child)
        return None if holder is None else holder.weight

    return property(read, doc=f"``{child}.weight`` (torch's ``{attribute}``), read by the attention forward")


class MaskedAttention:
    """Mixin of a prepared ``nn.MultiheadAttention``: its projection weights live in children."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torch's own names (a plain model's state dict, torchvision weight files) read as ours.
        for attribute, child in ATTENTION_PROJECTIONS.items():
            if prefix + attribute in state_dict and child in self._modules:
                state_dict[f"{prefix}{child}.weight"] = state_dict.pop(prefix + attribute)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


for _attribute, _child in ATTENTION_PROJECTIONS.items():
    setattr(MaskedAttention, _attribute, _projection_attribute(_attribute, _child))

_masked_attention_classes: Dict[type, type] = {}


def _masked_attention_class_for(cls: type) -> type:
    return mixed_class(MaskedAttention, cls, "Masked", globals(), _masked_attention_classes)


MaskedConv2d = _masked_class_for(nn.Conv2d)
MaskedLinear = _masked_class_for(nn.Linear)
MaskedAttentionProjection = _masked_class_for(AttentionProjection)
MaskedMultiheadAttention = _masked_attention_class_for(nn.MultiheadAttention)


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """fnmatch-style match of a module name (``fc``, ``layer1.*``, ``features.0``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _add_mask_(module: nn.Module) -> None:
    module.__class__ = _masked_class_for(type(module))
    module.register_buffer("mask", torch.ones_like(module.weight, dtype=torch.bool), persistent=True)


def _prepare_attention_(module: nn.MultiheadAttention, name: str, exclude: Sequence[str]) -> None:
    """Move the attention module's projection weights into ``AttentionProjection`` children (masked
    unless excluded by their own name) and give the module the class that reads them there."""
    present = {attribute: child for attribute, child in ATTENTION_PROJECTIONS.items()
               if module._parameters.get(attribute) is not None}
    prefix = f"{name}." if name else ""
    if matches_any(name, exclude) or all(matches_any(prefix + child, exclude) for child in present.values()):
        return  # the whole module stays as torch made it: dense and uncounted
    children = {}
    for attribute in ATTENTION_PROJECTIONS:
        weight = module._parameters.pop(attribute, None)
        if weight is None:
            continue
        children[present[attribute]] = projection = AttentionProjection(weight)
        if not matches_any(prefix + present[attribute], exclude):
            _add_mask_(projection)
    module.__class__ = _masked_attention_class_for(type(module))
    # Projections first: module order (random scores, tie-breaking) runs Q/K/V before out_proj.
    module._modules = {**children, **module._modules}


def prepare_model(model: nn.Module, exclude: Sequence[str] = ()) -> nn.Module:
    """Make every Conv2d/Linear/MultiheadAttention weight matrix of ``model`` prunable (in place)
    and return the model.

    Masks start all-True (dense).  ``exclude`` holds fnmatch patterns of module names to
    keep dense and uncounted (an attention module's projections are named
    ``<attention>.in_proj`` or ``<attention>.q_proj`` ...).  Calling it twice is harmless.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, (MaskedLayer, MaskedAttention, AttentionProjection)):
            continue
        if isinstance(module, ATTENTION_TYPES):
            _prepare_attention_(module, name, exclude)
            continue
        if not isinstance(module, PRUNABLE_TYPES) or matches_any(name, exclude):
            continue
        _add_mask_(module)
    if not any(True for _ in masked_layers(model)):
        raise MaskError("prepare_model: the model has no prunable Conv2d/Linear/attention layer left "
                        f"after exclude={list(exclude)}")
    return model


def state_dict_aliases(model: nn.Module) -> Dict[str, str]:
    """torch's state-dict name of each moved attention weight -> its name in the prepared model
    (``a.self_attention.in_proj_weight`` -> ``a.self_attention.in_proj.weight``)."""
    aliases = {}
    for name, module in model.named_modules():
        if isinstance(module, MaskedAttention):
            prefix = f"{name}." if name else ""
            for attribute, child in ATTENTION_PROJECTIONS.items():
                if child in module._modules:
                    aliases[prefix + attribute] = f"{prefix}{child}.weight"
    return aliases


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


# --------------------------------------------------------------------------- what stays dense
NORM_TYPES: Tuple[type, ...] = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                                 getattr(nn, "RMSNorm", None)) if t is not None)
EMBEDDING_TYPES: Tuple[type, ...] = (nn.Embedding, nn.EmbeddingBag)
WEIGHT_LAYER_TYPES: Tuple[type, ...] = PRUNABLE_TYPES + ATTENTION_TYPES + (AttentionProjection,)
# Categories of dense parameters, in the order the start line names them.
DENSE_CATEGORIES = ("biases", "norms", "embeddings", "position embeddings", "tokens", "layer scales",
                    "excluded layers", "other")
_NAMED_CATEGORIES = ("embeddings", "position embeddings", "tokens", "layer scales", "excluded layers", "other")


@dataclass
class DenseReport:
    """Parameters of a prepared model: the prunable weights and, by category, what stays dense."""
    total: int                                              # every parameter (a shared one once)
    prunable: int                                           # the masked weights: what densities count
    dense: Dict[str, int] = field(default_factory=dict)     # category -> parameters
    names: Dict[str, List[str]] = field(default_factory=dict)  # category -> parameter names


def _dense_category(module: nn.Module, attribute: str) -> str:
    """Why a parameter that is not a masked weight stays dense (by its module and name)."""
    if isinstance(module, NORM_TYPES):
        return "norms"
    if isinstance(module, EMBEDDING_TYPES):
        return "embeddings"
    if isinstance(module, WEIGHT_LAYER_TYPES):
        return "excluded layers" if attribute == "weight" or attribute in ATTENTION_PROJECTIONS else "biases"
    lower = attribute.lower()
    for words, category in ((("token",), "tokens"), (("pos_emb", "position"), "position embeddings"),
                            (("layer_scale", "gamma", "logit_scale"), "layer scales"), (("embed",), "embeddings"),
                            (("bias",), "biases")):
        if any(word in lower for word in words):
            return category
    return "other"


def dense_parameter_report(model: nn.Module) -> DenseReport:
    """Count the prunable weights and every parameter that stays dense, by category
    (``DENSE_CATEGORIES``): biases, normalisation layers, embeddings, position embeddings (and
    relative-position bias tables), class/distillation tokens, layer scales (and Swin-V2's
    attention logit scales), weights of excluded layers, anything else."""
    masked = {id(layer.weight) for _, layer in masked_layers(model)}
    report = DenseReport(total=0, prunable=0)
    seen = set()
    for module_name, module in model.named_modules():
        for attribute, parameter in module._parameters.items():
            if parameter is None or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            report.total += parameter.numel()
            if id(parameter) in masked:
                report.prunable += parameter.numel()
                continue
            category = _dense_category(module, attribute)
            report.dense[category] = report.dense.get(category, 0) + parameter.numel()
            report.names.setdefault(category, []).append(f"{module_name}.{attribute}" if module_name else attribute)
    report.dense = {c: report.dense[c] for c in DENSE_CATEGORIES if c in report.dense}
    report.names = {c: report.names[c] for c in DENSE_CATEGORIES if c in report.names}
    return report


def dense_summary(model: nn.Module) -> str:
    """One line: how many parameters the densities count, and what stays dense (with names
    where they are few kinds: embeddings, tokens, layer scales, excluded layers)."""
    report = dense_parameter_report(model)
    dense_total = report.total - report.prunable

    def share(count: int) -> str:
        return f"{100.0 * count / report.total:.2f}%" if report.total else "0%"

    parts = []
    for category, count in report.dense.items():
        text = f"{category} {count:,}"
        if category in _NAMED_CATEGORIES:
            names = report.names[category]
            text += f" ({', '.join(names[:3])}{f', +{len(names) - 3} more' if len(names) > 3 else ''})"
        parts.append(text)
    return (f"prunable (conv, linear and attention weight matrices): {report.prunable:,} of {report.total:,} "
            f"parameters ({share(report.prunable)}); dense, never pruned and outside every density: "
            f"{dense_total:,} ({share(dense_total)})" + (f": {'; '.join(parts)}" if parts else ""))


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


def layer_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """Prunable layer -> its weight's shape, in module order."""
    return {name: tuple(layer.weight.shape) for name, layer in masked_layers(model)}


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
