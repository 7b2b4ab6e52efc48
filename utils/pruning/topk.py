"""Keeping the top k by score, exactly and deterministically.

Within a layer (or, for ``global``, within the concatenation of all layers in module
order) the allocated count is filled by top score.  Ties at the cut are broken by
position: the lowest flat index wins.  The count is therefore exact even when every
score is equal, and the result is the same on every device (``torch.topk`` promises
neither about ties).  The k-th largest score is found by ``torch.kthvalue`` on a narrow
band of candidates located with a strided sample (an exact method: it falls back to
``kthvalue`` on everything when the band misses), which is what makes global pruning of
ResNet-50 take a fraction of a second on CPU (``bench/pruning_speed.py``)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

# --------------------------------------------------------------------------------------
# Selecting the top k by score (exact count, deterministic ties)
# --------------------------------------------------------------------------------------

# Vectors longer than this look for the k-th value in a band found by a strided sample.
_BAND_SEARCH_MIN_NUMEL = 1 << 20
_BAND_SAMPLE_SIZE = 1 << 16
# Half-width of the band, in sample positions: 1% of the sample (about 3x the standard
# error of a sample quantile at 65 k samples is 0.6%) plus a constant for extreme quantiles.
_BAND_HALF_WIDTH_FRACTION = 0.01
_BAND_HALF_WIDTH_MIN = 64


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor (0-d tensor), 1 <= k <= numel; exact."""
    n = values.numel()
    if n >= _BAND_SEARCH_MIN_NUMEL:
        sample = values[:: max(1, n // _BAND_SAMPLE_SIZE)].sort().values
        m = sample.numel()
        position = round((n - k) / n * (m - 1))  # ascending position of the cut in the sample
        half_width = int(_BAND_HALF_WIDTH_FRACTION * m) + _BAND_HALF_WIDTH_MIN
        low, high = sample[max(0, position - half_width)], sample[min(m - 1, position + half_width)]
        above_band = int((values > high).count_nonzero())  # note: a CPU-GPU sync point
        band = values[(values >= low) & (values <= high)]
        rank_in_band = k - above_band
        if 1 <= rank_in_band <= band.numel():
            return torch.kthvalue(band, band.numel() - rank_in_band + 1).values
    return torch.kthvalue(values, n - k + 1).values


def _keep_top_k(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(keep, cut): ``keep`` has exactly k True at the k largest scores; ``cut`` is the k-th
    largest score (None when k is 0 or everything)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} weights")
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool), None
    if k == n:
        return torch.ones_like(scores, dtype=torch.bool), None
    cut = _kth_largest(flat, k)
    keep = flat >= cut
    surplus = int(keep.count_nonzero()) - k  # > 0 only when several scores equal the cut
    if surplus < 0:  # NaN scores (never >= anything) hid part of the top k: they rank lowest
        return _keep_top_k(torch.nan_to_num(scores, nan=-math.inf, posinf=math.inf, neginf=-math.inf), k)
    if surplus > 0:
        tied = (flat == cut).nonzero().squeeze(1)
        keep[tied[tied.numel() - surplus:]] = False  # drop the highest indices among ties
    return keep.view_as(scores), cut


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor (shape of ``scores``) with exactly ``k`` True: the k largest scores.

    Ties at the cut go to the lowest flat indices; NaN scores rank lowest (as -inf).
    """
    return _keep_top_k(scores, k)[0]


def keep_top_k_alive(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """Like ``keep_top_k`` among the alive entries only: pruned entries stay pruned.

    ``scores`` holds -inf at pruned entries.  When the cut is above -inf no pruned entry can
    be chosen, so the whole tensor is ranked at once (no gather of the alive entries);
    otherwise (alive scores of -inf reach the cut, or everything alive is kept) the alive
    entries are ranked alone.
    """
    keep, cut = _keep_top_k(scores, k)
    if cut is None or not bool(cut > -math.inf):
        keep = torch.zeros_like(alive)
        keep[alive] = keep_top_k(scores[alive], k)
    return keep


