"""Criteria: what each weight (or channel) scores, one registry ``SCORES`` (``prune.criterion``).

A criterion's entry (``Criterion``) says what it scores and what it needs: per-weight scores
(``score``) and/or per-channel scores (``score_channels``: the channel structure ranks
channels by these), training batches (``needs_batches``: snip), the shape of an input
(``needs_input_shape``: synflow), rounds (``iterative``: synflow).  Callers ask the entry,
never the name.  ``package.module:function`` adds an outside per-weight criterion.

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
``grasp``      theta * (H g) (Wang et al. 2020): MINUS the paper's score S = -theta * (H g), whose
               highest the paper removes (bigger = kept here), with the authors' temperature
               (logits / 200) and H g a second backward through g (both summed over the
               batches); eval mode, as snip.  docs/design.md, "GraSP", says what differs from
               the authors' code.

The model is never modified by scoring: snip, synflow and grasp run ``torch.func.functional_call``
on detached copies of the parameters and buffers (so BatchNorm running statistics, weight
signs, ``.grad`` and ``requires_grad`` are untouched), and train/eval flags are restored
module by module afterwards."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from utils.core.registry import lookup
from utils.core.user_code import UserCodeError, import_callable, import_object, is_import_path
from utils.models.mask_layers import Masks, masked_layers
from utils.pruning.channel_graph import ChannelGroup, ChannelStructure, Member, StructureError

Scores = Dict[str, torch.Tensor]  # layer name -> float tensor shaped like the weight


# --------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------



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


# A score function returns FRESH tensors (callers fill pruned entries with -inf in place),
# on inputs.device, shaped like each masked layer's weight.  NaN scores rank lowest.
ScoreFn = Callable[[ScoringInputs, Masks], Scores]

# What a criterion can need from its caller, and the attribute of an outside score function
# (``package.module:function``) that declares each need, with its value when undeclared.
NEEDS = {"needs_batches": True, "needs_input_shape": False, "iterative": False}


# A channel score: (model, channel structure, seed) -> for every group, one ``MemberScores`` per
# member it reads (utils.pruning.channel_scores puts them on a common scale and ranks the units).
ChannelScoreFn = Callable[[nn.Module, ChannelStructure, int], Dict[str, List["MemberScores"]]]


@dataclasses.dataclass(frozen=True)
class Criterion:
    """A registry entry: what the criterion scores and what it needs.  The harness, the pruning
    command and the structures ask these fields (never the criterion's name)."""

    # Per-weight scores (a ScoreFn).  None: the criterion scores channels only (bn_gamma).
    score: Optional[ScoreFn] = None
    # Rounds: re-score the masked model over ``synflow_density_schedule`` (SynFlow), each
    # round keeping a smaller share; False: one scoring.
    iterative: bool = False
    # Training batches (``ScoringInputs.batches``, ``num_batches`` of them, ``loss_fn``).
    needs_batches: bool = False
    # The shape of one input (``ScoringInputs.input_shape``).
    needs_input_shape: bool = False
    # Per-channel scores (the channel structure ranks coupled channel units by these), or None.
    score_channels: Optional[ChannelScoreFn] = None
    # Options of this criterion's own, given to its score as keyword arguments: names of prune.*
    # keys (snip: "snip_mode").  The harness passes exactly these (``harness_utils.scoring``).
    options: Tuple[str, ...] = ()
    # Whether its scores change as the weights train (Early-Bird compares successive masks: a
    # score that ignores the weights, such as random, never settles).
    reads_weights: bool = True
    description: str = ""
    # A fresh score function per mask computation, whose rounds share what they reuse (SynFlow's
    # absolute-valued float64 state); None: ``score`` itself.
    per_computation: Optional[Callable[[], ScoreFn]] = None

    def needs(self) -> List[str]:
        """Its needs in words (for messages and docs): batches, input shape, rounds."""
        return [word for word, flag in (("batches", self.needs_batches), ("input shape", self.needs_input_shape),
                                        ("rounds", self.iterative)) if flag]

    def scores(self) -> List[str]:
        """What it scores, in words: weights, channels."""
        return [word for word, fn in (("weights", self.score), ("channels", self.score_channels)) if fn is not None]

    def scorer(self, options: Optional[Mapping[str, Any]] = None) -> ScoreFn:
        """The per-weight score function of one mask computation, with this criterion's options
        bound; ValueError (one line) for an option it does not take or a criterion without one."""
        if self.score is None:
            raise ValueError(f"this criterion scores {', '.join(self.scores())}, not single weights")
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"criterion options {unknown} are not this criterion's (it takes: "
                             f"{', '.join(self.options) or 'none'})")
        function = self.per_computation() if self.per_computation is not None else self.score
        return functools.partial(function, **options) if options else function


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


# ------------------------------------------------------------------------ channel scores
# A score function returns, for every group, one ``MemberScores`` per member it reads (a
# producing layer for magnitude, a BatchNorm for bn_gamma, one draw for random): the member's
# raw value per unit and which units it covers (a member of a concatenation covers a part).
@dataclasses.dataclass
class MemberScores:
    values: torch.Tensor    # float64 [size]
    covered: torch.Tensor   # bool [size]


def _member_scores(group: ChannelGroup, members: List[Member], values: Mapping[str, torch.Tensor]) -> List[MemberScores]:
    out = []
    for member in members:
        total = torch.zeros(group.size, dtype=torch.float64)
        covered = torch.zeros(group.size, dtype=torch.bool)
        total.index_add_(0, member.unit, values[member.layer][member.index].double())
        covered[member.unit] = True
        out.append(MemberScores(total, covered))
    return out


def module_lookup(model: nn.Module) -> Dict[str, nn.Module]:
    return dict(model.named_modules())


@torch.no_grad()
def channel_magnitude_scores(model: nn.Module, structure: ChannelStructure, seed: int) -> Dict[str, List[MemberScores]]:
    modules = module_lookup(model)
    needed = {m.layer for g in structure.groups for m in g.producers}
    row_l1 = {name: modules[name].weight.detach().abs().flatten(1).sum(1).to("cpu") for name in needed}
    return {g.name: _member_scores(g, g.producers, row_l1) for g in structure.groups}


@torch.no_grad()
def channel_bn_gamma_scores(model: nn.Module, structure: ChannelStructure, seed: int) -> Dict[str, List[MemberScores]]:
    check_bn_gamma_possible(structure)
    modules = module_lookup(model)
    gammas = {m.layer: modules[m.layer].weight.detach().abs().to("cpu")
              for g in structure.groups for m in g.norms}
    return {g.name: _member_scores(g, g.norms, gammas) for g in structure.groups}


def channel_random_scores(model: nn.Module, structure: ChannelStructure, seed: int) -> Dict[str, List[MemberScores]]:
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return {g.name: [MemberScores(torch.rand(g.size, generator=generator, dtype=torch.float64),
                                  torch.ones(g.size, dtype=torch.bool))] for g in structure.groups}

def check_bn_gamma_possible(structure: ChannelStructure) -> None:
    """Refuse ``bn_gamma`` unless every prunable group is normalised by a BatchNorm."""
    without = [g.name for g in structure.groups if not g.norms]
    if len(without) == len(structure.groups):
        raise StructureError("criterion bn_gamma needs a BatchNorm after a conv; this network has none "
                             "(use magnitude or random)")
    if without:
        raise StructureError(f"criterion bn_gamma needs a BatchNorm after every pruned conv; "
                             f"{', '.join(without[:3])}{' ...' if len(without) > 3 else ''} has none")


SNIP_MODES = ("eval", "train")
# The data order of a criterion's batches at level L is the training loader's order of "epoch"
# SCORE_EPOCH_OFFSET + L, with world size 1: an epoch id disjoint from the training epochs, the
# same global batches on every rank and in the pruning command.
SCORE_EPOCH_OFFSET = 1_000_000


def level_seed(seed: int, level: int) -> int:
    """The seed of a level's scores (random criterion): the harness's and the CLI's."""
    return seed * 1000 + level


def snip_scores(inputs: ScoringInputs, masks: Masks, snip_mode: str = "eval") -> Scores:
    if inputs.batches is None:
        raise ValueError("criterion 'snip' needs batches (an iterable of (x, y))")
    if inputs.num_batches < 1:
        raise ValueError(f"snip num_batches must be >= 1, got {inputs.num_batches}")
    model, device = inputs.model, inputs.device
    loss_fn = inputs.loss_fn or nn.functional.cross_entropy
    weight_keys = _weights_by_layer(model)
    if snip_mode not in SNIP_MODES:
        raise ValueError(f"snip mode {snip_mode!r}; valid: {', '.join(SNIP_MODES)}")
    with _ScoringMode(model, train=snip_mode == "train"):
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


# GraSP's temperature: the logits are divided by it before the loss (the authors' T = 200), which
# keeps the softmax away from saturation so that H g carries a signal at initialisation.
GRASP_TEMPERATURE = 200.0


def grasp_scores(inputs: ScoringInputs, masks: Masks, temperature: float = GRASP_TEMPERATURE) -> Scores:
    """theta * (H g): bigger = kept (the module docstring says why it is minus the paper's score)."""
    if inputs.batches is None:
        raise ValueError("criterion 'grasp' needs batches (an iterable of (x, y))")
    if inputs.num_batches < 1:
        raise ValueError(f"grasp num_batches must be >= 1, got {inputs.num_batches}")
    model, device = inputs.model, inputs.device
    loss_fn = inputs.loss_fn or nn.functional.cross_entropy
    # range first: zip stops before drawing a batch beyond num_batches; both passes read these.
    batches = [batch for _, batch in zip(range(inputs.num_batches), inputs.batches)]
    if len(batches) < inputs.num_batches:
        raise ValueError(f"grasp asked for {inputs.num_batches} batches, the iterable gave {len(batches)}")
    with _ScoringMode(model, train=False):
        state = _detached_state(model, device)
        leaves = {}
        for name, key in _weights_by_layer(model).items():  # the masked weight is the variable
            leaves[name] = (state[key] * masks[name]).requires_grad_(True)
            state[key] = leaves[name]
        variables = list(leaves.values())

        def tempered_loss(x, y):
            return loss_fn(functional_call(model, state, (x.to(device),)) / temperature, y.to(device))

        # First pass: g, summed over the batches, no graph kept.
        gradient = [torch.zeros_like(leaf) for leaf in variables]
        for x, y in batches:
            for total, part in zip(gradient, torch.autograd.grad(tempered_loss(x, y), variables)):
                total.add_(part)
        # Second pass: H g = d/dw <g, dL/dw>, the inner gradient taken with a graph (g a constant).
        # Attention in its plain math form: the fused kernels have no second derivative.
        hessian_gradient = [torch.zeros_like(leaf) for leaf in variables]
        for x, y in batches:
            with sdpa_kernel(SDPBackend.MATH):
                first = torch.autograd.grad(tempered_loss(x, y), variables, create_graph=True)
            z = sum((g * d).sum() for g, d in zip(gradient, first))
            for total, part in zip(hessian_gradient, torch.autograd.grad(z, variables, allow_unused=True)):
                if part is not None:  # a layer entering the loss linearly only (no curvature)
                    total.add_(part)
    return {name: hessian_gradient[index] * leaves[name].detach() for index, name in enumerate(leaves)}


def synflow_dtype(device: torch.device) -> torch.dtype:
    """float64 (R is a product over all layers: float32 overflows on deep nets) except on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


class SynFlowScores:
    """SynFlow's score of one mask computation (a fresh instance per ``compute_masks`` call): the
    absolute-valued float64 parameters and buffers are built at the first round and shared by
    the rest."""

    def __init__(self):
        self.linearized: Optional[Dict[str, torch.Tensor]] = None

    def __call__(self, inputs: ScoringInputs, masks: Masks) -> Scores:
        if inputs.input_shape is None:
            raise ValueError("criterion 'synflow' needs input_shape (C, H, W) of one input")
        model, device = inputs.model, inputs.device
        dtype = synflow_dtype(device)
        weight_keys = _weights_by_layer(model)
        if self.linearized is None:  # |parameters| and |buffers| in float64, built once per compute_masks call
            self.linearized = {key: tensor.to(dtype).abs() if tensor.is_floating_point() else tensor
                               for key, tensor in _detached_state(model, device).items()}
        linearized = self.linearized
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


def synflow_scores(inputs: ScoringInputs, masks: Masks) -> Scores:
    """One SynFlow scoring on its own (``SynFlowScores`` shares the state between the rounds of one
    mask computation)."""
    return SynFlowScores()(inputs, masks)


SCORES: Dict[str, Criterion] = {
    "magnitude": Criterion(magnitude_scores, score_channels=channel_magnitude_scores,
                           description="|w|; channels: L1 norm of the filters (Li et al. 2017)"),
    "random": Criterion(random_scores, score_channels=channel_random_scores, reads_weights=False,
                        description="i.i.d. uniform, seeded per level (random pruning)"),
    "snip": Criterion(snip_scores, needs_batches=True, options=("snip_mode",),
                      description="|dL/dw * w| on training batches (Lee et al. 2019)"),
    "synflow": Criterion(synflow_scores, iterative=True, needs_input_shape=True, per_computation=SynFlowScores,
                         description="|dR/dw * w| of the all-ones input, iterative rounds (Tanaka et al. 2020)"),
    "grasp": Criterion(grasp_scores, needs_batches=True,
                       description="GraSP: the highest -theta * Hg removed (Hessian-gradient product on training "
                                   "batches, temperature 200, Wang et al. 2020)"),
    "bn_gamma": Criterion(None, score_channels=channel_bn_gamma_scores,
                          description="channels: |gamma| of their BatchNorm (network slimming, Liu et al. 2017)"),
}


def weight_criteria() -> List[str]:
    """Registered criteria that score single weights."""
    return [name for name, spec in SCORES.items() if spec.score is not None]


def channel_criteria() -> List[str]:
    """Registered criteria that score channels."""
    return [name for name, spec in SCORES.items() if spec.score_channels is not None]


def get_criterion(name: str) -> Criterion:
    """A registry name, or ``package.module:function``: the user's score function (signature
    ``(inputs: ScoringInputs, masks) -> {layer name: scores}``, one shot) or a ``Criterion``."""
    if is_import_path(name):
        return user_criterion(name)
    return lookup(SCORES, "criterion", name)


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
        return obj if obj.score is None else dataclasses.replace(obj, score=_checked_score_fn(obj.score, path))
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
    def score(inputs: ScoringInputs, masks: Masks, **options: Any) -> Scores:
        return _checked_scores(function(inputs, masks, **options), masks, path, inputs.device)

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


def get_score_fn(name: str, **options: Any) -> ScoreFn:
    """The per-weight score function of ``name`` for one mask computation, ``options`` bound."""
    return get_criterion(name).scorer(options)


