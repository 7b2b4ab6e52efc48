"""Channel (structured) pruning on masked models: coupled channel groups, scores, masks.

Semantics (docs/design.md section 10; docs/structured.md):

* The unit is an output channel.  Channels that the network ties together -- the outputs of
  the convs summed by a residual addition, a conv and the depthwise conv that follows it,
  the channels a concatenation or a flatten hands to the next layer -- form one **unit**
  and are pruned together.  Which channels are tied comes from torch-pruning's
  ``DependencyGraph`` (one traced batch-1 forward on a CPU copy of the model); a
  ``ChannelStructure`` keeps only the result, as layer names and index tensors, so it is
  built once per run and costs nothing afterwards.
* A **group** is a set of layers whose output channels are tied index by index (torch-
  pruning's pruning group: e.g. the stem conv, every block's second conv and the shortcut
  of one stage of a ResNet); it has ``size`` units, unit j holding channel j of each of its
  layers (or the channel an index mapping sends j to, for concatenations).
* **Counting: every unit counts once**, however many layers it spans.  A ResNet-20 has 12
  groups and 448 prunable units (3 residual streams of 16 / 32 / 64 channels and the first
  convs of its 9 blocks, 3 of each width); channel density = kept units / all prunable units, and
  exactly ``round(density * units)`` are kept (``pruning_utils.target_keep_count``).
* Never pruned: the output layer (the last Conv2d/Linear the forward runs: its outputs are
  the logits) and every channel tied to it, the layers ``prune.exclude`` leaves unmasked and
  every channel tied to them, and groups holding a layer we cannot express as a weight mask
  (a grouped conv that is not depthwise, LayerNorm/GroupNorm/PReLU/attention parameters).
  The stem's input channels are the data's and are never a unit.
* Every group keeps its floor: ``max(1, ceil(min_fraction * size))`` units (a group with no
  channel left would cut the network, one with a sliver starves it; ``prune.min_channel_fraction``).
  ``global`` first gives each group its best alive units up to the floor, then ranks the rest;
  ``uniform`` raises a group below its floor, one unit at a time from the group with the most
  units above its own.  A density that keeps fewer units than the floors need is refused
  (``check_channel_densities`` before a run, ``select_units`` at pruning).
* The masks are the harness's ordinary weight masks (``utils.mask_layers``): a pruned unit
  zeroes the rows (output channels) of every layer producing it and the columns (input
  channels) of every layer consuming it, so ``layers.csv`` weight densities are what a
  compacted network really holds.  BatchNorm scale and shift of pruned channels and the
  biases of the producing layers are not masked weights: ``DeadChannelZeroer`` zeroes them
  and must run after every optimizer step (``ChannelZeroing`` is the callback that does it),
  so a pruned channel outputs exactly 0 in train and eval mode (BN: (0 - mean) / std * 0 + 0).

Scores of a unit (bigger = kept first; units already pruned score -inf and stay pruned):

``magnitude``  L1 norm of the unit's filters (Li et al. 2017), averaged over the layers
               producing the unit (a residual-stream unit made by 7 convs is not favoured
               over a single conv's unit for having 7 filters).
``bn_gamma``   |gamma| of the BatchNorm(s) that normalise the unit (network slimming, Liu et
               al. 2017), averaged over them.  Refused (``StructureError``) for a network
               whose prunable groups have no BatchNorm.
``random``     i.i.d. U(0, 1) float64 from a CPU generator seeded with ``seed``, drawn group by
               group in structure order (the same on every rank and device).

Scores are compared across layers on a common scale (``CHANNEL_NORMALIZERS``, default ``mean``):
each member's scores (one producing layer, one BatchNorm, one random draw) are divided by the
mean over the group's alive units before the mean over members.  Raw filter L1 norms grow with
fan-in (sqrt(fan-in) at a Kaiming initialisation), so a raw global ranking empties the layers
with small fan-in; the choice of ``mean`` was measured (bench/channel_normalizers.py).

Allocations: ``global`` ranks all units together (ties: the lower relative position index / size,
so equal scores give every group the same fraction; then structure order);
``uniform`` gives every group the same fraction of its units (largest-remainder
apportionment, ``pruning_utils.layer_keep_counts``), picked by score within the group.

Network slimming's sparsity term ``training.bn_l1``: ``add_bn_l1_subgradient_(model, lam)``
adds lam * sign(gamma) to the gradient of every BatchNorm scale (hook it into
``TrainingStep.after_backward``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from utils.callbacks import Callback
from utils.mask_layers import Masks, masked_layers, validate_masks
from utils.pruning_utils import layer_keep_counts, target_keep_count

STRUCTURES = ("unstructured", "channel")
CHANNEL_SCORES = ("magnitude", "bn_gamma", "random")
CHANNEL_ALLOCATIONS = ("global", "uniform")


class StructureError(ValueError):
    """Channel pruning cannot be done as asked (no prunable channels, no BatchNorm for bn_gamma,
    a density below one channel per group, ...); the message is one line."""


@dataclass
class Member:
    """Where the units of a group live in one layer: channel ``index[i]`` of ``layer`` belongs
    to unit ``unit[i]`` (both LongTensors on CPU, same length)."""
    layer: str
    index: torch.Tensor
    unit: torch.Tensor


@dataclass
class ChannelGroup:
    name: str                                          # its first producing layer, in module order
    size: int                                          # number of units
    producers: List[Member] = field(default_factory=list)   # weight rows (output channels); depthwise convs too
    consumers: List[Member] = field(default_factory=list)   # weight columns (input channels)
    norms: List[Member] = field(default_factory=list)       # BatchNorm channels (scale, shift)


@dataclass
class ChannelStructure:
    groups: List[ChannelGroup]
    output_layer: str                                  # never pruned
    skipped: Dict[str, str] = field(default_factory=dict)   # group name -> why it is not prunable

    @property
    def total_units(self) -> int:
        return sum(group.size for group in self.groups)

    def group_names(self) -> List[str]:
        return [group.name for group in self.groups]


ChannelKeep = Dict[str, torch.Tensor]  # group name -> bool tensor [size]: unit kept


# ------------------------------------------------------------------------------ structure
def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:  # pragma: no cover - requirements.txt installs it
        raise StructureError("prune.structure=channel needs the torch-pruning package "
                             "(pip install 'torch-pruning>=1.6')") from None
    return torch_pruning


def _execution_order(model: nn.Module, example: torch.Tensor) -> List[str]:
    """Names of the Conv2d/Linear modules in the order the forward runs them."""
    order: List[str] = []
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: order.append(name))
             for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return order


def build_channel_structure(model: nn.Module, input_shape: Sequence[int]) -> ChannelStructure:
    """The coupled channel groups of a (masked) model for inputs of shape ``input_shape`` (C, H, W).

    The model is not touched: a CPU float32 copy in eval mode is traced.  Raises
    ``StructureError`` when no channel can be pruned.
    """
    tp = _torch_pruning()
    traced = copy.deepcopy(model).to("cpu", torch.float32).eval()
    for parameter in traced.parameters():
        parameter.requires_grad_(True)  # the dependency graph follows autograd's graph
    example = torch.zeros(1, *input_shape)
    order = _execution_order(traced, example)
    if not order:
        raise StructureError(f"{type(model).__name__} has no Conv2d/Linear layer: no channels to prune")
    names = {module: name for name, module in traced.named_modules()}
    modules = dict(traced.named_modules())
    output_layer = order[-1]
    masked = {name for name, _ in masked_layers(traced)}
    unmasked = [module for module in modules.values()
                if isinstance(module, (nn.Conv2d, nn.Linear)) and names[module] not in masked]
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(traced, example_inputs=example, verbose=False)
    ignored = [modules[output_layer], *unmasked]
    position = {name: i for i, name in enumerate(modules)}
    optype = tp.ops.OPTYPE
    groups, skipped = [], {}
    for tp_group in graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
        producers, consumers, norms, problem = [], [], [], None
        size = len(tp_group[0].root_idxs)
        for item in tp_group.items:
            target, handler = item.dep.target, item.dep.handler
            if target.type in (optype.CONV, optype.LINEAR, optype.DEPTHWISE_CONV, optype.BN):
                module = target.module
                member = Member(names[module], torch.as_tensor(list(item.idxs), dtype=torch.long),
                                torch.as_tensor(list(item.root_idxs), dtype=torch.long))
                if target.type == optype.BN:
                    norms.append(member)
                elif target.type == optype.DEPTHWISE_CONV or graph.is_out_channel_pruning_fn(handler):
                    producers.append(member)
                elif isinstance(module, nn.Conv2d) and module.groups != 1:
                    problem = f"{member.layer} is a grouped conv (groups={module.groups}) that is not depthwise"
                else:
                    consumers.append(member)
            elif target.type in (optype.ELEMENTWISE, optype.CONCAT, optype.SPLIT, optype.RESHAPE, optype.SLICE,
                                 optype.UNBIND, optype.EXPAND, optype.OUTPUT):
                continue  # no parameters: the index mapping is already in the members
            else:
                problem = f"{target.name.split(' ')[0]} ({target.type.name}) cannot be pruned with weight masks"
        producers.sort(key=lambda m: position[m.layer])
        name = producers[0].layer if producers else names[tp_group[0].dep.target.module]
        if problem is not None:
            skipped[name] = problem
            continue
        groups.append(ChannelGroup(name=name, size=size, producers=producers, consumers=consumers,
                                   norms=sorted(norms, key=lambda m: position[m.layer])))
    groups.sort(key=lambda g: position[g.name])
    if not groups:
        raise StructureError(f"{type(model).__name__} has no prunable channels (the output layer "
                             f"{output_layer} and layers tied to it are never pruned)")
    return ChannelStructure(groups=groups, output_layer=output_layer, skipped=skipped)


# --------------------------------------------------------------------------------- scores
# A score function returns, for every group, one ``MemberScores`` per member it reads (a
# producing layer for magnitude, a BatchNorm for bn_gamma, one draw for random): the member's
# raw value per unit and which units it covers (a member of a concatenation covers a part).
@dataclass
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


def _module_lookup(model: nn.Module) -> Dict[str, nn.Module]:
    return dict(model.named_modules())


@torch.no_grad()
def _magnitude(model: nn.Module, structure: ChannelStructure, seed: int) -> Dict[str, List[MemberScores]]:
    modules = _module_lookup(model)
    needed = {m.layer for g in structure.groups for m in g.producers}
    row_l1 = {name: modules[name].weight.detach().abs().flatten(1).sum(1).to("cpu") for name in needed}
    return {g.name: _member_scores(g, g.producers, row_l1) for g in structure.groups}


@torch.no_grad()
def _bn_gamma(model: nn.Module, structure: ChannelStructure, seed: int) -> Dict[str, List[MemberScores]]:
    check_bn_gamma_possible(structure)
    modules = _module_lookup(model)
    gammas = {m.layer: modules[m.layer].weight.detach().abs().to("cpu")
              for g in structure.groups for m in g.norms}
    return {g.name: _member_scores(g, g.norms, gammas) for g in structure.groups}


def _random(model: nn.Module, structure: ChannelStructure, seed: int) -> Dict[str, List[MemberScores]]:
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return {g.name: [MemberScores(torch.rand(g.size, generator=generator, dtype=torch.float64),
                                  torch.ones(g.size, dtype=torch.bool))] for g in structure.groups}


CHANNEL_SCORE_FUNCTIONS: Dict[str, Callable[[nn.Module, ChannelStructure, int], Dict[str, List[MemberScores]]]] = {
    "magnitude": _magnitude,
    "bn_gamma": _bn_gamma,
    "random": _random,
}


# A normaliser maps one member's raw scores over the units it is ranked among (alive and
# covered; a 1-d float64 tensor, never empty) to a common scale.  Scale-free ones (mean, max,
# gaussian) make a layer with a larger fan-in -- whose filter L1 norms are larger just because
# they sum more weights -- and a wide or narrow group comparable under ``global``.
def _normalise_none(values: torch.Tensor) -> torch.Tensor:
    return values


def _divide_by(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    scale = float(scale)
    return values / scale if math.isfinite(scale) and scale > 0 else torch.ones_like(values)


def _normalise_mean(values: torch.Tensor) -> torch.Tensor:
    return _divide_by(values, values.mean())


def _normalise_max(values: torch.Tensor) -> torch.Tensor:
    return _divide_by(values, values.max())


def _normalise_gaussian(values: torch.Tensor) -> torch.Tensor:
    centred = values - values.mean()
    if values.numel() < 2:
        return torch.zeros_like(values)
    return _divide_by(centred, centred.std())


CHANNEL_NORMALIZERS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": _normalise_none,        # raw scores (a filter's L1 norm grows with its fan-in)
    "mean": _normalise_mean,        # score / mean score of the member's ranked units
    "max": _normalise_max,          # score / largest score
    "gaussian": _normalise_gaussian,  # (score - mean) / standard deviation
}
# The measured best at equal FLOPs (docs/structured.md, bench/channel_normalizers.py).
DEFAULT_CHANNEL_NORMALIZER = "mean"


def check_bn_gamma_possible(structure: ChannelStructure) -> None:
    """Refuse ``bn_gamma`` unless every prunable group is normalised by a BatchNorm."""
    without = [g.name for g in structure.groups if not g.norms]
    if len(without) == len(structure.groups):
        raise StructureError("criterion bn_gamma needs a BatchNorm after a conv; this network has none "
                             "(use magnitude or random)")
    if without:
        raise StructureError(f"criterion bn_gamma needs a BatchNorm after every pruned conv; "
                             f"{', '.join(without[:3])}{' ...' if len(without) > 3 else ''} has none")


def channel_scores(model: nn.Module, structure: ChannelStructure, criterion: str, seed: int = 0, *,
                   normalizer: str = "none", alive: Optional[ChannelKeep] = None) -> Dict[str, torch.Tensor]:
    """group name -> float64 score per unit (CPU): the mean, over the members covering a unit,
    of each member's score after ``normalizer`` (fitted on the member's ``alive`` units; all
    units when ``alive`` is None).  ``normalizer="none"``: the raw scores' mean."""
    if criterion not in CHANNEL_SCORE_FUNCTIONS:
        raise StructureError(f"unknown channel criterion {criterion!r}; valid: {', '.join(CHANNEL_SCORES)}")
    if normalizer not in CHANNEL_NORMALIZERS:
        raise StructureError(f"unknown channel normalizer {normalizer!r}; valid: {', '.join(CHANNEL_NORMALIZERS)}")
    normalise = CHANNEL_NORMALIZERS[normalizer]
    result = {}
    member_scores = CHANNEL_SCORE_FUNCTIONS[criterion](model, structure, seed)
    for group in structure.groups:
        ranked_among = alive[group.name].to("cpu", torch.bool) if alive is not None else torch.ones(group.size, dtype=torch.bool)
        total = torch.zeros(group.size, dtype=torch.float64)
        count = torch.zeros(group.size, dtype=torch.float64)
        for member in member_scores[group.name]:
            where = member.covered & ranked_among
            values = member.values.clone()
            if bool(where.any()):
                values[where] = normalise(values[where])
            total += torch.where(member.covered, values, torch.zeros_like(values))
            count += member.covered.double()
        result[group.name] = total / count.clamp(min=1)
    return result


# ------------------------------------------------------------------------- masks <-> units
def units_alive(structure: ChannelStructure, masks: Masks) -> ChannelKeep:
    """group name -> bool per unit: alive when some producing layer still has a weight in that channel."""
    alive = {}
    for group in structure.groups:
        count = torch.zeros(group.size, dtype=torch.long)
        for member in group.producers:
            if member.layer in masks:
                rows = masks[member.layer].to("cpu").flatten(1).any(1)
                count.index_add_(0, member.unit, rows[member.index].long())
            else:  # an unmasked producer never appears in a prunable group; treat as alive
                count += 1
        alive[group.name] = count > 0
    return alive


def channel_density(structure: ChannelStructure, masks: Masks) -> float:
    """Fraction of the prunable units alive in ``masks``."""
    alive = units_alive(structure, masks)
    return sum(int(a.sum()) for a in alive.values()) / structure.total_units


def masks_for_units(structure: ChannelStructure, keep: ChannelKeep, masks: Masks) -> Masks:
    """``masks`` (copied) with the rows of every producer and the columns of every consumer of
    each unit not in ``keep`` set False."""
    out = {name: mask.to("cpu", dtype=torch.bool, copy=True) for name, mask in masks.items()}
    for group in structure.groups:
        dead = ~keep[group.name].to("cpu")
        if not bool(dead.any()):
            continue
        for member in group.producers:
            if member.layer in out:
                out[member.layer][member.index[dead[member.unit]]] = False
        for member in group.consumers:
            if member.layer in out:
                out[member.layer][:, member.index[dead[member.unit]]] = False
    return out


def channel_floors(structure: ChannelStructure, min_fraction: float) -> Dict[str, int]:
    """Units each group keeps at least: ceil(min_fraction * size), and never fewer than 1."""
    if not 0.0 <= min_fraction <= 1.0:
        raise StructureError(f"min_channel_fraction must be in [0, 1], got {min_fraction}")
    # the 1e-9 keeps 0.25 * 16 = 4.000000000000001 from becoming 5
    return {g.name: max(1, math.ceil(min_fraction * g.size - 1e-9)) for g in structure.groups}


def lowest_channel_density(structure: ChannelStructure, min_fraction: float) -> float:
    """The smallest channel density whose kept count leaves every group its floor."""
    return sum(channel_floors(structure, min_fraction).values()) / structure.total_units


def check_channel_densities(structure: ChannelStructure, densities: Sequence[float], min_fraction: float) -> None:
    """Refuse (``StructureError``, one line) a plan with a density too low for the floors,
    before anything runs."""
    need = sum(channel_floors(structure, min_fraction).values())
    for level, density in enumerate(densities):
        keep = target_keep_count(density, structure.total_units)
        if keep < need:
            raise StructureError(
                f"channel density {density:.4g} (level {level}) keeps {keep} of {structure.total_units} channels, "
                f"fewer than the {need} that give each of the {len(structure.groups)} coupled groups its floor "
                f"(at least one channel, and prune.min_channel_fraction={min_fraction:g} of its channels); the "
                f"lowest density is {need / structure.total_units:.4g}: raise prune.target_density or lower "
                f"prune.min_channel_fraction")


def _top_units(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best candidate units of one group (ties: lower index)."""
    keep = torch.zeros_like(candidates)
    if k > 0:
        order = sorted(torch.nonzero(candidates).flatten().tolist(), key=lambda i: (-float(scores[i]), i))
        keep[order[:k]] = True
    return keep


def select_units(structure: ChannelStructure, scores: Mapping[str, torch.Tensor], alive: ChannelKeep,
                 keep_count: int, allocation: str, *, min_fraction: float = 0.0) -> ChannelKeep:
    """Exactly ``keep_count`` alive units, chosen by score, every group keeping its floor
    (``channel_floors``; a group with fewer alive units than its floor keeps them all).

    ``global``: each group first gets its ``floor`` best alive units; the rest are ranked
    together by score (ties: the unit at the lower relative position index / size, so equal
    scores spread evenly over groups; then structure order).  ``uniform``: every group keeps
    the same fraction (``uniform_unit_counts``), raised to its floor.  Compare scores across
    groups only on a common scale (``channel_scores(..., normalizer=)``)."""
    groups = structure.groups
    alive_count = {g.name: int(alive[g.name].sum()) for g in groups}
    alive_total = sum(alive_count.values())
    if keep_count > alive_total:
        raise StructureError(f"cannot keep {keep_count} channels: only {alive_total} are alive (masks only shrink)")
    for g in groups:
        if alive_count[g.name] == 0:
            raise StructureError(f"group {g.name} has no alive channel left")
    floors = {name: min(count, alive_count[name]) for name, count in channel_floors(structure, min_fraction).items()}
    if keep_count < sum(floors.values()):
        raise StructureError(
            f"keeping {keep_count} of {structure.total_units} channels leaves fewer than one channel per coupled "
            f"group, or less than min_channel_fraction={min_fraction:g} of one ({len(groups)} groups need "
            f"{sum(floors.values())}): density too low")
    masked_scores = {}
    for g in groups:
        s = torch.nan_to_num(scores[g.name].to("cpu", torch.float64).clone(), nan=-math.inf)
        s[~alive[g.name].to("cpu")] = -math.inf
        masked_scores[g.name] = s
    if allocation == "global":
        reserved = {g.name: _top_units(masked_scores[g.name], alive[g.name].to("cpu"), floors[g.name]) for g in groups}
        names = [g.name for g in groups]
        candidates = torch.cat([alive[n].to("cpu") & ~reserved[n] for n in names])
        flat_scores = torch.cat([masked_scores[n] for n in names]).numpy()
        relative = torch.cat([torch.arange(g.size, dtype=torch.float64) / g.size for g in groups]).numpy()
        position = np.arange(len(flat_scores))
        order = np.lexsort((position, relative, -flat_scores))  # last key sorts first
        order = order[candidates.numpy()[order]][:keep_count - sum(floors.values())]
        flat_keep = torch.zeros(len(flat_scores), dtype=torch.bool)
        flat_keep[torch.from_numpy(order)] = True
        extra = dict(zip(names, flat_keep.split([g.size for g in groups])))
        return {g.name: reserved[g.name] | extra[g.name] for g in groups}
    if allocation == "uniform":
        counts = uniform_unit_counts(structure, alive_count, keep_count, floors=floors)
        return {g.name: _top_units(masked_scores[g.name], alive[g.name].to("cpu"), counts[g.name]) for g in groups}
    raise StructureError(f"unknown channel allocation {allocation!r}; valid: {', '.join(CHANNEL_ALLOCATIONS)}")


def uniform_unit_counts(structure: ChannelStructure, capacities: Mapping[str, int], keep_count: int,
                        floors: Optional[Mapping[str, int]] = None) -> Dict[str, int]:
    """Units each group keeps under ``uniform``: density * size, apportioned by largest
    remainder to sum exactly to ``keep_count`` (``pruning_utils.layer_keep_counts``); a group
    below its floor (default 1) is raised to it, one unit at a time taken from the group with
    the most units above its own floor (the last such group in structure order)."""
    groups = structure.groups
    floors = floors or {g.name: 1 for g in groups}
    counts = layer_keep_counts("uniform", capacities=capacities, numels={g.name: g.size for g in groups},
                               shapes={g.name: (g.size,) for g in groups}, total_keep=keep_count)
    for g in groups:
        while counts[g.name] < floors[g.name]:
            donor = max(reversed(groups), key=lambda other: counts[other.name] - floors[other.name]).name
            counts[donor] -= 1
            counts[g.name] += 1
    return counts


def select_channels(model: nn.Module, structure: ChannelStructure, *, density: float, criterion: str,
                    allocation: str, masks: Optional[Masks] = None, seed: int = 0, min_fraction: float = 0.0,
                    normalizer: str = DEFAULT_CHANNEL_NORMALIZER) -> ChannelKeep:
    """The units kept at channel ``density`` (a fraction of ALL prunable units): scores from
    ``criterion``, each member's put on a common scale by ``normalizer`` over the alive units,
    chosen by ``allocation`` with every group keeping ``min_fraction`` of its units (>= 1)."""
    if not 0.0 < density <= 1.0:
        raise StructureError(f"density must be in (0, 1], got {density}")
    current = {name: layer.mask for name, layer in masked_layers(model)} if masks is None else masks
    alive = units_alive(structure, current)
    scores = channel_scores(model, structure, criterion, seed, normalizer=normalizer, alive=alive)
    return select_units(structure, scores, alive, target_keep_count(density, structure.total_units), allocation,
                        min_fraction=min_fraction)


def compute_channel_masks(model: nn.Module, structure: ChannelStructure, *, density: float, criterion: str,
                          allocation: str, masks: Optional[Masks] = None, seed: int = 0, min_fraction: float = 0.0,
                          normalizer: str = DEFAULT_CHANNEL_NORMALIZER) -> Masks:
    """Weight masks (CPU bool, a subset of ``masks`` / the model's masks) keeping exactly
    round(density * units) coupled channel units (``select_channels``).  The model is not modified."""
    current = get_current_masks(model) if masks is None else masks
    validate_masks(model, current)
    keep = select_channels(model, structure, density=density, criterion=criterion, allocation=allocation,
                           masks=current, seed=seed, min_fraction=min_fraction, normalizer=normalizer)
    return masks_for_units(structure, keep, current)


def shuffled_channel_masks(structure: ChannelStructure, masks: Masks, seed: int) -> Masks:
    """The random-pruning control (``prune.control=shuffle``) for channel masks: every group
    keeps as many units as in ``masks``, at random positions (CPU generator seeded with
    ``seed``, groups in structure order); weights outside the structure are as in ``masks``'
    all-True version, i.e. only the channel pattern is redrawn."""
    alive = units_alive(structure, masks)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    keep = {}
    for group in structure.groups:
        chosen = torch.randperm(group.size, generator=generator)[:int(alive[group.name].sum())]
        keep[group.name] = torch.zeros(group.size, dtype=torch.bool)
        keep[group.name][chosen] = True
    return masks_for_units(structure, keep, {name: torch.ones_like(mask, dtype=torch.bool) for name, mask in masks.items()})


def get_current_masks(model: nn.Module) -> Masks:
    return {name: layer.mask.detach().to("cpu") for name, layer in masked_layers(model)}


def keep_vector(keep: ChannelKeep, structure: ChannelStructure) -> torch.Tensor:
    """The units of ``keep`` as one flat bool vector, in structure order (Early-Bird's mask)."""
    return torch.cat([keep[g.name].to("cpu", torch.bool) for g in structure.groups])


def channels_alive(masks: Masks) -> Dict[str, Tuple[int, int]]:
    """layer name -> (output channels alive, output channels): a channel is alive while its
    weight row holds a kept weight.  Pure function of the masks (for ``layers.csv``)."""
    result = {}
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1).any(1)
        result[name] = (int(rows.sum()), int(mask.shape[0]))
    return result


# --------------------------------------------------------------- keeping pruned channels zero
class DeadChannelZeroer:
    """Zeroes BatchNorm scale and shift, and producer biases, of the pruned units.

    ``refresh(model)`` reads which units are dead from the model's masks (call it whenever
    masks change: after pruning, after a resume); calling the object zeroes them (after
    every optimizer step: momentum, Adam moments and weight decay would otherwise revive
    them).  The index tensors live on the model's device, so a call costs a few small
    ``index_fill_`` kernels and no host sync.
    """

    def __init__(self, structure: ChannelStructure):
        self.structure = structure
        self.targets: List[Tuple[str, torch.Tensor]] = []   # (module name, dead channel indices)

    def refresh(self, model: nn.Module) -> "DeadChannelZeroer":
        masks = get_current_masks(model)
        alive = units_alive(self.structure, masks)
        modules = _module_lookup(model)
        dead_by_module: Dict[str, List[torch.Tensor]] = {}
        for group in self.structure.groups:
            dead = ~alive[group.name]
            if not bool(dead.any()):
                continue
            for member in group.norms + group.producers:
                dead_by_module.setdefault(member.layer, []).append(member.index[dead[member.unit]])
        self.targets = []
        for name, pieces in dead_by_module.items():
            module = modules[name]
            device = next(module.parameters()).device if any(True for _ in module.parameters()) else "cpu"
            self.targets.append((name, torch.unique(torch.cat(pieces)).to(device)))
        self._modules = modules
        return self

    @torch.no_grad()
    def __call__(self, model: Optional[nn.Module] = None) -> None:
        modules = _module_lookup(model) if model is not None else self._modules
        for name, index in self.targets:
            module = modules[name]
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if module.weight is not None:
                    module.weight.index_fill_(0, index, 0.0)
                    module.bias.index_fill_(0, index, 0.0)
            elif getattr(module, "bias", None) is not None:
                module.bias.index_fill_(0, index, 0.0)


class ChannelZeroing(Callback):
    """Keeps pruned channels' BatchNorm scale/shift and biases at zero (DeadChannelZeroer)
    at the start of the run, of every level and after every optimizer step."""

    def __init__(self, structure: ChannelStructure, model: Optional[nn.Module] = None):
        self.zeroer = DeadChannelZeroer(structure)
        self.model = model
        if model is not None:
            self.zeroer.refresh(model)

    def _refresh(self, info) -> None:
        self.model = info.model
        self.zeroer.refresh(info.model)
        self.zeroer(info.model)

    def on_run_start(self, info) -> None:
        self._refresh(info)

    def on_level_start(self, info) -> None:
        self._refresh(info)

    def on_step_end(self, state) -> None:
        if self.zeroer.targets:
            self.zeroer(self.model)


# ------------------------------------------------------------------------ network slimming
@torch.no_grad()
def add_bn_l1_subgradient_(model: nn.Module, lam: float) -> None:
    """Network slimming's sparsity term lam * sum |gamma|: add lam * sign(gamma) to the
    gradient of every BatchNorm scale (call after backward, before the optimizer step)."""
    if lam == 0:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None \
                and module.weight.grad is not None:
            module.weight.grad.add_(torch.sign(module.weight), alpha=lam)


def bn_l1_hook(lam: float) -> Callable[[nn.Module], None]:
    """``add_bn_l1_subgradient_`` with ``lam`` bound, for ``TrainingStep.after_backward``."""
    def hook(model: nn.Module) -> None:
        add_bn_l1_subgradient_(model, lam)
    return hook
