"""Which epoch of a level counts as its best, and its early-stopping epoch: model selection.

A level's statistics are one plain dict (``new_level_stats``), updated after every epoch's
evaluation (``record_epoch``) and checkpointed with the run (``last.pt``'s ``level_stats``), so
a resumed level selects exactly as an uninterrupted one.  ``level_fields`` turns it into the
level's ``levels.csv`` columns.

* With validation data (``dataset.val_fraction``: held out from the training file, or
  ``dataset.val_path``), every epoch's row has ``val_loss`` and ``val_acc``, and the epochs are
  chosen on them, never on the test set:

  - the best epoch has the highest validation accuracy (the earliest of ties);
    ``best_test_acc`` is the test accuracy AT that epoch, ``best_val_acc`` its validation
    accuracy, ``best_selected_on`` = ``val``;
  - the early-stopping epoch has the lowest validation loss (the earliest of ties): Frankle &
    Carbin's early-stopping iteration, whose training iteration (``early_stop_iteration``: the
    optimizer steps of the schedule at that epoch's end) and test accuracy
    (``test_acc_at_early_stop``) they plot beside the accuracy.

* Without validation data the best epoch has the highest TEST accuracy (``best_test_acc`` is that
  maximum, optimistic by construction) and ``best_selected_on`` = ``test`` says so; the report
  labels it the same way.  ``final_test_acc`` (the last epoch's) is selection-free either way.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping

SELECTED_ON_VALIDATION, SELECTED_ON_TEST = "val", "test"
# levels.csv columns of every run: which epoch was the best, and what it was chosen on
SELECTION_LEVEL_COLUMNS = ["best_epoch", "best_selected_on"]
# the columns validation data adds to epochs.csv and levels.csv
VALIDATION_EPOCH_COLUMNS = ["val_loss", "val_acc"]
VALIDATION_LEVEL_COLUMNS = ["best_val_acc", "early_stop_epoch", "early_stop_iteration", "test_acc_at_early_stop"]


def new_level_stats(with_validation: bool) -> Dict[str, Any]:
    """A level's statistics before its first epoch (plain values: they go into checkpoints)."""
    stats: Dict[str, Any] = {"train_time_s": 0.0, "best_test_acc": 0.0, "best_epoch": -1,
                             "best_selected_on": SELECTED_ON_VALIDATION if with_validation else SELECTED_ON_TEST}
    if with_validation:
        stats.update(best_val_acc=-math.inf, early_stop_epoch=-1, early_stop_iteration=-1,
                     early_stop_val_loss=math.inf, test_acc_at_early_stop=math.nan)
    return stats


def record_epoch(stats: Dict[str, Any], row: Mapping[str, Any], iterations_per_epoch: int) -> None:
    """Update ``stats`` with one epoch's ``epochs.csv`` row (``epoch``, ``test_acc``; ``val_loss`` and
    ``val_acc`` when the level selects on validation data)."""
    epoch, test_acc = int(row["epoch"]), float(row["test_acc"])
    if stats["best_selected_on"] == SELECTED_ON_TEST:
        if stats["best_epoch"] < 0 or test_acc > stats["best_test_acc"]:
            stats.update(best_epoch=epoch, best_test_acc=test_acc)
        return
    if "val_acc" not in row:
        raise KeyError("the level selects on validation data but the epoch's row has no val_acc")
    if float(row["val_acc"]) > stats["best_val_acc"]:
        stats.update(best_epoch=epoch, best_val_acc=float(row["val_acc"]), best_test_acc=test_acc)
    if float(row["val_loss"]) < stats["early_stop_val_loss"]:
        stats.update(early_stop_epoch=epoch, early_stop_val_loss=float(row["val_loss"]),
                     early_stop_iteration=(epoch + 1) * int(iterations_per_epoch), test_acc_at_early_stop=test_acc)


def level_fields(stats: Mapping[str, Any]) -> Dict[str, Any]:
    """The level's selection columns for ``levels.csv`` (``best_test_acc``, ``SELECTION_LEVEL_COLUMNS``,
    and ``VALIDATION_LEVEL_COLUMNS`` when it selected on validation data)."""
    fields = {"best_test_acc": stats["best_test_acc"], "best_epoch": stats["best_epoch"],
              "best_selected_on": stats["best_selected_on"]}
    if stats["best_selected_on"] == SELECTED_ON_VALIDATION:
        fields.update({name: stats[name] for name in VALIDATION_LEVEL_COLUMNS})
    return fields


def selection_label(selected_on: str) -> str:
    """How a report names the best epoch's accuracy."""
    if selected_on == SELECTED_ON_VALIDATION:
        return "test accuracy at the best validation epoch"
    return "best test accuracy (epoch selected on the test set)"
