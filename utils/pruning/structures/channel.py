"""The channel structure: output channels, coupled groups pruned together.

The pieces: ``channel_graph`` (which channels the network ties together), the criteria's
channel scores (``utils.pruning.criteria``: a criterion that scores channels has
``score_channels``), ``channel_scores`` (their common scale), ``channel_select`` (floors,
allocations, weight masks of the kept units), ``channel_zeroing`` (a pruned channel outputs 0).
A level's target is a channel density: kept units / all prunable units.
"""
from __future__ import annotations

from typing import Any, ClassVar, List, Optional, Sequence, Tuple

import torch
from torch import nn

from utils.core.callbacks import Callback, LevelInfo
from utils.models import mask_layers
from utils.models.mask_layers import Masks
from utils.pruning.channel_graph import CHANNEL_ALLOCATIONS, ChannelStructure, StructureError, build_channel_structure
from utils.pruning.channel_scores import channel_scores
from utils.pruning.channel_select import (
    channel_density,
    channels_alive,
    check_channel_densities,
    compute_channel_masks,
    keep_vector,
    select_channels,
    shuffled_channel_masks,
)
from utils.pruning.channel_zeroing import ChannelZeroing
from utils.pruning.structures.base import Scoring, Structure
from utils.runs import checkpointing
from utils.runs.rundir import RunFiles


class ChannelReport(Callback):
    """Channel structure: channels alive in levels.csv (``channel_density``) and layers.csv
    (``channels``, ``channels_alive``), and each finished level's weights in
    ``checkpoints/level_L.pt`` (what ``python -m utils.compact`` makes smaller)."""

    def __init__(self, structure: ChannelStructure):
        self.structure = structure

    def on_level_end(self, info: LevelInfo) -> None:
        masks = mask_layers.get_masks(info.model)
        info.row["channel_density"] = channel_density(self.structure, masks)
        alive = channels_alive(masks)
        for layer in info.extra["layers"]:
            layer["channels_alive"], layer["channels"] = alive[layer["layer"]]

    def on_level_logged(self, info: LevelInfo) -> None:
        if info.is_primary:
            checkpointing.atomic_torch_save({"format": checkpointing.CHECKPOINT_FORMAT, "level": info.level,
                                             "model": checkpointing.model_state(info.model)},
                                            RunFiles(info.root).level_weights(info.level))


class Channel(Structure):
    name: ClassVar[str] = "channel"
    description: ClassVar[str] = ("output channels, coupled groups together (torch-pruning's dependency graph); "
                                  "criteria that score channels")
    level_columns: ClassVar[Tuple[str, ...]] = ("channel_density",)
    layer_columns: ClassVar[Tuple[str, ...]] = ("channels", "channels_alive")
    target_unit: ClassVar[str] = "channel"   # a level's target_density: kept units / all units, not weights
    compaction: ClassVar[Optional[str]] = "channels"
    compares_units: ClassVar[bool] = True

    graph: Optional[ChannelStructure] = None

    def accepts(self, criterion: Any) -> bool:
        return criterion.score_channels is not None

    def allocations(self) -> Optional[Tuple[str, ...]]:
        return CHANNEL_ALLOCATIONS

    def refusal(self, one_shot: bool) -> Optional[str]:
        if self.settings.layer_rates:
            return ("prune.layer_rates contradicts prune.structure=channel (layer rates count weights; a channel "
                    "level keeps a density of coupled channel units)")
        return None

    def attach(self, model: nn.Module, input_shape: Sequence[int], densities: Sequence[float]) -> None:
        self.graph = build_channel_structure(model, input_shape)
        channel_scores(model, self.graph, self.settings.criterion)  # a criterion that cannot score this network is refused now
        if densities:
            check_channel_densities(self.graph, densities, self.settings.min_channel_fraction)

    def _graph(self) -> ChannelStructure:
        if self.graph is None:
            raise StructureError("the channel structure is not attached to a model yet (Structure.attach)")
        return self.graph

    def masks(self, model: nn.Module, target: Any, scoring: Scoring) -> Masks:
        return compute_channel_masks(model, self._graph(), density=target, criterion=scoring.criterion,
                                     allocation=scoring.allocation, seed=scoring.seed,
                                     min_fraction=self.settings.min_channel_fraction)

    def shuffle(self, masks: Masks, seed: int) -> Masks:
        return shuffled_channel_masks(self._graph(), masks, seed)

    def callbacks(self, model: nn.Module) -> List[Any]:
        zeroing = ChannelZeroing(self._graph(), model)
        zeroing.in_every_training = True  # the stability analysis' second copy keeps channels dead too
        return [zeroing, ChannelReport(self._graph())]

    def unit_vector(self, model: nn.Module, target: Any, scoring: Scoring) -> Optional[torch.Tensor]:
        graph = self._graph()
        return keep_vector(select_channels(model, graph, density=target, criterion=scoring.criterion,
                                           allocation=scoring.allocation, seed=scoring.seed,
                                           min_fraction=self.settings.min_channel_fraction), graph)
