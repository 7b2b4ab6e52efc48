"""Model registry: torchvision classifiers by name, plus the lottery-ticket families.

One concern, though over 500 lines: which network a model name builds.  The families written
here register themselves with ``@register`` beside the registry, so every name's builder and
its adaptation rules (stems, heads, initialisation) are read in one file.

``get_model(name, num_classes=..., in_channels=..., image_size=...)`` is the only entry
point the harness needs.  Every builder in ``MODELS`` takes the same three plain
arguments, so a new family is one decorated function (no if/elif over names).

torchvision models (every name ``torchvision.models.list_models(module=torchvision.models)``
offers: resnet18 ... resnet152, wide_resnet50_2, vgg11 ... vgg19_bn, mobilenet_v2,
efficientnet_b0, densenet121, convnext_tiny, regnet_*, vit_*, swin_*, ...):

* built with ``weights=None`` (never downloads) and ``num_classes``;
* ResNet family (``torchvision.models.ResNet``: resnet*, wide_resnet*, resnext*) at
  ``image_size <= 64`` get the CIFAR adaptation: a 3x3 stride-1 padding-1 stem conv and
  no max-pool (``maxpool`` becomes ``nn.Identity``), as in the SynFlow / TurboPrune CIFAR
  ResNet-18 (555 M MACs at 32 px instead of ~37 M with the ImageNet stem);
* ``in_channels != 3``: the stem (first Conv2d in module order) is replaced by a conv with
  the same kernel/stride/padding/dilation/groups/bias/padding_mode taking ``in_channels``;
* every replaced stem conv is initialised ``kaiming_normal_(mode="fan_out",
  nonlinearity="relu")``, bias 0, which is what torchvision itself uses for the convs of
  ResNet, VGG, MobileNet, EfficientNet and RegNet;
* ViTs (``vit_b_16`` ... ``vit_h_14``) get a truncated-normal classifier head instead of
  torchvision's all-zero one (``init_vit_head_``: with a zero head, SNIP and SynFlow score every
  weight 0 at initialisation);
* GoogLeNet and Inception-v3 are built without auxiliary heads (``aux_logits=False``) so
  every model returns one logits tensor in training mode too; ViT and MaxViT are told
  ``image_size`` (their position embeddings / partitions depend on it).

Lottery-ticket families (written here):

* ``resnet20/32/44/56/110`` -- He et al. 2016, section 4.2 (CIFAR): 3x3 stem conv with 16
  filters, three stages of (depth-2)/6 basic blocks with 16/32/64 filters, stride 2 at
  the start of stages 2 and 3, global average pool, one linear layer.  Shortcuts where
  the shape changes are **option B**: 1x1 conv (stride 2, no bias) + BatchNorm, as in
  open_lth's ``cifar_resnet``; identity elsewhere.  Option B adds 2,752 parameters to
  option A's zero-padding shortcuts at any depth (272,474 vs 269,722 for ResNet-20), and
  its two 1x1 convs are prunable weights like the others.
  ``resnet{depth}_w{width}`` (width 32, 64) scale all stages (open_lth's
  ``cifar_resnet_20_64``).
* ``vgg11/13/16/19_cifar`` -- open_lth's ``cifar_vgg`` (also SynFlow's): 3x3 convs
  + BatchNorm + ReLU with open_lth's plans (convs without bias: open_lth keeps one, which
  the BatchNorm right after makes redundant; biases are never pruned or counted anyway), max-pool between groups, global
  average pool, one linear layer 512 -> num_classes.  Max-pools use ``ceil_mode=True``:
  identical to floor mode on the even sizes of 32 px inputs, and a 1x1 map pools to 1x1,
  so 8x8 inputs work (floor mode would shrink the map to 0x0 after the third pool).
* ``lenet_300_100`` -- MLP 300-100 (LeCun et al. 1998; Frankle & Carbin 2019), input
  ``in_channels * image_size**2``.
* ``lenet5`` -- LeNet-5 with ReLU and max-pooling as used in the pruning literature:
  conv 6@5x5 (padding 2) - pool - conv 16@5x5 - pool - fc 120 - fc 84 - fc classes; the
  first fc's input follows ``image_size`` (needs ``image_size >= 12``).
* ``conv2/conv4/conv6`` -- Frankle & Carbin 2019, Figure 2: groups of two 3x3 "same"
  convs (64, 128, 256 filters; with bias, no BatchNorm) each followed by a 2x2 max-pool,
  then fc 256 - fc 256 - fc classes; the first fc's input follows ``image_size``
  (``image_size >= 2**groups``).

* ``vit_nano_p4``, ``vit_lite7_p4``, ``vit_tiny_p4``, ``vit_small_p4`` -- vision transformers
  for small images, built from torchvision's own ``VisionTransformer`` (so its layers -- Conv2d
  patch embedding, ``nn.MultiheadAttention``, MLP Linears, head -- are the ones masked), with
  patch size 4: a 32 px image is 8x8 = 64 tokens plus the class token; an 8 px digit is 2x2 = 4
  tokens (each a 4x4 quadrant).  ``image_size`` must be a multiple of 4.  Depth, width, heads
  and MLP width (``VIT_P4_SIZES``): nano 2/64/2/128 (tests and CPU demos), lite7 7/256/4/512
  (ViT-Lite-7/4 of Hassani et al. 2021, the model of ``configs/vit_imp_cifar10.yaml``), tiny
  12/192/3/768 and small 12/384/6/1536 (DeiT-Ti / DeiT-S widths, Touvron et al. 2021).
  torchvision's initialisation throughout, except two things: a patch embedding for
  ``in_channels != 3`` is made anew with torchvision's rule (truncated normal, std
  sqrt(1 / fan_in), zero bias), and the classifier head gets a truncated normal with std 0.02
  (as every ViT of the registry, ``init_vit_head_``).
  No dropout and no stochastic depth (torchvision's ViT has no drop-path).

Initialisation of our own families: ``kaiming_normal_`` (fan_in, ReLU gain sqrt(2); the
"kaiming_normal" initializer of open_lth) for every Conv2d/Linear weight, biases 0,
BatchNorm weight 1 and bias 0 (open_lth's default BN init is uniform random weights; we
use the standard constant one).

Size check: after building, ``get_model`` runs a 1-sample eval-mode forward with
meta-device stand-ins for the parameters and buffers (``forward_problem``: shapes only, no
memory, no arithmetic; milliseconds, a few hundred for the largest ViTs).  If that forward
(or the build itself) fails, meta-device builds of the same model are tried at
``PROBE_IMAGE_SIZES``; when some of them run and the requested size does not, the size is
refused with a ModelError naming the model, the size and the probe sizes that work.
Otherwise the original error propagates (the probe is not trusted to judge, e.g. RegNet's
builder cannot run on the meta device at all).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torchvision
from torch import nn

from utils.core.user_code import UserCodeError, accepted_keywords, import_callable, is_import_path

Builder = Callable[[int, int, int], nn.Module]  # (num_classes, in_channels, image_size) -> model

MODELS: Dict[str, Builder] = {}

# Inputs up to this many pixels a side count as "small" (CIFAR 32, Tiny-ImageNet 64).
CIFAR_STEM_MAX_IMAGE_SIZE = 64

# Sizes tried when a model cannot run at the requested one, to say what is allowed.
PROBE_IMAGE_SIZES = (8, 16, 28, 32, 56, 64, 96, 112, 128, 224, 299)


class ModelError(ValueError):
    """A model that cannot be built as asked (unknown name, bad argument, input too small)."""


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding ``builder(num_classes, in_channels, image_size)`` to ``MODELS``."""

    def add(builder: Builder) -> Builder:
        if name in MODELS:
            raise ModelError(f"model name {name!r} is registered twice")
        MODELS[name] = builder
        return builder

    return add


def model_names() -> List[str]:
    return sorted(MODELS)


def get_model(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build model ``name`` (fresh random initialisation) for the given data shape.

    ``name`` is a registry name or ``package.module:factory`` (``build_user_model``).
    """
    if is_import_path(name):
        return build_user_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    builder = MODELS.get(name)
    if builder is None:
        raise ModelError(f"unknown model {name!r}; valid names: {', '.join(model_names())}")
    for argument, value in (("num_classes", num_classes), ("in_channels", in_channels),
                            ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{name}: {argument} must be a positive int, got {value!r}")
    build_error: Optional[Exception] = None
    try:
        model = builder(num_classes, in_channels, image_size)
    except ModelError:
        raise
    except Exception as error:  # noqa: BLE001 -- e.g. ViT: image size not a multiple of the patch
        build_error, problem = error, _first_line(error)
    else:
        problem = forward_problem(model, in_channels, image_size)
    if problem is not None:
        # Refuse only when a meta-device build of the same model runs at some probe size but
        # not at this one; a model that fails everywhere (or runs at this size when built on
        # meta) points at the probe, not at the input size.
        working = [size for size in sorted({*PROBE_IMAGE_SIZES, image_size})
                   if _meta_build_problem(builder, num_classes, in_channels, size) is None]
        if working and image_size not in working:
            raise ModelError(f"{name} cannot run on {in_channels}x{image_size}x{image_size} inputs "
                             f"({problem}); image sizes that work include {working}")
    if build_error is not None:
        raise build_error
    return model


def build_user_model(path: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """A user's network: ``package.module:factory`` called with ``num_classes=`` (and
    ``in_channels=``, ``image_size=`` when its signature takes them, or ``**kwargs``).

    Refused with a one-line ModelError: a module that cannot be imported, a missing or
    non-callable factory, one that does not take ``num_classes``, raises, returns anything
    but an ``nn.Module``, or whose module cannot run a 1-sample eval-mode forward on
    ``in_channels x image_size x image_size`` inputs to ``(1, num_classes)`` logits.
    """
    for argument, value in (("num_classes", num_classes), ("in_channels", in_channels),
                            ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{path}: {argument} must be a positive int, got {value!r}")
    try:
        factory = import_callable(path, keywords=("num_classes",))
    except UserCodeError as error:
        raise ModelError(str(error)) from None
    offered = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    kwargs = {name: offered[name] for name in accepted_keywords(factory, list(offered))}
    try:
        model = factory(**kwargs)
    except Exception as error:  # noqa: BLE001 -- the user's code failed: say how, in one line
        raise ModelError(f"{path}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) raised "
                         f"{type(error).__name__}: {_first_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{path} returned a {type(model).__name__}, not a torch.nn.Module")
    problem = _user_forward_problem(model, num_classes, in_channels, image_size)
    if problem is not None:
        raise ModelError(f"{path}: the network cannot classify {in_channels}x{image_size}x{image_size} inputs "
                         f"into {num_classes} classes ({problem})")
    return model


def _user_forward_problem(model: nn.Module, num_classes: int, in_channels: int, image_size: int) -> Optional[str]:
    """None when a 1-sample eval-mode forward gives (1, num_classes) logits, else why not.

    Shapes on the meta device first (nothing allocated); a module that cannot run on meta
    (e.g. it calls ``.item()``) gets one real forward on zeros, in eval mode and without
    gradients, its train/eval flags restored (BatchNorm statistics are not touched in eval).
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            stand_ins = {name: torch.empty_like(tensor, device="meta")
                         for name, tensor in (*model.named_parameters(), *model.named_buffers())}
            try:
                output = torch.func.functional_call(
                    model, stand_ins, (torch.empty(1, in_channels, image_size, image_size, device="meta"),))
            except Exception:  # noqa: BLE001 -- try for real before judging
                device = next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device
                output = model(torch.zeros(1, in_channels, image_size, image_size, device=device))
    except Exception as error:  # noqa: BLE001
        return _first_line(error)
    finally:
        for module, training in modes:
            module.training = training
    if not isinstance(output, torch.Tensor):
        return f"its forward returns a {type(output).__name__}, not a logits tensor"
    if tuple(output.shape) != (1, num_classes):
        return f"its forward returns shape {tuple(output.shape)} for one input, expected (1, {num_classes})"
    return None


def forward_problem(model: nn.Module, in_channels: int, image_size: int) -> Optional[str]:
    """None when a 1-sample eval-mode forward runs, else the error's first line.

    Shapes only: the forward runs through ``torch.func.functional_call`` with meta-device
    stand-ins for every parameter and buffer, so it allocates nothing and computes nothing,
    and the model itself (values, BN statistics, train/eval mode) is left as it was.
    """
    stand_ins = {name: torch.empty_like(tensor, device="meta")
                 for name, tensor in (*model.named_parameters(), *model.named_buffers())}
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            torch.func.functional_call(
                model, stand_ins, (torch.empty(1, in_channels, image_size, image_size, device="meta"),))
    except Exception as error:  # noqa: BLE001 -- any failure means "does not run at this size"
        return _first_line(error)
    finally:
        for module, training in modes:
            module.training = training
    return None


def _meta_build_problem(builder: Builder, num_classes: int, in_channels: int, image_size: int) -> Optional[str]:
    """Like ``forward_problem`` for a model built on the meta device (a failed build counts)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"), torch.no_grad():
            builder(num_classes, in_channels, image_size).eval()(
                torch.empty(1, in_channels, image_size, image_size))
    except Exception as error:  # noqa: BLE001
        return _first_line(error)
    return None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0][:200]


# --------------------------------------------------------------------------------------
# torchvision models
# --------------------------------------------------------------------------------------

# Constructor arguments by the module that defines a builder (data, not name logic).
_TORCHVISION_FIXED_KWARGS: Dict[str, dict] = {
    # One logits tensor in training mode; init_weights given to silence the
    # "default will change" warning and keep torchvision's truncated-normal init.
    "torchvision.models.googlenet": {"aux_logits": False, "init_weights": True},
    "torchvision.models.inception": {"aux_logits": False, "init_weights": True},
}
_TORCHVISION_SIZE_KWARGS: Dict[str, Callable[[int], dict]] = {
    "torchvision.models.vision_transformer": lambda size: {"image_size": size},
    "torchvision.models.maxvit": lambda size: {"input_size": (size, size)},
}


@torch.no_grad()
def init_vit_head_(model: torchvision.models.VisionTransformer) -> None:
    """Truncated normal (std 0.02, DeiT / timm) for the classifier head instead of torchvision's
    zeros: with a zero head every gradient into the network is zero at initialisation, so SNIP and
    SynFlow score every weight 0 and their masks would be mere positions."""
    head = model.heads.head
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)


# What is changed after torchvision built a model, by the module that defines its builder.
_TORCHVISION_AFTER_BUILD: Dict[str, Callable[[nn.Module], None]] = {
    "torchvision.models.vision_transformer": init_vit_head_,
}


def _build_torchvision(tv_name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    tv_builder = torchvision.models.get_model_builder(tv_name)
    kwargs = {"weights": None, "num_classes": num_classes}
    kwargs.update(_TORCHVISION_FIXED_KWARGS.get(tv_builder.__module__, {}))
    size_kwargs = _TORCHVISION_SIZE_KWARGS.get(tv_builder.__module__)
    if size_kwargs is not None:
        kwargs.update(size_kwargs(image_size))
    model = tv_builder(**kwargs)
    _TORCHVISION_AFTER_BUILD.get(tv_builder.__module__, lambda m: None)(model)
    if isinstance(model, torchvision.models.ResNet) and image_size <= CIFAR_STEM_MAX_IMAGE_SIZE:
        cifar_adapt_resnet_(model, in_channels)
    elif in_channels != 3:
        replace_stem_in_channels_(model, in_channels)
    return model


def cifar_adapt_resnet_(model: torchvision.models.ResNet, in_channels: int = 3) -> None:
    """3x3 stride-1 stem conv taking ``in_channels`` and no max-pool (in place)."""
    old = model.conv1
    model.conv1 = nn.Conv2d(in_channels, old.out_channels, kernel_size=3, stride=1, padding=1,
                            bias=False, device=old.weight.device, dtype=old.weight.dtype)
    _init_stem_(model.conv1)
    model.maxpool = nn.Identity()


def replace_stem_in_channels_(model: nn.Module, in_channels: int) -> None:
    """Replace the first Conv2d (in module order) with one taking ``in_channels``."""
    stem_name, old = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)),
                          (None, None))
    if old is None:
        raise ModelError(f"{type(model).__name__} has no Conv2d stem to adapt to {in_channels} channels")
    if in_channels % old.groups:
        raise ModelError(f"{type(model).__name__}: stem conv {stem_name} has groups={old.groups}, "
                         f"which does not divide in_channels={in_channels}")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                    padding=old.padding, dilation=old.dilation, groups=old.groups,
                    bias=old.bias is not None, padding_mode=old.padding_mode,
                    device=old.weight.device, dtype=old.weight.dtype)
    _init_stem_(new)
    parent_name, _, child_name = stem_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


@torch.no_grad()
def _init_stem_(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


for _tv_name in torchvision.models.list_models(module=torchvision.models):
    register(_tv_name)(functools.partial(_build_torchvision, _tv_name))


# --------------------------------------------------------------------------------------
# Lottery-ticket families
# --------------------------------------------------------------------------------------

@torch.no_grad()
def init_lottery_family_(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan_in, ReLU) conv/linear weights, zero biases, BN weight 1 bias 0."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def _size_after_pools(name: str, image_size: int, pools: int, minimum_after: int = 1) -> int:
    """Side of the feature map after ``pools`` floor-mode 2x2 max-pools; refuse if too small."""
    side = image_size // 2 ** pools
    if side < minimum_after:
        raise ModelError(f"{name} needs image_size >= {minimum_after * 2 ** pools}, got {image_size}")
    return side


# ----- CIFAR ResNets (He et al. 2016, section 4.2) -----

class CifarBasicBlock(nn.Module):
    def __init__(self, in_filters: int, out_filters: int, downsample: bool):
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = nn.Conv2d(in_filters, out_filters, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_filters)
        self.conv2 = nn.Conv2d(out_filters, out_filters, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_filters)
        self.relu = nn.ReLU(inplace=True)
        if downsample or in_filters != out_filters:  # option B projection shortcut
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_filters, out_filters, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_filters),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        blocks: List[nn.Module] = []
        in_filters = width
        for stage, out_filters in enumerate((width, 2 * width, 4 * width)):
            for index in range(blocks_per_stage):
                blocks.append(CifarBasicBlock(in_filters, out_filters, downsample=stage > 0 and index == 0))
                in_filters = out_filters
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_filters, num_classes)
        init_lottery_family_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(x)))
        x = self.pool(self.blocks(x))
        return self.fc(torch.flatten(x, 1))


def _cifar_resnet(depth: int, width: int, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return CifarResNet(depth, width, num_classes, in_channels)


for _depth in (20, 32, 44, 56, 110):
    register(f"resnet{_depth}")(functools.partial(_cifar_resnet, _depth, 16))
    for _width in (32, 64):
        register(f"resnet{_depth}_w{_width}")(functools.partial(_cifar_resnet, _depth, _width))


# ----- CIFAR VGG with batch norm (open_lth cifar_vgg; SynFlow) -----

POOL = "M"
VGG_CIFAR_PLANS: Dict[int, Sequence[Union[int, str]]] = {
    11: [64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512],
    13: [64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512],
    16: [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512],
    19: [64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
         512, 512, 512, 512],
}


class CifarVGG(nn.Module):
    def __init__(self, plan: Sequence[Union[int, str]], num_classes: int, in_channels: int):
        super().__init__()
        layers: List[nn.Module] = []
        filters = in_channels
        for entry in plan:
            if entry == POOL:
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(filters, entry, 3, padding=1, bias=False),
                           nn.BatchNorm2d(entry), nn.ReLU(inplace=True)]
                filters = entry
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(filters, num_classes)
        init_lottery_family_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))


def _cifar_vgg(depth: int, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return CifarVGG(VGG_CIFAR_PLANS[depth], num_classes, in_channels)


for _depth in VGG_CIFAR_PLANS:
    register(f"vgg{_depth}_cifar")(functools.partial(_cifar_vgg, _depth))


# ----- LeNets and Conv-2/4/6 (Frankle & Carbin 2019) -----

@register("lenet_300_100")
def lenet_300_100(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, 300), nn.ReLU(inplace=True),
        nn.Linear(300, 100), nn.ReLU(inplace=True),
        nn.Linear(100, num_classes),
    )
    return init_lottery_family_(model)


@register("lenet5")
def lenet5(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    # conv1 keeps the size (padding 2), pool halves it, conv2 (5x5, no padding) takes 4 off,
    # pool halves it again: 28 px (MNIST) -> 5x5x16, 32 px -> 6x6x16.
    after_conv2 = _size_after_pools("lenet5", image_size, pools=1, minimum_after=6) - 4
    side = after_conv2 // 2
    model = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side * side, 120), nn.ReLU(inplace=True),
        nn.Linear(120, 84), nn.ReLU(inplace=True),
        nn.Linear(84, num_classes),
    )
    return init_lottery_family_(model)


def _conv_n(groups: int, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    side = _size_after_pools(f"conv{2 * groups}", image_size, pools=groups)
    layers: List[nn.Module] = []
    filters = in_channels
    for group in range(groups):
        out_filters = 64 * 2 ** group
        layers += [nn.Conv2d(filters, out_filters, 3, padding=1), nn.ReLU(inplace=True),
                   nn.Conv2d(out_filters, out_filters, 3, padding=1), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2)]
        filters = out_filters
    layers += [nn.Flatten(),
               nn.Linear(filters * side * side, 256), nn.ReLU(inplace=True),
               nn.Linear(256, 256), nn.ReLU(inplace=True),
               nn.Linear(256, num_classes)]
    return init_lottery_family_(nn.Sequential(*layers))


for _groups in (1, 2, 3):
    register(f"conv{2 * _groups}")(functools.partial(_conv_n, _groups))


# ----- Small vision transformers: torchvision's VisionTransformer with patch size 4 -----

VIT_PATCH_SIZE = 4
# name -> (depth, width, heads, MLP width)
VIT_P4_SIZES: Dict[str, tuple] = {
    "vit_nano_p4": (2, 64, 2, 128),
    "vit_lite7_p4": (7, 256, 4, 512),
    "vit_tiny_p4": (12, 192, 3, 768),
    "vit_small_p4": (12, 384, 6, 1536),
}


def _vit_p4(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    if image_size % VIT_PATCH_SIZE:
        raise ModelError(f"{name} cuts images into {VIT_PATCH_SIZE}x{VIT_PATCH_SIZE} patches: image_size must be a "
                         f"multiple of {VIT_PATCH_SIZE}, got {image_size}")
    depth, width, heads, mlp_width = VIT_P4_SIZES[name]
    model = torchvision.models.VisionTransformer(image_size=image_size, patch_size=VIT_PATCH_SIZE, num_layers=depth,
                                                 num_heads=heads, hidden_dim=width, mlp_dim=mlp_width,
                                                 num_classes=num_classes)
    with torch.no_grad():
        if in_channels != 3:
            model.conv_proj = nn.Conv2d(in_channels, width, VIT_PATCH_SIZE, stride=VIT_PATCH_SIZE)
            fan_in = in_channels * VIT_PATCH_SIZE * VIT_PATCH_SIZE
            nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1.0 / fan_in))
            nn.init.zeros_(model.conv_proj.bias)
    init_vit_head_(model)
    return model


for _vit_name in VIT_P4_SIZES:
    register(_vit_name)(functools.partial(_vit_p4, _vit_name))
