"""The report's numbers: per-level summaries (mean, sample std over seeds, n), ``summary.csv``
and ``report.md``."""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Dict, List, Sequence

import pandas as pd

from utils.report.experiments import (
    structure_keys,
    BN_PROCESSES_KEY,
    IGNORED_FOR_GROUPING,
    Group,
    _level_list,
    _show,
    chance_margin,
    best_label,
    differing_keys,
    selected_on,
    value_in_table,
)
from utils.runs import rundir


def summarize(group: Group) -> pd.DataFrame:
    """One row per level: densities, mean/std of final and best test accuracy, n seeds."""
    frames = [e.levels.assign(seed=e.seed) for e in group.members if len(e.levels)]  # one run per seed
    columns = ["level", "target_density", "density", "final_test_acc_mean", "final_test_acc_std",
               "best_test_acc_mean", "best_test_acc_std", "n_seeds", "seeds"]
    if not frames:
        return pd.DataFrame(columns=columns)
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
        })
    return pd.DataFrame(rows, columns=columns)


def summary_table(groups: Sequence[Group]) -> pd.DataFrame:
    keys = differing_keys(groups)
    frames = []
    for group in groups:
        frame = summarize(group)
        frame.insert(0, "label", group.label)
        frame.insert(0, "group", group.gid)
        for position, key in enumerate(keys):
            frame.insert(2 + position, key, value_in_table(group, key, groups))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


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
    if common:
        lines += ["", "Common to all: " + ", ".join(f"`{k}={_show(groups[0].config[k])}`" for k in common) + "."]
    lines.append("")
    if "summary" in figures:
        lines += [f"![accuracy against density]({figures['summary'][0]})", ""]

    for group in groups:
        lines += [f"## {group.gid}: {group.label}", ""]
        if group.is_control:
            lines += [f"Control: `prune.control={group.config.get('prune.control')}` on the masks of "
                      f"`{group.config.get('prune.masks_from')}` (first seed's source shown).", ""]
        frame = summaries[group.gid]
        if frame.empty:
            lines += ["No finished level yet.", ""]
            continue
        lines += [f"| level | target density | density | final test acc | {best_label(selected_on(group.members))} | n |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for row in frame.itertuples():
            n = int(row.n_seeds)
            lines.append(f"| {row.level} | {row.target_density:.4f} | {row.density:.4f} | "
                         f"{_cell(row.final_test_acc_mean, row.final_test_acc_std, n)} | "
                         f"{_cell(row.best_test_acc_mean, row.best_test_acc_std, n)} | {n} |")
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


