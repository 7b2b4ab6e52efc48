"""Experiment directories -> accuracy-vs-density table and plot.

    python -m utils.report runs/EXP_A [runs/EXP_B ...] --out accuracy_vs_density.png

Reads each directory's levels.csv (and config.yaml for the label), prints one table per
experiment, and draws test accuracy against density on a log-scaled density axis, one line
per experiment, the dense level marked.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import List, Optional

import pandas as pd
import yaml

LEVEL_COLUMNS = ["level", "target_density", "density", "final_test_acc", "best_test_acc", "train_time_s"]


class ReportError(ValueError):
    pass


def read_levels(experiment_dir) -> pd.DataFrame:
    path = Path(experiment_dir) / "levels.csv"
    if not path.exists():
        raise ReportError(f"{experiment_dir}: no levels.csv (is it an experiment directory with a finished level?)")
    frame = pd.read_csv(path)
    missing = [c for c in LEVEL_COLUMNS if c not in frame.columns]
    if missing:
        raise ReportError(f"{path}: missing columns {missing}")
    if frame.empty:
        raise ReportError(f"{path}: no finished level yet")
    return frame


def label_for(experiment_dir) -> str:
    config_path = Path(experiment_dir) / "config.yaml"
    name = Path(experiment_dir).name
    if config_path.exists():
        config = yaml.safe_load(config_path.read_text()) or {}
        prune = config.get("prune", {})
        model = config.get("model", {}).get("name", "?")
        return f"{name} ({model}, {prune.get('criterion', '?')}/{prune.get('allocation', '?')}/{prune.get('training_type', '?')})"
    return name


def table(frame: pd.DataFrame) -> str:
    shown = frame[["level", "density", "final_test_acc", "best_test_acc", "train_time_s"]].copy()
    formats = {"density": "{:.4f}".format, "final_test_acc": "{:.2f}".format,
               "best_test_acc": "{:.2f}".format, "train_time_s": "{:.1f}".format}
    return shown.to_string(index=False, formatters=formats)


def plot(experiments: List[tuple], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, frame in experiments:
        frame = frame.sort_values("density", ascending=False)
        line, = ax.plot(frame["density"] * 100, frame["final_test_acc"], marker="o", label=label)
        dense = frame[frame["level"] == 0]
        if not dense.empty and abs(float(dense["density"].iloc[0]) - 1.0) < 1e-9:
            ax.axhline(float(dense["final_test_acc"].iloc[0]), color=line.get_color(), linestyle=":", linewidth=1)
            ax.plot(100, float(dense["final_test_acc"].iloc[0]), marker="*", markersize=14, color=line.get_color())
    ax.set_xscale("log")
    densities = sorted({round(float(d) * 100, 2) for _, f in experiments for d in f["density"]})
    if len(densities) > 12:  # keep the axis readable: every k-th level's density
        densities = densities[:: math.ceil(len(densities) / 12)] + [densities[-1]]
    ax.set_xticks(densities)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.invert_xaxis()
    ax.set_xlabel("density (% of prunable weights kept, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy against density (dotted: dense level)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Accuracy-vs-density report over experiment directories")
    parser.add_argument("experiments", nargs="+", help="experiment directories (holding levels.csv)")
    parser.add_argument("--out", type=Path, help="PNG file for the plot")
    args = parser.parse_args(argv)
    try:
        experiments = [(label_for(d), read_levels(d)) for d in args.experiments]
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for label, frame in experiments:
        print(f"== {label}")
        print(table(frame))
        print()
    if args.out:
        plot(experiments, args.out)
        print(f"plot written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
