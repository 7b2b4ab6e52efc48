"""The pruning structure is one extension point (utils/pruning/structures/): the built-in ones
answer for themselves, and a structure from an outside module -- block sparsity,
``examples/block_structure.py`` -- runs through the harness, the pruning command, a shuffle
control and the report without a line of the project naming it."""
from __future__ import annotations

import subprocess

import pandas as pd
import pytest
import torch

from tests.helpers import PYTHON, ROOT, digits_config, run_harness, write_config
from utils.pruning.criteria import SCORES
from utils.pruning.settings import PruneSettings
from utils.pruning.structures import STRUCTURES, StructureRegistryError, get_structure
from utils.pruning.structures.base import Structure

BLOCK = "block_structure:Blocks"
EXAMPLES = {"PYTHONPATH": str(ROOT / "examples")}


def settings(**changes) -> PruneSettings:
    values = dict(structure="unstructured", criterion="magnitude", allocation="global", training_type="imp",
                  rate=0.2, levels=3, target_density=None, layer_rates=(), nm="2:4", min_channel_fraction=0.1,
                  score_batches=1, synflow_iterations=100, snip_mode="eval", masks_from="", control="none")
    return PruneSettings(**{**values, **changes})


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_every_registered_structure_describes_itself_and_accepts_some_criterion(name):
    cls = STRUCTURES[name]
    assert issubclass(cls, Structure) and cls.name == name and cls.description
    structure = cls(settings(structure=name))
    assert any(structure.accepts(spec) for spec in SCORES.values())


def test_which_criteria_a_structure_takes_is_what_the_criterion_scores():
    unstructured, channel = STRUCTURES["unstructured"](settings()), STRUCTURES["channel"](settings())
    assert not unstructured.accepts(SCORES["bn_gamma"]) and channel.accepts(SCORES["bn_gamma"])
    assert unstructured.accepts(SCORES["snip"]) and not channel.accepts(SCORES["snip"])


def test_an_unknown_or_wrong_structure_is_refused_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(StructureRegistryError, match="valid names: unstructured, channel, nm"):
        get_structure("blocks")
    (tmp_path / "notastructure.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(StructureRegistryError, match="not a subclass") as error:
        get_structure("notastructure:Thing")
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------ block sparsity from outside
def tiled_layers(masks):
    """LeNet-300-100's layers with whole 4x4 tiles: all but the 10-output classifier."""
    return [name for name, mask in masks.items() if mask.shape[0] % 4 == 0]


def kept_tiles(masks) -> int:
    return sum(int(tiles_of(masks[name]).all(-1).sum()) for name in tiled_layers(masks))


def all_tiles(masks) -> int:
    return sum(masks[name].numel() for name in tiled_layers(masks)) // 16


def tiles_of(mask: torch.Tensor, block: int = 4) -> torch.Tensor:
    matrix = mask.reshape(mask.shape[0], -1)
    rows, columns = matrix.shape
    return matrix.reshape(rows // block, block, columns // block, block).permute(0, 2, 1, 3).reshape(
        rows // block, columns // block, block * block)


def assert_block_masks(masks, *, block: int = 4):
    """Every tile of a tileable layer is kept or dropped whole; the other layers stay dense."""
    for name, mask in masks.items():
        matrix = mask.reshape(mask.shape[0], -1)
        if matrix.shape[0] % block or matrix.shape[1] % block:
            assert bool(mask.all()), f"{name} has no whole tiles and must stay dense"
            continue
        tile = tiles_of(mask, block)
        assert bool((tile.all(-1) | ~tile.any(-1)).all()), f"{name}: a tile is partly kept"


@pytest.fixture(scope="module")
def block_runs(tmp_path_factory, digits):
    """An IMP run with the outside block structure (3 levels), its shuffle control, and the report."""
    tmp = tmp_path_factory.mktemp("block")
    base = digits_config(digits, tmp / "runs", name="blocks", **{"prune.structure": BLOCK, "prune.rate": 0.5,
                                                                "training.epochs": 1})
    config = write_config(tmp / "blocks.yaml", base)
    ticket = run_harness(config, env=EXAMPLES)
    control = run_harness(config, "--prune.masks_from=" + str(tmp / "runs" / "blocks"), "--prune.control=shuffle",
                          "--experiment.name=blocks_shuffle", env=EXAMPLES)
    report = subprocess.run([PYTHON, "-m", "utils.report", str(tmp / "runs" / "blocks"),
                             str(tmp / "runs" / "blocks_shuffle"), "--out-dir", str(tmp / "report")],
                            cwd=ROOT, capture_output=True, text=True, env={**_env(), **EXAMPLES}, timeout=300)
    return {"tmp": tmp, "config": config, "ticket": ticket, "control": control, "report": report}


def _env():
    import os
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_an_outside_block_structure_runs_through_the_harness(block_runs):
    assert block_runs["ticket"].returncode == 0, block_runs["ticket"].stderr[-2000:]
    root = block_runs["tmp"] / "runs" / "blocks"
    assert "block 4x4: layers kept dense (no whole tiles): 5 [10, 100]" in block_runs["ticket"].stdout  # the classifier
    levels = pd.read_csv(root / "levels.csv")
    masks = [torch.load(root / "masks" / f"level_{level}.pt") for level in range(3)]
    total = sum(m.numel() for m in masks[0].values())
    dense = total - 16 * all_tiles(masks[0])
    for level, level_masks in enumerate(masks):
        assert_block_masks(level_masks)
        kept = kept_tiles(level_masks)
        assert kept == round(0.5 ** level * all_tiles(level_masks))                 # the exact tile count
        assert levels.density[level] == pytest.approx((dense + 16 * kept) / total, abs=1e-6)
        assert levels.target_density[level] == pytest.approx(levels.density[level], abs=1e-6)
        if level:
            assert all(bool((level_masks[n] <= masks[level - 1][n]).all()) for n in level_masks)  # nested


def test_its_shuffle_control_keeps_each_layers_tile_count_at_other_positions(block_runs):
    assert block_runs["control"].returncode == 0, block_runs["control"].stderr[-2000:]
    source = block_runs["tmp"] / "runs" / "blocks"
    control = block_runs["tmp"] / "runs" / "blocks_shuffle"
    for level in (1, 2):
        theirs = torch.load(source / "masks" / f"level_{level}.pt")
        mine = torch.load(control / "masks" / f"level_{level}.pt")
        assert_block_masks(mine)
        for name in theirs:
            assert int(mine[name].sum()) == int(theirs[name].sum()), name
        assert any(not torch.equal(mine[n], theirs[n]) for n in tiled_layers(theirs))
        if level == 2:
            earlier = torch.load(control / "masks" / "level_1.pt")
            assert all(bool((mine[n] <= earlier[n]).all()) for n in mine)  # the control's levels nest too


def test_the_report_labels_the_outside_structure_and_counts_both_runs_complete(block_runs):
    report = block_runs["report"]
    assert report.returncode == 0, report.stderr[-2000:]
    text = (block_runs["tmp"] / "report" / "report.md").read_text()
    assert "block 4x4 magnitude/global/imp" in text
    assert text.count("complete (3 levels)") >= 2 and "incomplete" not in text


def test_the_pruning_command_computes_block_masks(block_runs, tmp_path):
    """python -m utils.pruning_utils asks the config's structure too: block masks of the initial
    weights, half of the tiles kept."""
    root = block_runs["tmp"] / "runs" / "blocks"
    out = tmp_path / "masks.pt"
    result = subprocess.run([PYTHON, "-m", "utils.pruning_utils", "--config", str(block_runs["config"]),
                             "--checkpoint", str(root / "checkpoints" / "init.pt"), "--density", "0.5",
                             "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, env={**_env(), **EXAMPLES}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    masks = torch.load(out)
    assert_block_masks(masks)
    assert kept_tiles(masks) == round(0.5 * all_tiles(masks))


def test_a_criterion_or_allocation_the_block_structure_does_not_take_is_refused_in_one_line(tmp_path, digits):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **{"prune.structure": BLOCK}))
    for flag, fragment in (("--prune.criterion=bn_gamma", f"does not apply to prune.structure={BLOCK}"),
                           ("--prune.allocation=erk", f"prune.allocation=erk does not apply to prune.structure={BLOCK}")):
        result = run_harness(config, flag, env=EXAMPLES)
        assert result.returncode == 2 and fragment in result.stderr, result.stderr[-1000:]
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_block_masks_keep_exactly_the_tiles_asked_for_with_every_criterion():
    import sys
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from block_structure import Blocks
    finally:
        sys.path.remove(str(ROOT / "examples"))
    from utils.models.mask_layers import prepare_model
    from utils.models.registry import get_model
    from utils.pruning.structures.base import Scoring
    torch.manual_seed(0)
    model = prepare_model(get_model("lenet_300_100", num_classes=10, in_channels=1, image_size=8))
    structure = Blocks(settings(structure=BLOCK))
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    for criterion in ("magnitude", "random", "snip", "synflow"):
        scoring = Scoring(criterion=criterion, allocation="global", seed=0, batches=batches,
                          input_shape=(1, 8, 8), synflow_iterations=5)
        masks = structure.masks(model, 0.3, scoring)
        assert_block_masks(masks)
        assert kept_tiles(masks) == round(0.3 * all_tiles(masks)), criterion


def test_a_control_with_another_structure_than_its_source_is_refused_in_one_line(block_runs):
    source = block_runs["tmp"] / "runs" / "blocks"
    result = run_harness(block_runs["config"], f"--prune.masks_from={source}", "--prune.structure=unstructured",
                         "--experiment.name=wrong_structure", env=EXAMPLES)
    assert result.returncode == 2, result.stderr[-2000:]
    assert (f"prune.masks_from={source} was made with prune.structure={BLOCK}, this run has "
            f"prune.structure=unstructured") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (block_runs["tmp"] / "runs" / "wrong_structure").exists()
