"""Level 0 taken from a control's source instead of trained again (``take_level_zero``).

A ``none`` or ``shuffle`` control starts
from its source's initial weights, and a source's level 0 is dense, so when nothing else
differs the control's level 0 would be an exact copy of the source's -- the same training
computed again.  It is taken instead: the source's level-0 rows of ``epochs.csv``,
``levels.csv`` and ``layers.csv`` are copied (timing columns included: what the numbers cost),
its ``masks/level_0.pt`` too, and ``reused.csv`` (``level, source, reason``) says which level
came from where; the control trains from level 1 on.  All of these must hold, else it trains
level 0 and says why in one line:

* ``prune.control`` is ``none`` or ``shuffle`` (``reinit`` starts from its own weights);
* ``prune.training_type`` is ``imp``: later levels start from the initial weights (the
  source's ``init.pt``, which the control has).  ``wr`` and ``lrr`` start them from level 0's
  rewind point or trained weights, which the source does not keep for others;
* the configs are the same apart from ``prune.masks_from``, ``prune.control``,
  ``prune.levels`` and the keys that never change results (the harness's rule: the caller
  passes the keys that differ, ``differing``): same seed (so the same data order), loader,
  optimizer, epochs, precision, ...; no stability analysis, Early-Bird or a structure with
  columns of its own (channel, N:M: they write files of their own at level 0);
* the source's level 0 is finished and dense (its mask keeps every weight), with every
  epoch's row and every layer's row there, in CSV files with the control's columns;
* the source records its data (``data.json``) and the control's files are that data still
  (checked again here: the source may have been waited for);
* it ran on the same device type as the control, with the same number of processes
  whenever that changes the model (BatchNorm with per-rank statistics:
  ``run_facts.batchnorm_processes``), as its last checkpoint records.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from utils.lottery.controls import (ControlError, ControlRequest, Source, finished_levels, first_line,
                                    load_level_masks)
from utils.runs import data_identity
from utils.runs.rundir import RunFiles

# Keys in which a control may differ from its source and still train the same level 0.
LEVEL_ZERO_FREE_KEYS = ("prune.masks_from", "prune.control", "prune.levels")


def _csv_rows(path: Path) -> Tuple[List[str], List[Dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def level_zero_difference(source: Source, request: ControlRequest, model: nn.Module, *, world_size: int,
                          device_type: str, columns: Mapping[str, List[str]], differing: Sequence[str]) -> Optional[str]:
    """None when this control's level 0 would be an exact copy of its source's (see the module
    docstring), else why not (a phrase).  ``columns``: the control's CSV logs' columns
    (``{"epochs": [...], "levels": [...], "layers": [...]}``); ``differing``: the keys in which
    the control's config differs from the source's in what a run computes (the harness's rule)."""
    from utils.runs import run_facts
    from utils.training.training_types import get_training_type
    control = request.control
    if control not in ("none", "shuffle"):
        return f"prune.control={control} starts from its own initial weights"
    if source.ticket is not None:
        return "the source is a ticket file, which holds no CSV rows to take"
    kind = request.training_type
    if not get_training_type(kind).resets_to_init:
        return (f"prune.training_type={kind}: later levels start from level 0's trained state, which the "
                f"source does not keep")
    for key, on in (("analysis.stability", request.stability), ("prune.early_bird", request.early_bird)):
        if on:
            return f"{key}={on} writes files of its own at level 0"
    structure = request.structure or source.structure
    if structure.level_columns or structure.layer_columns:
        return f"prune.structure={structure.settings.structure} writes files of its own at level 0"
    differing = [k for k in differing if k not in LEVEL_ZERO_FREE_KEYS]
    if differing:
        return "its config differs from the source's in " + ", ".join(differing[:4]) + (" ..." if len(differing) > 4 else "")
    if request.data is not None:
        try:
            recorded = data_identity.read_run_data(source.root)
        except data_identity.DataChanged as error:
            return str(error)
        if recorded is None:
            return "the source does not record which data it trained on (made before runs recorded it)"
        changed = data_identity.data_change(recorded, request.data)
        if changed:
            return f"the source was trained on other data: {changed}"
    if finished_levels(source) < 1:
        return "the source's level 0 is not finished"
    masks = load_level_masks(source, 0)
    if not all(bool(mask.all()) for mask in masks.values()):
        return "the source's level 0 is pruned (not dense)"
    execution = run_facts.recorded_execution(source.root, source.config.get("training.device"))
    if execution is None:
        return "the source's checkpoints/last.pt does not say how it ran"
    if execution.device_type != device_type:
        return f"the source ran on {execution.device_type}, this run on {device_type}"
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    sync_bn = request.sync_bn
    theirs = run_facts.batchnorm_processes(world_size=execution.world_size, device_type=execution.device_type,
                                           sync_bn=source.config.get("distributed.sync_bn", "auto"),
                                           has_batchnorm=has_batchnorm)
    mine = run_facts.batchnorm_processes(world_size=world_size, device_type=device_type, sync_bn=sync_bn,
                                         has_batchnorm=has_batchnorm)
    if theirs != mine:
        return (f"its BatchNorm statistics were per-rank over {theirs} process(es), this run's over {mine} "
                f"(another model)")
    expected = {"epochs": request.epochs, "levels": 1, "layers": len(source.layer_shapes)}
    for name, wanted in columns.items():
        path = source.root / f"{name}.csv"
        try:
            header, rows = _csv_rows(path)
        except OSError as error:
            return f"{path} cannot be read ({first_line(error)})"
        if header != list(wanted):
            return f"{path} has other columns than this run's"
        count = sum(1 for row in rows if row.get("level") == "0")
        if name in expected and count != expected[name]:
            return f"{path} has {count} level-0 rows, {expected[name]} expected"
    return None


def copy_level_zero(source: Source, root, logs: Mapping[str, Any]) -> int:
    """Append the source's level-0 rows to the control's CSV logs (objects with ``append(row)``,
    by name: epochs, levels, layers), write its level-0 masks and ``reused.csv``; -> rows copied."""
    from utils.runs.checkpointing import atomic_torch_save
    root = Path(root)
    copied = 0
    for name, log in logs.items():
        _, rows = _csv_rows(source.root / f"{name}.csv")
        for row in rows:
            if row.get("level") == "0":
                log.append(row)  # the strings as written: an exact copy
                copied += 1
    atomic_torch_save(load_level_masks(source, 0), RunFiles(root).masks(0))
    reused = RunFiles(root).reused
    reused.create()
    reused.append({"level": 0, "source": str(source.root),
                   "reason": "same config (masks_from, control, levels aside), seed and initial weights; dense level 0"})
    return copied


def take_level_zero(source: Source, request: ControlRequest, model: nn.Module, root, logs: Mapping[str, Any], *,
                    world_size: int, device_type: str, differing: Sequence[str]) -> Tuple[bool, str]:
    """Rank 0, in a fresh control directory: take the source's level 0 when it is identical
    (``level_zero_difference``), else leave it to be trained (and remove a ``reused.csv`` an
    interrupted start may have left).  -> (taken, the line to print)."""
    root = Path(root)
    try:
        why_not = level_zero_difference(source, request, model, world_size=world_size, device_type=device_type,
                                        columns={name: list(log.columns) for name, log in logs.items()},
                                        differing=differing)
    except ControlError as error:
        why_not = str(error)
    if why_not is not None:
        RunFiles(root).reused.path.unlink(missing_ok=True)
        return False, f"level 0 is trained, not taken from {source.root}: {why_not}"
    rows = copy_level_zero(source, root, logs)
    return True, (f"level 0 taken from {source.root} ({rows} CSV rows copied; see {RunFiles(root).reused.path}): "
                  f"it would be an exact copy of the source's")
