"""Network slimming's sparsity term ``training.bn_l1``: ``add_bn_l1_subgradient_(model, lam)``
adds lam * sign(gamma) to the gradient of every BatchNorm scale (hook it into
``TrainingStep.after_backward``)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


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
