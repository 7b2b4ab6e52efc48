"""utils/models/mask_layers.py: masked layers keep the model intact; masks validate, persist and stick."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from utils.models.mask_layers import (
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
from utils.models.registry import get_model


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
from utils.models.mask_layers import apply_masks_per_layer_


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


# ----- nn.MultiheadAttention: every weight matrix prunable -----

class TinyAttention(nn.Module):
    """A packed attention (kdim = vdim = embed_dim) and one with separate Q/K/V projections."""

    def __init__(self):
        super().__init__()
        self.packed = nn.MultiheadAttention(8, 2, batch_first=True)
        self.separate = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, batch_first=True, add_bias_kv=True)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):  # x: (batch, tokens, 12): 8 query features, 4 key features (values: 6 of them)
        query, key, value = x[..., :8], x[..., 8:12], x[..., 6:12]
        h, _ = self.packed(query, query, query, need_weights=False)
        h, _ = self.separate(self.norm(h), key, value, need_weights=False)
        return self.fc(h.mean(1))


def test_attention_projections_become_masked_layers_and_outputs_stay_identical():
    torch.manual_seed(0)
    model = TinyAttention()
    x = torch.randn(3, 5, 12)
    packed_weight, q_weight = model.packed.in_proj_weight, model.separate.q_proj_weight
    plain_state = model.state_dict()
    expected = model(x)
    prepare_model(model)
    assert prunable_layer_names(model) == ["packed.in_proj", "packed.out_proj", "separate.q_proj",
                                           "separate.k_proj", "separate.v_proj", "separate.out_proj", "fc"]
    assert model.packed.in_proj.weight is packed_weight and model.packed.in_proj_weight is packed_weight
    assert model.separate.q_proj_weight is q_weight and model.separate.in_proj_weight is None
    assert model.packed.in_proj_weight.shape == (24, 8) and model.separate.k_proj.mask.shape == (8, 4)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    # torch's own names (a plain model's state dict) load into the prepared model, masks untouched
    other = TinyAttention()
    prepare_model(other)
    other.load_state_dict(plain_state, strict=False)
    assert torch.equal(other.packed.in_proj.weight, packed_weight) and torch.equal(other.separate.v_proj.weight,
                                                                                   model.separate.v_proj.weight)
    missing = other.load_state_dict(plain_state, strict=False).missing_keys
    assert sorted(missing) == sorted(mask_buffer_names(other))
    assert mask_layers_aliases(other)["packed.in_proj_weight"] == "packed.in_proj.weight"


def mask_layers_aliases(model):
    from utils.models.mask_layers import state_dict_aliases
    return state_dict_aliases(model)


def test_attention_masks_zero_the_projection_weights_and_the_forward_uses_them():
    torch.manual_seed(0)
    model = prepare_model(TinyAttention())
    x = torch.randn(3, 5, 12)
    masks = random_masks(model, 0.4)
    set_masks(model, masks)
    for name in ("packed.in_proj", "separate.q_proj"):
        layer = model.get_submodule(name)
        assert bool((layer.weight[~layer.mask] == 0).all()) and bool((layer.weight[layer.mask] != 0).any())
    # the same network built from scratch with the zeroed weights, unprepared, gives the same output
    plain = TinyAttention()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(".mask")}
                          | {"packed.in_proj_weight": model.packed.in_proj.weight,
                             "separate.q_proj_weight": model.separate.q_proj.weight,
                             "separate.k_proj_weight": model.separate.k_proj.weight,
                             "separate.v_proj_weight": model.separate.v_proj.weight}, strict=False)
    assert torch.equal(plain.packed.in_proj_weight, model.packed.in_proj.weight)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    # training keeps them zero (apply_masks_ after each step, as the harness does)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
        apply_masks_(model)
    for name, mask in masks.items():
        assert torch.count_nonzero(model.get_submodule(name).weight[~mask]) == 0, name


def test_attention_exclude_by_projection_or_module_and_prepare_twice():
    # "separate" names the module's own Q/K/V weights; its out_proj is a layer of its own
    model = prepare_model(TinyAttention(), exclude=["packed.in_proj", "separate"])
    assert prunable_layer_names(model) == ["packed.out_proj", "separate.out_proj", "fc"]
    for name in ("packed", "separate"):  # every projection excluded: left as torch made it
        assert type(model.get_submodule(name)) is nn.MultiheadAttention
    assert model.packed.in_proj_weight.shape == (24, 8)
    # one projection excluded: it stays dense, the others are masked
    partial = prepare_model(TinyAttention(), exclude=["separate.k_proj"])
    assert "separate.k_proj" not in prunable_layer_names(partial) and "separate.q_proj" in prunable_layer_names(partial)
    assert not isinstance(partial.separate.k_proj, MaskedLayer) and partial.separate.k_proj_weight.shape == (8, 4)
    prepare_model(model, exclude=["packed.in_proj", "separate"])
    assert prunable_layer_names(model) == ["packed.out_proj", "separate.out_proj", "fc"]
    assert prunable_layer_names(prepare_model(TinyAttention(), exclude=["separate*"])) == [
        "packed.in_proj", "packed.out_proj", "fc"]


def test_attention_masks_round_trip_through_state_dict_deepcopy_and_pickle(tmp_path):
    import copy
    torch.manual_seed(0)
    model = prepare_model(TinyAttention())
    set_masks(model, random_masks(model, 0.5))
    for restored in (copy.deepcopy(model), _pickled(model, tmp_path)):
        assert masks_checksum(get_masks(restored)) == masks_checksum(get_masks(model))
        assert restored.packed.in_proj_weight is restored.packed.in_proj.weight
        x = torch.randn(2, 4, 12)
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    fresh = prepare_model(TinyAttention())
    fresh.load_state_dict(model.state_dict())
    assert masks_checksum(get_masks(fresh)) == masks_checksum(get_masks(model))


def _pickled(model, tmp_path):
    torch.save(model, tmp_path / "model.pt")
    return torch.load(tmp_path / "model.pt", weights_only=False)


@pytest.mark.parametrize("criterion", ["magnitude", "random", "snip", "synflow", "grasp"])
@pytest.mark.parametrize("allocation", ["global", "uniform", "erk", "balanced"])
def test_every_criterion_and_allocation_prunes_attention_weights_exactly(criterion, allocation):
    from utils.pruning.masks import compute_masks
    from utils.pruning.schedules import target_keep_count
    torch.manual_seed(0)
    model = prepare_model(get_model("vit_nano_p4", num_classes=10, in_channels=1, image_size=8))
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    masks = compute_masks(model, density=0.3, criterion=criterion, allocation=allocation, batches=batches,
                          input_shape=(1, 8, 8), synflow_iterations=3, seed=1)
    assert count_alive(masks) == target_keep_count(0.3, count_total(masks))
    attention = [n for n in masks if n.endswith("self_attention.in_proj")]
    assert len(attention) == 2 and all(0 < int(masks[n].sum()) < masks[n].numel() for n in attention)
    if criterion in ("snip", "synflow", "grasp"):  # gradients reach the packed projection: scores are not all ties
        kept = masks[attention[0]].reshape(-1)
        assert not torch.equal(kept, torch.sort(kept, descending=True).values)


def test_dense_parameter_report_counts_every_parameter_once_by_category():
    from utils.models.mask_layers import dense_parameter_report, dense_summary
    model = prepare_model(get_model("vit_nano_p4", num_classes=10, in_channels=1, image_size=8),
                          exclude=["conv_proj", "heads.*"])
    report = dense_parameter_report(model)
    assert report.total == sum(p.numel() for p in model.parameters())
    assert report.prunable == count_total(get_masks(model))
    assert report.prunable + sum(report.dense.values()) == report.total
    width = 64
    assert report.dense["tokens"] == width and report.names["tokens"] == ["class_token"]
    assert report.dense["position embeddings"] == 5 * width  # 2x2 patches + class token
    assert report.names["excluded layers"] == ["conv_proj.weight", "heads.head.weight"]
    assert report.dense["excluded layers"] == width * 16 + 10 * width
    assert report.dense["norms"] == 2 * width * (2 * 2 + 1)  # two LayerNorms per block, one at the end
    line = dense_summary(model)
    assert "\n" not in line and "tokens 64 (class_token)" in line and "excluded layers" in line
    assert f"weight matrices): {report.prunable:,} of {report.total:,}" in line
