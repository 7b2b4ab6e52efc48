"""Channel pruning (utils/pruning/channel_graph.py) and compaction (utils/pruning/compact.py).

Coupling is checked on layer names of the real architectures (not on the structure the
code built), so a dependency graph that failed to tie a residual, a shortcut, a depthwise
conv or the classifier's input to their producers makes these tests fail."""
from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import harness_params
from utils.models import mask_layers
from utils.models.mask_layers import get_masks, prepare_model, set_masks
from utils.models.registry import get_model
from utils.pruning import channel_graph, channel_scores, channel_select, channel_zeroing, compact
from utils.pruning.schedules import target_keep_count
from utils.training import slimming

SHAPE = (3, 32, 32)


def _randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine parameters away from their initial 0/1, so that a
    channel that is not really zero shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.rand(module.num_features, generator=generator) * 2 - 1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.2)
                module.bias.copy_(torch.rand(module.num_features, generator=generator) * 2 - 1)
    return model


def _build(name: str):
    torch.manual_seed(0)
    model = _randomize_(prepare_model(get_model(name, num_classes=10, image_size=32)))
    return model, channel_graph.build_channel_structure(model, SHAPE)


@pytest.fixture(scope="module")
def resnet20():
    return _build("resnet20")


@pytest.fixture(scope="module")
def resnet18():
    return _build("resnet18")


@pytest.fixture(scope="module")
def mobilenet():
    return _build("mobilenet_v2")


def _pruned(model_and_structure, density=0.5, criterion="magnitude", allocation="global"):
    model, structure = model_and_structure
    model = copy.deepcopy(model)
    masks = channel_select.compute_channel_masks(model, structure, density=density, criterion=criterion,
                                             allocation=allocation)
    set_masks(model, masks)
    channel_zeroing.DeadChannelZeroer(structure).refresh(model)(model)
    return model, masks


def rows_alive(masks, layer):
    return masks[layer].flatten(1).any(1)


def cols_alive(masks, layer):
    return masks[layer].transpose(0, 1).flatten(1).any(1)


def _assert_same(*vectors):
    for vector in vectors[1:]:
        assert torch.equal(vectors[0], vector)


# ------------------------------------------------------------------------------ coupling
def test_resnet20_residual_streams_shortcuts_and_classifier_input_are_pruned_together(resnet20):
    _, masks = _pruned(resnet20, density=0.5, criterion="random")
    stage1 = rows_alive(masks, "conv")
    assert 0 < int(stage1.sum()) < 16  # the stem's stream was really pruned
    _assert_same(stage1, rows_alive(masks, "blocks.0.conv2"), rows_alive(masks, "blocks.1.conv2"),
                 rows_alive(masks, "blocks.2.conv2"), cols_alive(masks, "blocks.1.conv1"),
                 cols_alive(masks, "blocks.3.conv1"), cols_alive(masks, "blocks.3.shortcut.0"))
    stage3 = rows_alive(masks, "blocks.6.shortcut.0")
    _assert_same(stage3, rows_alive(masks, "blocks.6.conv2"), rows_alive(masks, "blocks.8.conv2"),
                 cols_alive(masks, "fc"))
    # inner block channel: its own producer and consumer only
    _assert_same(rows_alive(masks, "blocks.4.conv1"), cols_alive(masks, "blocks.4.conv2"))
    # never pruned: the stem's input channels and the classifier's outputs
    assert bool(cols_alive(masks, "conv").all()) and bool(rows_alive(masks, "fc").all())


def test_torchvision_resnet18_downsample_and_residual_channels_are_coupled(resnet18):
    _, masks = _pruned(resnet18, density=0.5, criterion="random", allocation="uniform")
    layer1 = rows_alive(masks, "conv1")
    assert 0 < int(layer1.sum()) < 64
    _assert_same(layer1, rows_alive(masks, "layer1.0.conv2"), rows_alive(masks, "layer1.1.conv2"),
                 cols_alive(masks, "layer2.0.downsample.0"))
    layer2 = rows_alive(masks, "layer2.0.downsample.0")
    _assert_same(layer2, rows_alive(masks, "layer2.0.conv2"), rows_alive(masks, "layer2.1.conv2"))
    _assert_same(rows_alive(masks, "layer4.1.conv2"), cols_alive(masks, "fc"))
    assert bool(rows_alive(masks, "fc").all())


def test_mobilenet_v2_depthwise_convs_follow_their_expansion_conv(mobilenet):
    _, masks = _pruned(mobilenet, density=0.5, criterion="random")
    expand = rows_alive(masks, "features.2.conv.0.0")
    assert 0 < int(expand.sum()) < expand.numel()
    _assert_same(expand, rows_alive(masks, "features.2.conv.1.0"), cols_alive(masks, "features.2.conv.2"))
    # residual: block 3 adds to block 2's output
    _assert_same(rows_alive(masks, "features.2.conv.2"), rows_alive(masks, "features.3.conv.2"),
                 cols_alive(masks, "features.4.conv.0.0"))
    assert bool(rows_alive(masks, "classifier.1").all())


# --------------------------------------------------------------------------- exact counts
@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("criterion", ["magnitude", "bn_gamma", "random"])
def test_exact_channel_counts_at_least_one_per_group_and_masks_only_shrink(resnet20, criterion, allocation):
    model, structure = resnet20
    model = copy.deepcopy(model)
    previous = None
    for density in (0.8, 0.5, 0.3, 0.123):
        masks = channel_select.compute_channel_masks(model, structure, density=density, criterion=criterion,
                                                 allocation=allocation, seed=3)
        alive = channel_select.units_alive(structure, masks)
        kept = sum(int(a.sum()) for a in alive.values())
        assert kept == target_keep_count(density, structure.total_units)
        assert channel_select.channel_density(structure, masks) == kept / structure.total_units
        assert all(int(a.sum()) >= 1 for a in alive.values())
        if allocation == "uniform":
            for group in structure.groups:
                assert abs(int(alive[group.name].sum()) - density * group.size) < 2
        if previous is not None:
            assert all(bool((masks[n] & ~previous[n]).sum() == 0) for n in masks)
        set_masks(model, masks)
        previous = masks


def test_shuffle_control_keeps_each_groups_channel_count_at_other_positions(resnet20):
    model, structure = resnet20
    masks = channel_select.compute_channel_masks(model, structure, density=0.5, criterion="magnitude",
                                             allocation="global")
    shuffled = channel_select.shuffled_channel_masks(structure, masks, seed=1)
    before, after = channel_select.units_alive(structure, masks), channel_select.units_alive(structure, shuffled)
    assert all(int(before[g].sum()) == int(after[g].sum()) for g in before)
    assert any(not torch.equal(before[g], after[g]) for g in before)
    # still channel masks: coupled rows and the classifier's columns move together
    _assert_same(rows_alive(shuffled, "blocks.6.shortcut.0"), rows_alive(shuffled, "blocks.8.conv2"),
                 cols_alive(shuffled, "fc"))


def test_resnet20_counts_448_units_in_12_groups(resnet20):
    _, structure = resnet20
    assert len(structure.groups) == 12 and structure.total_units == 16 + 32 + 64 + 3 * (16 + 32 + 64)
    assert structure.output_layer == "fc"


def test_bn_gamma_keeps_the_largest_scales_of_a_block(resnet20):
    model, structure = resnet20
    model = copy.deepcopy(model)
    gammas = torch.linspace(-1.0, 1.0, 16)[torch.randperm(16, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        model.blocks[0].bn1.weight.copy_(gammas)
    keep = channel_select.select_channels(model, structure, density=0.5, criterion="bn_gamma", allocation="uniform")
    expected = torch.zeros(16, dtype=torch.bool)
    expected[gammas.abs().argsort(descending=True)[:8]] = True
    assert torch.equal(keep["blocks.0.conv1"], expected)


def test_magnitude_is_the_filter_l1_norm(resnet20):
    model, structure = resnet20
    model = copy.deepcopy(model)
    scores = channel_scores.channel_scores(model, structure, "magnitude")
    conv1 = model.blocks[4].conv1.weight.detach()
    assert torch.allclose(scores["blocks.4.conv1"], conv1.abs().flatten(1).sum(1).double())


# ------------------------------------------------------- global ranking on a common scale
def _fresh_resnet20(seed: int = 0):
    torch.manual_seed(seed)
    model = prepare_model(get_model("resnet20", num_classes=10, image_size=32))
    return model, channel_graph.build_channel_structure(model, SHAPE)


def _group_fractions(structure, masks):
    alive = channel_select.units_alive(structure, masks)
    return {g.name: int(alive[g.name].sum()) / g.size for g in structure.groups}


def test_global_magnitude_at_init_keeps_every_layer_and_compacts_to_a_quarter():
    """The reported collapse: raw filter L1 norms grow with fan-in, so ranking them globally at
    initialisation kept 1 of 16 / 1 of 32 channels in stages 1-2 and all 64 in stage 3 (0.59 of
    the dense parameters after compaction).  On the normalised scale every layer keeps a fair
    share and half the channels give about a quarter of the parameters."""
    model, structure = _fresh_resnet20()
    masks = channel_select.compute_channel_masks(model, structure, density=0.5, criterion="magnitude",
                                             allocation="global")
    assert min(alive / total for alive, total in channel_select.channels_alive(masks).values()) >= 0.25
    set_masks(model, masks)
    dense = compact.count_parameters(compact.strip_masks_(copy.deepcopy(model)))
    assert compact.count_parameters(compact.compact_model(model, structure, SHAPE)) <= 0.35 * dense


@pytest.mark.parametrize("criterion", ["magnitude", "bn_gamma"])
@pytest.mark.parametrize("normalizer", ["mean", "max", "gaussian"])
def test_scaling_one_layer_does_not_change_the_global_choice(resnet20, criterion, normalizer):
    """A common scale: multiplying the filters (or BatchNorm scales) of one layer by 50 leaves
    the chosen channels as they were (the raw ranking would give that layer everything)."""
    model = copy.deepcopy(resnet20[0])
    structure = resnet20[1]
    before = channel_select.select_channels(model, structure, density=0.4, criterion=criterion, allocation="global",
                                        normalizer=normalizer)
    with torch.no_grad():
        (model.blocks[4].conv1 if criterion == "magnitude" else model.blocks[4].bn1).weight.mul_(50.0)
    after = channel_select.select_channels(model, structure, density=0.4, criterion=criterion, allocation="global",
                                       normalizer=normalizer)
    assert all(torch.equal(before[name], after[name]) for name in before)
    raw = channel_select.select_channels(model, structure, density=0.4, criterion=criterion, allocation="global",
                                     normalizer="none")
    assert bool(raw["blocks.4.conv1"].all())  # the test can fail: unnormalised, the scaled layer keeps all


def test_equal_scores_spread_evenly_over_groups():
    """bn_gamma at initialisation: every scale is 1.  Ties no longer go to the first groups in
    structure order (which kept stages 1-2 whole and cut stage 3 to one channel a group)."""
    model, structure = _fresh_resnet20()
    masks = channel_select.compute_channel_masks(model, structure, density=0.5, criterion="bn_gamma",
                                             allocation="global")
    fractions = _group_fractions(structure, masks)
    assert all(abs(fraction - 0.5) <= 1 / 16 for fraction in fractions.values()), fractions


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("criterion", ["magnitude", "bn_gamma", "random"])
def test_min_channel_fraction_is_a_floor_for_every_group_with_exact_counts(resnet20, criterion, allocation):
    """A group whose scores are far below the others' would be pruned to one channel; the floor
    keeps ceil(fraction * size) of it, the total stays exact, masks still only shrink."""
    model = copy.deepcopy(resnet20[0])
    structure = resnet20[1]
    with torch.no_grad():  # make stage 3's inner convs look useless to every score but random
        for block in (6, 7, 8):
            model.blocks[block].conv1.weight.mul_(1e-3)
            model.blocks[block].bn1.weight.mul_(1e-3)
    scaled = copy.deepcopy(model)
    previous = None
    for density in (0.6, 0.35):
        masks = channel_select.compute_channel_masks(model, structure, density=density, criterion=criterion,
                                                 allocation=allocation, normalizer="none", min_fraction=0.3,
                                                 seed=1)
        alive = channel_select.units_alive(structure, masks)
        assert sum(int(a.sum()) for a in alive.values()) == target_keep_count(density, structure.total_units)
        for group in structure.groups:
            assert int(alive[group.name].sum()) >= math.ceil(0.3 * group.size)
        if previous is not None:
            assert mask_layers.is_subset(masks, previous)
        set_masks(model, masks)
        previous = masks
    if criterion != "random" and allocation == "global":  # without the floor the scaled groups collapse
        unfloored = channel_select.compute_channel_masks(scaled, structure, density=0.35, criterion=criterion,
                                                     allocation=allocation, normalizer="none", min_fraction=0.0)
        assert int(channel_select.units_alive(structure, unfloored)["blocks.6.conv1"].sum()) < math.ceil(0.3 * 64)


def test_floors_round_up_and_refuse_densities_below_them(resnet20):
    _, structure = resnet20
    floors = channel_select.channel_floors(structure, 0.25)
    assert [floors[g.name] for g in structure.groups[:2]] == [4, 4] and floors["blocks.6.conv1"] == 16
    assert channel_select.channel_floors(structure, 0.0)["conv"] == 1 and channel_select.channel_floors(structure, 0.01)["conv"] == 1
    lowest = channel_select.lowest_channel_density(structure, 0.25)
    assert lowest == sum(floors.values()) / structure.total_units
    channel_select.check_channel_densities(structure, [1.0, lowest], 0.25)
    with pytest.raises(channel_graph.StructureError, match="min_channel_fraction=0.25"):
        channel_select.check_channel_densities(structure, [1.0, 0.8, lowest - 0.01], 0.25)
    with pytest.raises(channel_graph.StructureError, match="fewer than one"):
        channel_select.select_channels(resnet20[0], structure, density=lowest - 0.01, criterion="random",
                                   allocation="global", min_fraction=0.25)


def test_harness_refuses_a_channel_density_below_the_floor_before_writing(tmp_path):
    from tests.helpers import digits_config, run_harness, write_config
    from utils.data.writer import ensure_digits
    data = ensure_digits(tmp_path / "data")[0].parent
    config = write_config(tmp_path / "c.yaml", digits_config(
        data, tmp_path / "runs", **{"prune.structure": "channel", "prune.training_type": "at_init",
                                    "prune.target_density": 0.2, "prune.levels": None,
                                    "prune.min_channel_fraction": 0.3}))
    result = run_harness(config)
    assert result.returncode == 2, result.stderr
    assert "prune.min_channel_fraction=0.3" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------- refusals
def test_refuses_bn_gamma_without_batchnorm_and_networks_without_prunable_channels():
    conv2 = prepare_model(get_model("conv2", num_classes=10, image_size=32))
    structure = channel_graph.build_channel_structure(conv2, SHAPE)
    with pytest.raises(channel_graph.StructureError, match="BatchNorm"):
        channel_select.compute_channel_masks(conv2, structure, density=0.5, criterion="bn_gamma", allocation="global")
    only_classifier = prepare_model(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))
    with pytest.raises(channel_graph.StructureError, match="no prunable channels"):
        channel_graph.build_channel_structure(only_classifier, (3, 2, 2))


def test_refuses_a_density_below_one_channel_per_group(resnet20):
    model, structure = resnet20
    with pytest.raises(channel_graph.StructureError, match="fewer than one"):
        channel_select.compute_channel_masks(model, structure, density=0.01, criterion="magnitude", allocation="global")


# ----------------------------------------------------------------- zeroing and compaction
def test_pruned_channels_stay_zero_through_training_and_compaction_matches(resnet20):
    model, structure = resnet20
    model, masks = _pruned(resnet20, density=0.4, criterion="magnitude")
    zeroing = channel_zeroing.ChannelZeroing(structure, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    with torch.no_grad():  # momentum that would revive the pruned BN channels without the zeroing
        for parameter in model.parameters():
            optimizer.state[parameter]["momentum_buffer"] = torch.ones_like(parameter)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(8, *SHAPE, generator=generator), torch.randint(0, 10, (8,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        slimming.add_bn_l1_subgradient_(model, 1e-4)
        optimizer.step()
        from utils.models.mask_layers import apply_masks_
        apply_masks_(model)
        zeroing.on_step_end(None)
    dead = ~channel_select.units_alive(structure, masks)["conv"]
    assert bool(dead.any())
    assert bool((model.bn.weight[dead] == 0).all()) and bool((model.bn.bias[dead] == 0).all())
    small = compact.compact_model(model, structure, SHAPE)
    compact.check_same_outputs(model, small, SHAPE)
    assert small.conv.out_channels == channel_select.channels_alive(masks)["conv"][0] == int((~dead).sum())
    assert type(small) is type(model) and compact.count_parameters(small) < compact.count_parameters(model)


def test_dead_channels_carry_the_bn_shift_until_the_zeroer_clears_it(resnet20):
    """The masked consumer columns already keep a dead channel out of the logits; the zeroer
    makes the channel itself exactly 0 (BN output included), in train and eval mode."""
    model, structure = resnet20
    model = copy.deepcopy(model)
    masks = channel_select.compute_channel_masks(model, structure, density=0.5, criterion="magnitude",
                                             allocation="global")
    set_masks(model, masks)
    dead = ~channel_select.units_alive(structure, masks)["conv"]
    seen = {}
    model.bn.register_forward_hook(lambda module, inputs, output: seen.update(out=output.detach()))
    x = torch.randn(4, *SHAPE)
    for mode in (model.eval, model.train):
        mode()
        with torch.no_grad():
            model(x)
        assert bool((seen["out"][:, dead] != 0).any())  # running mean / shift leak through without zeroing
    channel_zeroing.DeadChannelZeroer(structure).refresh(model)(model)
    for mode in (model.eval, model.train):
        mode()
        with torch.no_grad():
            model(x)
        assert bool((seen["out"][:, dead] == 0).all()) and bool((seen["out"][:, ~dead] != 0).any())


@pytest.mark.parametrize("fixture", ["resnet18", "mobilenet"])
def test_compacted_torchvision_models_compute_the_masked_outputs(fixture, request):
    model, structure = request.getfixturevalue(fixture)
    pruned, masks = _pruned((model, structure), density=0.5, criterion="magnitude", allocation="uniform")
    small = compact.compact_model(pruned, structure, SHAPE)
    compact.check_same_outputs(pruned, small, SHAPE)
    assert compact.count_parameters(small) < 0.5 * compact.count_parameters(pruned)


def test_channels_alive_reads_rows_of_masks():
    mask = torch.ones(4, 3, 2, 2, dtype=torch.bool)
    mask[1] = False
    mask[3, :2] = False  # partly pruned row: still alive
    linear = torch.zeros(5, 7, dtype=torch.bool)
    linear[2, 6] = True
    assert channel_select.channels_alive({"c": mask, "l": linear}) == {"c": (3, 4), "l": (1, 5)}


def test_bn_l1_subgradient_is_lambda_times_sign():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 0.0, 1.0]))
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    before = model[1].weight.grad.clone()
    slimming.add_bn_l1_subgradient_(model, 0.01)
    assert torch.allclose(model[1].weight.grad - before, torch.tensor([0.01, -0.01, 0.0, 0.01]))


# ----------------------------------------------------------------------------------- CLI
def _experiment(tmp_path: Path, resnet20, structure_key="channel", level=1, phase="level_done"):
    model, masks = _pruned(resnet20, density=0.5, criterion="bn_gamma")
    root = tmp_path / "exp"
    (root / "masks").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    tree = {"model": {"name": "resnet20"}, "dataset": {"name": "cifar10", "resolution": 0, "batch_size": 16},
            "prune": {"structure": structure_key, "exclude": []}}
    (root / "config.yaml").write_text(yaml.safe_dump(tree))
    torch.save(get_masks(prepare_model(get_model("resnet20", num_classes=10))), root / "masks" / "level_0.pt")
    torch.save(masks, root / "masks" / f"level_{level}.pt")
    torch.save({"format": 1, "level": level, "phase": phase, "next_epoch": 2, "model": model.state_dict()},
               root / "checkpoints" / "last.pt")
    return root, model


def test_compact_cli_writes_a_torchscript_file_that_loads_without_this_project(tmp_path, resnet20, capsys):
    root, model = _experiment(tmp_path, resnet20)
    out = tmp_path / "small.pt"
    assert compact.main(["--experiment", str(root), "--level", "1", "--out", str(out), "--no-timing"]) == 0
    printed = capsys.readouterr().out
    assert "FLOPs per image" in printed and "parameters" in printed
    x = torch.randn(2, *SHAPE)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x)
    script = ("import sys, torch; m = torch.jit.load(sys.argv[1]); "
              "y = m(torch.load(sys.argv[2])); torch.save(y, sys.argv[3])")
    subprocess.run([sys.executable, "-I", "-c", script, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   cwd=tmp_path, check=True)  # -I: neither the working tree nor PYTHONPATH is importable
    assert torch.allclose(torch.load(tmp_path / "y.pt"), expected, atol=1e-4)


def test_compact_cli_pt2_opens_with_torch_export_at_any_batch_size(tmp_path, resnet20):
    root, model = _experiment(tmp_path, resnet20)
    out = tmp_path / "small.pt2"
    assert compact.main(["--experiment", str(root), "--level", "1", "--out", str(out), "--no-timing"]) == 0
    loaded = torch.export.load(str(out)).module()
    for batch in (1, 3):
        x = torch.randn(batch, *SHAPE)
        with torch.no_grad():
            assert torch.allclose(loaded(x), copy.deepcopy(model).eval()(x), atol=1e-4)


@pytest.mark.parametrize("case, message", [
    ("other_level", "final weights of level 0 are not on disk"),
    ("unstructured", "was not channel-pruned"),
    ("unfinished", "not finished"),
])
def test_compact_cli_refusals_write_nothing(tmp_path, resnet20, capsys, case, message):
    structure_key = "unstructured" if case == "unstructured" else "channel"
    phase = "train" if case == "unfinished" else "level_done"
    root, _ = _experiment(tmp_path, resnet20, structure_key=structure_key, phase=phase)
    level = "0" if case == "other_level" else "1"
    out = tmp_path / "small.pt"
    assert compact.main(["--experiment", str(root), "--level", level, "--out", str(out), "--no-timing"]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not out.exists()


# -------------------------------------------------------------------------------- config
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "resnet20_slim_cifar10.yaml"


@pytest.mark.parametrize("overrides, message", [
    ({"prune.criterion": "bn_gamma", "prune.structure": "unstructured"}, "needs prune.structure=channel"),
    ({"prune.criterion": "snip"}, "does not apply to prune.structure=channel"),
    ({"prune.allocation": "erk"}, "does not apply to prune.structure=channel"),
    ({"prune.early_bird": "true", "prune.structure": "unstructured", "prune.criterion": "magnitude"},
     "early_bird=true needs prune.structure=channel"),
    ({"prune.early_bird": "true", "prune.criterion": "random"}, "needs a trained score"),
])
def test_config_refuses_contradictory_structure_keys(overrides, message):
    with pytest.raises(harness_params.ConfigError, match=message):
        harness_params.resolve(str(CONFIG), overrides)


def test_config_refuses_a_min_channel_fraction_outside_0_1():
    with pytest.raises(harness_params.ConfigError, match="min_channel_fraction"):
        harness_params.resolve(str(CONFIG), {"prune.min_channel_fraction": "1.5"})


def test_slimming_config_resolves_with_channel_keys():
    c = harness_params.resolve(str(CONFIG), {})
    assert c["prune.structure"] == "channel" and c["prune.criterion"] == "bn_gamma" and c["training.bn_l1"] > 0
