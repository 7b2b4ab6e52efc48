"""utils/lottery/controls.py: training another experiment's masks as they are, re-initialised or shuffled."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml

from harness_params import as_tree, resolve
from utils.lottery import controls, level_zero
from utils.models.mask_layers import all_true_masks, is_subset, prepare_model, set_masks
from utils.models.registry import get_model
from utils.pruning.masks import compute_masks
from utils.runs.rundir import REUSED_COLUMNS, RunFiles

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
    rows = ["level,target_density,density,final_test_acc,best_test_acc,best_epoch,best_selected_on,train_time_s"]
    for level in range(4):
        if level:
            masks = compute_masks(model, density=0.8 ** level, criterion="random", allocation="global", seed=level)
            set_masks(model, masks)
        torch.save(masks, root / "masks" / f"level_{level}.pt")
        if level < 3:
            rows.append(f"{level},{0.8 ** level},{0.8 ** level},90.0,91.0,1,test,1.0")
    (root / "levels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_reads_a_source_and_counts_only_finished_levels(tmp_path, source):
    c = config(tmp_path, **{"experiment.name": "control", "prune.masks_from": source})
    src = controls.read_source(source, controls.ControlRequest.from_config(c), model_for(c))
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
    src = controls.read_source(source, controls.ControlRequest.from_config(c), model_for(c))
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
    src = controls.read_source(source, controls.ControlRequest.from_config(c), model)
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
        controls.read_source(source, controls.ControlRequest.from_config(c), model_for(c) if c["model.name"] == "lenet_300_100" else
                             prepare_model(get_model("lenet5", num_classes=10, in_channels=1, image_size=12)))
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_missing_directory_and_own_directory_are_refused(tmp_path, source):
    c = config(tmp_path, **{"experiment.name": "control", "prune.masks_from": tmp_path / "nope"})
    with pytest.raises(controls.ControlError, match="no such experiment directory"):
        controls.read_source(tmp_path / "nope", controls.ControlRequest.from_config(c), model_for(c))
    c = config(tmp_path, **{"experiment.name": "source", "experiment.base_dir": source.parent,
                            "prune.masks_from": source})
    with pytest.raises(controls.ControlError, match="this run's own directory"):
        controls.read_source(source, controls.ControlRequest.from_config(c), model_for(c))


def test_wait_for_level_polls_until_the_row_appears_and_gives_up_when_told(tmp_path, source):
    c = config(tmp_path, **{"experiment.name": "control", "prune.masks_from": source})
    src = controls.read_source(source, controls.ControlRequest.from_config(c), model_for(c))
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


# ------------------------------------------------------------------ level 0 taken from the source
def add_run_files(root, *, epochs=2, world_size=1, cuda=False):
    """What a finished harness run also has: every level's epochs.csv and layers.csv rows, and a
    last checkpoint recording the launch (world_size; a CUDA RNG state only when CUDA ran)."""
    import harness_utils as hu
    levels = pd.read_csv(root / "levels.csv")
    epoch_rows = [{"level": level, "epoch": epoch, "lr": 0.1, "train_loss": 0.5, "train_acc": 80.0 + level,
                   "test_loss": 0.6, "test_acc": 85.0 + epoch, "epoch_time_s": 1.5, "images_per_s": 900.0}
                  for level in levels.level for epoch in range(epochs)]
    pd.DataFrame(epoch_rows, columns=hu.EPOCH_COLUMNS).to_csv(root / "epochs.csv", index=False)
    layer_rows = []
    for level in levels.level:
        for name, mask in torch.load(root / "masks" / f"level_{level}.pt").items():
            layer_rows.append({"level": level, "layer": name, "numel": mask.numel(), "alive": int(mask.sum()),
                               "density": float(mask.float().mean())})
    pd.DataFrame(layer_rows, columns=hu.LAYER_COLUMNS).to_csv(root / "layers.csv", index=False)
    rng = {"torch": torch.get_rng_state(), **({"cuda": [torch.get_rng_state()]} if cuda else {})}
    torch.save({"format": 1, "world_size": world_size, "rng": rng}, root / "checkpoints" / "last.pt")


class FakeLog:
    def __init__(self, columns):
        self.columns, self.rows = list(columns), []

    def append(self, row):
        self.rows.append(row)


def fake_logs():
    import harness_utils as hu
    return {"epochs": FakeLog(hu.EPOCH_COLUMNS), "levels": FakeLog(hu.LEVEL_COLUMNS), "layers": FakeLog(hu.LAYER_COLUMNS)}


def level_zero_check(tmp_path, source, *, model=None, world_size=1, device_type="cpu", **overrides):
    import harness_utils as hu
    c = config(tmp_path, **{"experiment.name": "control", "prune.masks_from": source, "prune.control": "shuffle",
                            "training.epochs": 2, "training.device": "cpu", **overrides})
    src = controls.read_source(source, controls.ControlRequest.from_config(c), model_for(c))
    logs = fake_logs()
    return level_zero.level_zero_difference(src, controls.ControlRequest.from_config(c), model or model_for(c),
                                          world_size=world_size, device_type=device_type,
                                          columns={n: log.columns for n, log in logs.items()},
                                          differing=hu.semantic_difference(src.config, c))


@pytest.fixture
def full_source(tmp_path, source, monkeypatch):
    """The source of the fixture above run with training.epochs=2 on CPU, all its files there,
    its data (BASE's a.beton and b.beton, stand-ins in the working directory) recorded."""
    from utils.runs import data_identity
    tree = yaml.safe_load((source / "config.yaml").read_text())
    tree["training"].update({"epochs": 2, "device": "cpu"})
    (source / "config.yaml").write_text(yaml.safe_dump(tree))
    add_run_files(source)
    monkeypatch.chdir(tmp_path)
    for name in ("a.beton", "b.beton"):
        (tmp_path / name).write_bytes(name.encode())
    data_identity.record_run_data(source, {"train": "a.beton", "test": "b.beton"})
    return source


def test_an_identical_level_0_is_taken_with_its_rows_masks_and_a_note(tmp_path, full_source):
    import harness_utils as hu
    assert level_zero_check(tmp_path, full_source) is None
    assert level_zero_check(tmp_path, full_source, **{"prune.control": "none", "prune.levels": 2}) is None
    c = config(tmp_path, **{"experiment.name": "control", "prune.masks_from": full_source, "prune.control": "shuffle",
                            "training.epochs": 2, "training.device": "cpu"})
    src = controls.read_source(full_source, controls.ControlRequest.from_config(c), model_for(c))
    root = tmp_path / "runs" / "control"
    (root / "masks").mkdir(parents=True)
    logs = fake_logs()
    taken, message = level_zero.take_level_zero(src, controls.ControlRequest.from_config(c), model_for(c), root, logs,
                                              world_size=1, device_type="cpu",
                                              differing=hu.semantic_difference(src.config, c))
    assert taken and message.startswith(f"level 0 taken from {full_source} (6 CSV rows copied")
    for name, log in logs.items():
        source_rows = pd.read_csv(full_source / f"{name}.csv", dtype=str, keep_default_na=False)
        expected = source_rows[source_rows.level == "0"].to_dict("records")
        assert log.rows == expected and len(expected) == {"epochs": 2, "levels": 1, "layers": 3}[name]
    masks = torch.load(root / "masks" / "level_0.pt")
    assert masks.keys() == src.layer_shapes.keys() and all(bool(m.all()) for m in masks.values())
    note = pd.read_csv(RunFiles(root).reused.path)
    assert list(note.columns) == REUSED_COLUMNS and note.level.tolist() == [0]
    assert note.source.tolist() == [str(full_source)]


def bn_model():
    return torch.nn.Sequential(torch.nn.BatchNorm1d(3))


@pytest.mark.parametrize("overrides,kwargs,fragment", [
    ({"prune.control": "reinit"}, {}, "prune.control=reinit starts from its own initial weights"),
    ({"prune.training_type": "lrr"}, {}, "prune.training_type=lrr: later levels start from level 0's trained state"),
    ({"optimizer.lr": 0.5}, {}, "its config differs from the source's in optimizer.lr"),
    ({"experiment.seed": 1}, {}, "differs from the source's in experiment.seed"),
    ({"dataset.loader": "torch"}, {}, "differs from the source's in dataset.loader"),
    ({"analysis.stability": True}, {}, "analysis.stability=True writes files of its own"),
    ({}, {"device_type": "cuda"}, "the source ran on cpu, this run on cuda"),
    ({}, {"world_size": 2, "model": bn_model()}, "per-rank over 1 process(es), this run's over 2"),
])
def test_a_level_0_that_is_not_identical_is_trained(tmp_path, full_source, overrides, kwargs, fragment):
    assert fragment in level_zero_check(tmp_path, full_source, **overrides, **kwargs)


def test_level_0_is_trained_when_the_source_does_not_have_it_all(tmp_path, full_source):
    # with 2 processes and no BatchNorm the model is the same: still taken
    assert level_zero_check(tmp_path, full_source, world_size=2) is None
    epochs = pd.read_csv(full_source / "epochs.csv")
    epochs.iloc[1:].to_csv(full_source / "epochs.csv", index=False)
    assert "has 1 level-0 rows, 2 expected" in level_zero_check(tmp_path, full_source)
    add_run_files(full_source)
    masks = torch.load(full_source / "masks" / "level_0.pt")
    masks["1"][0, 0] = False
    torch.save(masks, full_source / "masks" / "level_0.pt")
    assert "level 0 is pruned" in level_zero_check(tmp_path, full_source)


def test_level_0_is_trained_when_the_sources_data_is_not_known_to_be_the_controls(tmp_path, full_source):
    import os

    import harness_utils as hu
    c = config(tmp_path, **{"experiment.name": "control", "prune.masks_from": full_source, "prune.control": "shuffle",
                            "training.epochs": 2, "training.device": "cpu"})
    request = controls.ControlRequest.from_config(c)
    src = controls.read_source(full_source, request, model_for(c))

    def why_not():
        return level_zero.level_zero_difference(src, request, model_for(c), world_size=1, device_type="cpu",
                                              columns={n: log.columns for n, log in fake_logs().items()},
                                              differing=hu.semantic_difference(src.config, c))
    assert why_not() is None
    os.utime(tmp_path / "b.beton", ns=(1, 1))   # changed while the control waited: no record vouches for it
    assert "the source was trained on other data: dataset.test_path=b.beton" in why_not()
    with pytest.raises(controls.ControlError, match=r"prune.masks_from=\S+ was trained on other data: "
                                                    r"dataset.test_path=b.beton is not the data recorded"):
        controls.read_source(full_source, request, model_for(c))
    (full_source / "data.json").unlink()        # a source made before runs recorded their data
    assert "does not record which data it trained on" in why_not()


def test_a_stale_note_goes_when_level_0_is_trained(tmp_path, full_source):
    import harness_utils as hu
    c = config(tmp_path, **{"experiment.name": "control", "prune.masks_from": full_source, "prune.control": "shuffle",
                            "training.epochs": 3, "training.device": "cpu"})
    src = controls.read_source(full_source, controls.ControlRequest.from_config(c), model_for(c))
    root = tmp_path / "runs" / "control"
    root.mkdir(parents=True)
    (RunFiles(root).reused.path).write_text("level,source,reason\n0,x,y\n")
    taken, message = level_zero.take_level_zero(src, controls.ControlRequest.from_config(c), model_for(c), root,
                                              fake_logs(), world_size=1, device_type="cpu",
                                              differing=hu.semantic_difference(src.config, c))
    assert not taken and "differs from the source's in training.epochs" in message
    assert not (RunFiles(root).reused.path).exists()


def test_a_control_takes_its_sources_level_0_end_to_end(tmp_path, monkeypatch):
    """A shuffle control of a real digits run takes level 0 and trains level 1; the same control
    made to retrain level 0 gets the same numbers (so the copy is what training would give), and
    the taken one interrupted in level 1 resumes to them too."""
    from tests.helpers import digits_config, write_config
    from tests.test_resume import assert_same_results, run_in_process
    from utils.data.writer import ensure_digits
    data = tmp_path / "data"
    ensure_digits(data)
    runs = tmp_path / "runs"
    short = {"training.epochs": 1, "prune.levels": 2}
    source_config = write_config(tmp_path / "s.yaml", digits_config(data, runs, "source", **short))
    code, _, err = run_in_process(source_config)
    assert code == 0, err
    source = runs / "source"

    def control(name):
        return write_config(tmp_path / f"{name}.yaml", digits_config(data, runs, name, **{
            **short, "prune.masks_from": str(source), "prune.control": "shuffle", "logging.tensorboard": True}))

    code, out, err = run_in_process(control("taken"))
    assert code == 0, err
    assert f"level 0 taken from {source} (5 CSV rows copied" in out
    taken = runs / "taken"
    for name in ("epochs", "levels", "layers"):
        ours = (taken / f"{name}.csv").read_text().splitlines()
        theirs = (source / f"{name}.csv").read_text().splitlines()
        level0 = [line for line in theirs[1:] if line.startswith("0,")]
        assert ours[0] == theirs[0] and ours[1:1 + len(level0)] == level0  # copied as written, timing included
    assert pd.read_csv(taken / "levels.csv").level.tolist() == [0, 1]
    assert pd.read_csv(taken / "reused.csv").source.tolist() == [str(source)]
    assert "level 0 taken" not in run_in_process(control("taken"))[1]  # finished: nothing more to do

    with monkeypatch.context() as patch:
        patch.setattr(level_zero, "level_zero_difference", lambda *a, **k: "retrained for the test")
        code, out, err = run_in_process(control("trained"))
    assert code == 0, err
    assert "level 0 is trained, not taken from" in out and not (runs / "trained" / "reused.csv").exists()
    assert_same_results(taken, runs / "trained")

    cut = control("cut")
    code, out, err = run_in_process(cut, env={"HARNESS_TEST_KILL_AT": "batch:1:0:5", "HARNESS_TEST_KILL_SIGNAL": "SIGTERM"})
    assert code == 143 and "level 0 taken" in out, err
    code, out, err = run_in_process(cut)
    assert code == 0, err
    assert_same_results(taken, runs / "cut")
    # TensorBoard holds the taken level 0 (from the copied rows) and level 1, each step once,
    # in the run that was interrupted and resumed too
    from tests.test_trackers import read_scalars
    for name in ("taken", "cut"):
        series = read_scalars(runs / name)["epoch/test_acc"]
        assert [step for step, _ in series] == [0, 1], name
        assert [value for _, value in series] == pytest.approx(pd.read_csv(runs / name / "epochs.csv").test_acc.tolist())
