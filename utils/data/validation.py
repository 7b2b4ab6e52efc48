"""Validation data held out from the training file (``dataset.val_fraction``).

``split_indices(num_samples, fraction, seed)`` -> (training indices, validation indices) of the
training ``.beton``: sorted int64 sample indices, disjoint, together every sample once.  The
held-out samples are the first ``round(fraction * num_samples)`` of a permutation drawn from
``numpy.random.default_rng([VALIDATION_STREAM, seed])``, so the split is a function of the
file's sample count, the fraction and ``dataset.val_seed`` only: not of ``experiment.seed``
(a study's seeds and controls all hold out the same samples), the process count, the rank or
the loader back-end.  ``dataset.train_samples`` trains on a subset of the rest, drawn from the same
permutation.  Every loader takes the indices (``make_loader(indices=...)``) and reads
only those samples, by their index in the file, so the augmentation of a training sample is the
same as without a split."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from utils.data.sources import DataError

VALIDATION_STREAM = 0x76616C   # "val": the split's random stream, apart from the data order's [seed, epoch]


def validation_count(num_samples: int, fraction: float) -> int:
    """How many samples ``fraction`` holds out: round(fraction * num_samples), refused when that
    leaves no validation sample or no training sample."""
    count = int(round(float(fraction) * int(num_samples)))
    if count < 1 or count >= num_samples:
        raise DataError(f"dataset.val_fraction={fraction} of {num_samples} training samples holds out {count}; "
                        f"it must hold out at least 1 and leave at least 1 for training")
    return count


def split_indices(num_samples: int, fraction: float, seed: int,
                  train_samples: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """-> (training indices, validation indices), each sorted int64 (see the module docstring).
    ``fraction`` 0: no validation sample.  ``train_samples`` > 0 (``dataset.train_samples``): train on
    that many of the samples not held out, the next ones of the same permutation, so the validation
    samples do not depend on it and a smaller subset is part of a larger one."""
    count = validation_count(num_samples, fraction) if fraction > 0 else 0
    order = np.random.default_rng([VALIDATION_STREAM, int(seed)]).permutation(int(num_samples))
    end = int(num_samples)
    if train_samples:
        if not 1 <= train_samples <= num_samples - count:
            raise DataError(f"dataset.train_samples={train_samples}: the training file has {num_samples - count} "
                            f"samples to train on (after {count} held out for validation); use 1..{num_samples - count} "
                            f"or 0 for all")
        end = count + int(train_samples)
    return np.sort(order[count:end]).astype(np.int64), np.sort(order[:count]).astype(np.int64)


def check_indices(indices, num_samples: int, path) -> np.ndarray:
    """``indices`` as a sorted, duplicate-free int64 array within the file's ``num_samples``."""
    array = np.asarray(indices)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: the samples to read must be a non-empty 1-D array of integer indices")
    array = array.astype(np.int64)
    if array.min() < 0 or array.max() >= num_samples or np.any(np.diff(array) <= 0):
        raise DataError(f"{path}: the samples to read must be increasing indices in 0..{num_samples - 1}")
    return array
