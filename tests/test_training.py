"""utils/training/step.py on its own: the step, the epoch with callbacks, mixed precision on CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from utils.core.callbacks import Callback
from utils.models import mask_layers
from utils.training.step import EpochState, TrainingStep, evaluate, train_epoch


class _Schedule:
    def __init__(self):
        self.lr, self.steps = 0.1, 0

    def step(self):
        self.steps += 1


def _model_and_batches(seed=0, n=6):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10))
    mask_layers.prepare_model(model)
    keep = {name: torch.rand(layer.weight.shape) < 0.3 for name, layer in mask_layers.masked_layers(model)}
    mask_layers.set_masks(model, keep)
    batches = [(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))) for _ in range(n)]
    return model, keep, batches


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_on_cpu_keep_pruned_weights_zero(precision):
    """The bf16 and fp16 (GradScaler) paths of the step, on the CPU where torch's autocast has them."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model, keep, batches = _model_and_batches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    step = TrainingStep(model, model, optimizer, _Schedule(), scaler, dtype, grad_clip=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = EpochState(epoch=0, total_batches=len(batches), lr_at_start=0.1)
    train_epoch(step, batches, state)
    loss_sum, correct, count = state.sums.tolist()
    assert count == 16 * len(batches) and torch.isfinite(torch.tensor(loss_sum))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()), "the model trained"
    for name, layer in mask_layers.masked_layers(model):
        assert torch.count_nonzero(layer.weight.detach()[~keep[name]]) == 0
    assert step.schedule.steps == len(batches)
    loss, correct, count = evaluate(model, batches, autocast_dtype=dtype)
    assert count == 16 * len(batches) and model.training  # evaluate restores the mode it found


def test_a_callback_can_stop_an_epoch_but_not_at_its_last_batch():
    model, _, batches = _model_and_batches(n=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainingStep(model, model, optimizer, _Schedule())

    class StopAt(Callback):
        def __init__(self, at):
            self.at, self.seen = at, []

        def on_step_end(self, state):
            self.seen.append(state.batches_done)
            if state.batches_done == self.at:
                state.stop = True

    early = StopAt(2)
    state = train_epoch(step, batches, EpochState(epoch=0, total_batches=4, lr_at_start=0.1), [early])
    assert state.stopped and state.batches_done == 2 and early.seen == [1, 2]
    last = StopAt(4)
    state = train_epoch(step, batches, EpochState(epoch=1, total_batches=4, lr_at_start=0.1), [last])
    assert not state.stopped and state.batches_done == 4
    assert state.steady_images_per_s(64) is not None
