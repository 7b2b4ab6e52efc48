"""utils/controls.py: training another experiment's masks as they are, re-initialised or shuffled."""
from __future__ import annotations

import pytest
import torch
import yaml

from harness_params import as_tree, resolve
from utils import controls
from utils.mask_layers import all_true_masks, is_subset, prepare_model, set_masks
from utils.models import get_model
from utils.pruning_utils import compute_masks

BASE = {
    "model": {"name": "lenet_300_100"},
    "dataset": {"name": "digits", "train_path": "a.beton", "test_path": "b.beton"},
    "prune": {"levels": 4, "rate": 0.2},
    "experiment": {"name": "source"},
}


def config(tmp_path, tree=None, name="c.yaml", **overrides):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree or BASE))
    return resolve(str(path), {k: str(v) for k, v in overrides.items()})


def model_for(c, seed=0):
    torch.manual_seed(seed)
    return prepare_model(get_model(c["model.name"], num_classes=10, in_channels=1, image_size=8),
                         exclude=c["prune.exclude"])


@pytest.fixture
def source(tmp_path):
    """A source experiment directory as the harness writes it: 3 of 4 levels finished, and
    level 3's mask file written (the level started) but no levels.csv row yet."""
    c = config(tmp_path)
    root = tmp_path / "runs" / "source"
    (root / "masks").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump(as_tree(c)))
    model = model_for(c, seed=7)
    torch.save({"format": 1, "config": c, "model": model.state_dict()}, root / "checkpoints" / "init.pt")
    masks = all_true_masks(model)
    rows = ["level,target_density,density,final_test_acc,best_test_acc,train_time_s"]
    for level in range(4):
        if level:
            masks = compute_masks(model, density=0.8 ** level, criterion="random", allocation="global", seed=level)
            set_masks(model, masks)
        torch.save(masks, root / "masks" / f"level_{level}.pt")
        if level < 3:
            rows.append(f"{level},{0.8 ** level},{0.8 ** level},90.0,91.0,1.0")
    (root / "levels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_reads_a_source_and_counts_only_finished_levels(tmp_path, source):
    c = config(tmp_path, **{"experiment.name": "control", "prune.masks_from": source})
    src = controls.read_source(source, c, model_for(c))
    assert controls.finished_levels(src) == 3 and src.planned_levels == 4
    assert src.planned_densities[2] == pytest.approx(0.64)
    assert controls.control_levels(src, None) == 4 and controls.control_levels(src, 2) == 2
    saved = torch.load(source / "masks" / "level_2.pt")
    got = controls.masks_for_level(src, 2, "none", seed=0)
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    with pytest.raises(controls.ControlError, match="level 3 of .* is not finished yet"):
        controls.masks_for_level(src, 3, "none", seed=0)
    with open(source / "levels.csv", "a") as handle:
        handle.write("3,0.512,0.512,90.0,91.0,1.0\n")
    assert controls.finished_levels(src) == 4
    assert int(sum(m.sum() for m in controls.masks_for_level(src, 3, "reinit", seed=0).values())) == \
        int(sum(m.sum() for m in torch.load(source / "masks" / "level_3.pt").values()))


def test_shuffle_keeps_each_layers_count_at_random_nested_positions(tmp_path, source):
    c = config(tmp_path, **{"experiment.name": "control", "prune.masks_from": source, "prune.control": "shuffle"})
    src = controls.read_source(source, c, model_for(c))
    original = controls.load_level_masks(src, 2)
    shuffled = controls.masks_for_level(src, 2, "shuffle", seed=0)
    for name in original:
        assert int(shuffled[name].sum()) == int(original[name].sum())
        assert not torch.equal(shuffled[name], original[name])
    again = controls.masks_for_level(src, 2, "shuffle", seed=0)
    other_seed = controls.masks_for_level(src, 2, "shuffle", seed=1)
    assert all(torch.equal(again[k], shuffled[k]) for k in shuffled)
    assert not all(torch.equal(other_seed[k], shuffled[k]) for k in shuffled)
    assert is_subset(shuffled, controls.masks_for_level(src, 1, "shuffle", seed=0))
    level0 = controls.masks_for_level(src, 0, "shuffle", seed=0)
    assert all(bool(m.all()) for m in level0.values())


def test_initial_weights_are_the_sources_or_this_runs_own(tmp_path, source):
    c = config(tmp_path, **{"experiment.name": "control", "prune.masks_from": source, "prune.control": "reinit"})
    model = model_for(c, seed=3)
    src = controls.read_source(source, c, model)
    saved = torch.load(source / "checkpoints" / "init.pt")["model"]
    for control in ("none", "shuffle"):
        state = controls.initial_state(src, control, model)
        assert "1.mask" not in state and torch.equal(state["1.weight"], saved["1.weight"])
    own = controls.initial_state(src, "reinit", model)
    assert torch.equal(own["1.weight"], model.state_dict()["1.weight"])
    assert not torch.equal(own["1.weight"], saved["1.weight"])


def corrupt_mask(source):
    (source / "masks" / "level_1.pt").write_bytes(b"not a checkpoint")


def wrong_shape_mask(source):
    masks = torch.load(source / "masks" / "level_1.pt")
    masks["1"] = masks["1"][:, :10]
    torch.save(masks, source / "masks" / "level_1.pt")


def missing_mask(source):
    (source / "masks" / "level_2.pt").unlink()


def missing_init(source):
    (source / "checkpoints" / "init.pt").unlink()


def no_config(source):
    (source / "config.yaml").unlink()


@pytest.mark.parametrize("damage,overrides,fragment", [
    (None, {"model.name": "lenet5"}, "was made with model.name='lenet_300_100', this run has model.name='lenet5'"),
    (None, {"prune.exclude": "['5']"}, "prune.exclude=[]"),
    (None, {"prune.levels": 6}, "has 4 levels in all"),
    (corrupt_mask, {}, "level_1.pt cannot be read"),
    (wrong_shape_mask, {}, "mask for 1"),
    (missing_mask, {}, "level_2.pt is missing"),
    (missing_init, {}, "init.pt is missing"),
    (no_config, {}, "no config.yaml there"),
])
def test_unfit_sources_are_refused_in_one_line(tmp_path, source, damage, overrides, fragment):
    if damage:
        damage(source)
    c = config(tmp_path, **{"experiment.name": "control", "prune.masks_from": source, **overrides})
    with pytest.raises(controls.ControlError) as error:
        controls.read_source(source, c, model_for(c) if c["model.name"] == "lenet_300_100" else
                             prepare_model(get_model("lenet5", num_classes=10, in_channels=1, image_size=12)))
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_missing_directory_and_own_directory_are_refused(tmp_path, source):
    c = config(tmp_path, **{"experiment.name": "control", "prune.masks_from": tmp_path / "nope"})
    with pytest.raises(controls.ControlError, match="no such experiment directory"):
        controls.read_source(tmp_path / "nope", c, model_for(c))
    c = config(tmp_path, **{"experiment.name": "source", "experiment.base_dir": source.parent,
                            "prune.masks_from": source})
    with pytest.raises(controls.ControlError, match="this run's own directory"):
        controls.read_source(source, c, model_for(c))


def test_wait_for_level_polls_until_the_row_appears_and_gives_up_when_told(tmp_path, source):
    c = config(tmp_path, **{"experiment.name": "control", "prune.masks_from": source})
    src = controls.read_source(source, c, model_for(c))
    sleeps = []

    def finish_level_3(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 2:
            with open(source / "levels.csv", "a") as handle:
                handle.write("3,0.512,0.512,90.0,91.0,1.0\n")

    controls.wait_for_level(src, 3, poll_s=5, sleep=finish_level_3)
    assert sleeps == [5, 5]
    with pytest.raises(controls.ControlError, match="there is no level 4"):
        controls.wait_for_level(src, 4, sleep=lambda s: None)
    (source / "levels.csv").write_text("level,target_density\n0,1.0\n")
    with pytest.raises(controls.ControlError, match="did not finish within 10 s"):
        controls.wait_for_level(src, 2, poll_s=4, timeout_s=10, sleep=lambda s: None)
