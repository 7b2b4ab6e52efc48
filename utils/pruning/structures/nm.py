"""The N:M structure: in every group of M consecutive inputs, N weights kept (``utils.pruning.nm``).

Level L of K keeps round(M - L (M - N) / (K - 1)) per group (K = 2: one-shot N:M after a dense
level); at_init prunes once, to N per group.  The pattern fixes every level's density, so
``prune.target_density`` and ``prune.layer_rates`` are refused, and ``prune.allocation`` does not
apply (every group keeps its own count; the start line says so).  Any per-weight criterion ranks
the weights of each group.  The shuffle control keeps each group's count at random positions.
"""
from __future__ import annotations

from typing import Any, ClassVar, List, Optional, Sequence, Tuple

from torch import nn

from utils.models.mask_layers import Masks
from utils.pruning import nm
from utils.pruning.masks import compute_masks
from utils.pruning.structures.base import Scoring, Shapes, Structure


class NM(Structure):
    name: ClassVar[str] = "nm"
    description: ClassVar[str] = "N of every M consecutive inputs kept (prune.nm; 2:4 runs faster on GPUs)"
    layer_columns: ClassVar[Tuple[str, ...]] = ("nm",)
    compaction: ClassVar[Optional[str]] = "semi-structured"
    fixes_densities: ClassVar[bool] = True
    setting_keys: ClassVar[Tuple[str, ...]] = ("prune.nm",)
    density_targets: ClassVar[bool] = False

    plan: Optional[nm.NMPlan] = None

    @property
    def pattern(self) -> Tuple[int, int]:
        return nm.parse_nm(self.settings.nm)

    def label(self) -> str:
        return self.settings.nm

    def describe_setting(self) -> str:
        return f"nm (prune.nm={self.settings.nm})"

    def refusal(self, one_shot: bool) -> Optional[str]:
        s = self.settings
        if s.layer_rates:
            return "prune.layer_rates contradicts prune.structure=nm (every group of every N:M layer keeps the same count)"
        if s.target_density is not None:
            return (f"prune.target_density={s.target_density} contradicts prune.structure=nm: prune.nm={s.nm} fixes "
                    f"every level's density; give prune.levels (at_init: neither)")
        if not one_shot and not s.is_control and (s.levels is None or s.levels < 2):
            return (f"prune.structure=nm with prune.training_type={s.training_type} needs prune.levels >= 2 (level 0 "
                    f"dense, the last keeping {s.nm}; 2 is one-shot), got {s.levels}")
        return None

    def level_targets(self, densities: Sequence[float], shapes: Optional[Shapes],
                      one_shot: bool) -> List[Tuple[Optional[float], Any]]:
        n, m = self.pattern
        levels = None if one_shot else len(densities)
        keeps = [n] if levels is None else nm.level_keeps(n, m, levels)
        if shapes is None:
            return [(None, (keep, m)) for keep in keeps]
        self.plan = nm.nm_plan(shapes, n, m, levels)
        return [(density, (keep, m)) for density, keep in zip(self.plan.densities, self.plan.keeps)]

    def start_line(self) -> Optional[str]:
        return nm.start_line(self.plan, self.settings.allocation) if self.plan is not None else None

    def masks(self, model: nn.Module, target: Any, scoring: Scoring) -> Masks:
        return compute_masks(model, nm=target, allocation=None, **scoring.as_kwargs())

    def shuffle(self, masks: Masks, seed: int) -> Masks:
        return nm.shuffled_nm_masks(masks, self.pattern[1], seed)

    def callbacks(self, model: nn.Module) -> List[Any]:
        return [nm.NMReport(self.pattern[1])]
