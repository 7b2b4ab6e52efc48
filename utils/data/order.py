"""The data order.

* ``epoch_order``: THE definition of which samples a rank sees in which batch.  Both
  loader back-ends use it, so 1 process and N processes see the same global batches, and
  a run resumed in the middle of an epoch (``start_batch``) sees exactly the batches it
  had not seen yet."""
from __future__ import annotations

import math

import numpy as np

from utils.data.sources import DataError


# --------------------------------------------------------------------------- data order
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def epoch_order(num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int,
                global_batch_size: int, shuffle: bool = True, drop_last: bool = True,
                start_batch: int = 0) -> np.ndarray:
    """Indices (int64) that rank ``rank`` reads in epoch ``epoch``, in order.

    ``perm`` is ``np.random.default_rng([seed, epoch]).permutation(n)`` when ``shuffle``,
    else ``arange(n)``.  With G = global_batch_size, W = world_size, L = G / W:

    * ``drop_last=True`` (training): the first (n // G) * G entries of ``perm`` form the
      global batches ``perm[b*G:(b+1)*G]``; rank r takes the r-th contiguous chunk of L of
      every global batch (``perm.reshape(nb, W, L)[:, r]``).  So the union of the ranks'
      b-th local batches is the b-th global batch whatever W is.
    * ``drop_last=False`` (evaluation): every sample exactly once over all ranks; rank r
      takes the r-th **contiguous** part of ``np.array_split(perm, W)`` (sizes differ by at
      most one; ranks may hold different numbers of batches, the last one partial).

    ``start_batch`` skips the first ``start_batch`` local batches (``start_batch * L``
    indices) for an exact mid-epoch resume.  G not divisible by W is a DataError.
    """
    num_samples = _check_int("num_samples", num_samples, 0)
    seed = _check_int("seed", seed, 0)
    epoch = _check_int("epoch", epoch, 0)
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise DataError(f"rank={rank} must be < world_size={world_size}")
    global_batch_size = _check_int("global batch size", global_batch_size, 1)
    start_batch = _check_int("start_batch", start_batch, 0)
    if global_batch_size % world_size:
        raise DataError(f"global batch size {global_batch_size} is not divisible by world_size={world_size}; "
                        f"use a multiple of {world_size}")
    local_batch = global_batch_size // world_size

    if shuffle:
        perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
    else:
        perm = np.arange(num_samples)
    if drop_last:
        num_batches = num_samples // global_batch_size
        mine = perm[:num_batches * global_batch_size].reshape(num_batches, world_size, local_batch)[:, rank]
        mine = mine.reshape(-1)
    else:
        mine = np.array_split(perm, world_size)[rank]
    return np.ascontiguousarray(mine[start_batch * local_batch:], dtype=np.int64)


def batches_per_epoch(num_samples: int, *, rank: int, world_size: int, global_batch_size: int,
                      drop_last: bool) -> int:
    """len(epoch_order(...)) in local batches, without building the order."""
    local_batch = global_batch_size // world_size
    if drop_last:
        return num_samples // global_batch_size
    part = num_samples // world_size + (1 if rank < num_samples % world_size else 0)
    return math.ceil(part / local_batch)


