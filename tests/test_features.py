"""The wave-2 features end to end through the harness (issues 10-12): controls from another
run's masks, late resetting, per-layer rates, stability analysis, channel pruning with
Early-Bird and compaction, trackers.  LeNet-300-100 / conv2 on digits, torch loader, short."""
from __future__ import annotations

import subprocess

import pandas as pd
import pytest
import torch

import harness
from tests.helpers import PYTHON, ROOT, digits_config, write_config
from tests.test_resume import assert_same_results, run_in_process


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, digits):
    """A finished 3-level IMP run whose masks the controls train."""
    base = tmp_path_factory.mktemp("source")
    config = write_config(base / "c.yaml", digits_config(digits, base / "runs", "source", **{"training.epochs": 1}))
    code, _, err = run_in_process(config)
    assert code == 0, err
    return base / "runs" / "source"


def _masks(root, level):
    return torch.load(root / "masks" / f"level_{level}.pt", weights_only=True)


# ------------------------------------------------------------------------------ controls
@pytest.mark.parametrize("control", ["none", "reinit", "shuffle"])
def test_controls_train_the_source_masks_level_by_level(tmp_path, digits, source_run, control):
    config = write_config(tmp_path / "c.yaml", digits_config(
        digits, tmp_path / "runs", f"ctl_{control}", **{"training.epochs": 1, "prune.levels": None,
                                                       "prune.masks_from": str(source_run), "prune.control": control,
                                                       "experiment.seed": 5}))
    code, out, err = run_in_process(config)
    assert code == 0, err
    root = tmp_path / "runs" / f"ctl_{control}"
    levels = pd.read_csv(root / "levels.csv")
    assert levels.level.tolist() == [0, 1, 2]
    source_init = torch.load(source_run / "checkpoints" / "init.pt", weights_only=True)["model"]
    own_init = torch.load(root / "checkpoints" / "init.pt", weights_only=True)["model"]
    same_init = all(torch.equal(source_init[k], own_init[k]) for k in source_init if not k.endswith(".mask"))
    assert same_init == (control != "reinit")
    for level in range(3):
        ours, theirs = _masks(root, level), _masks(source_run, level)
        for name in theirs:
            assert int(ours[name].sum()) == int(theirs[name].sum()), "same count per layer"
        identical = all(torch.equal(ours[n], theirs[n]) for n in theirs)
        assert identical == (control != "shuffle" or level == 0)  # level 0 is dense: nothing to shuffle
    assert pd.read_csv(source_run / "levels.csv").density.tolist() == pytest.approx(levels.density.tolist())


def test_a_control_of_an_unfitting_source_is_refused_in_one_line(tmp_path, digits, source_run):
    config = write_config(tmp_path / "c.yaml", digits_config(
        digits, tmp_path / "runs", "bad", **{"model.name": "conv2", "prune.masks_from": str(source_run),
                                            "prune.levels": None}))
    code, _, err = run_in_process(config)
    assert code == harness.EXIT_USER_ERROR
    assert len(err.strip().splitlines()) == 1 and "model.name" in err
    assert not (tmp_path / "runs" / "bad").exists()


# ------------------------------------------------------------------- late resetting
def test_late_resetting_rewinds_to_an_iteration_and_resumes_exactly(tmp_path, digits):
    """22 batches per epoch: iteration 30 is epoch 1, batch 8.  Later levels start there; a
    SIGTERM inside level 0 before the point and a SIGKILL inside a rewound level both resume
    to the uninterrupted results."""
    overrides = {"prune.training_type": "wr", "prune.rewind_iteration": 30, "training.epochs": 3}
    reference = write_config(tmp_path / "ref.yaml", digits_config(digits, tmp_path / "runs", "ref", **overrides))
    code, _, err = run_in_process(reference)
    assert code == 0, err
    ref_root = tmp_path / "runs" / "ref"
    rewind = torch.load(ref_root / "checkpoints" / "rewind.pt", weights_only=True)
    assert rewind["schedule"]["iteration"] == 30
    epochs = pd.read_csv(ref_root / "epochs.csv")
    assert epochs[epochs.level == 1].epoch.tolist() == [1, 2]  # from epoch 1 (its batches 8..21), then 2
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", "cut", **overrides))
    code, _, err = run_in_process(config, env={"HARNESS_TEST_KILL_AT": "batch:0:1:5", "HARNESS_TEST_KILL_SIGNAL": "SIGTERM"})
    assert code == harness.EXIT_PREEMPTED, err
    code, _, err = run_in_process(config, env={"HARNESS_TEST_KILL_AT": "batch:1:1:15", "HARNESS_TEST_KILL_SIGNAL": "SIGTERM"})
    assert code == harness.EXIT_PREEMPTED, err
    code, out, err = run_in_process(config)
    assert code == 0, err
    assert_same_results(ref_root, tmp_path / "runs" / "cut")


def test_late_resetting_beyond_level_0_is_refused(tmp_path, digits):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", "far", **{
        "prune.training_type": "wr", "prune.rewind_iteration": 44}))  # 2 epochs x 22 batches: 0..43
    code, _, err = run_in_process(config)
    assert code == harness.EXIT_USER_ERROR and "prune.rewind_iteration=44 is beyond level 0" in err
    assert not (tmp_path / "runs" / "far").exists()


# ------------------------------------------------------------------- per-layer rates
def test_per_layer_rates_prune_each_layer_at_its_own_rate(tmp_path, digits):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", "rates", **{
        "prune.allocation": "uniform", "prune.layer_rates": ["1=0.5", "5=0.1"], "training.epochs": 1}))
    code, _, err = run_in_process(config)
    assert code == 0, err
    layers = pd.read_csv(tmp_path / "runs" / "rates" / "layers.csv")
    for level in (1, 2):
        at = layers[layers.level == level].set_index("layer")
        at.index = at.index.astype(str)  # LeNet-300-100's layers are named 1, 3, 5 (nn.Sequential)
        assert at.loc["1", "alive"] == round(0.5 ** level * at.loc["1", "numel"])
        assert at.loc["5", "alive"] == round(0.9 ** level * at.loc["5", "numel"])
        assert at.loc["3", "alive"] == round(0.8 ** level * at.loc["3", "numel"])  # prune.rate


# ------------------------------------------------------------------- stability
def test_stability_analysis_writes_the_path_and_the_barrier(tmp_path, digits):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", "lmc", **{
        "analysis.stability": True, "analysis.interpolation_points": 3, "prune.levels": 2, "training.epochs": 1}))
    code, out, err = run_in_process(config)
    assert code == 0, err
    root = tmp_path / "runs" / "lmc"
    path = pd.read_csv(root / "stability.csv")
    assert list(path.columns) == ["level", "alpha", "test_loss", "test_acc"]
    assert path.level.tolist() == [0, 0, 0, 1, 1, 1] and path.alpha.tolist() == [0, 0.5, 1] * 2
    levels = pd.read_csv(root / "levels.csv")
    epochs = pd.read_csv(root / "epochs.csv")
    for level in (0, 1):
        ends = path[path.level == level]
        assert ends.test_acc.iloc[0] == pytest.approx(epochs[epochs.level == level].test_acc.iloc[-1], abs=1e-4)
        expected = (100 - ends.test_acc).max() - ((100 - ends.test_acc.iloc[0]) + (100 - ends.test_acc.iloc[-1])) / 2
        assert levels.instability[level] == pytest.approx(expected, abs=1e-3) and levels.instability[level] >= 0
    assert "instability" in out


# ------------------------------------------------------------------- channel pruning
def test_channel_pruning_early_bird_and_compaction_end_to_end(tmp_path, digits):
    overrides = {"model.name": "conv2", "prune.structure": "channel", "prune.allocation": "global",
                 "training.epochs": 6, "prune.levels": 2, "prune.rate": 0.5, "training.bn_l1": 1e-4,
                 "prune.early_bird": True, "prune.early_bird_window": 2, "prune.early_bird_threshold": 0.5}
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", "slim", **overrides))
    code, out, err = run_in_process(config)
    assert code == 0, err
    root = tmp_path / "runs" / "slim"
    early = pd.read_csv(root / "early_bird.csv")
    epochs = pd.read_csv(root / "epochs.csv")
    level0 = epochs[epochs.level == 0].epoch.tolist()
    assert level0 == list(range(len(early))) and len(level0) < 6, "Early-Bird ended level 0 early"
    assert early.distance.iloc[-1] < 0.5
    layers = pd.read_csv(root / "layers.csv")
    assert {"channels", "channels_alive"} <= set(layers.columns)
    levels = pd.read_csv(root / "levels.csv")
    assert levels.channel_density.tolist()[0] == 1.0 and levels.channel_density[1] < 0.6
    at_1 = layers[layers.level == 1].set_index("layer")
    at_1.index = at_1.index.astype(str)
    for name, mask in _masks(root, 1).items():  # whole output channels pruned: rows with no kept weight
        assert int(mask.reshape(mask.shape[0], -1).any(1).sum()) == at_1.loc[name, "channels_alive"]
    assert (at_1.channels_alive < at_1.channels).any()
    out_file = tmp_path / "small.pt"
    result = subprocess.run([PYTHON, "-m", "utils.compact", "--experiment", str(root), "--level", "1",
                             "--out", str(out_file)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out_file.exists() and "parameters" in result.stdout


# ------------------------------------------------------------------- trackers
def test_tensorboard_tracker_writes_event_files_next_to_the_csvs(tmp_path, digits):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", "tb", **{
        "logging.tensorboard": True, "training.epochs": 1, "prune.levels": 2}))
    code, _, err = run_in_process(config)
    assert code == 0, err
    events = list((tmp_path / "runs" / "tb").rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert any("test_acc" in tag for tag in tags)


# ------------------------------------------------------------------- ImageNet recipe keys
def test_blurpool_runs_through_the_harness_and_flip_tta_is_refused_for_digits(tmp_path, digits):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", "blur", **{
        "model.name": "resnet20", "model.blurpool": True, "training.epochs": 1, "prune.levels": 2}))
    code, _, err = run_in_process(config)
    assert code == 0, err
    state = torch.load(tmp_path / "runs" / "blur" / "checkpoints" / "last.pt", weights_only=True)
    masks = _masks(tmp_path / "runs" / "blur", 1)
    assert masks.keys() == {k[:-len(".mask")] for k in state["model"] if k.endswith(".mask")}
    import harness_params
    from utils.core.distributed import DistributedContext
    from utils.models.blurpool import blurred_layer_names

    experiment = harness.Experiment(harness_params.load_config(["--config", str(config)]), DistributedContext())
    experiment.check_inputs()
    blurred = blurred_layer_names(experiment.model)
    assert blurred and set(blurred) <= set(masks), "strided convolutions blurred, and still pruned"
    refused = write_config(tmp_path / "r.yaml", digits_config(digits, tmp_path / "runs", "tta", **{
        "training.flip_tta": True}))
    code, _, err = run_in_process(refused)
    assert code == harness.EXIT_USER_ERROR and "training.flip_tta=true does not suit dataset.name=digits" in err


def test_progressive_resizing_gives_each_epoch_its_resolution(tmp_path, monkeypatch):
    """A tiny ImageFolder tree written as an ImageNet .beton; the ramp 32 -> 64 px over epochs 0..2
    (multiples of 32, ties to even: 32, 64, 64), read by the torch loader per batch."""
    import numpy as np
    from PIL import Image

    from utils.data import writer as wb

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for name in ("n01", "n02"):
            (tmp_path / "raw" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(48, 56, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "raw" / split / name / f"{i}.png")
    train, test = wb.write_dataset("imagenet", tmp_path / "raw", tmp_path / "data", num_workers=1, max_resolution=64)
    tree = digits_config(tmp_path, tmp_path / "runs", "ramp", **{
        "model.name": "resnet18", "dataset.name": "imagenet", "dataset.train_path": str(train),
        "dataset.test_path": str(test), "dataset.batch_size": 4, "training.epochs": 3, "prune.levels": 1,
        "resolution.start_res": 32, "resolution.end_res": 64, "resolution.start_epoch": 0, "resolution.end_epoch": 2})
    config = write_config(tmp_path / "c.yaml", tree)
    seen = []
    original = harness.Experiment.prepare_epoch

    def spy(self, epoch):
        original(self, epoch)
        seen.append((epoch, self.train_loader.output_resolution))

    monkeypatch.setattr(harness.Experiment, "prepare_epoch", spy)
    code, _, err = run_in_process(config)
    assert code == 0, err
    assert seen == [(0, 32), (1, 64), (2, 64)]


def test_a_reinit_control_with_its_sources_seed_is_refused(tmp_path, digits, source_run):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", "same_seed", **{
        "prune.levels": None, "prune.masks_from": str(source_run), "prune.control": "reinit"}))
    code, _, err = run_in_process(config)
    assert code == harness.EXIT_USER_ERROR and "give the control another experiment.seed" in err
    assert not (tmp_path / "runs" / "same_seed").exists()
