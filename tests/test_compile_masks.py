"""torch.compile with masks (training.compile=true): trains, survives mask changes between levels
without recompiling, evaluates, and the bare model's state_dict round-trips.

The harness compiles a wrapper (``train_model = torch.compile(model)``) and checkpoints the bare
``model``; ``apply_masks_`` runs eagerly after each optimizer step on the bare model's tensors,
which the compiled module shares.

Each test runs on two backends: ``aot_eager`` (dynamo's graph capture, guards and recompilation
logic plus AOT autograd, no code generation: seconds) in the default run, and ``inductor`` (what
``torch.compile`` uses by default; C++ code generation on CPU, 1-3 minutes cold on a busy 2-core
machine) marked slow: ``RUN_SLOW=1 pytest tests/test_compile_masks.py``.  Recompilation is a
dynamo matter (guards), so the fast run already pins it.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from utils.models import mask_layers
from utils.training.schedulers import LRSchedule, ScheduleSpec
from utils.training.step import EpochState, TrainingStep, evaluate, train_epoch


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def graphs_compiled() -> int:
    """Graphs dynamo has handed to the backend since the last reset (each recompilation adds one)."""
    return int(counters["stats"]["unique_graphs"])


def random_masks(model, density, seed):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(mask.shape, generator=generator) < density
            for name, mask in mask_layers.get_masks(model).items()}


def assert_pruned_are_zero(model):
    for name, layer in mask_layers.masked_layers(model):
        assert bool((layer.weight[~layer.mask] == 0).all()), name


@pytest.fixture(scope="module", params=["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def run(request):
    """Three levels of IMP-like training through a compiled wrapper; records what the tests check."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = mask_layers.prepare_model(SmallNet())
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model, backend=request.param)
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator))
            for _ in range(3)]
    record = {"graphs_after_level": [], "eval": [], "masks": []}
    density = 1.0
    for level in range(3):
        if level > 0:
            density *= 0.5
            masks = random_masks(model, density, seed=level)
            previous = mask_layers.get_masks(model)
            masks = {n: m & previous[n] for n, m in masks.items()}          # only shrink
            state = dict(initial)
            state.update({f"{n}.mask": m for n, m in masks.items()})
            model.load_state_dict(state)                                    # rewind (in place)
            mask_layers.set_masks(model, masks)
        record["masks"].append(mask_layers.get_masks(model))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        schedule = LRSchedule(optimizer, ScheduleSpec(name="cosine", epochs=2, iterations_per_epoch=len(data)))
        step = TrainingStep(train_model=compiled, model=model, optimizer=optimizer, schedule=schedule)
        for epoch in range(2):
            state = train_epoch(step, data, EpochState(epoch=epoch, total_batches=len(data), lr_at_start=schedule.lr))
            assert_pruned_are_zero(model)
            record["eval"].append(evaluate(compiled, data))
        record["graphs_after_level"].append(graphs_compiled())
        record.setdefault("train_sums", []).append(state.sums.tolist())
    record.update(model=model, compiled=compiled, data=data)
    return record


def test_compiled_masked_model_trains_and_keeps_pruned_weights_zero(run):
    model = run["model"]
    assert_pruned_are_zero(model)
    assert mask_layers.overall_density(model) == pytest.approx(0.5 * 0.25, abs=0.04)   # two random halvings
    for loss_sum, correct, count in run["train_sums"]:
        assert count == 48 and loss_sum == loss_sum and loss_sum < 48 * 10     # finite, sane
    assert run["masks"][2]["fc"].sum() < run["masks"][0]["fc"].sum()


def test_mask_changes_between_levels_do_not_recompile(run):
    graphs = run["graphs_after_level"]
    assert graphs[0] >= 1                       # something was compiled (train and eval graphs)
    assert graphs[1] == graphs[0] and graphs[2] == graphs[0], graphs


def test_compiled_evaluation_matches_eager(run):
    model, compiled, data = run["model"], run["compiled"], run["data"]
    eager = evaluate(model, data)
    with_compile = evaluate(compiled, data)
    assert eager[2] == with_compile[2] == 48
    assert with_compile[0] == pytest.approx(eager[0], rel=1e-4, abs=1e-4)
    assert abs(with_compile[1] - eager[1]) <= 1   # argmax ties may flip one sample at most


def test_bare_state_dict_round_trips_and_compiled_keys_carry_the_prefix(run):
    model, compiled, data = run["model"], run["compiled"], run["data"]
    bare_keys = list(model.state_dict())
    compiled_keys = list(compiled.state_dict())
    assert compiled_keys == [f"_orig_mod.{k}" for k in bare_keys]    # why the harness saves the bare model
    assert any(k.endswith(".mask") for k in bare_keys)
    fresh = mask_layers.prepare_model(SmallNet())
    fresh.load_state_dict(model.state_dict())                        # strict: same keys
    assert mask_layers.masks_checksum(mask_layers.get_masks(fresh)) == \
        mask_layers.masks_checksum(mask_layers.get_masks(model))
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(data[0][0]), compiled(data[0][0]), atol=1e-5)
    # a compiled module's state_dict loads into the bare model once the prefix is stripped
    stripped = {k.removeprefix("_orig_mod."): v for k, v in compiled.state_dict().items()}
    fresh.load_state_dict(stripped)
    model.train()
