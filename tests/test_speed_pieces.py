"""The ImageNet recipe pieces: progressive resizing, flip test-time augmentation, BlurPool."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.models.blurpool import BlurPoolMixin, add_blurpool_, binomial_filter, blurred_layer_names
from utils.models.mask_layers import (
    MaskedLayer,
    apply_masks_,
    get_masks,
    prepare_model,
    prunable_layer_names,
    set_masks,
)
from utils.models.registry import get_model
from utils.training.progressive import resolution_for_epoch, resolution_schedule
from utils.training.tta import FlipTTA, flip_averaged_logits


# ----- progressive resizing -----
def ffcv_rule(epoch, min_res, max_res, end_ramp, start_ramp):
    """ffcv-imagenet's get_resolution, restated with numpy as the reference."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0] / 32)) * 32


@pytest.mark.parametrize("start_res,end_res,start_epoch,end_epoch,epochs", [
    (160, 192, 65, 76, 88),       # ffcv-imagenet rn50 88 epochs
    (160, 192, 11, 13, 16),       # rn50 16 epochs: a two-epoch ramp
    (128, 256, 2, 30, 40),        # long ramp: every multiple of 32 between appears
    (160, 171, 0, 10, 12),        # end not a multiple of 32: the ffcv rule as is
    (176, 176, 0, 0, 5),          # no ramp
])
def test_resolution_follows_the_ffcv_imagenet_rule(start_res, end_res, start_epoch, end_epoch, epochs):
    got = resolution_schedule(epochs, start_res=start_res, end_res=end_res, start_epoch=start_epoch,
                              end_epoch=end_epoch)
    assert got == [ffcv_rule(e, start_res, end_res, end_epoch, start_epoch) for e in range(epochs)]


def test_resolution_endpoints_ramp_and_monotone():
    ramp = dict(start_res=128, end_res=256, start_epoch=2, end_epoch=30)
    schedule = resolution_schedule(40, **ramp)
    assert schedule[:3] == [128, 128, 128] and schedule[30:] == [256] * 10
    assert all(a <= b for a, b in zip(schedule, schedule[1:]))
    assert all(r % 32 == 0 for r in schedule)
    assert set(schedule) == {128, 160, 192, 224, 256}
    # exact ties go to even, as np.round does
    assert resolution_for_epoch(1, start_res=160, end_res=192, start_epoch=0, end_epoch=2) == 192  # 176/32 = 5.5 -> 6
    assert resolution_for_epoch(1, start_res=128, end_res=160, start_epoch=0, end_epoch=2) == 128  # 144/32 = 4.5 -> 4


@pytest.mark.parametrize("arguments", [
    dict(start_res=192, end_res=160, start_epoch=0, end_epoch=5),
    dict(start_res=160, end_res=192, start_epoch=5, end_epoch=2),
    dict(start_res=0, end_res=192, start_epoch=0, end_epoch=2),
    dict(start_res=160.0, end_res=192, start_epoch=0, end_epoch=2),
])
def test_resolution_refuses_bad_arguments(arguments):
    with pytest.raises(ValueError):
        resolution_for_epoch(1, **arguments)


# ----- flip test-time augmentation -----
class Asymmetric(nn.Module):
    """Logits depend on left/right: the left half's mean vs the right half's."""

    def forward(self, x):
        half = x.shape[3] // 2
        left, right = x[..., :half].mean((1, 2, 3)), x[..., half:].mean((1, 2, 3))
        return torch.stack([left, right], 1)


def test_flip_tta_averages_image_and_mirror():
    images = torch.randn(4, 3, 8, 8)
    model = Asymmetric()
    expected = (model(images) + model(torch.flip(images, dims=[3]))) / 2
    assert torch.allclose(flip_averaged_logits(model, images), expected)
    # for this model the average is symmetric: both logits equal the whole image's mean
    averaged = FlipTTA(model)(images)
    assert torch.allclose(averaged[:, 0], averaged[:, 1], atol=1e-6)
    assert not torch.allclose(model(images)[:, 0], model(images)[:, 1])


def test_flip_tta_wraps_a_real_model_for_evaluate_and_keeps_its_checkpoint_keys():
    from utils.training.step import evaluate
    torch.manual_seed(0)
    model = prepare_model(get_model("resnet20", num_classes=10))
    wrapped = FlipTTA(model)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss, correct, count = evaluate(wrapped, [(images, labels)])
    model.eval()
    with torch.no_grad():
        logits = (model(images) + model(images.flip(3))) / 2
    assert count == 8 and correct == int((logits.argmax(1) == labels).sum())
    assert loss == pytest.approx(float(F.cross_entropy(logits, labels, reduction="sum")), rel=1e-5)
    assert list(wrapped.state_dict()) == list(model.state_dict())
    with pytest.raises(ValueError, match="N, C, H, W"):
        flip_averaged_logits(model, torch.randn(3, 32, 32))


# ----- BlurPool -----
def test_binomial_filter_sums_to_one_per_channel():
    filt = binomial_filter(5)
    assert filt.shape == (5, 1, 3, 3)
    assert torch.allclose(filt.sum((1, 2, 3)), torch.ones(5))
    assert torch.equal(filt[0, 0] * 16, torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]))


def strided_convs(model, min_in_channels=16):
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and max(m.stride) > 1 and m.in_channels >= min_in_channels]


def test_blurpool_changes_exactly_the_strided_convs_and_computes_blur_then_conv():
    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=10, image_size=64)
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = strided_convs(model)
    assert "conv1" not in expected and "layer2.0.conv1" in expected and "layer2.0.downsample.0" in expected
    changed = add_blurpool_(model)
    assert changed == expected == blurred_layer_names(model)
    assert add_blurpool_(model) == []                           # idempotent
    assert list(model.state_dict()) == list(plain_state)        # no new keys: the filter is not persistent
    conv = model.layer2[0].conv1
    x = torch.randn(2, conv.in_channels, 16, 16)
    blurred = F.conv2d(x, binomial_filter(conv.in_channels), padding=1, groups=conv.in_channels)
    reference = F.conv2d(blurred, conv.weight, conv.bias, conv.stride, conv.padding)
    assert torch.allclose(conv(x), reference, atol=1e-5)
    # a constant image stays constant inside the border after the blur
    plain_conv = nn.Conv2d(conv.in_channels, 4, 3, stride=2, padding=1)
    add_blurpool_(nn.Sequential(plain_conv))
    constant = torch.ones(1, conv.in_channels, 8, 8)
    inner = F.conv2d(constant, plain_conv.blur_filter, padding=1, groups=conv.in_channels)[..., 1:-1, 1:-1]
    assert torch.allclose(inner, torch.ones_like(inner))
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()          # trains


@pytest.mark.parametrize("order", ["blur_then_prepare", "prepare_then_blur"])
def test_blurpool_convs_stay_masked_prunable_layers_in_either_order(order):
    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=10, image_size=64)
    names_before = None
    if order == "blur_then_prepare":
        add_blurpool_(model)
        prepare_model(model)
    else:
        prepare_model(model)
        names_before = prunable_layer_names(model)
        add_blurpool_(model)
    convs = strided_convs(model)
    for name in convs:
        layer = model.get_submodule(name)
        assert isinstance(layer, MaskedLayer) and isinstance(layer, BlurPoolMixin), name
    if names_before is not None:
        assert prunable_layer_names(model) == names_before     # same names, same masks
    plain = prepare_model(get_model("resnet18", num_classes=10, image_size=64))
    assert prunable_layer_names(model) == prunable_layer_names(plain)
    # masks set by name reach the blurred convs; pruned weights stay zero through training
    generator = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(m.shape, generator=generator) < 0.3 for n, m in get_masks(model).items()}
    set_masks(model, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.randint(0, 10, (4,))).backward()
        optimizer.step()
        apply_masks_(model)
    layer = model.get_submodule(convs[0])
    assert bool((layer.weight[~layer.mask] == 0).all()) and bool((layer.weight[layer.mask] != 0).any())
    # checkpoints move between blurred and plain models (same keys)
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain.get_submodule(convs[0]).mask, layer.mask)
    # the whole model pickles (dynamic classes are importable by name)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 64, 64)
    model.eval(), loaded.eval()
    assert torch.allclose(loaded(x), model(x))
