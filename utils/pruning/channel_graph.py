"""Channel pruning, 1: the coupled channel groups of a masked model (``build_channel_structure``).

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
  exactly ``round(density * units)`` are kept (``utils.pruning.schedules.target_keep_count``).
* Never pruned: the output layer (the last Conv2d/Linear the forward runs: its outputs are
  the logits) and every channel tied to it, the layers ``prune.exclude`` leaves unmasked and
  every channel tied to them, and groups holding a layer we cannot express as a weight mask
  (a grouped conv that is not depthwise, LayerNorm/GroupNorm/PReLU/attention parameters).
  The stem's input channels are the data's and are never a unit."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
from torch import nn

from utils.models.mask_layers import masked_layers

CHANNEL_ALLOCATIONS = ("global", "uniform")  # how units are shared among groups (channel_select)


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


