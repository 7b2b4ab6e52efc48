"""Stability to SGD noise: the error barrier on the linear path between two trained networks
(linear mode connectivity, Frankle et al. 2020; docs/design.md section 9).

Two copies of one level's start state train with different data orders, giving networks
A and B with the same masks.  For alpha in ``points`` evenly spaced values 0, ..., 1 (end
points included) the network ``(1 - alpha) * A + alpha * B`` is evaluated on the test set:

* every floating-point parameter and buffer is interpolated; integer buffers
  (``num_batches_tracked``) and the masks are taken from A (the masks must be equal);
  pruned weights are exactly zero in A and B, hence on the whole path (and the masks are
  applied again after loading, so they stay zero whatever the inputs);
* BatchNorm statistics of an interpolated network are not an interpolation of anything
  meaningful, so they are re-estimated at each interior point: running statistics reset,
  ``momentum=None`` (a cumulative average: with equal batch sizes, exactly the mean of
  the per-batch statistics), forward passes in train mode over ``bn_batches`` training
  batches without gradients, every other module (e.g. dropout) in eval mode;
* the END points are evaluated with the networks' OWN statistics by default
  (``reestimate_endpoints=False``): the path then starts and ends at exactly the test
  loss/accuracy each network reports by itself.  ``reestimate_endpoints=True`` re-estimates
  there too, so that all points are measured the same way (then two identical networks
  give a barrier of exactly 0 with BatchNorm too; with own statistics at the ends, a small
  difference between running and re-estimated statistics can show up as a barrier).
  Networks without BatchNorm are unaffected by the choice and draw no training batches.

Instability (the error barrier), in percentage points:
``max over the path of the test error - (error(A) + error(B)) / 2``, error = 100 - accuracy.
It is >= 0 (the maximum includes the end points); ~0 means A and B are linearly connected.

Plain arguments throughout (a model template, two state dicts, batch factories); the
evaluation is ``utils.training.step.evaluate``, so distributed runs pass ``reduce`` (test
batches split across ranks) and give every rank the SAME training batches for the
re-estimation (the statistics are then identical on every rank).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from utils.core.callbacks import Callback
from utils.models.mask_layers import apply_masks_, mask_buffer_names
from utils.runs.checkpointing import model_state
from utils.training.step import autocast, evaluate

Batches = Iterable[Tuple[torch.Tensor, torch.Tensor]]
STABILITY_COLUMNS = ["level", "alpha", "test_loss", "test_acc"]


@dataclass(frozen=True)
class PathPoint:
    alpha: float
    test_loss: float
    test_acc: float          # percent
    bn_reestimated: bool

    @property
    def test_error(self) -> float:
        return 100.0 - self.test_acc


@dataclass(frozen=True)
class StabilityResult:
    points: List[PathPoint]
    instability: float       # percentage points

    def rows(self, level: int) -> List[Dict[str, float]]:
        """stability.csv rows (``STABILITY_COLUMNS``)."""
        return [{"level": level, "alpha": p.alpha, "test_loss": p.test_loss, "test_acc": p.test_acc}
                for p in self.points]


def alphas(points: int) -> List[float]:
    """``points`` evenly spaced values from 0 to 1, both included (exact 0.0 and 1.0)."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"interpolation points must be an integer >= 2, got {points!r}")
    return [0.0] + [k / (points - 1) for k in range(1, points - 1)] + [1.0]


def _mask_keys(model: nn.Module) -> set:
    return set(mask_buffer_names(model))


def check_compatible(model: nn.Module, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor]) -> None:
    """ValueError (one line) unless both states fit ``model`` and carry the same masks."""
    own = model.state_dict()
    for label, state in (("first", state_a), ("second", state_b)):
        missing, unknown = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unknown:
            raise ValueError(f"the {label} network does not fit the model (missing {missing[:3]}, unknown {unknown[:3]})")
        for key, value in own.items():
            if tuple(state[key].shape) != tuple(value.shape):
                raise ValueError(f"the {label} network's {key} is {tuple(state[key].shape)}, the model's {tuple(value.shape)}")
    for key in _mask_keys(model):
        if not torch.equal(state_a[key].to("cpu", torch.bool), state_b[key].to("cpu", torch.bool)):
            raise ValueError(f"the two networks have different masks ({key}); the path needs identical masks")


def interpolate(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                alpha: float) -> Dict[str, torch.Tensor]:
    """(1 - alpha) * a + alpha * b for floating-point entries; others (integers, bool masks) from a."""
    mixed = {}
    for key, a in state_a.items():
        b = state_b[key]
        if not a.is_floating_point() or alpha == 0.0:
            mixed[key] = a.clone()
        elif alpha == 1.0:  # exactly B, not a + 1.0 * (b - a) with its rounding
            mixed[key] = b.to(device=a.device, dtype=a.dtype, copy=True)
        else:
            mixed[key] = torch.lerp(a, b.to(device=a.device, dtype=a.dtype), alpha)
    return mixed


def load_interpolated_(model: nn.Module, state_a, state_b, alpha: float) -> nn.Module:
    """Load the network at ``alpha`` into ``model`` (in place); masks applied; -> model."""
    model.load_state_dict(interpolate(state_a, state_b, alpha))
    apply_masks_(model)
    return model


def batchnorm_modules(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_batchnorm_(model: nn.Module, batches: Batches, num_batches: int, *,
                          device: Optional[torch.device] = None,
                          autocast_dtype: Optional[torch.dtype] = None) -> int:
    """Re-estimate every BatchNorm's running statistics over ``num_batches`` training batches.

    Running statistics reset, momentum None (cumulative average), BatchNorm in train mode and
    every other module in eval mode, no gradients; every module's momentum and train/eval
    flag restored afterwards.  -> batches used (0 and nothing drawn without BatchNorm);
    ValueError when ``batches`` runs out before ``num_batches``.
    """
    norms = batchnorm_modules(model)
    if not norms:
        return 0
    if num_batches < 1:
        raise ValueError(f"BatchNorm re-estimation needs num_batches >= 1, got {num_batches}")
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    try:
        for _, (images, _labels) in zip(range(num_batches), batches):  # range first: no extra batch drawn
            if device is not None:
                images = images.to(device)
            with autocast(images.device, autocast_dtype):
                model(images)
            used += 1
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, flag in flags:
            m.training = flag
    if used < num_batches:
        raise ValueError(f"BatchNorm re-estimation asked for {num_batches} batches, the loader gave {used}")
    return used


def evaluate_path(model: nn.Module, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], *,
                  train_batches: Callable[[], Batches], test_batches: Callable[[], Batches],
                  device: Optional[torch.device] = None, points: int = 11, bn_batches: int = 20,
                  reestimate_endpoints: bool = False, autocast_dtype: Optional[torch.dtype] = None,
                  reduce: Optional[Callable[[torch.Tensor], None]] = None) -> StabilityResult:
    """Test loss/accuracy at ``points`` alphas on the path from A (alpha 0) to B (alpha 1).

    ``model``: a template with the right architecture and masked layers (its weights are not
    changed: a deep copy is used).  ``train_batches()`` / ``test_batches()``: fresh iterables
    of (images, labels) each time they are called (e.g. ``lambda: loader.batches(0)``).
    ``reduce``: sums the evaluation's (loss, correct, count) across ranks in place.
    """
    check_compatible(model, state_a, state_b)
    work = copy.deepcopy(model)
    if device is not None:
        work.to(device)
    has_bn = bool(batchnorm_modules(work))
    results = []
    for alpha in alphas(points):
        load_interpolated_(work, state_a, state_b, alpha)
        endpoint = alpha in (0.0, 1.0)
        reestimate = has_bn and (reestimate_endpoints or not endpoint)
        if reestimate:
            reestimate_batchnorm_(work, train_batches(), bn_batches, device=device, autocast_dtype=autocast_dtype)
        loss_sum, correct, count = evaluate(work, test_batches(), device=device, autocast_dtype=autocast_dtype,
                                            reduce=reduce)
        if count <= 0:
            raise ValueError("the test batches are empty")
        results.append(PathPoint(alpha=alpha, test_loss=loss_sum / count, test_acc=100.0 * correct / count,
                                 bn_reestimated=reestimate))
    return StabilityResult(points=results, instability=instability(results))


def instability(points: Sequence[PathPoint]) -> float:
    """max error on the path - mean of the end points' errors, in percentage points."""
    if len(points) < 2:
        raise ValueError("a path needs at least its two end points")
    ends = (points[0].test_error + points[-1].test_error) / 2.0
    return max(p.test_error for p in points) - ends


# ------------------------------------------------------------------ the run's analysis
@dataclass
class StabilityRun:
    """The narrow handle a run gives the analysis: what it may ask of the training, nothing more.

    ``model`` is the bare model; ``snapshot()`` its training state now (weights, optimizer,
    schedule); ``save_start(state)`` keeps a level's start state on disk (rank 0; resume reads
    it back: ``resumed_start()``); ``train_copy(start, level)`` trains a second copy from
    ``start`` with another data order and returns its weights, leaving the run as it was;
    ``sync_buffers()`` gives every rank rank 0's buffers; ``bn_batches(level)`` and
    ``test_batches()`` make batch iterators; ``log_rows(rows)`` writes stability.csv rows
    (rank 0); ``say`` prints on rank 0."""
    model: nn.Module
    snapshot: Callable[[], Dict[str, Any]]
    save_start: Callable[[Dict[str, Any]], None]
    resumed_start: Callable[[], Optional[Dict[str, Any]]]
    train_copy: Callable[[Dict[str, Any], int], Dict[str, torch.Tensor]]
    sync_buffers: Callable[[], None]
    bn_batches: Callable[[int], Batches]
    test_batches: Callable[[], Batches]
    log_rows: Callable[[List[Dict[str, Any]]], None]
    say: Callable[[str], None]
    device: torch.device
    autocast_dtype: Optional[torch.dtype] = None
    reduce: Optional[Callable] = None
    points: int = 11
    bn_batch_count: int = 20
    reestimate_endpoints: bool = False


class StabilityAnalysis(Callback):
    """analysis.stability: at each level's start the state is kept (and written, for resume);
    at its end a second copy trains from it with another data order, the test error along the
    linear path between the two goes to stability.csv and the barrier to levels.csv."""

    def __init__(self, make_run: Callable[[], StabilityRun]):
        self.make_run = make_run  # called once the run's training objects exist (at on_run_start)
        self.run: Optional[StabilityRun] = None
        self.start: Optional[Dict[str, Any]] = None

    def on_run_start(self, info) -> None:
        self.run = self.make_run()
        self.start = self.run.resumed_start()  # None on a fresh run; a resumed level's start state otherwise

    def on_level_start(self, info) -> None:
        self.start = {**self.run.snapshot(), "epoch": info.extra["start_epoch"],
                      "batches_done": info.extra["start_batch"]}
        if info.is_primary:
            self.run.save_start(self.start)

    def on_level_end(self, info) -> None:
        run = self.run
        run.sync_buffers()
        first = model_state(run.model)
        second = run.train_copy(self.start, info.level)
        result = evaluate_path(run.model, first, second, train_batches=lambda: run.bn_batches(info.level),
                               test_batches=run.test_batches, device=run.device, points=run.points,
                               bn_batches=run.bn_batch_count, reestimate_endpoints=run.reestimate_endpoints,
                               autocast_dtype=run.autocast_dtype, reduce=run.reduce)
        info.row["instability"] = result.instability
        if info.is_primary:
            run.log_rows(result.rows(info.level))
        run.say(f"level {info.level}: instability {result.instability:.2f} points "
                f"(error barrier on the path between two copies)")
