"""Vision transformers end to end, and tickets from given weights (``model.weights``).

* IMP on the digits data with the smallest ViT of the family (``vit_nano_p4``): exact densities
  over all attention and MLP weight matrices, the dense start line.
* ``utils/models/pretrained.py`` on its own: a torchvision state dict with another class count, torch's
  attention names, and every refusal (one line, the model untouched).
* ``model.weights`` through the harness: init.pt holds the given weights and IMP rewinds to them;
  wr, lrr, at_init; controls (none uses them as its source did, reinit ignores them).
* The README's "starting from pre-trained weights" commands, as written.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
from torch import nn

import harness
from tests.helpers import digits_config, readme_commands, run_in_repository_copy, write_config
from utils.models import mask_layers
from utils.models.pretrained import (
    WeightsError,
    apply_given_weights,
    check_control_weights,
    classifier_head,
    load_given_weights,
)
from utils.models.registry import get_model
from utils.pruning.schedules import target_keep_count

VIT_EXCLUDE = ["conv_proj", "heads.*"]  # as configs/vit_imp_cifar10.yaml


def run_main(capsys, config: Path, *args: str):
    code = harness.main(["--config", str(config), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def model_state(path: Path):
    state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    return {k: v for k, v in state.items() if not k.endswith(".mask")}


def digits_model(name="lenet_300_100", classes=10, seed=123):
    torch.manual_seed(seed)
    return get_model(name, num_classes=classes, in_channels=1, image_size=8)


# ----------------------------------------------------------------------------- ViT IMP on digits

def test_vit_imp_on_digits_has_exact_densities_over_attention_and_mlp_weights(tmp_path, digits, capsys):
    tree = digits_config(digits, tmp_path / "runs", name="vit", **{
        "model.name": "vit_nano_p4", "training.epochs": 1, "prune.levels": 2, "prune.exclude": VIT_EXCLUDE,
        "optimizer.name": "adamw", "optimizer.lr": 1e-3, "optimizer.weight_decay": 0.05,
        "optimizer.label_smoothing": 0.1, "schedule.warmup_epochs": 0.5})
    code, out, err = run_main(capsys, write_config(tmp_path / "c.yaml", tree))
    assert code == 0, err
    start_lines = [line for line in out.splitlines() if line.startswith("prunable (")]
    assert len(start_lines) == 1
    assert "tokens 64 (class_token)" in start_lines[0] and "position embeddings 320" in start_lines[0]
    assert "excluded layers" in start_lines[0] and "conv_proj.weight" in start_lines[0]

    model = mask_layers.prepare_model(digits_model("vit_nano_p4"), exclude=VIT_EXCLUDE)
    expected_layers = {name: layer.weight.numel() for name, layer in mask_layers.masked_layers(model)}
    attention_and_mlp = [f"encoder.layers.encoder_layer_{i}.{part}" for i in range(2)
                         for part in ("self_attention.in_proj", "self_attention.out_proj", "mlp.0", "mlp.3")]
    assert sorted(expected_layers) == sorted(attention_and_mlp)

    root = tmp_path / "runs" / "vit"
    layers = pd.read_csv(root / "layers.csv")
    levels = pd.read_csv(root / "levels.csv")
    total = sum(expected_layers.values())
    for level in (0, 1):
        rows = layers[layers.level == level]
        assert dict(zip(rows.layer, rows.numel)) == expected_layers
        assert rows.alive.sum() == target_keep_count(0.8 ** level, total)
        assert levels.density[level] == pytest.approx(rows.alive.sum() / total, abs=1e-6)  # written with 6 decimals
        masks = mask_layers.load_masks(root / "masks" / f"level_{level}.pt")
        assert sorted(masks) == sorted(attention_and_mlp)
        assert mask_layers.count_alive(masks) == target_keep_count(0.8 ** level, total)
    level1 = layers[layers.level == 1].set_index("layer")
    assert 0 < level1.alive[attention_and_mlp[0]] < level1.numel[attention_and_mlp[0]]  # Q/K/V are pruned
    assert not levels.final_test_acc.isna().any()
    # IMP: level 1 restarts from the initial weights, masked; trained weights stay zero where pruned
    init, last = model_state(root / "checkpoints" / "init.pt"), torch.load(
        root / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
    packed = "encoder.layers.encoder_layer_0.self_attention.in_proj"
    assert init[f"{packed}.weight"].shape == (3 * 64, 64)
    assert torch.count_nonzero(last[f"{packed}.weight"][~last[f"{packed}.mask"]]) == 0


# ----------------------------------------------------------------------------- pretrained.py on its own

def test_torchvision_file_with_1000_classes_loads_all_but_the_head(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    model = mask_layers.prepare_model(get_model("resnet18", num_classes=10, image_size=224))
    fresh_head = model.fc.weight.detach().clone()
    lines = apply_given_weights(model, str(path))
    assert len(lines) == 2 and "classifier head fc keeps its fresh initialisation" in lines[1]
    assert "1000 classes, this model 10" in lines[1]
    state = model.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key
    assert torch.equal(model.fc.weight, fresh_head)
    assert classifier_head(model) == "fc"


def test_torch_attention_names_load_into_the_prepared_vit(tmp_path):
    plain = digits_model("vit_nano_p4", classes=100, seed=5)  # unprepared: torch's own names
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in plain.state_dict()
    torch.save(plain.state_dict(), tmp_path / "vit.pt")
    model = mask_layers.prepare_model(digits_model("vit_nano_p4"), exclude=VIT_EXCLUDE)
    lines = load_given_weights(model, str(tmp_path / "vit.pt"))
    assert "heads.head keeps its fresh initialisation" in lines[-1]
    attention = model.encoder.layers.encoder_layer_1.self_attention
    assert torch.equal(attention.in_proj.weight, plain.encoder.layers.encoder_layer_1.self_attention.in_proj_weight)
    assert torch.equal(model.conv_proj.weight, plain.conv_proj.weight)


def test_a_saved_prepared_model_or_checkpoint_dict_loads_too(tmp_path):
    source = mask_layers.prepare_model(digits_model())
    state = {k: v for k, v in source.state_dict().items() if not k.endswith(".mask")}
    torch.save({"model": state, "epoch": 3}, tmp_path / "nested.pt")
    model = mask_layers.prepare_model(digits_model(seed=9))
    load_given_weights(model, str(tmp_path / "nested.pt"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


class NotAStateDict:
    pass


@pytest.mark.parametrize("make, fragment", [
    (lambda p: None, "no such file"),
    (lambda p: torch.save(NotAStateDict(), p), "weights_only=True"),
    (lambda p: torch.save(torch.zeros(3), p), "holds a Tensor, not a state dict"),
    (lambda p: torch.save({k: v for k, v in digits_model().state_dict().items() if k != "1.weight"}, p),
     "missing 1.weight"),
    (lambda p: torch.save({**digits_model().state_dict(), "extra.weight": torch.zeros(1),
                           "more.bias": torch.zeros(1), "x": torch.zeros(1), "y": torch.zeros(1)}, p),
     "not in the model extra.weight, more.bias, x and 1 more"),
    (lambda p: torch.save(get_model("lenet_300_100", num_classes=10, in_channels=3, image_size=8).state_dict(), p),
     "shapes differ: 1.weight [300, 192] in the file, [300, 64] in the model"),
    (lambda p: torch.save(mask_layers.prepare_model(digits_model()).state_dict(), p), "holds masks"),
], ids=["missing_file", "pickled_object", "tensor", "missing_key", "unexpected_keys", "stem_shape", "masks"])
def test_misfits_are_refused_in_one_line_and_leave_the_model_as_it_was(tmp_path, make, fragment):
    path = tmp_path / "weights.pt"
    make(path)
    model = mask_layers.prepare_model(digits_model(seed=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_given_weights(model, str(path))
    message = str(info.value)
    assert "\n" not in message and fragment in message and message.startswith(f"model.weights={path}")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_head_with_another_input_size_is_a_misfit_not_a_new_head(tmp_path):
    class Net(nn.Module):
        def __init__(self, hidden):
            super().__init__()
            self.body, self.head = nn.Linear(4, hidden), nn.Linear(hidden, 5)

    torch.save(Net(6).state_dict(), tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="shapes differ: body.bias"):
        load_given_weights(mask_layers.prepare_model(Net(7)), str(tmp_path / "w.pt"))


def test_control_weights_rule():
    check_control_weights("", "w.pt", "none", "runs/x")          # unset: the source's are used
    check_control_weights("w.pt", "./w.pt", "none", "runs/x")     # the same file
    check_control_weights("other.pt", "", "reinit", "runs/x")    # reinit ignores them
    with pytest.raises(WeightsError, match="prune.control=shuffle starts from the initial weights of "
                                           "prune.masks_from=runs/x .its own random initialisation."):
        check_control_weights("w.pt", "", "shuffle", "runs/x")
    with pytest.raises(WeightsError, match=r"\(model.weights=a.pt\)"):
        check_control_weights("b.pt", "a.pt", "none", "runs/x")


# ----------------------------------------------------------------------------- model.weights in the harness

@pytest.fixture(scope="module")
def given(tmp_path_factory):
    """A digits LeNet-300-100 state dict with 100 classes (its head does not fit 10)."""
    path = tmp_path_factory.mktemp("given") / "lenet_c100.pt"
    torch.save(digits_model(classes=100, seed=77).state_dict(), path)
    return path


def assert_starts_from(root: Path, given: Path, head: str = "5"):
    init, file = model_state(root / "checkpoints" / "init.pt"), torch.load(given, weights_only=True)
    for key, value in file.items():
        if not key.startswith(f"{head}."):
            assert torch.equal(init[key], value), key
    assert init[f"{head}.weight"].shape[0] == 10


@pytest.mark.parametrize("training_type, extra", [
    ("imp", {}), ("wr", {"prune.rewind_epoch": 1}), ("lrr", {}),
    ("at_init", {"prune.levels": None, "prune.target_density": 0.3}),
])
def test_given_weights_start_every_training_type(tmp_path, digits, given, capsys, training_type, extra):
    # imp: the stability analysis keeps each level's start state (checkpoints/level_start.pt)
    keep_level_start = {"analysis.stability": True, "analysis.interpolation_points": 2} if training_type == "imp" else {}
    tree = digits_config(digits, tmp_path / "runs", name=training_type, **{
        "model.weights": str(given), "prune.training_type": training_type, "prune.levels": 2,
        "training.epochs": 2 if training_type == "wr" else 1, **keep_level_start, **extra})
    code, out, err = run_main(capsys, write_config(tmp_path / "c.yaml", tree))
    assert code == 0, err
    assert len([line for line in out.splitlines() if "classifier head 5 keeps its fresh initialisation" in line]) == 1
    root = tmp_path / "runs" / training_type
    assert_starts_from(root, given)
    file = torch.load(given, weights_only=True)
    if training_type == "imp":  # level 1 restarted from the given weights, masked
        masks = mask_layers.load_masks(root / "masks" / "level_1.pt")
        start = model_state(root / "checkpoints" / "level_start.pt")
        for name in ("1", "3"):
            assert 0 < int(masks[name].sum()) < masks[name].numel()
            assert torch.equal(start[f"{name}.weight"], file[f"{name}.weight"] * masks[name]), name
    if training_type == "at_init":  # magnitude pruning of the given weights, globally
        masks = mask_layers.load_masks(root / "masks" / "level_0.pt")
        kept = torch.cat([file[f"{n}.weight"].abs()[masks[n]] for n in ("1", "3")])
        pruned = torch.cat([file[f"{n}.weight"].abs()[~masks[n]] for n in ("1", "3")])
        assert kept.min() >= pruned.max()


def test_controls_use_or_ignore_the_given_weights_and_refuse_another_file(tmp_path, digits, given, capsys):
    runs = tmp_path / "runs"
    source = digits_config(digits, runs, name="source", **{"model.weights": str(given), "training.epochs": 1,
                                                           "prune.levels": 2})
    assert run_main(capsys, write_config(tmp_path / "s.yaml", source))[0] == 0
    common = {"training.epochs": 1, "prune.masks_from": str(runs / "source"), "prune.levels": None}
    none = digits_config(digits, runs, name="none", **common, **{"prune.control": "none"})
    assert run_main(capsys, write_config(tmp_path / "n.yaml", none))[0] == 0
    init_none, init_source = model_state(runs / "none" / "checkpoints" / "init.pt"), model_state(
        runs / "source" / "checkpoints" / "init.pt")
    assert all(torch.equal(init_none[k], v) for k, v in init_source.items())
    assert_starts_from(runs / "none", given)

    reinit = digits_config(digits, runs, name="reinit", **common, **{
        "prune.control": "reinit", "model.weights": str(given), "experiment.seed": 1})
    code, out, err = run_main(capsys, write_config(tmp_path / "r.yaml", reinit))
    assert code == 0, err
    assert "is not used: prune.control=reinit trains a fresh random initialisation" in out
    init_reinit = model_state(runs / "reinit" / "checkpoints" / "init.pt")
    assert not torch.equal(init_reinit["1.weight"], torch.load(given, weights_only=True)["1.weight"])

    other = tmp_path / "other.pt"
    shutil.copy(given, other)
    refused = digits_config(digits, runs, name="refused", **common, **{"prune.control": "none",
                                                                       "model.weights": str(other)})
    code, out, err = run_main(capsys, write_config(tmp_path / "x.yaml", refused))
    assert code == harness.EXIT_USER_ERROR and len(err.strip().splitlines()) == 1
    assert "prune.control=none starts from the initial weights of" in err
    assert not (runs / "refused").exists()


def test_a_misfit_file_is_refused_before_anything_is_written(tmp_path, digits, capsys):
    path = tmp_path / "vit.pt"
    torch.save(digits_model("vit_nano_p4").state_dict(), path)
    tree = digits_config(digits, tmp_path / "runs", name="bad", **{"model.weights": str(path)})
    code, out, err = run_main(capsys, write_config(tmp_path / "c.yaml", tree))
    assert code == harness.EXIT_USER_ERROR and len(err.strip().splitlines()) == 1, err
    assert f"model.weights={path} does not fit model: missing 1.bias, 1.weight, 3.bias and 3 more" in err
    assert not (tmp_path / "runs" / "bad").exists()


# ----------------------------------------------------------------------------- README

@pytest.mark.slow  # 25-45 s here: RUN_SLOW=1 runs it (make test stays near its time budget)
def test_readme_pretrained_weights_commands_run(tmp_path):
    commands = readme_commands("readme-test:weights")
    assert any("--model.weights=" in command for command in commands)
    copy = run_in_repository_copy(commands, tmp_path)
    assert (copy / "runs" / "vit_from_weights" / "levels.csv").read_text().count("\n") == 3  # header + 2 levels
