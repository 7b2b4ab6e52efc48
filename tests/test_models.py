"""utils/models/registry.py: every registered name builds, shapes, CIFAR adaptation, paper parameter counts.

Every registered name (80 torchvision classifiers + our families) is built and forward-passed
with its parameters on the ``meta`` device (shapes only, no memory, no arithmetic), so the
whole registry is covered in seconds; a representative subset runs for real on tiny inputs.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torchvision
from torch import nn

from utils.models.mask_layers import MaskedLayer, dense_parameter_report, prepare_model
from utils.models.registry import MODELS, ModelError, get_model, model_names

LOTTERY_NAMES = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet20_w64",
                 "vgg11_cifar", "vgg13_cifar", "vgg16_cifar", "vgg19_cifar",
                 "lenet_300_100", "lenet5", "conv2", "conv4", "conv6"]


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter and buffer registered inside goes to the meta device.

    ``with torch.device("meta")`` alone is not enough: RegNet's builder computes its widths
    with torch ops and ``.tolist()``, which meta tensors cannot do.
    """
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_to_meta(self, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer_to_meta(self, name, tensor, persistent=True):
        register_buffer(self, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter_to_meta, buffer_to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def standard_weight_matrices(model: nn.Module):
    """(name, parameter) of every weight matrix of a Conv2d, Linear or MultiheadAttention (Q/K/V,
    packed or separate; its out_proj is a Linear), found in the unprepared model."""
    for module_name, module in model.named_modules():
        attributes = (["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
                      if isinstance(module, nn.MultiheadAttention) else
                      ["weight"] if isinstance(module, (nn.Conv2d, nn.Linear)) else [])
        for attribute in attributes:
            parameter = getattr(module, attribute)
            if parameter is not None:
                yield f"{module_name}.{attribute}", parameter


def test_vit_b_16_has_its_attention_weights_among_the_matrices_checked():
    with parameters_on_meta():
        model = get_model("vit_b_16", num_classes=7, image_size=224)
    names = [name for name, _ in standard_weight_matrices(model)]
    assert sum(name.endswith("self_attention.in_proj_weight") for name in names) == 12
    prepare_model(model)
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attention) == 12 and all(isinstance(m.in_proj, MaskedLayer) for m in attention)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----- the registry -----

def test_registry_holds_every_torchvision_classifier_and_our_families():
    names = set(model_names())
    assert set(torchvision.models.list_models(module=torchvision.models)) <= names
    assert set(LOTTERY_NAMES) <= names
    assert model_names() == sorted(MODELS)


@pytest.mark.parametrize("name", model_names())  # every torchvision.models.list_models(module=torchvision.models)
def test_every_registered_name_builds_prepares_and_forwards(name):     # name among them (test above)
    # 224 px works for every family; in_channels=1 and 7 classes exercise both adaptations.
    with parameters_on_meta():
        model = get_model(name, num_classes=7, in_channels=1, image_size=224)
    weight_matrices = {id(p): name for name, p in standard_weight_matrices(model)}
    prepare_model(model)
    prunable = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert prunable and all(isinstance(m, MaskedLayer) for m in prunable)
    # full coverage: every conv, linear and attention weight matrix is a masked layer's weight
    masked = {id(layer.weight) for layer in model.modules() if isinstance(layer, MaskedLayer)}
    assert sorted(weight_matrices[i] for i in set(weight_matrices) - masked) == []
    report = dense_parameter_report(model)
    assert report.prunable == sum(p.numel() for p in model.parameters() if id(p) in weight_matrices)
    assert "excluded layers" not in report.dense and report.prunable + sum(report.dense.values()) == report.total
    assert "other" not in report.dense, report.names.get("other")  # every dense parameter has a named kind
    with torch.no_grad():
        out = model.eval()(torch.empty(2, 1, 224, 224, device="meta"))
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 7)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ModelError) as caught:
        get_model("resnet21", num_classes=10)
    message = str(caught.value)
    assert "resnet21" in message and "\n" not in message
    for valid in ("resnet20", "resnet18", "vgg16_cifar", "lenet_300_100", "conv2"):
        assert valid in message


@pytest.mark.parametrize("bad", [{"num_classes": 0}, {"in_channels": 0}, {"image_size": -1},
                                 {"num_classes": 10.0}, {"num_classes": True}])
def test_bad_arguments_refused(bad):
    kwargs = {"num_classes": 10, **bad}
    with pytest.raises(ModelError, match=next(iter(bad))):
        get_model("resnet20", **kwargs)


@pytest.mark.parametrize("name, in_channels, image_size, allowed", [
    ("alexnet", 3, 32, 224),          # third max-pool sees 1x1
    ("inception_v3", 3, 32, 299),
    ("vit_b_16", 3, 24, 32),          # not a multiple of the 16 px patch (builder refuses)
    ("maxvit_t", 3, 32, 224),         # 7x7 partitions
    ("vgg11", 1, 8, 32),
])
def test_input_too_small_for_torchvision_model_is_refused(name, in_channels, image_size, allowed):
    with parameters_on_meta(), pytest.raises(ModelError) as caught:
        get_model(name, num_classes=10, in_channels=in_channels, image_size=image_size)
    message = str(caught.value)
    assert name in message and f"{image_size}x{image_size}" in message and str(allowed) in message
    assert "\n" not in message
    with parameters_on_meta():  # and the suggested size is accepted
        get_model(name, num_classes=10, in_channels=in_channels, image_size=allowed)


@pytest.mark.parametrize("name, image_size, minimum", [("lenet5", 8, 12), ("conv6", 4, 8), ("conv2", 1, 2)])
def test_input_too_small_for_our_families_is_refused(name, image_size, minimum):
    with pytest.raises(ModelError, match=rf"{name} needs image_size >= {minimum}, got {image_size}"):
        get_model(name, num_classes=10, in_channels=1, image_size=image_size)
    get_model(name, num_classes=10, in_channels=1, image_size=minimum)


# ----- real forwards on tiny inputs -----

@pytest.mark.parametrize("name", ["lenet_300_100", "lenet5", "conv2", "conv4", "conv6", "resnet20",
                                  "vgg11_cifar", "resnet18", "mobilenet_v2"])
def test_forward_and_backward_on_digits_shaped_input(name):
    image_size = 12 if name == "lenet5" else 8  # digits: 1x8x8, 10 classes
    torch.manual_seed(0)
    model = prepare_model(get_model(name, num_classes=10, in_channels=1, image_size=image_size))
    out = model.train()(torch.randn(4, 1, image_size, image_size))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_resnet18_gets_cifar_adaptation_at_32px_and_not_at_224px():
    small = get_model("resnet18", num_classes=10, in_channels=1, image_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert small.conv1.padding == (1, 1) and small.conv1.in_channels == 1 and small.conv1.bias is None
    assert isinstance(small.maxpool, nn.Identity)
    assert small.fc.out_features == 10
    assert small(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with parameters_on_meta():
        large = get_model("resnet18", num_classes=10, image_size=224)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)
    with parameters_on_meta():  # the whole ResNet family (wide, ResNeXt) is adapted
        for name in ("resnet50", "wide_resnet50_2", "resnext50_32x4d"):
            model = get_model(name, num_classes=10, image_size=64)
            assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity), name


def test_in_channels_replaces_the_stem_and_keeps_its_other_arguments():
    with parameters_on_meta():
        reference = get_model("mobilenet_v2", num_classes=10, in_channels=3, image_size=32)
        vit = get_model("vit_b_16", num_classes=10, in_channels=4, image_size=32)
        convnext = get_model("convnext_tiny", num_classes=10, in_channels=1, image_size=32)
    model = get_model("mobilenet_v2", num_classes=10, in_channels=1, image_size=32)
    old, new = reference.features[0][0], model.features[0][0]
    assert new.in_channels == 1 and old.in_channels == 3
    for attribute in ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(new, attribute) == getattr(old, attribute), attribute
    assert (new.bias is None) == (old.bias is None)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert vit.conv_proj.in_channels == 4 and vit.conv_proj.kernel_size == (16, 16)
    assert vit.conv_proj.stride == (16, 16) and vit.conv_proj.bias is not None
    assert convnext.features[0][0].in_channels == 1 and convnext.features[0][0].stride == (4, 4)


def test_num_classes_respected():
    assert get_model("resnet20", num_classes=100).fc.out_features == 100
    assert get_model("vgg16_cifar", num_classes=100).fc.out_features == 100
    assert get_model("lenet_300_100", num_classes=3, in_channels=1, image_size=28)[-1].out_features == 3


def test_resnet50_at_224px_forwards_once():
    torch.manual_seed(0)
    model = get_model("resnet50", num_classes=1000, image_size=224).eval()
    assert model.conv1.kernel_size == (7, 7)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# ----- our families against the papers -----

# He et al. 2016, Table 6: ResNet-20 0.27M, ResNet-56 0.85M parameters (two significant
# digits, i.e. +-1.9% and +-0.6%).  Our option-B shortcuts add 2,752 parameters (1x1 convs
# 16->32 and 32->64 plus their BatchNorms) to option A's 269,722 / 853,018.  Tolerance 2%;
# the exact counts are pinned too, so any architecture change shows up.
@pytest.mark.parametrize("name, paper, exact", [("resnet20", 0.27e6, 272_474), ("resnet56", 0.85e6, 855_770)])
def test_cifar_resnet_parameter_counts_match_the_paper(name, paper, exact):
    count = parameter_count(get_model(name, num_classes=10))
    assert abs(count - paper) / paper < 0.02
    assert count == exact


def test_other_parameter_counts():
    # LeNet-300-100 on MNIST: 784*300+300 + 300*100+100 + 100*10+10 (Frankle & Carbin: 266K).
    assert parameter_count(get_model("lenet_300_100", num_classes=10, in_channels=1, image_size=28)) == 266_610
    # Conv-2 on CIFAR-10 (F&C 2019, Figure 2: 4.3M, of which 38K conv and 4.3M fc).
    assert abs(parameter_count(get_model("conv2", num_classes=10)) - 4.3e6) / 4.3e6 < 0.01
    # VGG-16 for CIFAR: 14.7M (conv stack 14.71M + BN + one 512x10 linear).
    assert parameter_count(get_model("vgg16_cifar", num_classes=10)) == 14_724_042


def test_cifar_resnet_structure_uses_option_b_shortcuts_where_shape_changes():
    model = get_model("resnet56", num_classes=10)
    assert len(model.blocks) == 27
    projections = [b.shortcut for b in model.blocks if not isinstance(b.shortcut, nn.Identity)]
    assert len(projections) == 2
    for projection in projections:
        conv, norm = projection
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and isinstance(norm, nn.BatchNorm2d)
    assert [model.blocks[i].conv2.out_channels for i in (0, 9, 18)] == [16, 32, 64]
    assert get_model("resnet20_w64", num_classes=10).fc.in_features == 256
    with pytest.raises(ModelError, match="6n"):
        from utils.models.registry import CifarResNet
        CifarResNet(21, 16, 10, 3)


def test_our_families_use_kaiming_normal_and_unit_batchnorm():
    torch.manual_seed(0)
    model = get_model("vgg16_cifar", num_classes=10)
    conv = model.features[-3]  # 512 -> 512, 3x3: fan_in 4608, 2.36M weights
    expected_std = math.sqrt(2.0 / conv.weight[0].numel())
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.01
    assert abs(conv.weight.mean().item()) < 0.01 * expected_std * 10
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
    assert all(torch.equal(n.bias, torch.zeros_like(n.bias)) for n in norms)
    linear = get_model("lenet_300_100", num_classes=10, in_channels=1, image_size=28)[1]
    assert abs(linear.weight.std().item() / math.sqrt(2.0 / 784) - 1) < 0.02
    assert torch.equal(linear.bias, torch.zeros_like(linear.bias))


def test_build_is_seeded_and_leaves_the_model_in_training_mode():
    torch.manual_seed(3)
    first = get_model("resnet20", num_classes=10, in_channels=1, image_size=8)
    torch.manual_seed(3)
    second = get_model("resnet20", num_classes=10, in_channels=1, image_size=8)
    assert first.training
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["vit_b_32", "vit_nano_p4"])
def test_vit_heads_are_not_zero_so_gradient_scores_see_the_network(name):
    """torchvision zero-initialises a ViT's head: every gradient into the network would be 0 at
    initialisation and SNIP would rank nothing but positions."""
    from utils.pruning.criteria import ScoringInputs, snip_scores
    torch.manual_seed(0)
    model = prepare_model(get_model(name, num_classes=10, image_size=32))
    assert bool((model.heads.head.weight != 0).all())
    assert 0.015 < float(model.heads.head.weight.std()) < 0.025
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    scores = snip_scores(ScoringInputs(model=model, device=torch.device("cpu"), batches=[batch]),
                         {n: m.mask for n, m in model.named_modules() if isinstance(m, MaskedLayer)})
    attention = scores["encoder.layers.encoder_layer_0.self_attention.in_proj"]
    assert float(attention.count_nonzero()) > 0.5 * attention.numel()
