"""utils/mask_layers.py: masked layers keep the model intact; masks validate, persist and stick."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from utils.mask_layers import (
    MaskedConv2d,
    MaskedLayer,
    MaskedLinear,
    MaskError,
    apply_masks_,
    count_alive,
    count_total,
    density_report,
    get_masks,
    is_subset,
    load_masks,
    mask_buffer_names,
    masks_checksum,
    overall_density,
    prepare_model,
    prunable_layer_names,
    save_masks,
    set_masks,
)
from utils.models import get_model


def random_masks(model: nn.Module, density: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(mask.shape, generator=generator) < density
            for name, mask in get_masks(model).items()}


class OddLayers(nn.Module):
    """Conv/Linear variants whose arguments prepare_model must not lose."""

    def __init__(self):
        super().__init__()
        self.reflect = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect", bias=False)
        self.dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.depthwise = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False)
        self.fc = nn.Linear(4 * 4 * 4, 3, bias=False)

    def forward(self, x):
        x = self.depthwise(self.dilated(self.reflect(x)))
        return self.fc(torch.flatten(x, 1))


def layer_signature(module: nn.Module):
    keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
            "padding_mode", "in_features", "out_features")
    return ({k: getattr(module, k) for k in keys if hasattr(module, k)},
            module.weight, module.bias)


# ----- prepare_model -----

@pytest.mark.parametrize("build", [OddLayers, lambda: get_model("mobilenet_v2", num_classes=10, image_size=32)],
                         ids=["odd_layers", "mobilenet_v2"])
def test_prepare_model_keeps_layer_arguments_and_the_same_parameter_tensors(build):
    torch.manual_seed(0)
    model = build()
    before = {name: layer_signature(m) for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    prepare_model(model)
    after = {name: layer_signature(m) for name, m in model.named_modules() if isinstance(m, MaskedLayer)}
    assert after.keys() == before.keys()
    for name, (arguments, weight, bias) in before.items():
        new_arguments, new_weight, new_bias = after[name]
        assert new_arguments == arguments, name
        assert new_weight is weight and new_bias is bias, name  # the same tensor objects
    for name, p in model.named_parameters():
        assert torch.equal(p, values[name]), name
    depthwise = [m for m in model.modules()
                 if isinstance(m, MaskedConv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels]
    assert depthwise  # mobilenet_v2 has 17 depthwise convs; OddLayers one


def test_prepare_model_keeps_outputs_identical():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 8, 8)
    for name in ("resnet20", "vgg11_cifar", "conv2", "lenet_300_100"):
        model = get_model(name, num_classes=10, in_channels=1, image_size=8).eval()
        with torch.no_grad():
            before = model(x)
            after = prepare_model(model)(x)
        assert torch.equal(before, after), name
    model = OddLayers().eval()
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), prepare_model(model)(x))


def test_prepare_model_twice_is_harmless_and_classes_are_shared():
    model = prepare_model(get_model("resnet20", num_classes=10))
    set_masks(model, random_masks(model, 0.5))
    masks = get_masks(model)
    prepare_model(model)
    assert masks_checksum(get_masks(model)) == masks_checksum(masks)
    assert type(model.conv) is MaskedConv2d and type(model.fc) is MaskedLinear
    assert type(model.conv).__mro__.count(nn.Conv2d) == 1


def test_masks_start_dense_as_bool_buffers_in_the_state_dict_and_load_back():
    model = prepare_model(get_model("resnet20", num_classes=10))
    state = model.state_dict()
    names = mask_buffer_names(model)
    assert len(names) == len(prunable_layer_names(model)) == 22  # 19 convs + 2 shortcuts + fc
    for key in names:
        assert state[key].dtype == torch.bool and bool(state[key].all())
    masks = random_masks(model, 0.3, seed=1)
    set_masks(model, masks)
    state = model.state_dict()
    fresh = prepare_model(get_model("resnet20", num_classes=10))
    fresh.load_state_dict(state)
    for name, mask in get_masks(fresh).items():
        assert mask.dtype == torch.bool and torch.equal(mask, masks[name]), name
    for name, layer in fresh.named_modules():
        if isinstance(layer, MaskedLayer):
            assert torch.equal(layer.weight, model.get_submodule(name).weight), name
            assert bool((layer.weight[~layer.mask] == 0).all()), name


def test_exclude_leaves_layers_dense_and_uncounted():
    model = prepare_model(get_model("resnet20", num_classes=10), exclude=["fc", "conv", "blocks.0.*"])
    names = prunable_layer_names(model)
    assert "fc" not in names and "conv" not in names
    assert not any(n.startswith("blocks.0.") for n in names) and "blocks.1.conv1" in names
    assert type(model.fc) is nn.Linear and not hasattr(model.fc, "mask")
    assert "fc.mask" not in model.state_dict()
    fc_before = model.fc.weight.detach().clone()
    set_masks(model, {n: torch.zeros_like(m) for n, m in get_masks(model).items()})
    apply_masks_(model)
    assert torch.equal(model.fc.weight, fc_before)  # excluded: never zeroed
    assert overall_density(model) == 0.0  # ... and not counted
    assert {row["layer"] for row in density_report(model)} == set(names)
    with pytest.raises(MaskError, match="no prunable"):
        prepare_model(nn.Sequential(nn.Linear(2, 2)), exclude=["*"])


# ----- set_masks validation -----

def test_set_masks_refuses_masks_that_do_not_fit():
    model = prepare_model(get_model("lenet_300_100", num_classes=10, in_channels=1, image_size=8))
    good = get_masks(model)
    wrong_shape = {**good, "1": torch.ones(300, 65, dtype=torch.bool)}
    with pytest.raises(MaskError, match="shape"):
        set_masks(model, wrong_shape)
    with pytest.raises(MaskError, match="unknown layers"):
        set_masks(model, {**good, "7": torch.ones(3, dtype=torch.bool)})
    missing = dict(good)
    missing.pop("5")
    with pytest.raises(MaskError, match="missing layers"):
        set_masks(model, missing)
    non_binary = {name: mask.float() for name, mask in good.items()}
    non_binary["3"][0, 0] = 0.5
    with pytest.raises(MaskError, match="other than 0 and 1"):
        set_masks(model, non_binary)
    assert all(bool(m.all()) for m in get_masks(model).values())  # nothing was installed


def test_set_masks_accepts_0_1_floats_and_zeroes_exactly_the_pruned_weights():
    torch.manual_seed(0)
    model = prepare_model(get_model("conv2", num_classes=10, in_channels=1, image_size=8))
    before = {name: layer.weight.detach().clone() for name, layer in model.named_modules()
              if isinstance(layer, MaskedLayer)}
    masks = random_masks(model, 0.4)
    set_masks(model, {name: mask.float() for name, mask in masks.items()})
    for name, layer in model.named_modules():
        if isinstance(layer, MaskedLayer):
            mask = masks[name]
            assert layer.mask.dtype == torch.bool and torch.equal(layer.mask, mask)
            assert bool((layer.weight[~mask] == 0).all())
            assert torch.equal(layer.weight[mask], before[name][mask])


def test_get_masks_returns_copies():
    model = prepare_model(get_model("lenet_300_100", num_classes=10, in_channels=1, image_size=8))
    masks = get_masks(model)
    masks["1"].zero_()
    assert bool(model.get_submodule("1").mask.all())


# ----- pruned weights stay exactly zero while training -----

@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-4),
    lambda params: torch.optim.AdamW(params, lr=1e-2),
], ids=["sgd_momentum_wd", "adam", "adamw"])
def test_pruned_weights_stay_exactly_zero_when_apply_masks_follows_each_step(make_optimizer):
    torch.manual_seed(0)
    model = prepare_model(get_model("resnet20", num_classes=10, in_channels=1, image_size=8))
    masks = random_masks(model, 0.2)
    set_masks(model, masks)
    optimizer = make_optimizer(model.parameters())
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    layers = {name: layer for name, layer in model.named_modules() if isinstance(layer, MaskedLayer)}
    for step in range(4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        # The control: without apply_masks_ the step revives pruned weights (so this test can fail).
        revived = sum(int((layer.weight[~masks[name]] != 0).sum()) for name, layer in layers.items())
        assert revived > 0, step
        apply_masks_(model)
        for name, layer in layers.items():
            assert bool((layer.weight[~masks[name]] == 0).all()), (step, name)
            assert torch.equal(layer.mask, masks[name])
    alive = sum(int((layer.weight[masks[name]] != 0).sum()) for name, layer in layers.items())
    assert alive == count_alive(masks)  # alive weights keep training


# ----- reports, checksums, subsets, files -----

def test_density_report_and_counts():
    model = prepare_model(nn.Sequential(nn.Linear(4, 3), nn.Conv2d(1, 2, 3)))
    linear_mask = torch.zeros(3, 4, dtype=torch.bool)
    linear_mask[0, :3] = True                            # 3 of 12 alive
    conv_mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    conv_mask[1] = False                                 # 9 of 18 alive
    set_masks(model, {"0": linear_mask, "1": conv_mask})
    assert density_report(model) == [
        {"layer": "0", "numel": 12, "alive": 3, "density": 0.25},
        {"layer": "1", "numel": 18, "alive": 9, "density": 0.5},
    ]
    masks = get_masks(model)
    assert count_alive(masks) == 12 and count_total(masks) == 30
    assert overall_density(model) == overall_density(masks) == 12 / 30  # biases never counted
    assert "density=0.2500" in repr(model)


def test_masks_checksum_changes_when_one_bit_flips():
    model = prepare_model(get_model("resnet20", num_classes=10))
    masks = random_masks(model, 0.5)
    reference = masks_checksum(masks)
    assert masks_checksum({n: m.clone() for n, m in reversed(list(masks.items()))}) == reference
    assert masks_checksum({n: m.to(torch.uint8) for n, m in masks.items()}) == reference
    flipped = {n: m.clone() for n, m in masks.items()}
    flipped["blocks.4.conv2"][3, 5, 1, 2] ^= True
    assert masks_checksum(flipped) != reference
    renamed = {("x" + n if n == "fc" else n): m for n, m in masks.items()}
    assert masks_checksum(renamed) != reference


def test_is_subset():
    larger = {"a": torch.tensor([True, True, False]), "b": torch.tensor([[True, False]])}
    smaller = {"a": torch.tensor([True, False, False]), "b": torch.tensor([[False, False]])}
    assert is_subset(smaller, larger) and is_subset(larger, larger)
    assert not is_subset(larger, smaller)
    revived = {"a": torch.tensor([False, False, True]), "b": torch.tensor([[False, False]])}
    assert not is_subset(revived, larger)


def test_save_and_load_masks_round_trip(tmp_path):
    model = prepare_model(get_model("conv2", num_classes=10, in_channels=1, image_size=8))
    masks = random_masks(model, 0.3)
    save_masks(masks, tmp_path / "level_1.pt")
    loaded = load_masks(tmp_path / "level_1.pt")
    assert masks_checksum(loaded) == masks_checksum(masks)
    assert all(m.dtype == torch.bool for m in loaded.values())
    torch.save([1, 2], tmp_path / "bad.pt")
    with pytest.raises(MaskError):
        load_masks(tmp_path / "bad.pt")


# ----- fused apply_masks_ (torch._foreach_mul_ with cached weight-dtype masks) -----
from utils.mask_layers import apply_masks_per_layer_  # noqa: E402


def _noisy_copy_pair(masks_seed: int = 0):
    """Two identical masked ResNet-20s with random masks and all weights nonzero again."""
    torch.manual_seed(0)
    model = prepare_model(get_model("resnet20", num_classes=10))
    set_masks(model, random_masks(model, 0.3, seed=masks_seed))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)      # ~no weight is exactly zero: pruned ones are 1.0 now
    twin = prepare_model(get_model("resnet20", num_classes=10))
    twin.load_state_dict(model.state_dict())
    return model, twin


def _assert_zero_exactly_where_pruned(model):
    for name, layer in model.named_modules():
        if isinstance(layer, MaskedLayer):
            assert bool((layer.weight[~layer.mask] == 0).all()), name
            assert bool((layer.weight[layer.mask] != 0).all()), name   # nothing alive was zeroed


def test_fused_apply_equals_per_layer_and_zeroes_exactly_the_pruned_weights():
    model, twin = _noisy_copy_pair()
    apply_masks_(model)
    apply_masks_per_layer_(twin)
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name
    _assert_zero_exactly_where_pruned(model)


def _dirty(model):
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, MaskedLayer):
                layer.weight.add_(1.0)


def test_fused_apply_follows_set_masks_and_in_place_mask_edits():
    model, _ = _noisy_copy_pair()
    apply_masks_(model)                        # fills the cache with the first masks
    new_masks = random_masks(model, 0.1, seed=7)
    set_masks(model, new_masks)
    _dirty(model)
    apply_masks_(model)
    _assert_zero_exactly_where_pruned(model)
    assert get_masks(model)["fc"].equal(new_masks["fc"])
    # an in-place edit of one mask (not through set_masks) is seen too
    layer = model.fc
    with torch.no_grad():
        layer.mask[0].fill_(False)
    _dirty(model)
    apply_masks_(model)
    assert bool((layer.weight[0] == 0).all())
    _assert_zero_exactly_where_pruned(model)


def test_fused_apply_follows_load_state_dict_and_device_moves():
    model, _ = _noisy_copy_pair(masks_seed=0)
    apply_masks_(model)
    other, _ = _noisy_copy_pair(masks_seed=3)
    apply_masks_(other)
    model.load_state_dict(other.state_dict())          # masks copied in place (version bumps)
    _dirty(model)
    apply_masks_(model)
    _assert_zero_exactly_where_pruned(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        if name.endswith(".mask"):
            assert torch.equal(a, b), name
    # assign=True replaces the mask tensors; .to() replaces buffers: new identities
    model.load_state_dict(_noisy_copy_pair(masks_seed=5)[0].state_dict(), assign=True)
    _dirty(model)
    apply_masks_(model)
    _assert_zero_exactly_where_pruned(model)
    model.to(torch.float64)
    _dirty(model)
    apply_masks_(model)
    assert model.fc.weight.dtype == torch.float64
    _assert_zero_exactly_where_pruned(model)
