"""Channel pruning, 4: a pruned channel outputs exactly 0.

BatchNorm scale and shift of pruned channels and the biases of the producing layers are not
masked weights: ``DeadChannelZeroer`` zeroes them and must run after every optimizer step
(``ChannelZeroing`` is the callback that does it), so a pruned channel outputs exactly 0 in
train and eval mode (BN: (0 - mean) / std * 0 + 0)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from utils.core.callbacks import Callback
from utils.pruning.channel_graph import ChannelStructure
from utils.pruning.criteria import module_lookup
from utils.pruning.channel_select import get_current_masks, units_alive


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
        modules = module_lookup(model)
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
        modules = module_lookup(model) if model is not None else self._modules
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


