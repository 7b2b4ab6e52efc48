"""Pruning: score functions x allocation rules -> masks, density schedules, and a CLI.

Semantics (docs/science.md and the README's "Pruning" section say the same for users):

* Prunable weights are the ``weight`` of every masked layer (``utils.mask_layers``);
  excluded layers are not masked layers, so they are out of every count.  ``density`` is
  always a fraction of ALL prunable weights, never of the remaining ones.
* ``compute_masks`` keeps exactly ``target_keep_count(density, N) = round(density * N)``
  weights (Python ``round``), and its result is a subset of the current masks: weights
  already pruned score ``-inf`` and are never candidates, whatever their score or value.
* A criterion (registry ``SCORES``; config key ``prune.criterion``) scores every weight;
  an allocation (registry ``ALLOCATIONS``; ``prune.allocation``) decides how many weights
  each layer keeps and picks them by score.  Any criterion works with any allocation.
* A criterion's entry (``Criterion``) says what it needs: training batches
  (``needs_batches``: snip), the shape of an input (``needs_input_shape``: synflow), rounds
  (``iterative``: synflow).  Callers ask the entry, never the name.
* One procedure, ``compute_masks``, for the three kinds of target: a density shared by an
  allocation, per-layer counts (``prune.layer_rates``) and N:M groups (``utils.nm_sparsity``).

Scores (bigger = more important):

``magnitude``  |w|.
``random``     i.i.d. U(0, 1) in float64 from a CPU ``torch.Generator`` seeded with
               ``seed``, drawn layer by layer in module order: the same on every rank,
               device and run for the same seed (float64 so ties are practically
               impossible even on ResNet-50's 25 M weights; float32 ``rand`` has only 2**24
               distinct values).
``snip``       |dL/dw * w| (Lee et al. 2019), the loss gradient taken on the masked model.
               Mode: **eval mode** by default (BatchNorm with its running statistics,
               dropout off), as both reference implementations score (the SNIP authors'
               and the SynFlow authors'); ``snip_mode="train"`` scores with batch
               statistics instead (dropout still off, so the score stays a deterministic
               function of the batches).  The two disagree a lot: on ResNet-20 and VGG-16
               at 5% only about a fifth of the kept weights are the same.  With ``num_batches > 1`` the
               gradients of the batches are summed before taking |.|: SNIP on one larger
               minibatch (as the SynFlow authors' SNIP does); ``num_batches=1`` is the
               paper's definition.  Each rank must see the same batches for its masks to
               match the others'.
``synflow``    |dR/dw * w| with R = sum(model(ones(1, *input_shape))) (Tanaka et al. 2020),
               every floating-point parameter AND buffer replaced by its absolute value (as
               the authors' ``linearize`` does to the whole state_dict), eval mode
               (BatchNorm uses running statistics), float64 except on MPS.  Iterative:
               ``synflow_iterations`` rounds, round k keeping the density
               d_k = d_start * (d_target / d_start) ** (k / K), each round re-scoring the
               model with the previous round's mask applied.

The model is never modified by scoring: snip and synflow run ``torch.func.functional_call``
on detached copies of the parameters and buffers (so BatchNorm running statistics, weight
signs, ``.grad`` and ``requires_grad`` are untouched), and train/eval flags are restored
module by module afterwards.

Allocations (how many weights each layer keeps):

``global``     one ranking of all prunable weights together; keep the top
               round(density * N).
``uniform``    every layer the same density: layer l's share is density * numel_l.
``erk``        Erdos-Renyi-Kernel (Evci et al. 2020, RigL): layer l's density is
               eps * sum(shape_l) / prod(shape_l) (kernel dims included for conv; for a
               linear layer (n_in + n_out) / (n_in * n_out)), eps solved so the kept total is
               the target.
``balanced``   every layer keeps the same number of weights k.

For the three per-layer rules the real-valued shares are share_l = t * w_l (w_l = numel_l,
sum(shape_l), 1 respectively) with one scale t for all layers.  A layer whose share
would exceed its capacity (weights alive now: the whole layer when dense, less after
earlier levels, because masks only shrink) keeps all it has, and t is re-solved over the
remaining layers, repeatedly (water-filling; for ERK on dense masks this is RigL's
"make the densest layer dense and re-solve eps" loop, and it ends at the same set of dense
layers because t only grows as layers are capped).  The real shares are turned into
integer counts by largest-remainder apportionment: every layer gets floor(share_l), and
the weights still missing to reach the exact total go one each to the layers with the
largest fractional parts (ties: earlier layer in module order first), never above a
layer's capacity.  So every layer is within one weight of its exact share, and the total
is exact.  (For ``uniform`` this can differ from rounding each layer separately by one
weight in some layers; per-layer rounding alone would miss the total.)  For ``balanced``
all fractional parts are equal, so the remainder goes to the first layers in module order.

Within a layer (or, for ``global``, within the concatenation of all layers in module
order) the allocated count is filled by top score.  Ties at the cut are broken by
position: the lowest flat index wins.  The count is therefore exact even when every
score is equal, and the result is the same on every device (``torch.topk`` promises
neither about ties).  The k-th largest score is found by ``torch.kthvalue`` on a narrow
band of candidates located with a strided sample (an exact method: it falls back to
``kthvalue`` on everything when the band misses), which is what makes global pruning of
ResNet-50 take a fraction of a second on CPU (``bench/pruning_speed.py``).

Command line: ``python -m utils.pruning_utils --config FILE --checkpoint CKPT --density D
--out MASKS.pt`` (``utils/pruning_cli.py``): a level's masks for a checkpoint, as the harness
computes them.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import sys
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

from utils import nm_sparsity
from utils.user_code import UserCodeError, import_callable, import_object, is_import_path
from utils.mask_layers import Masks, masked_layers, set_masks, validate_masks

Scores = Dict[str, torch.Tensor]  # layer name -> float tensor shaped like the weight

# --------------------------------------------------------------------------------------
# Densities and counts
# --------------------------------------------------------------------------------------


def target_keep_count(density: float, total: int) -> int:
    """Number of weights kept at ``density`` out of ``total``: the target rounded (``round``)."""
    return int(round(density * total))


def level_density(level: int, rate: float) -> float:
    """Target density of level ``level`` of an iterative run removing ``rate`` per level."""
    if level < 0:
        raise ValueError(f"level must be >= 0, got {level}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    return (1.0 - rate) ** level


# Relative slack when comparing a level's density with target_density: 0.8 ** 3 is
# 0.5120000000000001 in floating point and must count as reaching a target of 0.512.
_DENSITY_RELATIVE_TOLERANCE = 1e-9


def iterative_densities(rate: float, levels: Optional[int] = None,
                        target_density: Optional[float] = None) -> List[float]:
    """Target densities of levels 0, 1, ... (level 0 is dense, 1.0).

    ``levels``: that many levels (level 0 included).  ``target_density``: stop at the first
    level whose density is at or below it.  Both: whichever comes first.
    """
    if levels is None and target_density is None:
        raise ValueError("iterative_densities needs levels or target_density")
    if levels is not None and levels < 1:
        raise ValueError(f"levels must be >= 1 (level 0 is the dense level), got {levels}")
    if target_density is not None:
        if not 0.0 < target_density <= 1.0:
            raise ValueError(f"target_density must be in (0, 1], got {target_density}")
        if rate <= 0.0 and target_density < 1.0:
            raise ValueError(f"rate {rate} never reaches target_density {target_density}")
    densities: List[float] = []
    for level in itertools.count():
        if levels is not None and level >= levels:
            break
        density = level_density(level, rate)
        densities.append(density)
        if target_density is not None and density <= target_density * (1 + _DENSITY_RELATIVE_TOLERANCE):
            break
    return densities


def synflow_density_schedule(start: float, target: float, iterations: int) -> List[float]:
    """Densities of SynFlow's rounds 1..K: start * (target / start) ** (k / K); the last is target."""
    if iterations < 1:
        raise ValueError(f"synflow iterations must be >= 1, got {iterations}")
    if not 0.0 < target <= start <= 1.0:
        raise ValueError(f"synflow schedule needs 0 < target <= start <= 1, got start={start}, target={target}")
    schedule = [start * (target / start) ** (k / iterations) for k in range(1, iterations + 1)]
    schedule[-1] = target  # exact, not start * (target/start) ** 1.0 with its rounding error
    return schedule


# --------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------


def _lookup(registry: Mapping[str, Any], kind: str, name: str) -> Any:
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(registry))}") from None


@dataclasses.dataclass
class ScoringInputs:
    """Everything a score function may use besides the current masks (plain arguments only).

    The callers (``compute_masks``, and through it the harness and ``python -m
    utils.pruning_utils``) fill every field; a criterion reads the ones its registry entry
    says it needs (``Criterion.needs_batches``, ``needs_input_shape``) and may ignore the rest.
    """

    # The prepared model (``mask_layers.prepare_model``): its masked layers are the prunable
    # weights, its pruned weights are zero.  Read it, never modify it (score copies, as snip
    # and synflow do with ``torch.func.functional_call``); its train/eval flags are restored
    # by the scoring functions that change them.
    model: nn.Module
    # Where the returned score tensors must live (and where the model is; ``compute_masks``'
    # ``device`` argument, the run's device in the harness).
    device: torch.device
    # Training batches: an iterable of (inputs, labels) on any device (move them with
    # ``.to(device)``).  The harness and the pruning command give them to a criterion whose
    # entry needs batches (``needs_batches``): the training data of level L in a fixed order
    # (loader epoch ``SCORE_EPOCH_OFFSET + L``, world size 1), so every rank and the command
    # see the same batches.  None for the others.
    batches: Optional[Iterable] = None
    # The loss of a batch, ``loss_fn(outputs, labels)``; None: cross-entropy (the harness
    # passes ``torch.nn.functional.cross_entropy``).
    loss_fn: Optional[Callable] = None
    # How many of ``batches`` a criterion uses (``prune.score_batches``, >= 1): snip sums the
    # gradients of exactly this many and refuses an iterable that runs out first.
    num_batches: int = 1
    # (C, H, W) of one input: the data's channels and training resolution.  A criterion whose
    # entry needs it (``needs_input_shape``, e.g. synflow's all-ones input) gets it; given to all.
    input_shape: Optional[Tuple[int, ...]] = None
    # The level's seed (``level_seed(experiment.seed, level)``): draw random numbers from a
    # ``torch.Generator`` seeded with it, so every rank, device and rerun draws the same.
    seed: int = 0
    # BatchNorm while snip scores: "eval" (running statistics) or "train" (batch statistics);
    # ``prune.snip_mode``.  Dropout is off either way.
    snip_mode: str = "eval"
    # Scratch space shared by the rounds of one ``compute_masks`` call (an iterative criterion
    # keeps what every round reuses here: synflow its absolute-valued float64 parameters).
    cache: Dict[str, Any] = dataclasses.field(default_factory=dict)


# A score function returns FRESH tensors (callers fill pruned entries with -inf in place),
# on inputs.device, shaped like each masked layer's weight.  NaN scores rank lowest.
ScoreFn = Callable[[ScoringInputs, Masks], Scores]

# What a criterion can need from its caller, and the attribute of an outside score function
# (``package.module:function``) that declares each need, with its value when undeclared.
NEEDS = {"needs_batches": True, "needs_input_shape": False, "iterative": False}


@dataclasses.dataclass(frozen=True)
class Criterion:
    """A registry entry: the score function and what it needs.  The harness and the pruning
    command ask these fields (never the criterion's name) what to prepare."""

    score: ScoreFn
    # Rounds: re-score the masked model over ``synflow_density_schedule`` (SynFlow), each
    # round keeping a smaller share; False: one scoring.
    iterative: bool = False
    # Training batches (``ScoringInputs.batches``, ``num_batches`` of them, ``loss_fn``).
    needs_batches: bool = False
    # The shape of one input (``ScoringInputs.input_shape``).
    needs_input_shape: bool = False

    def needs(self) -> List[str]:
        """Its needs in words (for messages and docs): batches, input shape, rounds."""
        return [word for word, flag in (("batches", self.needs_batches), ("input shape", self.needs_input_shape),
                                        ("rounds", self.iterative)) if flag]


def _weights_by_layer(model: nn.Module) -> Dict[str, str]:
    """layer name -> fully qualified parameter name of its weight (functional_call keys)."""
    return {name: f"{name}.weight" if name else "weight" for name, _ in masked_layers(model)}


def _detached_state(model: nn.Module, device: torch.device) -> Dict[str, torch.Tensor]:
    """Parameters (detached) and buffers (cloned: train-mode BatchNorm writes them) on ``device``."""
    state = {name: p.detach().to(device) for name, p in model.named_parameters()}
    state.update({name: b.detach().to(device, copy=True) for name, b in model.named_buffers()})
    return state


class _ScoringMode:
    """Set train/eval for scoring; restore every module's own flag afterwards."""

    def __init__(self, model: nn.Module, train: bool):
        self.model, self.train = model, train

    def __enter__(self):
        self.flags = [(module, module.training) for module in self.model.modules()]
        self.model.train(self.train)
        if self.train:  # deterministic scores: no dropout noise (see module docstring)
            for module in self.model.modules():
                if isinstance(module, nn.modules.dropout._DropoutNd):
                    module.eval()
        return self

    def __exit__(self, *exc):
        for module, flag in self.flags:
            module.training = flag
        return False


def magnitude_scores(inputs: ScoringInputs, masks: Masks) -> Scores:
    return {name: layer.weight.detach().to(inputs.device).abs()
            for name, layer in masked_layers(inputs.model)}


def random_scores(inputs: ScoringInputs, masks: Masks) -> Scores:
    generator = torch.Generator(device="cpu").manual_seed(int(inputs.seed))
    return {name: torch.rand(layer.weight.shape, generator=generator, dtype=torch.float64).to(inputs.device)
            for name, layer in masked_layers(inputs.model)}


SNIP_MODES = ("eval", "train")
# The data order of a criterion's batches at level L is the training loader's order of "epoch"
# SCORE_EPOCH_OFFSET + L, with world size 1: an epoch id disjoint from the training epochs, the
# same global batches on every rank and in the pruning command.
SCORE_EPOCH_OFFSET = 1_000_000


def level_seed(seed: int, level: int) -> int:
    """The seed of a level's scores (random criterion): the harness's and the CLI's."""
    return seed * 1000 + level


def snip_scores(inputs: ScoringInputs, masks: Masks) -> Scores:
    if inputs.batches is None:
        raise ValueError("criterion 'snip' needs batches (an iterable of (x, y))")
    if inputs.num_batches < 1:
        raise ValueError(f"snip num_batches must be >= 1, got {inputs.num_batches}")
    model, device = inputs.model, inputs.device
    loss_fn = inputs.loss_fn or nn.functional.cross_entropy
    weight_keys = _weights_by_layer(model)
    if inputs.snip_mode not in SNIP_MODES:
        raise ValueError(f"snip mode {inputs.snip_mode!r}; valid: {', '.join(SNIP_MODES)}")
    with _ScoringMode(model, train=inputs.snip_mode == "train"):
        state = _detached_state(model, device)
        leaves = {}
        for name, key in weight_keys.items():  # the masked weight is the variable
            leaves[name] = (state[key] * masks[name]).requires_grad_(True)
            state[key] = leaves[name]
        gradient_sums = {name: torch.zeros_like(leaf) for name, leaf in leaves.items()}
        used = 0
        # range first: zip stops before drawing a batch beyond num_batches.
        for _, (x, y) in zip(range(inputs.num_batches), inputs.batches):
            loss = loss_fn(functional_call(model, state, (x.to(device),)), y.to(device))
            gradients = torch.autograd.grad(loss, list(leaves.values()))
            for name, gradient in zip(leaves, gradients):
                gradient_sums[name].add_(gradient)
            used += 1
        if used < inputs.num_batches:
            raise ValueError(f"snip asked for {inputs.num_batches} batches, the iterable gave {used}")
    return {name: (gradient_sums[name] * leaves[name].detach()).abs_() for name in leaves}


def synflow_dtype(device: torch.device) -> torch.dtype:
    """float64 (R is a product over all layers: float32 overflows on deep nets) except on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


def synflow_scores(inputs: ScoringInputs, masks: Masks) -> Scores:
    if inputs.input_shape is None:
        raise ValueError("criterion 'synflow' needs input_shape (C, H, W) of one input")
    model, device = inputs.model, inputs.device
    dtype = synflow_dtype(device)
    weight_keys = _weights_by_layer(model)
    linearized = inputs.cache.get("synflow_linearized")
    if linearized is None:  # |parameters| and |buffers| in float64, built once per compute_masks call
        linearized = {key: tensor.to(dtype).abs() if tensor.is_floating_point() else tensor
                      for key, tensor in _detached_state(model, device).items()}
        inputs.cache["synflow_linearized"] = linearized
    with _ScoringMode(model, train=False):
        state = dict(linearized)
        leaves = {}
        for name, key in weight_keys.items():
            leaves[name] = (linearized[key] * masks[name]).requires_grad_(True)
            state[key] = leaves[name]
        ones = torch.ones((1, *inputs.input_shape), dtype=dtype, device=device)
        synaptic_flow = functional_call(model, state, (ones,)).sum()
        gradients = torch.autograd.grad(synaptic_flow, list(leaves.values()))
    return {name: (gradient * leaves[name].detach()).abs_() for name, gradient in zip(leaves, gradients)}


SCORES: Dict[str, Criterion] = {
    "magnitude": Criterion(magnitude_scores),
    "random": Criterion(random_scores),
    "snip": Criterion(snip_scores, needs_batches=True),
    "synflow": Criterion(synflow_scores, iterative=True, needs_input_shape=True),
}


def get_criterion(name: str) -> Criterion:
    """A registry name, or ``package.module:function``: the user's score function (signature
    ``(inputs: ScoringInputs, masks) -> {layer name: scores}``, one shot) or a ``Criterion``."""
    if is_import_path(name):
        return user_criterion(name)
    return _lookup(SCORES, "criterion", name)


def user_criterion(path: str) -> Criterion:
    """The ``Criterion`` that ``package.module:function`` names; ValueError (one line) when it
    cannot be imported or does not take ``(inputs, masks)``.  Its scores are checked at every
    call: one float tensor per masked layer, shaped like the weight (``_checked_scores``).

    A function declares its needs with attributes (``fn.needs_batches = False``,
    ``fn.needs_input_shape = True``, ``fn.iterative = True``); undeclared, it gets training
    batches (``NEEDS``: the safe default, at the cost of a loader) and one round.  An object of
    type ``Criterion`` declares them in its fields."""
    try:
        obj = import_object(path)
    except UserCodeError as error:
        raise ValueError(str(error)) from None
    if isinstance(obj, Criterion):
        return dataclasses.replace(obj, score=_checked_score_fn(obj.score, path))
    try:
        function = import_callable(path, positional=("inputs", "masks"))
    except UserCodeError as error:
        raise ValueError(str(error)) from None
    needs = {}
    for attribute, default in NEEDS.items():
        value = getattr(function, attribute, default)
        if not isinstance(value, bool):
            raise ValueError(f"{path}.{attribute} must be True or False, got {value!r}")
        needs[attribute] = value
    return Criterion(_checked_score_fn(function, path), **needs)


def _checked_score_fn(function: ScoreFn, path: str) -> ScoreFn:
    def score(inputs: ScoringInputs, masks: Masks) -> Scores:
        return _checked_scores(function(inputs, masks), masks, path, inputs.device)

    score.__name__ = getattr(function, "__name__", "score")
    return score


def _checked_scores(scores: Any, masks: Masks, path: str, device: torch.device) -> Scores:
    """A user's scores as the allocations need them: fresh float tensors on ``device``."""
    if not isinstance(scores, Mapping):
        raise ValueError(f"criterion {path} returned a {type(scores).__name__}, not a dict layer name -> scores")
    missing, unknown = sorted(set(masks) - set(scores)), sorted(set(scores) - set(masks))
    if missing or unknown:
        raise ValueError(f"criterion {path}: scores must name exactly the masked layers "
                         f"(missing {missing[:3]}, unknown {unknown[:3]})")
    checked = {}
    for name, mask in masks.items():
        value = scores[name]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(mask.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"criterion {path}: scores for {name} are {shape}, expected a tensor {tuple(mask.shape)}")
        # A copy (callers fill pruned entries in place; the user may have returned a live weight).
        checked[name] = value.detach().to(device=device, dtype=torch.float64 if value.dtype == torch.float64
                                          else torch.float32, copy=True)
    return checked


def get_score_fn(name: str) -> ScoreFn:
    return get_criterion(name).score


# --------------------------------------------------------------------------------------
# Selecting the top k by score (exact count, deterministic ties)
# --------------------------------------------------------------------------------------

# Vectors longer than this look for the k-th value in a band found by a strided sample.
_BAND_SEARCH_MIN_NUMEL = 1 << 20
_BAND_SAMPLE_SIZE = 1 << 16
# Half-width of the band, in sample positions: 1% of the sample (about 3x the standard
# error of a sample quantile at 65 k samples is 0.6%) plus a constant for extreme quantiles.
_BAND_HALF_WIDTH_FRACTION = 0.01
_BAND_HALF_WIDTH_MIN = 64


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor (0-d tensor), 1 <= k <= numel; exact."""
    n = values.numel()
    if n >= _BAND_SEARCH_MIN_NUMEL:
        sample = values[:: max(1, n // _BAND_SAMPLE_SIZE)].sort().values
        m = sample.numel()
        position = round((n - k) / n * (m - 1))  # ascending position of the cut in the sample
        half_width = int(_BAND_HALF_WIDTH_FRACTION * m) + _BAND_HALF_WIDTH_MIN
        low, high = sample[max(0, position - half_width)], sample[min(m - 1, position + half_width)]
        above_band = int((values > high).count_nonzero())  # note: a CPU-GPU sync point
        band = values[(values >= low) & (values <= high)]
        rank_in_band = k - above_band
        if 1 <= rank_in_band <= band.numel():
            return torch.kthvalue(band, band.numel() - rank_in_band + 1).values
    return torch.kthvalue(values, n - k + 1).values


def _keep_top_k(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(keep, cut): ``keep`` has exactly k True at the k largest scores; ``cut`` is the k-th
    largest score (None when k is 0 or everything)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} weights")
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool), None
    if k == n:
        return torch.ones_like(scores, dtype=torch.bool), None
    cut = _kth_largest(flat, k)
    keep = flat >= cut
    surplus = int(keep.count_nonzero()) - k  # > 0 only when several scores equal the cut
    if surplus < 0:  # NaN scores (never >= anything) hid part of the top k: they rank lowest
        return _keep_top_k(torch.nan_to_num(scores, nan=-math.inf, posinf=math.inf, neginf=-math.inf), k)
    if surplus > 0:
        tied = (flat == cut).nonzero().squeeze(1)
        keep[tied[tied.numel() - surplus:]] = False  # drop the highest indices among ties
    return keep.view_as(scores), cut


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor (shape of ``scores``) with exactly ``k`` True: the k largest scores.

    Ties at the cut go to the lowest flat indices; NaN scores rank lowest (as -inf).
    """
    return _keep_top_k(scores, k)[0]


def keep_top_k_alive(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """Like ``keep_top_k`` among the alive entries only: pruned entries stay pruned.

    ``scores`` holds -inf at pruned entries.  When the cut is above -inf no pruned entry can
    be chosen, so the whole tensor is ranked at once (no gather of the alive entries);
    otherwise (alive scores of -inf reach the cut, or everything alive is kept) the alive
    entries are ranked alone.
    """
    keep, cut = _keep_top_k(scores, k)
    if cut is None or not bool(cut > -math.inf):
        keep = torch.zeros_like(alive)
        keep[alive] = keep_top_k(scores[alive], k)
    return keep


# --------------------------------------------------------------------------------------
# Allocations
# --------------------------------------------------------------------------------------

# A layer-share rule gives each layer a positive weight w_l; layer l's share is t * w_l.
LayerShareRule = Callable[[Mapping[str, int], Mapping[str, Tuple[int, ...]]], Dict[str, float]]


def uniform_shares(numels, shapes) -> Dict[str, float]:
    return {name: float(numels[name]) for name in numels}


def erk_densities_unscaled(shapes) -> Dict[str, float]:
    """RigL's raw ERK density per layer: sum(shape) / prod(shape) (before the scale eps)."""
    return {name: sum(shape) / math.prod(shape) for name, shape in shapes.items()}


def erk_shares(numels, shapes) -> Dict[str, float]:
    raw = erk_densities_unscaled(shapes)
    return {name: raw[name] * numels[name] for name in numels}


def balanced_shares(numels, shapes) -> Dict[str, float]:
    return {name: 1.0 for name in numels}


LAYER_SHARE_RULES: Dict[str, LayerShareRule] = {
    "uniform": uniform_shares,
    "erk": erk_shares,
    "balanced": balanced_shares,
}


def _water_fill(weights: Mapping[str, float], capacities: Mapping[str, int], total_keep: int) -> Dict[str, float]:
    """Real shares min(capacity_l, t * w_l) summing to total_keep (cap, re-solve, repeat)."""
    capped: set = set()
    scale = 0.0
    while True:
        free = [name for name in weights if name not in capped]
        budget = total_keep - sum(capacities[name] for name in capped)
        weight_sum = sum(weights[name] for name in free)
        scale = budget / weight_sum if weight_sum > 0 else 0.0
        newly_capped = [name for name in free if scale * weights[name] >= capacities[name]]
        if not newly_capped:
            break
        capped.update(newly_capped)
    return {name: float(capacities[name]) if name in capped else scale * weights[name] for name in weights}


def _apportion(shares: Mapping[str, float], capacities: Mapping[str, int], total_keep: int) -> Dict[str, int]:
    """Integer counts: floor of each share, then the remainder by largest fractional part."""
    names = list(shares)
    counts = {name: min(capacities[name], max(0, math.floor(shares[name]))) for name in names}
    order = sorted(names, key=lambda name: (-(shares[name] - math.floor(shares[name])), names.index(name)))
    missing = total_keep - sum(counts.values())
    # One pass suffices in exact arithmetic (0 <= missing < number of layers); the loop only
    # guards against floating-point error in the shares.
    while missing != 0:
        step = 1 if missing > 0 else -1
        candidates = order if step > 0 else reversed(order)
        progressed = False
        for name in candidates:
            if missing == 0:
                break
            if 0 <= counts[name] + step <= capacities[name]:
                counts[name] += step
                missing -= step
                progressed = True
        if not progressed:
            raise ValueError(f"cannot place {total_keep} weights in layers holding {sum(capacities.values())}")
    return counts


def layer_keep_counts(allocation: str, capacities: Mapping[str, int], numels: Mapping[str, int],
                      shapes: Mapping[str, Tuple[int, ...]], total_keep: int) -> Dict[str, int]:
    """Weights each layer keeps under a per-layer allocation, summing exactly to ``total_keep``.

    ``capacities``: weights alive now per layer (a count never exceeds it); ``numels`` and
    ``shapes``: of each layer's weight.  ``global`` has no per-layer rule (its counts follow
    the scores).
    """
    rule = _lookup(LAYER_SHARE_RULES, "per-layer allocation", allocation)
    if set(capacities) != set(numels) or set(numels) != set(shapes):
        raise ValueError("layer_keep_counts: capacities, numels and shapes must name the same layers")
    available = sum(capacities.values())
    if not 0 <= total_keep <= available:
        raise ValueError(f"cannot keep {total_keep} weights: {available} are alive")
    shares = _water_fill(rule(numels, shapes), capacities, total_keep)
    return _apportion(shares, capacities, total_keep)


# --------------------------------------------------------------------------------------
# Per-layer pruning rates (Frankle & Carbin 2019 prune conv layers at one rate, fully
# connected layers at another and the output layer at half the fully connected rate)
# --------------------------------------------------------------------------------------


def parse_layer_rates(items: Sequence[str]) -> List[Tuple[str, float]]:
    """``["fc*=0.2", "conv*=0.1"]`` -> ``[("fc*", 0.2), ("conv*", 0.1)]``, in the order given.

    A pattern is an fnmatch pattern of layer names (as ``prune.exclude``); a rate is the
    fraction of the layer's remaining weights removed per level, in [0, 1).  ValueError
    (one line, naming the item) otherwise, and for a pattern given twice.
    """
    if isinstance(items, str):
        items = [items]
    rules: List[Tuple[str, float]] = []
    for item in items:
        if not isinstance(item, str) or item.count("=") != 1:
            raise ValueError(f"layer rate {item!r} is not of the form pattern=rate")
        pattern, raw_rate = (part.strip() for part in item.split("="))
        try:
            rate = float(raw_rate)
        except ValueError:
            raise ValueError(f"layer rate {item!r}: {raw_rate!r} is not a number") from None
        if not pattern:
            raise ValueError(f"layer rate {item!r} has an empty layer-name pattern")
        if not 0.0 <= rate < 1.0:  # also refuses nan
            raise ValueError(f"layer rate {item!r}: the rate must be in [0, 1)")
        if pattern in (known for known, _ in rules):
            raise ValueError(f"layer rate pattern {pattern!r} is given twice")
        rules.append((pattern, rate))
    return rules


def rates_by_layer(layer_names: Sequence[str], rules: Sequence[Tuple[str, float]],
                   default_rate: float) -> Dict[str, float]:
    """Each layer's rate: the FIRST rule whose pattern matches its name, else ``default_rate``
    (``prune.rate``).  A pattern that matches no prunable layer is refused (ValueError): a
    typo must not silently leave the layers it meant at the default rate."""
    import fnmatch

    rates = {}
    for name in layer_names:
        rates[name] = next((rate for pattern, rate in rules if fnmatch.fnmatchcase(name, pattern)), default_rate)
    unused = [pattern for pattern, _ in rules if not any(fnmatch.fnmatchcase(n, pattern) for n in layer_names)]
    if unused:
        shown = ", ".join(list(layer_names)[:8]) + (", ..." if len(layer_names) > 8 else "")
        raise ValueError(f"layer rate pattern(s) {unused} match no prunable layer (layers: {shown})")
    return rates


def layer_rate_counts(numels: Mapping[str, int], rates: Mapping[str, float], level: int) -> Dict[str, int]:
    """Weights layer l keeps at ``level``: round((1 - rate_l) ** level * numel_l) (``round``).

    Non-increasing in ``level`` for every layer, so the masks of successive levels nest.
    """
    return {name: target_keep_count(level_density(level, rates[name]), numels[name]) for name in numels}


@dataclasses.dataclass(frozen=True)
class LayerRatePlan:
    """Per-layer rates of a run and what they give at each level."""

    rates: Dict[str, float]            # layer -> rate
    counts: List[Dict[str, int]]       # counts[L][layer]: weights kept at level L
    densities: List[float]             # densities[L]: kept / all prunable weights at level L (target_density)


def layer_rate_plan(model: nn.Module, layer_rates: Sequence[str], default_rate: float, levels: int) -> LayerRatePlan:
    """Levels 0 .. levels-1 of an iterative run with ``prune.layer_rates`` on ``model``
    (prepared: its masked layers are the prunable ones).  ValueError (one line) for bad rules."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    numels = {name: layer.weight.numel() for name, layer in masked_layers(model)}
    rates = rates_by_layer(list(numels), parse_layer_rates(layer_rates), default_rate)
    counts = [layer_rate_counts(numels, rates, level) for level in range(levels)]
    total = sum(numels.values())
    return LayerRatePlan(rates=rates, counts=counts, densities=[sum(c.values()) / total for c in counts])


def allocate_counts(scores: Scores, masks: Masks, counts: Mapping[str, int]) -> Masks:
    """Each layer keeps exactly ``counts[layer]`` of its alive weights, by top score."""
    return {name: keep_top_k_alive(scores[name], masks[name], counts[name]) for name in masks}


def _layer_count_schedule(alive: Mapping[str, int], targets: Mapping[str, int], rounds: int) -> List[Dict[str, int]]:
    """Per-layer counts of SynFlow's rounds: layer l follows alive_l * (target_l / alive_l) ** (k / K)
    (each layer's own exponential schedule), rounded; the last round is the target exactly."""
    schedule = []
    for k in range(1, rounds + 1):
        counts = {}
        for name, target in targets.items():
            if k == rounds or alive[name] == 0 or target == 0:
                counts[name] = target if k == rounds or target == 0 else alive[name]
            else:
                counts[name] = max(target, min(alive[name], round(alive[name] * (target / alive[name]) ** (k / rounds))))
        schedule.append(counts)
    return schedule


# An allocation turns (scores with -inf at pruned weights, current masks, total to keep)
# into new masks, a subset of the current ones with exactly total_keep weights.
AllocationFn = Callable[[Scores, Masks, int], Masks]


def allocate_global(scores: Scores, masks: Masks, total_keep: int) -> Masks:
    names = list(masks)
    flat_scores = torch.cat([scores[name].reshape(-1) for name in names])
    flat_alive = torch.cat([masks[name].reshape(-1) for name in names])
    flat_keep = keep_top_k_alive(flat_scores, flat_alive, total_keep)
    pieces = flat_keep.split([masks[name].numel() for name in names])
    return {name: piece.view(masks[name].shape) for name, piece in zip(names, pieces)}


def _per_layer_allocation(rule_name: str) -> AllocationFn:
    def allocate(scores: Scores, masks: Masks, total_keep: int) -> Masks:
        counts = layer_keep_counts(
            rule_name,
            capacities={name: int(mask.count_nonzero()) for name, mask in masks.items()},
            numels={name: mask.numel() for name, mask in masks.items()},
            shapes={name: tuple(mask.shape) for name, mask in masks.items()},
            total_keep=total_keep,
        )
        return {name: keep_top_k_alive(scores[name], masks[name], counts[name]) for name in masks}

    allocate.__name__ = f"allocate_{rule_name}"
    return allocate


ALLOCATIONS: Dict[str, AllocationFn] = {
    "global": allocate_global,
    **{name: _per_layer_allocation(name) for name in LAYER_SHARE_RULES},
}


def get_allocation(name: str) -> AllocationFn:
    return _lookup(ALLOCATIONS, "allocation", name)


# --------------------------------------------------------------------------------------
# Masks from a model
# --------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


# One round of a mask computation: (the density it is announced with to ``on_round``, or None
# for the masks' own density; the selection: scores with -inf at pruned weights and the current
# masks -> the new masks, a subset of the current ones).
Round = Tuple[Optional[float], Callable[[Scores, Masks], Masks]]


def _density_rounds(current: Masks, alive_by_layer: Mapping[str, int], density: float, allocation: str,
                    rounds: Optional[int]) -> List[Round]:
    """A density of all prunable weights, shared among layers by ``allocation``."""
    allocate = get_allocation(allocation)
    total = sum(mask.numel() for mask in current.values())
    alive = sum(alive_by_layer.values())
    if not 0.0 < density <= 1.0:  # also refuses nan
        raise ValueError(f"density must be in (0, 1], got {density}")
    keep = target_keep_count(density, total)
    if keep > alive:
        raise ValueError(f"density {density} keeps {keep} of {total} weights but only {alive} are alive "
                         f"(density {alive / total:.6g}); masks only shrink")
    schedule = synflow_density_schedule(alive / total, density, rounds) if rounds is not None else [density]
    return [(round_density, functools.partial(_allocate_total, allocate, target_keep_count(round_density, total)))
            for round_density in schedule]


def _allocate_total(allocate: AllocationFn, total_keep: int, scores: Scores, masks: Masks) -> Masks:
    return allocate(scores, masks, total_keep)


def _layer_count_rounds(current: Masks, alive: Mapping[str, int], layer_counts: Mapping[str, int], allocation: str,
                        rounds: Optional[int]) -> List[Round]:
    """Per-layer counts (``prune.layer_rates``): a layer-wise allocation with the shares given."""
    if allocation != "uniform":
        raise ValueError(f"per-layer counts (prune.layer_rates) apply to allocation 'uniform' only, not {allocation!r}")
    if set(layer_counts) != set(current):
        raise ValueError(f"layer_counts must name exactly the prunable layers "
                         f"(missing {sorted(set(current) - set(layer_counts))[:3]}, "
                         f"unknown {sorted(set(layer_counts) - set(current))[:3]})")
    for name, count in layer_counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= alive[name]:
            raise ValueError(f"layer {name} cannot keep {count!r} weights: {alive[name]} are alive; masks only shrink")
    total = sum(mask.numel() for mask in current.values())
    schedule = _layer_count_schedule(alive, layer_counts, rounds) if rounds is not None else [dict(layer_counts)]
    return [(sum(counts.values()) / total, functools.partial(_allocate_layer_counts, counts)) for counts in schedule]


def _allocate_layer_counts(counts: Mapping[str, int], scores: Scores, masks: Masks) -> Masks:
    return allocate_counts(scores, masks, counts)


def _nm_rounds(current: Masks, nm: Tuple[int, int], allocation: Optional[str], rounds: Optional[int]) -> List[Round]:
    """N:M: every group of M consecutive inputs keeps ``keep`` (``utils.nm_sparsity``)."""
    keep, group = nm
    if allocation is not None:
        raise ValueError(f"allocation {allocation!r} does not apply to N:M masks (every group keeps its own count); "
                         f"pass allocation=None")
    if isinstance(keep, bool) or not isinstance(keep, int) or not isinstance(group, int) or not 0 <= keep <= group:
        raise ValueError(f"nm=(keep, M) needs 0 <= keep <= M, got {nm!r}")
    grouped_layers = [name for name, mask in current.items() if nm_sparsity.groupable(tuple(mask.shape), group)]
    if not grouped_layers:
        raise ValueError(f"no prunable layer has an input size that is a multiple of {group}")
    alive = max(int(nm_sparsity.group_counts(current[name], group).max()) for name in grouped_layers)
    try:
        counts = nm_sparsity.round_keeps(alive, keep, 1 if rounds is None else rounds)
    except nm_sparsity.NMError as error:
        raise ValueError(str(error)) from None
    return [(None, functools.partial(_keep_in_groups, grouped_layers, count, group)) for count in counts]


def _keep_in_groups(layers: Sequence[str], keep: int, group: int, scores: Scores, masks: Masks) -> Masks:
    selected = dict(masks)  # layers without groups stay as they are
    for name in layers:
        try:
            selected[name] = nm_sparsity.keep_in_groups(scores[name], masks[name], keep, group)
        except nm_sparsity.NMError as error:
            raise ValueError(f"layer {name}: {error}") from None
    return selected


def compute_masks(model: nn.Module, *, density: Optional[float] = None, criterion: str,
                  allocation: Optional[str] = None, masks: Optional[Masks] = None, batches: Optional[Iterable] = None,
                  loss_fn: Optional[Callable] = None, num_batches: int = 1,
                  synflow_iterations: int = 100, input_shape: Optional[Sequence[int]] = None,
                  seed: int = 0, device=None, snip_mode: str = "eval",
                  on_round: Optional[Callable[[int, float, Masks], None]] = None,
                  layer_counts: Optional[Mapping[str, int]] = None,
                  nm: Optional[Tuple[int, int]] = None) -> Masks:
    """New masks (CPU bool tensors), a subset of ``masks`` (default: the model's current masks).

    The target is exactly one of:

    * ``density``: keep exactly round(density * N) of the N prunable weights, shared among the
      layers by ``allocation`` (``ALLOCATIONS``);
    * ``layer_counts`` (per-layer pruning rates, ``layer_rate_plan``): layer l keeps exactly
      ``layer_counts[l]``; only with ``allocation="uniform"`` (it IS a layer-wise allocation,
      with the shares given);
    * ``nm=(keep, M)``: every group of M consecutive inputs keeps exactly ``keep`` weights
      (``utils.nm_sparsity``); layers whose input size is not a multiple of M stay as they
      are; ``allocation`` must be None (it does not apply).

    One procedure for all three, so every option reaches each: the criterion (``SCORES`` or
    ``package.module:function``) scores the masked model from one ``ScoringInputs`` (batches,
    ``num_batches``, ``loss_fn``, ``input_shape``, ``seed``, ``snip_mode``); weights already
    pruned score -inf and are never kept; an iterative criterion (SynFlow) re-scores over
    ``synflow_iterations`` rounds (exponential in the density; per layer with layer_counts;
    per group with nm).  ``on_round(k, density_k, masks_k)`` is called after each round.

    The model's weights, buffers, gradients and train/eval flags are left as they were.
    ``device``: where scoring runs (default: the model's).
    """
    spec = get_criterion(criterion)
    if spec.iterative and synflow_iterations < 1:
        raise ValueError(f"synflow iterations must be >= 1, got {synflow_iterations}")
    if sum(target is not None for target in (density, layer_counts, nm)) != 1:
        raise ValueError("compute_masks needs exactly one of density and layer_counts and nm")
    # The model's own buffers are only read (selections build new tensors): no copy.
    current = {name: layer.mask for name, layer in masked_layers(model)} if masks is None else masks
    validate_masks(model, current)
    device = torch.device(device) if device is not None else _model_device(model)
    current = {name: mask.to(device=device, dtype=torch.bool) for name, mask in current.items()}
    rounds = synflow_iterations if spec.iterative else None  # None: one scoring
    alive = {name: int(mask.count_nonzero()) for name, mask in current.items()}  # note: one pass over the masks
    if nm is not None:
        plan = _nm_rounds(current, tuple(nm), allocation, rounds)
    else:
        get_allocation(allocation)  # an unknown name is refused before any scoring
        plan = (_density_rounds(current, alive, density, allocation, rounds) if density is not None
                else _layer_count_rounds(current, alive, layer_counts, allocation, rounds))
    inputs = ScoringInputs(model=model, device=device, batches=batches, loss_fn=loss_fn,
                           num_batches=num_batches, seed=seed, snip_mode=snip_mode,
                           input_shape=tuple(input_shape) if input_shape is not None else None)
    total = sum(mask.numel() for mask in current.values())
    # Layers that may hold pruned weights: those with any before the first round, every layer
    # after it (a pass over a dense layer's mask to find out would cost what the fill costs).
    holding_pruned = [name for name, mask in current.items() if alive[name] < mask.numel()]
    for round_index, (round_density, select) in enumerate(plan, start=1):
        scores = spec.score(inputs, current)
        for name in holding_pruned:
            scores[name].masked_fill_(~current[name], -math.inf)
        current = select(scores, current)
        holding_pruned = list(current)
        if on_round is not None:
            if round_density is None:
                round_density = sum(int(mask.count_nonzero()) for mask in current.values()) / total
            on_round(round_index, round_density, current)
    return {name: mask.to("cpu") for name, mask in current.items()}


def prune_model(model: nn.Module, **kwargs) -> Masks:
    """``compute_masks(model, **kwargs)``, then install the masks (zeroing pruned weights)."""
    new_masks = compute_masks(model, **kwargs)
    set_masks(model, new_masks)
    return new_masks


# --------------------------------------------------------------------------------------
# The pruning command lives in utils/pruning_cli.py (an entry point: it reads the config through
# the harness's loader); ``python -m utils.pruning_utils`` runs it.
# --------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m utils.pruning_utils ...``: the pruning command (``utils.pruning_cli.main``)."""
    from utils.pruning_cli import main as command

    return command(argv)


if __name__ == "__main__":
    sys.exit(main())
