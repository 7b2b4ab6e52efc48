"""The report's numbers: per-level summaries (mean, sample std over seeds, n), ``summary.csv``
and ``report.md``.

Densities are named by what they count, so that a channel density is never read as a weight
density: ``levels.csv``'s ``target_density`` counts the units its structure's ``target_unit``
names (``Structure.target_unit``: prunable weights, or channels), and becomes
``target_weight_density`` / ``target_channel_density``; ``density`` is always the fraction of
prunable weights kept, ``weight_density``; a structure's own achieved density (its level column
``<unit>_density``: ``channel_density``) is shown beside it.  ``summary.csv`` keeps ``density``
(= ``weight_density``) for scripts written before; its old ``target_density`` is gone, since for
a channel run it was a channel density.

``report.md`` opens with one table of final test accuracy by density, one column per group
(``accuracy_by_density``): rows are the levels' planned densities, matched across groups by
the value and its unit (not by the level's number), so a study's ticket, its controls and other
training types at the same density share a row; a group without that density leaves the cell
empty."""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pandas as pd

from utils.report import cost
from utils.report.experiments import (
    BN_PROCESSES_KEY,
    DATA_KEY,
    IGNORED_FOR_GROUPING,
    Group,
    _level_list,
    _show,
    chance_margin,
    config_defaults,
    differing_keys,
    value_in_table,
)
from utils.report.labels import best_label, selected_on, structure_keys
from utils.runs import rundir


def summarize(group: Group) -> pd.DataFrame:
    """One row per level: densities, mean/std of final and best test accuracy, n seeds, and the
    epochs of training spent to produce the level (``cost.COLUMN``; the same for every seed)."""
    frames = [e.levels.assign(seed=e.seed) for e in group.members if len(e.levels)]  # one run per seed
    columns = ["level", "target_density", "density", "final_test_acc_mean", "final_test_acc_std",
               "best_test_acc_mean", "best_test_acc_std", "n_seeds", "seeds", cost.COLUMN]
    if not frames:
        return pd.DataFrame(columns=columns)
    config = {**config_defaults(), **group.config}
    steps = next((e.iterations_per_epoch for e in group.members if e.iterations_per_epoch), None)
    rows = []
    for level, part in pd.concat(frames).groupby("level", sort=True):
        n = len(part)
        rows.append({
            "level": int(level), "target_density": float(part["target_density"].mean()),
            "density": float(part["density"].mean()),
            "final_test_acc_mean": float(part["final_test_acc"].mean()),
            "final_test_acc_std": float(part["final_test_acc"].std(ddof=1)) if n > 1 else math.nan,
            "best_test_acc_mean": float(part["best_test_acc"].mean()),
            "best_test_acc_std": float(part["best_test_acc"].std(ddof=1)) if n > 1 else math.nan,
            "n_seeds": n, "seeds": " ".join(str(s) for s in part["seed"]),
            cost.COLUMN: cost.level_cost(config, int(level), steps),
        })
    return pd.DataFrame(rows, columns=columns)


def summary_table(groups: Sequence[Group]) -> pd.DataFrame:
    keys = differing_keys(groups)
    frames, named = [], {}
    for group in groups:
        summary = summarize(group)
        named.update(dict.fromkeys(named_densities(group, summary).columns))
        frame = with_named_densities(group, summary)
        frame.insert(0, "label", group.label)
        frame.insert(0, "group", group.gid)
        for position, key in enumerate(keys):
            frame.insert(2 + position, key, value_in_table(group, key, groups))
        frames.append(frame)
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True)
    # groups of different structures name different densities: all of them after "level", targets first
    order = sorted(named, key=lambda c: (not c.startswith("target_"), c == "weight_density"))
    rest = [c for c in table.columns if c not in named]
    at = rest.index("level") + 1
    return table[rest[:at] + order + rest[at:]]


# ====================================================================== densities, named
def structure_class(config: Mapping[str, Any]):
    """The run's ``Structure`` subclass, or None when it cannot be imported here."""
    from utils.pruning.structures import StructureRegistryError, get_structure
    try:
        return get_structure(str(config.get("prune.structure") or "unstructured"))
    except StructureRegistryError:
        return None


def target_unit(config: Mapping[str, Any]) -> Optional[str]:
    """What the run's ``levels.csv`` ``target_density`` is a density of: its structure's
    ``target_unit`` ("weight", "channel"); None when the structure cannot be imported here."""
    structure = structure_class(config)
    return None if structure is None else str(structure.target_unit)


def target_column(unit: Optional[str]) -> str:
    """The report's name of a target density of ``unit`` (None: a unit the report cannot know)."""
    return f"target_{unit}_density" if unit else "target_density_unit_unknown"


def named_densities(group: Group, summary: pd.DataFrame) -> pd.DataFrame:
    """The densities of ``summary``'s levels under names that say what they count: the target
    (``target_<unit>_density``), the structure's own achieved density when it is not a weight
    density (the level column ``<unit>_density`` among its ``level_columns``, mean over seeds),
    ``weight_density``; one row per summary row."""
    unit = target_unit(group.config)
    columns = {target_column(unit): summary["target_density"].to_numpy()}
    own = f"{unit}_density"
    frames = [e.levels for e in group.members if own in e.levels.columns and len(e.levels)]
    if unit and unit != "weight" and own in structure_class(group.config).level_columns and frames:
        means = pd.concat(frames).groupby("level")[own].mean()
        columns[own] = [float(means.get(level, math.nan)) for level in summary["level"]]
    columns["weight_density"] = summary["density"].to_numpy()
    return pd.DataFrame(columns, index=summary.index)


def with_named_densities(group: Group, summary: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with ``target_density`` and ``density`` replaced by ``named_densities``, in
    their place; ``density`` (= ``weight_density``) kept at the end for scripts written before."""
    named = named_densities(group, summary)
    at = list(summary.columns).index("target_density")
    rest = summary.drop(columns=["target_density", "density"])
    frame = pd.concat([rest.iloc[:, :at], named, rest.iloc[:, at:]], axis=1)
    frame["density"] = summary["density"]
    return frame


def density_header(column: str) -> str:
    """report.md's words for a ``named_densities`` column: target_channel_density -> target channel density."""
    return column.replace("_", " ")


# ====================================================================== the table of all groups
def taken_levels(group: Group) -> set:
    """Levels some member of ``group`` took from its source instead of training them (reused.csv)."""
    levels = set()
    for experiment in group.members:
        try:
            levels |= rundir.RunFiles(experiment.path).taken_levels()
        except Exception:  # noqa: BLE001 -- a note only: the status in Experiments says it is unreadable
            pass
    return levels


def accuracy_by_density(groups: Sequence[Group], summaries: Dict[str, pd.DataFrame]) -> List[Dict[str, Any]]:
    """One row per planned density, in decreasing order: ``{"unit", "target", "levels",
    "weight_density": [...], "cells": {gid: summary row}}``.  A level goes to the row of its
    target density and unit (4 significant digits: the plan's densities are the same numbers
    for a source, its controls and every training type with the same rate), every dense level
    to one row (unit "dense"); a level without a target goes by its weight density."""
    rows: Dict[Tuple, Dict[str, Any]] = {}
    for group in groups:
        unit = target_unit(group.config)
        for row in summaries[group.gid].itertuples():
            target, row_unit = float(row.target_density), unit
            if math.isnan(target):
                target, row_unit = float(row.density), "weight"
            key = (row_unit or "", float(f"{target:.4g}"))
            if key[1] == 1.0:  # the dense network: 100% of channels is 100% of weights
                key, row_unit = ("dense", 1.0), "dense"
            if key in rows and group.gid in rows[key]["cells"]:  # two levels of one group at one density
                key = key + (int(row.level),)
            entry = rows.setdefault(key, {"unit": row_unit, "target": key[1], "levels": [], "weight_density": [],
                                          "cells": {}})
            entry["cells"][group.gid] = row
            entry["levels"].append(int(row.level))
            entry["weight_density"].append(float(row.density))
    return [rows[key] for key in sorted(rows, key=lambda k: (-k[1], k[0], k[2:]))]


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.3g}%"


def accuracy_by_density_markdown(groups: Sequence[Group], summaries: Dict[str, pd.DataFrame]) -> List[str]:
    """The table that opens report.md: final test accuracy, mean ± std over seeds, one column per group."""
    rows = accuracy_by_density(groups, summaries)
    taken = {g.gid: taken_levels(g) for g in groups}
    lines = ["## Final test accuracy by density", "",
             "Test accuracy (%) at the last epoch of each level, mean ± sample std (ddof=1) over the group's seeds; "
             "n seeds in each column's head (a cell with fewer seeds finished says its own n). Rows: the levels' "
             "planned (target) density; a group with no level at that density leaves its cell empty. "
             "Weight density: the fraction of prunable weights kept (each group's mean over seeds).", ""]
    # every group a column: one with no finished level yet stays empty
    header = ["target density", "weight density", "level", *(f"{g.gid}: {g.label} (n={len(g.members)})" for g in groups)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    marked = False
    for row in rows:
        unit = {"dense": "(dense)", None: "(unit unknown)"}.get(row["unit"], f"of {row['unit']}s")
        weights = " / ".join(dict.fromkeys(_percent(d) for d in row["weight_density"]))
        levels = ", ".join(str(level) for level in dict.fromkeys(row["levels"]))
        cells = []
        for group in groups:
            summary = row["cells"].get(group.gid)
            if summary is None:
                cells.append("")
                continue
            n = int(summary.n_seeds)
            text = _cell(summary.final_test_acc_mean, summary.final_test_acc_std, n)
            if n != len(group.members):
                text += f" (n={n})"
            if int(summary.level) in taken[group.gid]:
                text += " †"
                marked = True
            cells.append(text)
        lines.append("| " + " | ".join([f"{_percent(row['target'])} {unit}", weights, levels, *cells]) + " |")
    lines.append("")
    if marked:
        lines += ["† a level some seed of the control took from its source instead of training it (the same masks, "
                  "weights and seed: the source's numbers; the status in Experiments names the runs).", ""]
    return lines


# ============================================================================ figures
def _cell(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 and not math.isnan(std) else f"{mean:.2f}"


def markdown(groups: Sequence[Group], summaries: Dict[str, pd.DataFrame], figures: Dict[str, List[str]],
             command: str) -> str:
    lines = ["# Pruning report", "",
             f"Made by `{command}` on {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}. Accuracies in %; "
             "mean ± sample standard deviation (ddof=1) over the seeds of a group; n = seeds with that level finished.",
             ""]
    lines += accuracy_by_density_markdown(groups, summaries)
    experiments = [e for g in groups for e in g.members]
    everything = experiments + [e for g in groups for e in g.dropped]
    incomplete = [e for e in experiments if not e.complete]
    counted_word = " counted" if len(everything) > len(experiments) else ""
    lines += ["## Experiments", "", "| experiment | group | seed | counted | status |", "|---|---|---|---|---|"]
    for group in groups:
        for e in sorted(group.members + group.dropped, key=lambda e: (str(e.seed), str(e.path))):
            counted = "yes" if e.duplicate_of is None else f"no: copy of `{e.duplicate_of.path.name}`"
            lines.append(f"| `{e.path}` | {group.gid} | {e.seed} | {counted} | {e.status()} |")
    lines.append("")
    if incomplete:
        lines += [f"**{len(incomplete)} of {len(experiments)} runs{counted_word} are incomplete** (still running or "
                  "stopped): their finished levels are included; "
                  + ", ".join(f"`{e.path.name}`" for e in incomplete) + ".", ""]
    else:
        lines += [f"All {len(experiments)} runs{counted_word} are complete.", ""]
    dropped = [e for g in groups for e in g.dropped]
    if dropped:
        lines += [f"**{len(dropped)} of {len(everything)} runs are copies of a seed already counted** and are left "
                  "out of every number: a group counts each seed once (for a control: each seed of each source), "
                  "keeping the newest complete run.", ""]
        for e in dropped:
            kept = e.duplicate_of
            lines.append(f"- seed {e.seed}: kept `{kept.path}` ({kept.status()}), dropped `{e.path}` ({e.status()})")
        lines.append("")
    warnings = []
    for e in everything:
        chance = e.chance_levels()
        if chance:
            ceiling = 100.0 / e.num_classes + chance_margin(e.num_classes)
            warnings.append(f"- **`{e.path}` is at chance level** in level{'s' * (len(chance) > 1)} "
                            f"{_level_list(chance)}: no epoch's test accuracy there exceeds {ceiling:.3g}% "
                            f"(chance: {100.0 / e.num_classes:.3g}% for {e.num_classes} classes); a run that "
                            "never learned (a bad learning rate, a stuck control, a broken input?)"
                            + (" -- it is not counted (a copy)" if e.duplicate_of is not None else
                               " -- it is counted in its group's numbers"))
    for e in everything:
        if e.plan_problem:
            warnings.append(f"- `{e.path}`: {e.plan_problem}; how many levels it will have is unknown, so it is "
                            f"not counted as complete")
    unknown = [e for e in experiments if e.num_classes is None]
    if unknown:
        warnings.append("- chance level not checked for " + ", ".join(f"`{e.path.name}`" for e in unknown)
                        + " (the number of classes is unknown)")
    if warnings:
        lines += ["## Warnings", "", *warnings, ""]

    keys = differing_keys(groups)
    lines += ["## Groups", ""]
    if keys:
        lines += ["Config keys that differ between groups: " + ", ".join(f"`{k}`" for k in keys) + ".", ""]
    else:
        lines += ["One group: the runs differ only in " + ", ".join(f"`{k}`" for k in IGNORED_FOR_GROUPING[:3]) + ".", ""]
    if BN_PROCESSES_KEY in keys:
        lines += [f"`{BN_PROCESSES_KEY}` is not a config key: it is the number of processes whose BatchNorm statistics "
                  "were per-rank (1 = one process, no BatchNorm, or SyncBatchNorm), read from the runs' checkpoints. "
                  "Runs with different values train different models, so they are not pooled.", ""]
    header = ["group", "label", "seeds", *keys]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        seeds = ", ".join(str(e.seed) for e in group.members)
        if group.dropped:
            seeds += f" ({len(group.dropped)} cop{'ies' if len(group.dropped) > 1 else 'y'} left out)"
        lines.append("| " + " | ".join([group.gid, group.label, seeds,
                                         *(value_in_table(group, k, groups) for k in keys)]) + " |")
    shown = ("model.name", "dataset.name", "prune.structure", *structure_keys(groups[0].config), "prune.criterion",
             "prune.allocation", "prune.training_type", "prune.rate", "training.epochs", "optimizer.lr")
    common = [k for k in shown if k not in keys and k in groups[0].config]
    data = [] if DATA_KEY in keys else [f"data: {groups[0].members[0].data_words}"]  # one data set: name it
    if common or data:
        lines += ["", "Common to all: " + ", ".join([*(f"`{k}={_show(groups[0].config[k])}`" for k in common),
                                                     *data]) + "."]
    lines.append("")
    if "summary" in figures:
        lines += [f"![accuracy against density]({figures['summary'][0]})", ""]
    if figures.get("cost"):
        lines += [f"![accuracy against training cost]({figures['cost'][0]})", "",
                  f"Training cost (`{cost.COLUMN}`): the epochs of training spent to produce a point, earlier levels "
                  "included -- IMP and LRR level L: (L + 1) x E; WR: E + L x (E - rewind epoch); fine-tuning: "
                  "E + L x E; pruning at initialisation: E (E = `training.epochs`).", ""]
        unknown = [g.gid for g in groups if not summaries[g.gid].empty and summaries[g.gid][cost.COLUMN].isna().any()]
        if unknown:
            lines += [f"Cost unknown (left off that figure): {', '.join(unknown)} -- a training type that cannot be "
                      "imported here, or a `prune.rewind_iteration` run whose checkpoint does not record its steps "
                      "per epoch.", ""]

    for group in groups:
        lines += [f"## {group.gid}: {group.label}", ""]
        if group.is_control:
            lines += [f"Control: `prune.control={group.config.get('prune.control')}` on the masks of "
                      f"`{group.config.get('prune.masks_from')}` (first seed's source shown).", ""]
        frame = summaries[group.gid]
        if frame.empty:
            lines += ["No finished level yet.", ""]
            continue
        densities = named_densities(group, frame)
        lines += ["| level | " + " | ".join(map(density_header, densities.columns))
                  + f" | final test acc | {best_label(selected_on(group.members))} | n | train cost (epochs) |",
                  "|---:|" + "---:|" * len(densities.columns) + "---:|---:|---:|---:|"]
        for row, values in zip(frame.itertuples(), densities.itertuples(index=False)):
            n = int(row.n_seeds)
            spent = getattr(row, cost.COLUMN)
            lines.append(f"| {row.level} | " + " | ".join(f"{value:.4f}" for value in values) + " | "
                         f"{_cell(row.final_test_acc_mean, row.final_test_acc_std, n)} | "
                         f"{_cell(row.best_test_acc_mean, row.best_test_acc_std, n)} | {n} | "
                         f"{'–' if math.isnan(spent) else f'{spent:g}'} |")
        lines.append("")
        for name in figures.get(group.gid, []):
            lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


def label_for(experiment_dir) -> str:
    name = Path(experiment_dir).name
    try:
        c = rundir.read_config(experiment_dir)
    except rundir.RunDirError:
        return name
    return (f"{name} ({c.get('model.name', '?')}, {c.get('prune.criterion', '?')}/{c.get('prune.allocation', '?')}/"
            f"{c.get('prune.training_type', '?')})")


def table(frame: pd.DataFrame) -> str:
    shown = frame[["level", "density", "final_test_acc", "best_test_acc", "train_time_s"]].copy()
    formats = {"density": "{:.4f}".format, "final_test_acc": "{:.2f}".format,
               "best_test_acc": "{:.2f}".format, "train_time_s": "{:.1f}".format}
    return shown.to_string(index=False, formatters=formats)


