"""Optimizer registry: ``optimizer.name`` -> a builder taking the parameters and the settings.

    build_optimizer(model.parameters(), name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)

A new optimizer is one entry in ``OPTIMIZERS`` (``harness_params`` takes its allowed names
from here).  Every builder receives the same settings dict (lr, momentum, nesterov,
weight_decay, betas) and uses what applies to it.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable

import torch

OptimizerBuilder = Callable[[list, Dict[str, Any]], torch.optim.Optimizer]

OPTIMIZERS: Dict[str, OptimizerBuilder] = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c["lr"], momentum=c["momentum"],
                                             nesterov=c["nesterov"], weight_decay=c["weight_decay"]),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c["lr"], betas=tuple(c["betas"]),
                                               weight_decay=c["weight_decay"]),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c["lr"], betas=tuple(c["betas"]),
                                                 weight_decay=c["weight_decay"]),
}


def build_optimizer(parameters: Iterable[torch.nn.Parameter], *, name: str, lr: float, momentum: float = 0.9,
                    nesterov: bool = False, weight_decay: float = 0.0, betas=(0.9, 0.999)) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(sorted(OPTIMIZERS))}")
    settings = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, betas=betas)
    return OPTIMIZERS[name](list(parameters), settings)
