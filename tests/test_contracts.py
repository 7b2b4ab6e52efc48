"""The extension contracts, enforced over every registry entry (docs/extending.md):

* a criterion reads the model and never modifies it: weights, buffers (BatchNorm statistics
  included), gradients, ``requires_grad``, train/eval flags -- every built-in one, every
  criterion the docs and ``examples/custom.py`` show, and every channel score;
* every training type describes itself, and an outside one that cannot is refused in one line;
* a rewind key given to a training type that does not rewind is refused in one line;
* a model added from an outside module trains through the real command line.
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import ROOT, digits_config, run_harness, write_config
from utils.models.mask_layers import count_alive, prepare_model
from utils.pruning.criteria import SCORES

INPUT_SHAPE = (3, 8, 8)
SCORE_SIGNATURE = re.compile(r"^def (\w+)\(inputs, masks\)", re.M)


# ----------------------------------------------------------------------- criteria leave the model alone
def docs_criteria():
    """(module source, function name) of every criterion the ```python blocks of docs/extending.md define."""
    text = (ROOT / "docs" / "extending.md").read_text()
    return [(block, name) for block in re.findall(r"```python\n(.*?)```", text, re.S)
            for name in SCORE_SIGNATURE.findall(block)]


def example_criteria():
    """``examples.custom:NAME`` of every function there taking ``(inputs, masks)``."""
    module = importlib.import_module("examples.custom")
    return [f"examples.custom:{name}" for name, function in inspect.getmembers(module, inspect.isfunction)
            if function.__module__ == module.__name__ and list(inspect.signature(function).parameters) == ["inputs", "masks"]]


WEIGHT_CRITERIA = [name for name, entry in SCORES.items() if getattr(entry, "score", None) is not None]
CHANNEL_CRITERIA = [name for name, entry in SCORES.items() if getattr(entry, "score_channels", None) is not None]


def contract_model() -> nn.Module:
    """conv-BN-ReLU-dropout, conv-BN-ReLU, linear: prepared, in TRAIN mode except one BatchNorm
    (mixed flags), one parameter frozen, one holding a gradient, BatchNorm statistics not fresh."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    prepare_model(model)
    model.train()
    model[5].eval()
    model[0].bias.requires_grad_(False)
    model[8].weight.grad = torch.randn_like(model[8].weight)
    for norm in (model[1], model[5]):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.num_batches_tracked.fill_(7)
    return model


def snapshot(model: nn.Module) -> dict:
    """Everything a criterion could change, by name."""
    tensors = itertools.chain(model.named_parameters(prefix="param "), model.named_buffers(prefix="buffer "))
    return {
        "values": {name: tensor.detach().clone() for name, tensor in tensors},
        "training": {name or "(model)": module.training for name, module in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grad": {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()},
        "hooks": {name or "(model)": (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for name, m in model.named_modules()},
    }


def changes(before: dict, after: dict) -> list:
    """What differs, one line per item (empty: the model is as it was)."""
    found = []
    for kind in before:
        if before[kind].keys() != after[kind].keys():
            found.append(f"{kind}: names {sorted(before[kind])} -> {sorted(after[kind])}")
            continue
        for name, old in before[kind].items():
            new = after[kind][name]
            if isinstance(old, torch.Tensor) or isinstance(new, torch.Tensor):
                same = (isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and old.dtype == new.dtype
                        and torch.equal(old, new))
            else:
                same = old == new
            if not same:
                shown = (lambda v: v.flatten()[:3].tolist() if isinstance(v, torch.Tensor) else v)
                found.append(f"{kind} {name}: {shown(old)} -> {shown(new)}")
    return found


def assert_untouched(model: nn.Module, before: dict, criterion: str) -> None:
    found = changes(before, snapshot(model))
    assert not found, f"criterion {criterion} modified the model:\n" + "\n".join(found)


def batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, *INPUT_SHAPE, generator=generator), torch.randint(0, 10, (4,), generator=generator))
            for _ in range(2)]


def check_weight_criterion(criterion: str) -> None:
    from utils.pruning.masks import compute_masks

    model = contract_model()
    before = snapshot(model)
    total = sum(layer.numel() for name, layer in before["values"].items() if name.endswith(".mask"))
    masks = compute_masks(model, density=0.5, criterion=criterion, allocation="global", batches=batches(),
                          num_batches=2, input_shape=INPUT_SHAPE, seed=0, synflow_iterations=3)
    assert count_alive(masks) == round(0.5 * total)
    assert_untouched(model, before, criterion)


@pytest.mark.parametrize("name", WEIGHT_CRITERIA)
def test_every_registered_criterion_leaves_the_model_as_it_found_it(name):
    check_weight_criterion(name)


@pytest.mark.parametrize("path", example_criteria())
def test_the_example_criteria_leave_the_model_as_they_found_it(path):
    check_weight_criterion(path)


@pytest.fixture
def docs_criterion(tmp_path, monkeypatch):
    """index -> ``module:function`` of the docs' criterion ``index``, its block written as a module
    of its own on sys.path (imported afresh by each test, forgotten after it)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(index: int) -> str:
        source, function = docs_criteria()[index]
        module = f"docs_criterion_{index}"
        (tmp_path / f"{module}.py").write_text(source)
        sys.modules.pop(module, None)
        written.append(module)
        return f"{module}:{function}"

    yield write
    for module in written:
        sys.modules.pop(module, None)


@pytest.mark.parametrize("index", range(len(docs_criteria())))
def test_the_docs_criteria_leave_the_model_as_they_found_it(index, docs_criterion):
    check_weight_criterion(docs_criterion(index))


def test_the_docs_criterion_scores_what_snip_scores(docs_criterion):
    """The docs' |w x grad|, gradients summed over the batches in eval mode, is SNIP on those batches."""
    from utils.pruning.masks import compute_masks

    path = docs_criterion(0)
    model = contract_model()
    ours, snip = (compute_masks(model, density=0.3, criterion=criterion, allocation="global", batches=batches(),
                                num_batches=2, input_shape=INPUT_SHAPE) for criterion in (path, "snip"))
    assert ours.keys() == snip.keys() and all(torch.equal(ours[name], snip[name]) for name in ours)


def test_the_docs_and_the_example_show_criteria_to_check():
    assert [name for _, name in docs_criteria()] == ["grad_times_weight"]
    assert example_criteria() == ["examples.custom:lamp_scores"]
    assert {"magnitude", "random", "snip", "synflow"} <= set(WEIGHT_CRITERIA)


@pytest.mark.parametrize("name", CHANNEL_CRITERIA)
def test_every_channel_score_leaves_the_model_as_it_found_it(name):
    from utils.pruning.channel_graph import build_channel_structure
    from utils.pruning.channel_select import compute_channel_masks

    model = contract_model()
    before = snapshot(model)
    structure = build_channel_structure(model, INPUT_SHAPE)
    masks = compute_channel_masks(model, structure, density=0.5, criterion=name, allocation="global")
    assert count_alive(masks) < sum(mask.numel() for mask in masks.values())
    assert_untouched(model, before, name)


# ----------------------------------------------------------------------- training types describe themselves
OUTSIDE_TYPES = '''
from utils.training.training_types import TrainingType


class Bare(TrainingType):
    name = "bare"


class Docstring(TrainingType):
    """Trained weights kept, as lrr.

    More about it."""
    name = "docstring"


class Described(TrainingType):
    name = "described"
    description = "said in one line"
'''

BASE = {"model.name": "lenet_300_100", "dataset.name": "digits", "dataset.train_path": "a",
        "dataset.test_path": "b", "experiment.name": "x", "prune.levels": "2"}


def docs_block(first_line: str) -> str:
    """The ```python block of docs/extending.md that starts with ``first_line``."""
    text = (ROOT / "docs" / "extending.md").read_text()
    blocks = [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if block.startswith(first_line)]
    assert len(blocks) == 1, f"docs/extending.md: {len(blocks)} python blocks start with {first_line!r}"
    return blocks[0]


@pytest.fixture
def outside_code(tmp_path, monkeypatch):
    """name -> writes tmp_path/code/NAME.py with the given source, importable (afresh) by this test."""
    code = tmp_path / "code"
    code.mkdir()
    monkeypatch.syspath_prepend(str(code))
    written = []

    def write(module: str, source: str) -> Path:
        (code / f"{module}.py").write_text(source)
        sys.modules.pop(module, None)
        written.append(module)
        return code

    yield write
    for module in written:
        sys.modules.pop(module, None)


def help_line(key: str) -> str:
    import harness_params
    lines = [line for line in harness_params.help_text().splitlines() if line.startswith(f"  {key} ")]
    assert len(lines) == 1, key
    return lines[0]


def test_every_registered_training_type_describes_itself_in_one_line():
    from utils.training.training_types import TRAINING_TYPES

    listed = help_line("prune.training_type")
    for name, kind in TRAINING_TYPES.items():
        text = kind.describe()
        assert text and text == kind.description and "\n" not in text, name
        assert f"{name} ({text})" in listed


def test_an_outside_training_type_without_a_description_is_refused_in_one_line(outside_code, tmp_path, capsys):
    import harness_params
    from utils.training.training_types import TrainingTypeError, get_training_type

    outside_code("outside_types", OUTSIDE_TYPES)
    with pytest.raises(TrainingTypeError) as refusal:
        get_training_type("outside_types:Bare")
    assert "outside_types:Bare has no description" in str(refusal.value) and "\n" not in str(refusal.value)
    assert get_training_type("outside_types:Docstring").describe() == "Trained weights kept, as lrr."
    assert get_training_type("outside_types:Described").describe() == "said in one line"
    # Through the command line's loader: exit status 2, one line naming the key.
    config = write_config(tmp_path / "c.yaml", digits_config(tmp_path, tmp_path / "runs"))
    with pytest.raises(SystemExit) as exit_request:
        harness_params.load_config(["--config", str(config), "--prune.training_type=outside_types:Bare"])
    err = capsys.readouterr().err
    assert exit_request.value.code == 2 and err.strip().count("\n") == 0, err
    assert err.startswith("config error: prune.training_type: outside_types:Bare has no description"), err
    assert harness_params.resolve(None, {**BASE, "prune.training_type": "outside_types:Described"})


def test_the_docs_training_type_declares_its_description(outside_code):
    from utils.training.training_types import get_training_type

    source = docs_block("# mytypes.py")
    outside_code("mytypes", source)
    kind = get_training_type("mytypes:TenthRate")
    assert "description" in type(kind).__dict__ and kind.describe() == kind.description


# ----------------------------------------------------------------------- --help lists the registries
def _registries():
    """(key, registry, an entry removed, an entry added, what --help must then say of it)."""
    from dataclasses import replace

    from utils.data.loaders import LOADER_BACKENDS
    from utils.data.specs import AUGMENTATIONS, DATASETS, AugmentPolicy
    from utils.models.registry import MODELS
    from utils.pruning.allocations import ALLOCATIONS
    from utils.training.optimizers import OPTIMIZERS
    from utils.training.schedulers import SCHEDULES
    from utils.training.training_types import TRAINING_TYPES, TrainingType

    class ZzType(TrainingType):
        name = "zz_type"
        description = "zz: weights kept, twice"

    class ZzLoader:
        """Zz reads the batches backwards."""

    return {
        "prune.training_type": (TRAINING_TYPES, "lrr", "zz_type", ZzType(), "zz_type (zz: weights kept, twice)"),
        "prune.allocation": (ALLOCATIONS, "balanced", "zz_alloc", ALLOCATIONS["global"], "zz_alloc"),
        "optimizer.name": (OPTIMIZERS, "adamw", "zz_opt", OPTIMIZERS["sgd"], "zz_opt"),
        "schedule.name": (SCHEDULES, "triangular", "zz_sched", SCHEDULES["constant"], "zz_sched"),
        "dataset.name": (DATASETS, "svhn", "zz_data", replace(DATASETS["digits"], name="zz_data", num_classes=3),
                         "zz_data (1x8x8, 3 classes)"),
        "dataset.loader": (LOADER_BACKENDS, "memory", "zz_loader", ZzLoader, "zz_loader (zz reads the batches backwards)"),
        "dataset.augment": (AUGMENTATIONS, "rrc", "zz_aug", AugmentPolicy(False, True, 2),
                            "zz_aug (pad 2 + random crop + flip)"),
        "model.name": (MODELS, "lenet5", "zz_model", MODELS["lenet_300_100"], "zz_model"),
    }


@pytest.mark.parametrize("key", ["prune.training_type", "prune.allocation", "optimizer.name", "schedule.name",
                                 "dataset.name", "dataset.loader", "dataset.augment", "model.name"])
def test_help_lists_what_the_registry_holds(key, monkeypatch):
    registry, removed, added, entry, said = _registries()[key]
    assert re.search(rf"(?<![\w.]){removed}(?!\w)", help_line(key))
    monkeypatch.delitem(registry, removed)
    monkeypatch.setitem(registry, added, entry)
    line = help_line(key)
    assert said in line and not re.search(rf"(?<![\w.]){removed}(?!\w)", line), line


# ----------------------------------------------------------------------- rewind keys need a type that rewinds
def rewind_cases():
    from utils.training.training_types import TRAINING_TYPES
    return [(name, key) for name, kind in TRAINING_TYPES.items() if not kind.captures_rewind
            for key in ("prune.rewind_epoch", "prune.rewind_iteration")]


@pytest.mark.parametrize("name,key", rewind_cases())
def test_a_rewind_key_for_a_type_that_does_not_rewind_is_refused(name, key):
    import harness_params
    from utils.training.training_types import get_training_type

    target = {"prune.levels": "null", "prune.target_density": "0.5"} if get_training_type(name).one_shot else {}
    with pytest.raises(harness_params.ConfigError) as refusal:
        harness_params.resolve(None, {**BASE, **target, "prune.training_type": name, key: "1"})
    assert str(refusal.value) == f"{key}=1 needs prune.training_type=wr, not {name}, which does not rewind"


def test_a_rewinding_type_takes_its_rewind_keys():
    import harness_params
    for key in ("prune.rewind_epoch", "prune.rewind_iteration"):
        assert harness_params.resolve(None, {**BASE, "prune.training_type": "wr", key: "1"})[key] == 1


def test_the_harness_refuses_rewind_epoch_with_lrr_in_one_line(tmp_path, digits):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs"))
    result = run_harness(config, "--prune.training_type=lrr", "--prune.rewind_epoch=1")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and "prune.rewind_epoch=1" in result.stderr, result.stderr
    assert "not lrr" in result.stderr and result.stdout == ""
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------- a model of one's own
def read_csv(path):
    import csv
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_an_outside_model_from_the_docs_trains_through_the_harness(tmp_path, digits, outside_code):
    code = outside_code("mynets", docs_block("# mynets.py"))
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **{
        "model.name": "mynets:small_cnn", "prune.levels": 2, "training.epochs": 1}))
    result = run_harness(config, env={"PYTHONPATH": str(code)})
    assert result.returncode == 0, result.stderr[-2000:]
    layers = {row["layer"]: row for row in read_csv(tmp_path / "runs" / "exp" / "layers.csv") if row["level"] == "1"}
    # The conv and the linear layer, built for digits: in_channels=1, image_size=8 (linear: 16 x 4 x 4 inputs).
    assert {name: int(row["numel"]) for name, row in layers.items()} == {"0": 16 * 1 * 3 * 3, "5": 10 * 16 * 4 * 4}
    assert sum(int(row["alive"]) for row in layers.values()) == round(0.8 * (16 * 9 + 10 * 256))


def test_a_factory_gets_the_keywords_it_names_and_every_conv_linear_attention_weight_is_pruned(outside_code):
    from utils.models.mask_layers import masked_layers
    from utils.models.registry import get_model

    outside_code("mynets", docs_block("# mynets.py"))
    outside_code("othernets", '''
from torch import nn


def only_classes(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))


class Mixed(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.line = nn.Conv1d(4, 4, 1)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        tokens = self.line(self.stem(x).flatten(2)).transpose(1, 2)
        tokens = self.norm(self.attention(tokens, tokens, tokens)[0])
        return self.head(tokens.mean(1))
''')
    only = get_model("othernets:only_classes", num_classes=10, in_channels=1, image_size=8)  # not given the others
    assert [name for name, _ in masked_layers(prepare_model(only))] == ["1"]
    assert [name for name, _ in masked_layers(prepare_model(get_model("mynets:small_cnn", num_classes=10, in_channels=1,
                                                                       image_size=8), exclude=["5"]))] == ["0"]
    mixed = prepare_model(get_model("othernets:Mixed", num_classes=3, in_channels=1, image_size=8))
    assert sorted(name for name, _ in masked_layers(mixed)) == ["attention.in_proj", "attention.out_proj", "head", "stem"]
