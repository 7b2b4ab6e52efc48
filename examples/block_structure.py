"""Block sparsity from outside the project: square blocks of a weight matrix kept or dropped whole.

    PYTHONPATH=examples python harness.py --config configs/quickstart.yaml \\
        --prune.structure=block_structure:Blocks

A structure is one ``utils.pruning.structures.base.Structure`` subclass (docs/extending.md, "A
pruning structure"); nothing in the project names it.  Here:

* Units.  A weight ``[out, in, *kernel]`` is seen as the matrix ``[out, in * kernel]`` and cut
  into ``block`` x ``block`` tiles.  A layer whose matrix does not split into whole tiles stays
  dense (the start line names it), so every unit holds exactly ``block ** 2`` weights.
* Target.  A level keeps a fraction of the tiles: level L of an iterative run keeps
  round((1 - rate) ** L * tiles) of all tiles, ranked together (``prune.allocation=global``
  only) by the mean of the criterion's scores over each tile's weights.  Any per-weight
  criterion scores; an iterative one (SynFlow) re-scores over rounds, the tile count falling
  exponentially to the target.  ``levels.csv``'s ``target_density`` is the density of all
  prunable weights this keeps, the dense layers included.
* Shuffle control.  Each layer keeps as many tiles as the source's mask keeps there, at the
  positions of highest priority: one U(0, 1) priority per tile from a generator seeded with
  (seed, layer index), the same at every level, so the masks of successive levels nest.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from utils.models.mask_layers import Masks
from utils.pruning.masks import compute_masks
from utils.pruning.schedules import target_keep_count
from utils.pruning.structures.base import Scoring, Shapes, Structure


def tiles(tensor: torch.Tensor, block: int) -> torch.Tensor:
    """``[out, in, *kernel]`` -> ``[out / block, columns / block, block * block]``: one row per tile."""
    matrix = tensor.reshape(tensor.shape[0], -1)
    rows, columns = matrix.shape
    return (matrix.reshape(rows // block, block, columns // block, block)
            .permute(0, 2, 1, 3).reshape(rows // block, columns // block, block * block))


def untiled(values: torch.Tensor, shape: Sequence[int], block: int) -> torch.Tensor:
    """A per-tile bool ``[out / block, columns / block]`` -> a weight-shaped mask."""
    rows, columns = shape[0], math.prod(shape[1:])
    expanded = values[:, None, :, None].expand(rows // block, block, columns // block, block)
    return expanded.reshape(rows, columns).reshape(tuple(shape))


def tileable(shape: Sequence[int], block: int) -> bool:
    return len(shape) >= 2 and shape[0] % block == 0 and math.prod(shape[1:]) % block == 0


class Blocks(Structure):
    name: ClassVar[str] = "block"
    description: ClassVar[str] = "square blocks of a weight matrix (4 x 4), kept or dropped whole"
    block: ClassVar[int] = 4

    def label(self) -> str:
        return f"block {self.block}x{self.block}"

    def allocations(self) -> Optional[Tuple[str, ...]]:
        return ("global",)

    def refusal(self, one_shot: bool) -> Optional[str]:
        if self.settings.layer_rates:
            return "prune.layer_rates contradicts a block structure (a level keeps a fraction of all tiles)"
        return None

    # ---------------------------------------------------------------- the plan
    def level_targets(self, densities: Sequence[float], shapes: Optional[Shapes],
                      one_shot: bool) -> List[Tuple[Optional[float], Any]]:
        if shapes is None:
            return [(None, density) for density in densities]
        tiled = {name: shape for name, shape in shapes.items() if tileable(shape, self.block)}
        if not tiled:
            raise ValueError(f"no prunable layer splits into whole {self.block}x{self.block} tiles")
        total = sum(math.prod(shape) for shape in shapes.values())
        dense = total - sum(math.prod(shape) for shape in tiled.values())
        count = sum(math.prod(shape) for shape in tiled.values()) // self.block ** 2
        self._dense = {name: tuple(shape) for name, shape in shapes.items() if name not in tiled}
        return [((dense + target_keep_count(d, count) * self.block ** 2) / total, d) for d in densities]

    def start_line(self) -> Optional[str]:
        dense = getattr(self, "_dense", {})
        kept = ", ".join(f"{name} {list(shape)}" for name, shape in dense.items()) or "none"
        return f"block {self.block}x{self.block}: layers kept dense (no whole tiles): {kept}"

    # ---------------------------------------------------------------- masks
    def masks(self, model: nn.Module, target: Any, scoring: Scoring) -> Masks:
        return compute_masks(model, selection=lambda current, alive, rounds: self._rounds(current, target, rounds),
                             allocation=None, **scoring.as_kwargs())

    def _rounds(self, current: Masks, fraction: float, rounds: Optional[int]):
        tiled = [name for name, mask in current.items() if tileable(tuple(mask.shape), self.block)]
        count = sum(current[name].numel() for name in tiled) // self.block ** 2
        alive = sum(int(tiles(current[name], self.block).any(-1).sum()) for name in tiled)
        keep = target_keep_count(fraction, count)
        if keep > alive:
            raise ValueError(f"a block level keeps {keep} tiles but only {alive} are alive; masks only shrink")
        steps = 1 if rounds is None else rounds
        counts = [keep if k == steps else max(keep, round(alive * (keep / alive) ** (k / steps)))
                  for k in range(1, steps + 1)] if alive else [0]
        return [(None, lambda scores, masks, n=n: self._keep_tiles(scores, masks, tiled, n)) for n in counts]

    def _keep_tiles(self, scores: Dict[str, torch.Tensor], masks: Masks, tiled: List[str], keep: int) -> Masks:
        """The ``keep`` alive tiles of highest mean score, over every tiled layer (ties: module
        order, then position)."""
        per_tile = []
        for name in tiled:
            tile_alive = tiles(masks[name], self.block).any(-1)
            value = tiles(torch.nan_to_num(scores[name].double(), nan=-math.inf).clamp(min=-1e300), self.block).mean(-1)
            per_tile.append(torch.where(tile_alive, value, torch.full_like(value, -math.inf)).reshape(-1))
        flat = torch.cat(per_tile)
        order = torch.sort(flat, descending=True, stable=True).indices[:keep]
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[order] = True
        new, start = dict(masks), 0
        for name, values in zip(tiled, per_tile):
            layer = chosen[start:start + values.numel()]
            start += values.numel()
            grid = tiles(masks[name], self.block).shape[:2]
            new[name] = untiled(layer.reshape(grid).to(masks[name].device), tuple(masks[name].shape), self.block)
        return new

    # ---------------------------------------------------------------- the shuffle control
    def shuffle(self, masks: Masks, seed: int) -> Masks:
        shuffled = {}
        for index, (name, mask) in enumerate(masks.items()):
            if not tileable(tuple(mask.shape), self.block):
                shuffled[name] = mask.clone()
                continue
            kept = tiles(mask, self.block).any(-1)
            digest = hashlib.sha256(f"block-shuffle:{seed}:{index}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            priority = torch.rand(kept.numel(), generator=generator, dtype=torch.float64)
            chosen = torch.zeros(kept.numel(), dtype=torch.bool)
            chosen[torch.sort(priority, descending=True, stable=True).indices[:int(kept.sum())]] = True
            shuffled[name] = untiled(chosen.reshape(kept.shape), tuple(mask.shape), self.block)
        return shuffled
