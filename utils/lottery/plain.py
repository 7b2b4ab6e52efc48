"""A trained ticket as a plain PyTorch state dict (``python -m utils.ticket plain``).

The harness's model holds masked layer classes (``utils.models.mask_layers``) and a ``mask``
buffer beside every prunable weight; nothing outside this project loads that.  ``plain_state_dict``
turns it into the state dict of the ordinary model class: mask buffers dropped, every pruned
weight exactly zero (weight times mask), attention projections under torch's own names
(``in_proj_weight``, ``mask_layers.state_dict_aliases`` read backwards).

The ordinary class is what ``utils.models.registry.get_model`` builds before the masks go in.
For torchvision's ResNets the lines printed build it with torchvision alone
(``torchvision.models.resnet18(weights=None, num_classes=N)``, plus the registry's changes:
a small-image stem and no max-pool, or a stem for other channel counts); for every other model
they use the registry (this project's classes, without masks).  Before anything is written
the lines are run as printed: the state dict must load with ``load_state_dict(strict=True)``
and the plain model's outputs must equal the masked model's exactly (eval mode, float32, a
random batch); the file is written atomically and checked again through the printed lines.

Refused in one line (``PlainError``): a channel-pruned level (``python -m utils.compact`` makes
the physically smaller network), an N:M level (its semi-structured format:
``python -m utils.compact --format semi-structured``), a model with BlurPool (not the ordinary
class), weights that do not fit the model.  Plain arguments only.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from utils.core.atomic_io import atomic_output
from utils.models.mask_layers import MaskError, prepare_model, set_masks, state_dict_aliases
from utils.models.registry import ModelError, get_model

OUTPUT_CHECK_BATCH = 8


class PlainError(ValueError):
    """A level that cannot be written as a plain state dict, or one whose check failed: one line."""


def refusal(structure: str, compaction: Optional[str], where: str, level: int, blurpool: bool) -> Optional[str]:
    """Why level ``level`` of ``where`` has no plain form here (None: it has one)."""
    if compaction == "channels":
        return (f"level {level} of {where} is channel-pruned (prune.structure={structure}): "
                f"python -m utils.compact --experiment DIR --level {level} --out FILE.pt2 makes the smaller network")
    if compaction == "semi-structured":
        return (f"level {level} of {where} is N:M (prune.structure={structure}): its plain form is torch's "
                f"semi-structured format, python -m utils.compact --experiment DIR --level {level} --format semi-structured")
    if compaction is not None:
        return f"level {level} of {where}: prune.structure={structure} compacts as {compaction!r}, which plain does not write"
    if blurpool:
        return f"{where} has model.blurpool=true: its blurred convolutions are not in the ordinary model class"
    return None


def ordinary_model(model_args: Mapping[str, Any]) -> nn.Module:
    try:
        return get_model(model_args["name"], num_classes=int(model_args["num_classes"]),
                         in_channels=int(model_args["in_channels"]), image_size=int(model_args["image_size"]))
    except (ModelError, KeyError, TypeError, ValueError) as error:
        raise PlainError(f"cannot build model {model_args.get('name')!r}: {str(error).splitlines()[0]}") from None


def masked_model(model_args: Mapping[str, Any], masks: Mapping[str, torch.Tensor],
                 trained: Mapping[str, torch.Tensor]) -> nn.Module:
    """The harness's model of ``model_args`` holding ``trained`` (masks aside) and ``masks``."""
    model = ordinary_model(model_args)
    try:
        prepare_model(model, exclude=list(model_args.get("exclude") or []))
        result = model.load_state_dict(dict(trained), strict=False)
        missing = [key for key in result.missing_keys if not key.endswith(".mask")]
        if missing or result.unexpected_keys:
            raise PlainError(f"the trained weights do not fit {model_args['name']} (missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})")
        set_masks(model, {name: mask.to(torch.bool) for name, mask in masks.items()})
    except (MaskError, RuntimeError) as error:  # load_state_dict: shapes that differ
        raise PlainError(f"the trained weights or masks do not fit {model_args['name']}: "
                         f"{str(error).strip().splitlines()[-1][:200]}") from None
    return model.eval()


@torch.no_grad()
def plain_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model``'s state dict for its ordinary class: masks dropped, pruned weights exactly zero,
    torch's own names for attention projections."""
    state = model.state_dict()
    masks = {key[:-len(".mask")]: value for key, value in state.items() if key.endswith(".mask")}
    back = {new: old for old, new in state_dict_aliases(model).items()}
    plain = {}
    for key, value in state.items():
        if key.endswith(".mask") and key[:-len(".mask")] in masks:
            continue
        layer = key[:-len(".weight")] if key.endswith(".weight") else None
        if layer in masks:
            value = value * masks[layer].to(value.dtype)
        plain[back.get(key, key)] = value.detach().to("cpu", copy=True).contiguous()
    return plain


def construction_lines(model_args: Mapping[str, Any]) -> List[str]:
    """Python lines that build the ordinary, untrained model as ``model``."""
    import torchvision

    name, classes = model_args["name"], int(model_args["num_classes"])
    built = ordinary_model(model_args)
    if isinstance(built, torchvision.models.ResNet) and name in torchvision.models.list_models(module=torchvision.models):
        lines = ["import torch, torchvision", f"model = torchvision.models.{name}(weights=None, num_classes={classes})"]
        reference = torchvision.models.get_model(name, weights=None, num_classes=classes)
        stem, usual = built.conv1, reference.conv1
        if (stem.in_channels, stem.kernel_size, stem.stride, stem.padding) != \
                (usual.in_channels, usual.kernel_size, usual.stride, usual.padding):
            lines.append(f"model.conv1 = torch.nn.Conv2d({stem.in_channels}, {stem.out_channels}, "
                         f"kernel_size={stem.kernel_size[0]}, stride={stem.stride[0]}, padding={stem.padding[0]}, "
                         f"bias={stem.bias is not None})  # this project's stem for {model_args['image_size']} px, "
                         f"{stem.in_channels} channel(s)")
        if isinstance(built.maxpool, nn.Identity):
            lines.append("model.maxpool = torch.nn.Identity()  # small images: no max-pool")
        return lines
    return ["import torch",
            "from utils.models.registry import get_model  # this project's model classes, without masks",
            f"model = get_model({name!r}, num_classes={classes}, in_channels={int(model_args['in_channels'])}, "
            f"image_size={int(model_args['image_size'])})"]


def loading_lines(path) -> List[str]:
    return [f"model.load_state_dict(torch.load({str(path)!r}, weights_only=True), strict=True)", "model.eval()"]


def run_lines(lines: Sequence[str]) -> nn.Module:
    """The model that ``lines`` (as printed) leave in ``model``."""
    namespace: Dict[str, Any] = {}
    exec(compile("\n".join(lines), "<plain model lines>", "exec"), namespace)  # noqa: S102 -- lines made above
    return namespace["model"]


@torch.no_grad()
def output_difference(masked: nn.Module, plain: nn.Module, input_shape: Sequence[int], seed: int = 0) -> float:
    """Max |masked(x) - plain(x)| on a random batch (eval mode, float32, CPU); inf for other shapes."""
    inputs = torch.randn(OUTPUT_CHECK_BATCH, *input_shape, generator=torch.Generator().manual_seed(seed))
    expected = masked.to("cpu", torch.float32).eval()(inputs)
    got = plain.to("cpu", torch.float32).eval()(inputs)
    if expected.shape != got.shape:
        return float("inf")
    return float((expected - got).abs().max())


def checked_plain(model_args: Mapping[str, Any], masked: nn.Module, path=None) -> Dict[str, torch.Tensor]:
    """The plain state dict of ``masked``, loaded with strict=True into the model the printed lines
    build, outputs equal; PlainError otherwise."""
    state = plain_state_dict(masked)
    plain = run_lines(construction_lines(model_args))
    try:
        plain.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise PlainError(f"the plain state dict does not load into {type(plain).__name__} with strict=True: "
                         f"{' '.join(str(error).split())[:240]}") from None
    _require_same(masked, plain, model_args, "before writing")
    return state


def _require_same(masked: nn.Module, plain: nn.Module, model_args: Mapping[str, Any], when: str) -> None:
    shape = (int(model_args["in_channels"]), int(model_args["image_size"]), int(model_args["image_size"]))
    difference = output_difference(masked, plain, shape)
    if difference != 0.0:
        raise PlainError(f"the plain model's outputs differ from the masked model's by {difference:.3g} ({when}); "
                         f"nothing written")


def write_plain(out, model_args: Mapping[str, Any], masks: Mapping[str, torch.Tensor],
                trained: Mapping[str, torch.Tensor], *, what: str) -> List[str]:
    """Write the plain state dict of ``trained`` + ``masks`` to ``out`` (checked before and after,
    see the module docstring) -> the lines to print.  ``what``: the level, for the first line."""
    masked = masked_model(model_args, masks, trained)
    state = checked_plain(model_args, masked)
    with atomic_output(out, keep_suffix=True) as temporary:
        torch.save(state, temporary)
        _require_same(masked, run_lines(construction_lines(model_args) + loading_lines(temporary)), model_args,
                      "loaded from the file by the lines below")
    alive = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    zeros = sum(int((state[f"{name}.weight"] == 0).sum()) for name in masks if f"{name}.weight" in state)
    return [f"{what} -> {out}: plain state dict of {len(state)} tensors for the ordinary {model_args['name']} "
            f"({total - alive:,} of {total:,} prunable weights pruned, exactly zero; {zeros:,} zeros in those weights)",
            f"checked: load_state_dict(strict=True) and outputs equal to the masked model's (eval mode, float32, "
            f"random batch of {OUTPUT_CHECK_BATCH}), through these lines:",
            *("    " + line for line in construction_lines(model_args) + loading_lines(out))]
