"""LR schedules: exact values, warmup, and that the position is one integer (rewindable)."""

import pytest
import torch

from utils.training.schedulers import LRSchedule, ScheduleError, ScheduleSpec, lr_factor, schedule_names


def spec(name, **kw):
    base = dict(epochs=10, iterations_per_epoch=4)
    base.update(kw)
    return ScheduleSpec(name=name, **base)


def test_registry_names():
    assert schedule_names() == sorted(["constant", "step", "multistep", "cosine", "linear", "triangular"])


def test_constant_and_step_and_multistep():
    assert all(lr_factor(spec("constant"), i) == 1.0 for i in range(40))
    s = spec("step", step_size=3, gamma=0.5)
    assert [lr_factor(s, e * 4) for e in (0, 2, 3, 5, 6, 9)] == [1, 1, 0.5, 0.5, 0.25, 0.125]
    m = spec("multistep", milestones=(5, 8), gamma=0.1)
    assert lr_factor(m, 4 * 5 - 1) == 1.0
    assert lr_factor(m, 4 * 5) == pytest.approx(0.1)
    assert lr_factor(m, 4 * 8) == pytest.approx(0.01)


def test_cosine_and_linear_endpoints():
    c = spec("cosine", final_factor=0.0)
    assert lr_factor(c, 0) == 1.0
    assert lr_factor(c, 20) == pytest.approx(0.5)  # halfway: cos(pi/2)
    assert lr_factor(c, 40) == pytest.approx(0.0, abs=1e-12)
    lin = spec("linear", final_factor=0.1)
    assert lr_factor(lin, 20) == pytest.approx(0.55)


def test_triangular_peaks_at_peak_epoch():
    t = spec("triangular", peak_epoch=2, final_factor=0.0)
    values = [lr_factor(t, i) for i in range(41)]
    assert max(values) == pytest.approx(1.0)
    assert values.index(max(values)) == 8  # epoch 2 x 4 iterations
    assert values[0] == 0.0 and values[40] == pytest.approx(0.0)


def test_warmup_is_linear_and_reaches_schedule():
    w = spec("constant", warmup_epochs=2, warmup_start_factor=0.0)
    assert [lr_factor(w, i) for i in range(9)] == pytest.approx([1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 1, 1])


def test_lr_schedule_sets_and_restores_position():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.4)
    s = LRSchedule(opt, spec("multistep", milestones=(1,), gamma=0.1))
    for _ in range(5):
        s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.04)
    saved = s.state_dict()
    fresh_opt = torch.optim.SGD([param], lr=0.4)
    fresh = LRSchedule(fresh_opt, s.spec)
    assert fresh.lr == pytest.approx(0.4)
    fresh.load_state_dict(saved)
    assert fresh.lr == pytest.approx(0.04) and fresh.iteration == 5


def test_unknown_schedule_lists_names():
    with pytest.raises(ScheduleError, match="cosine"):
        lr_factor(spec("bogus"), 0)
