"""Early-Bird tickets (You et al., ICLR 2020): end level 0 when the channel mask stops moving.

At the end of every epoch of level 0 the channel mask that pruning to the NEXT level's
density would give now is drawn (a flat bool vector over the prunable channel units,
``utils.pruning.channel_select.keep_vector``).  Its distance to an earlier mask is the normalized
Hamming distance: the fraction of units on which the two masks differ.  With a window of
W (default 5, You et al.'s ``epoch_keep``) the masks of the last W epochs are kept, the
current one included; the epoch's distance is the LARGEST distance between the current
mask and each of the W - 1 before it (undefined, and no stop, until W masks exist).  Level
0 ends at the first epoch whose distance is below the threshold (default 0.1) -- the
reference code's queue of 5 masks and ``max(dist) < 0.1`` test.

``early_bird_stop`` is that rule on a plain sequence of masks; ``EarlyBird`` is the
callback the harness runs: it writes ``early_bird.csv`` (``epoch, distance``; distance
empty while undefined), sets ``info.end_level`` at the stopping epoch, and keeps its
window and row count in ``state_dict()`` so a resumed run continues exactly (rows written
after the checkpoint it resumes from are dropped, like the harness's own CSVs).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from utils.core.callbacks import Callback
from utils.runs.rundir import RunFiles

DEFAULT_THRESHOLD = 0.1
DEFAULT_WINDOW = 5


def mask_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalized Hamming distance: the fraction of entries where two bool masks differ."""
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a.bool() ^ b.bool()).sum()) / max(1, a.numel())


def window_distance(window: Sequence[torch.Tensor]) -> float:
    """Largest distance between the last mask of ``window`` and each mask before it."""
    current = window[-1]
    return max(mask_distance(current, earlier) for earlier in window[:-1])


def early_bird_stop(masks: Sequence[torch.Tensor], threshold: float = DEFAULT_THRESHOLD,
                    window: int = DEFAULT_WINDOW) -> Tuple[Optional[int], List[Optional[float]]]:
    """(index of the first mask at which Early-Bird stops or None, distance per mask).

    The distance of mask i is defined once ``window`` masks exist (i >= window - 1): the
    largest distance between mask i and masks i-window+1 .. i-1.  Stops at the first i
    whose distance is < ``threshold``.
    """
    if window < 2:
        raise ValueError(f"the Early-Bird window must hold at least 2 masks, got {window}")
    distances: List[Optional[float]] = []
    stop = None
    for i in range(len(masks)):
        if i < window - 1:
            distances.append(None)
            continue
        distance = window_distance(masks[i - window + 1:i + 1])
        distances.append(distance)
        if stop is None and distance < threshold:
            stop = i
    return stop, distances


class EarlyBird(Callback):
    """Ends level 0 at the Early-Bird epoch.

    ``draw_mask(model) -> bool tensor``: the channel mask at the next level's density, e.g.
    ``lambda m: structured.keep_vector(structured.select_channels(m, structure, density=d1,
    criterion=..., allocation=...), structure)``.  ``agree(flag) -> flag``: makes the stop
    decision the same on every rank (e.g. rank 0's, broadcast); identity by default.
    ``min_epochs``: never stop before this many epochs are done (WR: ``prune.rewind_epoch``,
    whose state later levels restart from, must have been reached).
    """

    name = "early_bird"

    def __init__(self, draw_mask: Callable[[torch.nn.Module], torch.Tensor], threshold: float = DEFAULT_THRESHOLD,
                 window: int = DEFAULT_WINDOW, agree: Optional[Callable[[bool], bool]] = None,
                 min_epochs: int = 0):
        if window < 2:
            raise ValueError(f"early_bird window must be >= 2, got {window}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"early_bird threshold must be in (0, 1], got {threshold}")
        self.draw_mask, self.threshold, self.window = draw_mask, threshold, window
        self.agree = agree or (lambda flag: flag)
        self.min_epochs = min_epochs
        self.recent: List[torch.Tensor] = []   # the last `window` masks (CPU bool)
        self.rows = 0                          # data rows of early_bird.csv this state accounts for
        self.stopped_epoch: Optional[int] = None

    # --------------------------------------------------------------------- level loop
    def on_run_start(self, info) -> None:
        if info.is_primary and info.root is not None:
            RunFiles(info.root).early_bird.truncate(self.rows)

    def on_epoch_logged(self, info) -> None:
        if info.level != 0 or self.stopped_epoch is not None:
            return
        self.recent.append(self.draw_mask(info.model).detach().to("cpu", torch.bool))
        self.recent = self.recent[-self.window:]
        distance = window_distance(self.recent) if len(self.recent) == self.window else None
        if info.is_primary and info.root is not None:
            log = RunFiles(info.root).early_bird
            log.truncate(self.rows)  # header present, no stray rows
            log.append({"epoch": info.epoch, "distance": distance})
        self.rows += 1
        below = distance is not None and distance < self.threshold and info.epoch + 1 >= self.min_epochs
        if self.agree(below):
            self.stopped_epoch = info.epoch
            info.end_level = True

    # ------------------------------------------------------------------------ resume
    def state_dict(self) -> Dict:
        return {"recent": [mask.clone() for mask in self.recent], "rows": self.rows,
                "stopped_epoch": -1 if self.stopped_epoch is None else self.stopped_epoch,
                "threshold": self.threshold, "window": self.window}

    def load_state_dict(self, state: Dict) -> None:
        if state.get("window") != self.window or state.get("threshold") != self.threshold:
            raise ValueError("early_bird state from another threshold/window; the config changed")
        self.recent = [mask.to(torch.bool) for mask in state["recent"]]
        self.rows = int(state["rows"])
        stopped = int(state["stopped_epoch"])
        self.stopped_epoch = None if stopped < 0 else stopped
