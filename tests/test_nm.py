"""N:M sparsity (utils/pruning/nm.py, ``prune.structure=nm``): the exact pattern in every group,
the count per level, nested masks, every criterion, the harness's files and its refusals."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

import harness_params
from tests.helpers import digits_config, run_harness, write_config
from utils.models.mask_layers import all_true_masks, is_subset, masked_layers, prepare_model
from utils.models.registry import get_model
from utils.pruning import criteria, nm
from utils.pruning import masks as pruning_masks

INPUT_SHAPE = (3, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def resnet20() -> nn.Module:
    """Its stem conv has 3 inputs (no groups of 4: stays dense); every other layer has groups."""
    torch.manual_seed(0)
    return prepare_model(get_model("resnet20", num_classes=10, in_channels=3, image_size=8))


def batches(count: int = 2):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn((8, *INPUT_SHAPE), generator=generator), torch.randint(0, 10, (8,), generator=generator))
            for _ in range(count)]


def groups_of(mask: torch.Tensor, m: int):
    """The counts kept in every group, found without nm_sparsity: inputs moved last by an explicit
    permutation, then m consecutive inputs summed."""
    if mask.dim() == 4:
        mask = mask.permute(0, 2, 3, 1)
    return mask.reshape(-1, mask.shape[-1] // m, m).sum(-1).reshape(-1).tolist()


def groups_by_loops(mask: torch.Tensor, m: int):
    """The same by explicit loops over output, kernel position and group (small tensors only)."""
    out, inputs = mask.shape[:2]
    positions = [tuple(int(i) for i in p) for p in torch.cartesian_prod(
        *[torch.arange(k) for k in mask.shape[2:]]).reshape(-1, mask.dim() - 2)] if mask.dim() > 2 else [()]
    return [sum(bool(mask[(o, start + j, *position)]) for j in range(m))
            for o in range(out) for position in positions for start in range(0, inputs, m)]


# ------------------------------------------------------------------------ plain functions
def test_parse_nm_and_the_count_of_every_level():
    assert nm.parse_nm("2:4") == (2, 4) and nm.parse_nm("1:8") == (1, 8)
    for bad in ("4:2", "2:2", "0:4", "2/4", "a:b", 24, "2:4:8"):
        with pytest.raises(nm.NMError):
            nm.parse_nm(bad)
    for n, m, levels in ((2, 4, 2), (2, 4, 3), (1, 4, 4), (2, 8, 4), (1, 16, 6), (3, 4, 5)):
        keeps = nm.level_keeps(n, m, levels)
        assert keeps == [round(m - level * (m - n) / (levels - 1)) for level in range(levels)]
        assert keeps[0] == m and keeps[-1] == n and keeps == sorted(keeps, reverse=True)
    assert nm.level_keeps(2, 4, 3) == [4, 3, 2]
    with pytest.raises(nm.NMError, match="levels >= 2"):
        nm.level_keeps(2, 4, 1)


@pytest.mark.parametrize("shape", [(6, 8, 3, 3), (5, 12), (3, 4, 1, 1)])
@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_in_groups_keeps_the_best_scores_of_every_group_exactly(shape, keep):
    generator = torch.Generator().manual_seed(sum(shape) + keep)
    scores = torch.rand(shape, generator=generator, dtype=torch.float64)
    alive = torch.rand(shape, generator=generator) < 0.9
    alive_groups = nm.grouped(alive, 4)
    alive_groups[alive_groups.sum(1) < keep, :keep] = True  # every group has enough alive
    alive = nm.ungrouped(alive_groups, shape).contiguous()
    kept = nm.keep_in_groups(scores, alive, keep, 4)
    assert kept.shape == scores.shape and kept.dtype == torch.bool
    assert set(groups_by_loops(kept, 4)) == {keep} and sorted(groups_of(kept, 4)) == sorted(groups_by_loops(kept, 4))
    assert not bool((kept & ~alive).any())  # never a pruned weight
    # the kept ones are the best alive scores of their group
    for group_scores, group_alive, group_kept in zip(nm.grouped(scores, 4), nm.grouped(alive, 4), nm.grouped(kept, 4)):
        best = sorted(((-float(v), j) for j, v in enumerate(group_scores) if group_alive[j]))[:keep]
        assert sorted(j for _, j in best) == [j for j in range(4) if group_kept[j]]


def test_keep_in_groups_breaks_ties_by_position_and_ranks_nan_last():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, float("nan"), 2.0, 2.0, 0.0]])
    kept = nm.keep_in_groups(scores, torch.ones_like(scores, dtype=torch.bool), 2, 4)
    assert kept.tolist() == [[True, True, False, False, False, True, True, False]]
    with pytest.raises(nm.NMError, match="fewer than 2 of 4"):
        nm.keep_in_groups(scores, torch.tensor([[True, False, False, False] * 2]), 2, 4)


def test_plan_densities_dense_layers_and_start_line():
    shapes = {"stem": (16, 3, 3, 3), "body": (32, 16, 3, 3), "fc": (10, 32)}
    plan = nm.nm_plan(shapes, 2, 4, levels=3)
    assert plan.keeps == [4, 3, 2] and plan.grouped_layers == ["body", "fc"] and plan.dense_layers == {"stem": 3}
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    total = sum(numel.values())
    for keep, density in zip(plan.keeps, plan.densities):
        assert density == (numel["stem"] + (numel["body"] + numel["fc"]) * keep / 4) / total
    line = nm.start_line(plan, "erk")
    assert "stem (3 inputs)" in line and "prune.allocation=erk does not apply" in line and "4, 3, 2" in line
    assert "\n" not in line
    assert nm.nm_plan(shapes, 2, 4, levels=None).keeps == [2]  # at_init: once, to N
    with pytest.raises(nm.NMError, match="prunes nothing"):
        nm.nm_plan({"stem": (16, 3, 3, 3)}, 2, 4, levels=2)


# ------------------------------------------------------------------- through compute_masks
@pytest.mark.parametrize("criterion", criteria.weight_criteria())
def test_every_criterion_gives_exact_nested_nm_masks_level_by_level(criterion):
    model = resnet20()
    options = dict(criterion=criterion, batches=batches(), input_shape=INPUT_SHAPE, synflow_iterations=5, seed=3)
    masks = all_true_masks(model)
    plan = nm.nm_plan({name: tuple(mask.shape) for name, mask in masks.items()}, 1, 4, levels=4)
    assert plan.dense_layers == {"conv": 3}
    for level in range(1, 4):
        new = pruning_masks.compute_masks(model, masks=masks, nm=plan.target(level), **options)
        assert is_subset(new, masks)
        for name, mask in new.items():
            if name in plan.dense_layers:
                assert bool(mask.all()), name
            else:
                assert set(groups_of(mask, 4)) == {plan.keeps[level]}, (name, level)
        assert sum(int(m.sum()) for m in new.values()) == round(plan.densities[level] * sum(m.numel() for m in new.values()))
        masks = new


def test_nm_scores_within_groups_magnitude_keeps_the_largest_of_each_group():
    model = resnet20()
    new = pruning_masks.compute_masks(model, nm=(2, 4), criterion="magnitude")
    layer = dict(masked_layers(model))["blocks.3.conv1"]
    assert torch.equal(new["blocks.3.conv1"], nm.keep_in_groups(layer.weight.detach().abs(),
                                                                torch.ones_like(new["blocks.3.conv1"]), 2, 4))


def test_synflow_rounds_apply_per_group():
    model = resnet20()
    rounds = []
    pruning_masks.compute_masks(model, nm=(1, 4), criterion="synflow", input_shape=INPUT_SHAPE, synflow_iterations=50,
                     on_round=lambda k, density, masks: rounds.append({n: nm.kept_per_group(m, 4) for n, m in masks.items()
                                                                       if n != "conv"}))
    assert [set(r.values()) for r in rounds] == [{3}, {2}, {1}]  # repeats of a count are skipped


def test_nm_refuses_an_allocation_and_a_group_with_too_few_alive():
    model = resnet20()
    with pytest.raises(ValueError, match="does not apply to N:M"):
        pruning_masks.compute_masks(model, nm=(2, 4), criterion="magnitude", allocation="global")
    two = pruning_masks.compute_masks(model, nm=(2, 4), criterion="magnitude")
    with pytest.raises(ValueError, match="masks only shrink"):
        pruning_masks.compute_masks(model, masks=two, nm=(3, 4), criterion="magnitude")


def test_shuffle_control_keeps_the_count_of_every_group_and_nests():
    model = resnet20()
    three = pruning_masks.compute_masks(model, nm=(3, 4), criterion="magnitude")
    two = pruning_masks.compute_masks(model, masks=three, nm=(2, 4), criterion="magnitude")
    shuffled = [nm.shuffled_nm_masks(masks, 4, seed=7) for masks in (three, two)]
    assert is_subset(shuffled[1], shuffled[0])
    for source, control in zip((three, two), shuffled):
        for name in source:
            assert nm.pattern_of(control[name], 4) == nm.pattern_of(source[name], 4)
        assert any(not torch.equal(source[name], control[name]) for name in source)


# ------------------------------------------------------------------------------ harness
def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def nm_config(digits, base, name="nm", **overrides):
    """examples.custom:build_net on digits: a conv of 1 input (dense) and two linear layers."""
    return digits_config(digits, base, name, **{"model.name": "examples.custom:build_net", "training.epochs": 1,
                                                "prune.structure": "nm", "prune.nm": "2:4", "prune.levels": 3,
                                                **overrides})


@pytest.fixture(scope="module")
def nm_run(digits, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    config = write_config(base / "nm.yaml", nm_config(digits, base, **{"prune.allocation": "erk"}))
    result = run_harness(config)
    assert result.returncode == 0, result.stderr[-2000:]
    return base / "nm", result


def test_harness_nm_run_levels_layers_and_start_line(nm_run):
    root, result = nm_run
    start = [line for line in result.stdout.splitlines() if line.startswith("N:M 2:4")]
    assert len(start) == 1 and "0 (1 inputs)" in start[0] and "prune.allocation=erk does not apply" in start[0]
    layers = read_csv(root / "layers.csv")
    assert {row["layer"] for row in layers} == {"0", "5", "7"}
    for row in layers:
        expected = "dense" if row["layer"] == "0" else f"{[4, 3, 2][int(row['level'])]}:4"
        assert row["nm"] == expected, row
    levels = read_csv(root / "levels.csv")
    numel = {row["layer"]: int(row["numel"]) for row in layers if row["level"] == "0"}
    for row in levels:
        keep = [4, 3, 2][int(row["level"])]
        expected = (numel["0"] + (numel["5"] + numel["7"]) * keep // 4) / sum(numel.values())
        assert float(row["density"]) == pytest.approx(expected, abs=1e-6)
        assert float(row["target_density"]) == pytest.approx(expected, abs=1e-6)
    masks = [torch.load(root / "masks" / f"level_{level}.pt", weights_only=True) for level in range(3)]
    for earlier, later in zip(masks, masks[1:]):
        assert is_subset(later, earlier)
    assert set(groups_of(masks[2]["5"], 4)) == {2} and set(groups_of(masks[2]["7"], 4)) == {2}


def test_harness_nm_at_init_prunes_once_to_n_of_m(digits, tmp_path):
    """at_init: level 0 itself keeps 2 of every 4 (no levels, no density).  (wr and lrr prune
    between levels as imp does: the combination tests run them.)"""
    training_type = "at_init"
    config = write_config(tmp_path / "c.yaml", nm_config(digits, tmp_path, **{"prune.training_type": training_type,
                                                                             "prune.levels": None}))
    result = run_harness(config)
    assert result.returncode == 0, result.stderr[-2000:]
    last = read_csv(tmp_path / "nm" / "layers.csv")
    final_level = max(int(row["level"]) for row in last)
    assert final_level == 0
    assert {row["layer"]: row["nm"] for row in last if int(row["level"]) == final_level} == \
        {"0": "dense", "5": "2:4", "7": "2:4"}


def refusal(argv):
    with pytest.raises(harness_params.ConfigError) as caught:
        harness_params.resolve(None, argv)
    return str(caught.value)


BASE = {"model.name": "lenet_300_100", "dataset.name": "digits", "dataset.train_path": "a", "dataset.test_path": "b",
        "experiment.name": "x", "prune.structure": "nm"}


@pytest.mark.parametrize("overrides, fragment", [
    ({"prune.levels": "3", "prune.layer_rates": "fc*=0.1"}, "prune.layer_rates contradicts prune.structure=nm"),
    ({"prune.target_density": "0.5"}, "contradicts prune.structure=nm"),
    ({"prune.levels": "1"}, "needs prune.levels >= 2"),
    ({}, "needs prune.levels >= 2"),
    ({"prune.levels": "3", "prune.nm": "4:2"}, "prune.nm='4:2' is not allowed"),
    ({"prune.training_type": "at_init", "prune.levels": "2"}, "contradicts prune.training_type=at_init"),
])
def test_config_refusals(overrides, fragment):
    message = refusal({**BASE, **overrides})
    assert fragment in message and "\n" not in message


def test_config_accepts_at_init_without_a_density_and_says_nothing_of_allocation():
    resolved = harness_params.resolve(None, {**BASE, "prune.training_type": "at_init"})
    assert resolved["prune.structure"] == "nm" and resolved["prune.nm"] == "2:4"


def test_control_of_another_structure_is_refused_and_shuffle_keeps_groups(nm_run, digits, tmp_path):
    source, _ = nm_run
    unstructured = write_config(tmp_path / "u.yaml", nm_config(digits, tmp_path, "u", **{
        "prune.structure": "unstructured", "prune.masks_from": str(source), "prune.levels": None}))
    result = run_harness(unstructured)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "prune.structure=nm (prune.nm=2:4), this run has prune.structure=unstructured" in result.stderr
    assert not (tmp_path / "u").exists()
    shuffle = write_config(tmp_path / "s.yaml", nm_config(digits, tmp_path, "s", **{
        "prune.masks_from": str(source), "prune.control": "shuffle", "experiment.seed": 1, "prune.levels": None}))
    result = run_harness(shuffle)
    assert result.returncode == 0, result.stderr[-2000:]
    layers = read_csv(tmp_path / "s" / "layers.csv")
    assert [row["nm"] for row in layers if row["layer"] == "5"] == ["4:4", "3:4", "2:4"]
    theirs = torch.load(source / "masks" / "level_2.pt", weights_only=True)
    mine = torch.load(tmp_path / "s" / "masks" / "level_2.pt", weights_only=True)
    assert not torch.equal(theirs["5"], mine["5"])


def test_compact_semi_structured_says_it_needs_an_ampere_gpu(nm_run, capsys):
    if nm.semi_structured_unavailable() is None:
        pytest.skip("a GPU that runs 2:4 kernels is here: the conversion is measured by the device check")
    from utils.pruning import compact

    root, _ = nm_run
    assert compact.main(["--experiment", str(root), "--level", "2", "--format", "semi-structured"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a CUDA GPU with compute capability >= 8.0" in err


def test_an_unquoted_pattern_is_read_as_written():
    """YAML 1.1 reads 2:4 as the base-60 number 124; the config gives the pattern back."""
    assert harness_params.resolve(None, {**BASE, "prune.levels": "2", "prune.nm": "2:4"})["prune.nm"] == "2:4"
    assert harness_params.resolve(None, {**BASE, "prune.levels": "2", "prune.nm": "1:8"})["prune.nm"] == "1:8"


def test_attention_projections_of_a_vit_get_exact_groups():
    """The masked attention projections (packed Q/K/V, out_proj) are grouped like linear layers."""
    torch.manual_seed(0)
    model = prepare_model(get_model("vit_nano_p4", num_classes=10, in_channels=3, image_size=32))
    masks = pruning_masks.compute_masks(model, nm=(2, 4), criterion="magnitude")
    attention = [name for name in masks if name.endswith(("in_proj", "out_proj"))]
    assert attention and all(set(groups_of(masks[name], 4)) == {2} for name in attention)
    assert nm.pattern_of(masks["conv_proj"], 4) == "dense"  # the patch embedding's 3 input channels
    if nm.semi_structured_unavailable() is not None:  # on CPU nothing converts, and every layer says why
        converted, skipped = nm.to_semi_structured_(model, masks)
        assert converted == [] and set(skipped) == set(masks)
        assert "not a linear layer" in skipped[attention[0]] and "not a linear layer" in skipped["conv_proj"]
