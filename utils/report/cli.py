"""The report command:

    python -m utils.report DIR [DIR ...] --out-dir OUT     # OUT/report.md, OUT/summary.csv, OUT/*.png
    python -m utils.report runs/EXP_A [runs/EXP_B ...] --out accuracy_vs_density.png   # one plot (kept)

What the numbers count and how runs form groups: ``utils/report/experiments.py``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from utils.core.atomic_io import atomic_write_text
from utils.report.experiments import ReportError, _level_list, expand_dirs, load_experiment, make_groups, read_levels
from utils.report.figures import (plot, plot_accuracy_vs_cost, plot_accuracy_vs_density, plot_layer_density,
                                  plot_training_curves)
from utils.report.tables import label_for, markdown, summarize, summary_table, table


def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def write_report(dirs: Sequence, out_dir, command: str = "python -m utils.report") -> Dict[str, Any]:
    """Read ``dirs``, write OUT/report.md, OUT/summary.csv and the figures; -> what was written.
    Raises ReportError (one line) before writing anything when the input is unusable."""
    experiments = [load_experiment(d) for d in expand_dirs(dirs)]
    if not any(len(e.levels) for e in experiments):
        names = ", ".join(str(e.path) for e in experiments[:5])
        raise ReportError(f"no finished level yet in {names}{' ...' if len(experiments) > 5 else ''}")
    groups = make_groups(experiments)
    summaries = {g.gid: summarize(g) for g in groups}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out-dir {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    figures: Dict[str, List[str]] = {"summary": ["accuracy_vs_density.png"]}
    plot_accuracy_vs_density(groups, summaries, out / "accuracy_vs_density.png")
    if plot_accuracy_vs_cost(groups, summaries, out / "accuracy_vs_cost.png"):
        figures["cost"] = ["accuracy_vs_cost.png"]
    for group in groups:
        names = []
        if plot_training_curves(group, out / f"curves_{group.gid}.png"):
            names.append(f"curves_{group.gid}.png")
        if plot_layer_density(group, out / f"layers_{group.gid}.png"):
            names.append(f"layers_{group.gid}.png")
        figures[group.gid] = names
    table = summary_table(groups)
    _write_text(out / "summary.csv", table.to_csv(index=False))
    _write_text(out / "report.md", markdown(groups, summaries, figures, command))
    counted = [e for g in groups for e in g.members]
    return {"groups": groups, "summary": table, "figures": [n for names in figures.values() for n in names],
            "incomplete": [e for e in counted if not e.complete],
            "dropped": [e for g in groups for e in g.dropped],
            "at_chance": [e for e in experiments if e.chance_levels()]}


# ====================================================================== the one-plot CLI
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Report over experiment directories: --out-dir OUT writes report.md, summary.csv and "
                    "figures (groups of seeds); --out FILE.png draws one accuracy-vs-density plot")
    parser.add_argument("experiments", nargs="+",
                        help="experiment directories (holding config.yaml), or directories of them (a sweep)")
    parser.add_argument("--out-dir", type=Path, help="directory for report.md, summary.csv and the PNG figures")
    parser.add_argument("--out", type=Path, help="PNG file for one accuracy-vs-density plot (one line per experiment)")
    args = parser.parse_args(argv)
    try:
        if args.out_dir is not None:
            command = "python -m utils.report " + " ".join(
                [*map(str, args.experiments), "--out-dir", str(args.out_dir)])
            written = write_report(args.experiments, args.out_dir, command=command)
            for group in written["groups"]:
                copies = f", {len(group.dropped)} cop{'ies' if len(group.dropped) > 1 else 'y'} of a seed left out" \
                    if group.dropped else ""
                print(f"{group.gid}: {group.label}  ({len(group.members)} seed{'s' * (len(group.members) > 1)}{copies})")
            for e in written["incomplete"]:
                print(f"incomplete: {e.path} ({e.status()})")
            for e in written["dropped"]:
                print(f"copy left out: {e.path} (seed {e.seed}; counted: {e.duplicate_of.path})")
            for e in written["at_chance"]:
                print(f"AT CHANCE: {e.path} (levels {_level_list(e.chance_levels())})")
            print(f"report written to {args.out_dir / 'report.md'} (+ summary.csv, {len(written['figures'])} figures)")
        if args.out is not None or args.out_dir is None:
            dirs = expand_dirs(args.experiments)
            experiments = [(label_for(d), read_levels(d)) for d in dirs]
            for label, frame in experiments:
                print(f"== {label}")
                print(table(frame))
                print()
            if args.out:
                plot(experiments, args.out)
                print(f"plot written to {args.out}")
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0

