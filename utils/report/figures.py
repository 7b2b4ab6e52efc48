"""The report's figures: accuracy against density and against training cost (±1 std bands clipped
to 0-100), training curves and per-layer densities of a group; the one-plot form of the command.

Every group's dense point stays visible: a control that took its source's level 0 (shuffle)
has the very same dense point as its source, and one marker drawn on another hides it.  Each
line has its own marker shape (``MARKERS``); the dense markers (larger, edged in black) that
would cover one another on the screen are set side by side around 100%, a fixed number of points
apart, in the legend's order (``place_dense_markers``); the caption says so.  Their data stay
at 100%."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pandas as pd

from utils.core.atomic_io import atomic_output
from utils.report.experiments import Group
from utils.report.labels import best_label, selected_on
from utils.report.tables import summarize


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: Path) -> None:
    with atomic_output(out, keep_suffix=True) as temporary:
        fig.savefig(temporary)


def _density_ticks(ax, densities_percent: Sequence[float]) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter
    ticks = sorted({round(float(d), 2) for d in densities_percent}, reverse=True)
    if len(ticks) > 10:  # keep the axis readable: every k-th level, the sparsest kept
        step = math.ceil(len(ticks) / 10)
        thinned = ticks[::step]
        if thinned[-1] != ticks[-1]:
            if thinned[-1] / ticks[-1] < 1.5:  # too close to the sparsest to share the axis with it
                thinned.pop()
            thinned.append(ticks[-1])
        ticks = thinned
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _plain_log_labels(axis) -> None:
    """0.3, 0.6, 20, 100 instead of 3x10^-1 on a log axis."""
    from matplotlib.ticker import FuncFormatter
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    # minor ticks (2, 3, ... 9 x 10^k): label 2, 3 and 5 only, so that labels never touch
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.3g}" if v > 0 and f"{v:.0e}"[0] in "235" else ""))


# one marker shape per line (group, or experiment of the one-plot form), in legend order
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "p", "h", "<", ">", "*")
DENSE_MARKER_SIZE = 9.0     # points: the dense markers, larger than the lines' own (4)
DENSE_SPACING = 10.0        # points between the centres of neighbouring dense markers
DENSE_SPREAD = 90.0         # points: the widest the row of dense markers gets (many groups: closer)


def marker_for(index: int) -> str:
    return MARKERS[index % len(MARKERS)]


def dense_offsets(count: int) -> List[float]:
    """Horizontal screen offsets (points) of ``count`` dense markers, centred on their true x:
    DENSE_SPACING apart, closer when the row would be wider than DENSE_SPREAD."""
    if count <= 1:
        return [0.0] * count
    step = min(DENSE_SPACING, DENSE_SPREAD / (count - 1))
    return [(index - (count - 1) / 2) * step for index in range(count)]


def dense_rows(heights: Sequence[float], apart: float) -> List[List[int]]:
    """Indices of ``heights`` (screen units) in rows of markers that would touch: sorted by
    height, a marker closer than ``apart`` to the previous one joins its row; each row in the
    original (legend) order."""
    rows: List[List[int]] = []
    last = None
    for index in sorted(range(len(heights)), key=lambda i: (heights[i], i)):
        if last is None or heights[index] - last >= apart:
            rows.append([])
        rows[-1].append(index)
        last = heights[index]
    return [sorted(row) for row in rows]


def place_dense_markers(ax, points: Sequence[Tuple[float, object, str, str]], densest: float,
                        sparsest: float) -> None:
    """Draw the dense markers ``points`` = [(accuracy, colour, marker, gid)] at 100% density,
    once the figure's layout is done (the screen distances are final): markers that would
    cover one another are shifted sideways on the screen (``dense_offsets``; the log density
    axis does not move them by a density), above the lines; then the densest x limit leaves
    room for them (the axis is inverted: at least 15% above the densest point)."""
    from matplotlib.transforms import offset_copy
    if not points:
        return
    size = DENSE_MARKER_SIZE * ax.figure.dpi / 72.0                                   # pixels
    heights = [float(ax.transData.transform((densest, value))[1]) for value, *_ in points]
    offsets = [0.0] * len(points)
    for row in dense_rows(heights, size * 1.1):
        for index, offset in zip(row, dense_offsets(len(row))):
            offsets[index] = offset
    reach = (max(-min(offsets), 0.0) + DENSE_MARKER_SIZE) * 1.3                        # points left of 100%
    width = ax.get_window_extent().width * 72.0 / ax.figure.dpi                        # the panel, in points
    inner = math.log10(100.0 / (sparsest / 1.15))                                      # decades right of 100%
    left = max(densest * 1.15, 100.0 * 10 ** (reach * inner / max(width - reach, 1.0)))
    ax.set_xlim(left, sparsest / 1.15)
    for (value, color, marker, gid), offset in zip(points, offsets):
        shifted = offset_copy(ax.transData, fig=ax.figure, x=offset, y=0.0, units="points")
        line, = ax.plot([100.0], [value], linestyle="none", marker=marker, markersize=DENSE_MARKER_SIZE,
                        color=color, markeredgecolor="black", markeredgewidth=0.8, transform=shifted, zorder=6)
        line.set_gid(gid)


def band_limits(mean: pd.Series, std: pd.Series) -> Tuple[pd.Series, pd.Series]:
    """mean ± std, clipped to 0-100: accuracies are percentages."""
    return (mean - std).clip(lower=0.0, upper=100.0), (mean + std).clip(lower=0.0, upper=100.0)


def plot_accuracy_vs_density(groups: Sequence[Group], summaries: Dict[str, pd.DataFrame], out: Path) -> None:
    plt = _pyplot()
    label_width = max((len(f"{g.gid}: {g.label} (10-10 seeds)") for g in groups), default=0)
    legend_columns = 1 if label_width > 45 else 2
    legend_rows = math.ceil(len(groups) / legend_columns)
    legend_height = 0.2 * legend_rows + 0.25  # inches
    height = 4.2 + legend_height
    fig, axes = plt.subplots(1, 2, figsize=(11, height), dpi=120, sharey=True)
    band_alpha = 0.2 if len(groups) <= 3 else 0.12
    all_densities = []
    dense_points = {ax: [] for ax in axes}   # (accuracy, colour, marker, gid), drawn once the layout is done
    for ax, metric, title in ((axes[0], "final_test_acc", "final test accuracy (last epoch)"),
                              (axes[1], "best_test_acc", best_label(selected_on([e for g in groups for e in g.members])))):
        for index, group in enumerate(groups):
            frame = summaries[group.gid]
            if frame.empty:
                continue
            frame = frame.sort_values("density", ascending=False)
            x = frame["density"] * 100
            all_densities.extend(x)
            mean, std = frame[f"{metric}_mean"], frame[f"{metric}_std"].fillna(0.0)
            n, n_low = int(frame["n_seeds"].max()), int(frame["n_seeds"].min())
            seeds = f"{n} seeds" if n == n_low else f"{n_low}-{n} seeds"
            label = f"{group.gid}: {group.label} ({seeds if n > 1 else '1 seed'})"
            line, = ax.plot(x, mean, marker=marker_for(index), markersize=4, label=label)
            if n > 1:
                low, high = band_limits(mean, std)
                ax.fill_between(x, low, high, color=line.get_color(), alpha=band_alpha, linewidth=0)
            dense = frame[frame["level"] == 0]
            if not dense.empty and abs(float(dense["density"].iloc[0]) - 1.0) < 1e-9:
                value = float(dense[f"{metric}_mean"].iloc[0])
                ax.axhline(value, color=line.get_color(), linestyle=":", linewidth=1)
                dense_points[ax].append((value, line.get_color(), marker_for(index), f"dense:{group.gid}"))
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("density (% of prunable weights kept, log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    if all_densities:
        for ax in axes:
            _density_ticks(ax, all_densities)
            ax.set_xlim(max(all_densities) * 1.15, min(all_densities) / 1.15)
    axes[0].set_ylabel("test accuracy (%)")
    fig.suptitle("Test accuracy against density: mean over seeds, band = ±1 std; dense level (100%): large marker and "
                 "dotted line;\ndense markers that would cover one another are set side by side, in legend order "
                 "(all are at 100%)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=legend_columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_height / height, 1, 1))
    if all_densities:
        for ax in axes:
            place_dense_markers(ax, dense_points[ax], max(all_densities), min(all_densities))
    _save(fig, out)
    plt.close(fig)


def _spread_ticks(values: Sequence[float], most: int = 10) -> List[float]:
    """Ticks for a log axis from ``values`` (ascending, positive): the smallest, then each value at
    least 1/most of the axis's log span above the last one kept (labels never touch), the largest
    kept in place of a tick too close to it."""
    span = math.log(values[-1] / values[0]) if values[-1] > values[0] else 1.0
    gap = span / most
    ticks = [values[0]]
    for value in values[1:]:
        if math.log(value / ticks[-1]) >= gap:
            ticks.append(value)
    if ticks[-1] != values[-1]:
        if len(ticks) > 1 and math.log(values[-1] / ticks[-1]) < gap:
            ticks.pop()
        ticks.append(values[-1])
    return ticks


def plot_accuracy_vs_cost(groups: Sequence[Group], summaries: Dict[str, pd.DataFrame], out: Path) -> bool:
    """Test accuracy against the epochs of training spent to produce each point (``cost.COLUMN``),
    beside accuracy against density: one line per group through its levels, ±1 std bands, each
    point labelled with its density when the panel is not crowded.  False (nothing written) when
    no point has a known cost."""
    from matplotlib.ticker import NullFormatter

    from utils.report.cost import COLUMN
    shown = {g.gid: summaries[g.gid].dropna(subset=[COLUMN]) for g in groups
             if not summaries[g.gid].empty and COLUMN in summaries[g.gid]}
    shown = {gid: frame for gid, frame in shown.items() if not frame.empty}
    if not shown:
        return False
    plt = _pyplot()
    label_width = max((len(f"{g.gid}: {g.label} (10-10 seeds)") for g in groups), default=0)
    legend_columns = 1 if label_width > 45 else 2
    legend_rows = math.ceil(len(shown) / legend_columns)
    legend_height = 0.2 * legend_rows + 0.25  # inches
    height = 4.2 + legend_height
    fig, axes = plt.subplots(1, 2, figsize=(11, height), dpi=120, sharey=True)
    band_alpha = 0.2 if len(shown) <= 3 else 0.12
    annotate = sum(len(frame) for frame in shown.values()) <= 30
    costs = sorted({float(c) for frame in shown.values() for c in frame[COLUMN]})
    for ax, metric, title in ((axes[0], "final_test_acc", "final test accuracy (last epoch)"),
                              (axes[1], "best_test_acc", best_label(selected_on([e for g in groups for e in g.members])))):
        for group in groups:
            if group.gid not in shown:
                continue
            frame = shown[group.gid].sort_values([COLUMN, "level"])
            x = frame[COLUMN]
            mean, std = frame[f"{metric}_mean"], frame[f"{metric}_std"].fillna(0.0)
            n, n_low = int(frame["n_seeds"].max()), int(frame["n_seeds"].min())
            seeds = f"{n} seeds" if n == n_low else f"{n_low}-{n} seeds"
            label = f"{group.gid}: {group.label} ({seeds if n > 1 else '1 seed'})"
            line, = ax.plot(x, mean, marker="o", markersize=4, label=label)
            if n > 1:
                low, high = band_limits(mean, std)
                ax.fill_between(x, low, high, color=line.get_color(), alpha=band_alpha, linewidth=0)
            if annotate and ax is axes[0]:
                for cost, value, density in zip(x, mean, frame["density"]):
                    if density >= 1.0 - 1e-9:
                        continue  # the dense level: unlabelled (the title says so)
                    ax.annotate(f"{density * 100:.3g}%", (cost, value), textcoords="offset points", xytext=(4, -9),
                                fontsize=6, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("training cost (epochs spent to produce the network, log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xticks(_spread_ticks(costs))
        _plain_log_labels(ax.xaxis)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(costs[0] / 1.25, costs[-1] * 1.25)
    axes[0].set_ylabel("test accuracy (%)")
    fig.suptitle("Test accuracy against training cost: mean over seeds, band = ±1 std"
                 + (", labels = density (% kept; unlabelled: dense)" if annotate else ""), fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=legend_columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_height / height, 1, 1))
    _save(fig, out)
    plt.close(fig)
    return True


def plot_training_curves(group: Group, out: Path) -> bool:
    """Test accuracy and training loss against the epoch, one line per level (mean over seeds)."""
    frames = [e.epochs.assign(seed=e.seed) for e in group.members if len(e.epochs)]
    if not frames:
        return False
    epochs = pd.concat(frames)
    means = epochs.groupby(["level", "epoch"], as_index=False)[["test_acc", "train_loss"]].mean()
    summary = summarize(group).set_index("level")
    plt = _pyplot()
    from matplotlib import cm, colors
    levels = sorted(int(level) for level in means["level"].unique())
    norm = colors.Normalize(vmin=0, vmax=max(levels[-1], 1))
    colormap = cm.get_cmap("viridis") if hasattr(cm, "get_cmap") else plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for level in levels:
        part = means[means["level"] == level].sort_values("epoch")
        color = colormap(norm(level))
        density = summary["density"].get(level, math.nan) * 100
        axes[0].plot(part["epoch"] + 1, part["test_acc"], color=color, marker="." if len(part) < 30 else None,
                     label=f"level {level} ({density:.3g}%)")
        axes[1].plot(part["epoch"] + 1, part["train_loss"], color=color, marker="." if len(part) < 30 else None)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].set_ylabel("training loss")
    axes[1].set_yscale("log")
    _plain_log_labels(axes[1].yaxis)
    for ax in axes:
        ax.set_xlabel("epoch within the level")
        ax.grid(True, alpha=0.3)
        last_epoch = int(means["epoch"].max()) + 1
        if last_epoch <= 12:
            ax.set_xticks(range(1, last_epoch + 1))
    n = len(group.members)
    fig.suptitle(f"{group.gid}: {group.label} — training curves per level (mean over {'up to ' if n > 1 else ''}{n} seed{'s' * (n > 1)})",
                 fontsize=10)
    if len(levels) <= 12:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7, title="level (density)",
                   title_fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0, 0.86, 1))
    else:
        mappable = cm.ScalarMappable(norm=norm, cmap=colormap)
        fig.tight_layout(rect=(0, 0, 0.92, 1))
        bar = fig.colorbar(mappable, ax=axes, fraction=0.03, pad=0.02)
        bar.set_label("level")
    _save(fig, out)
    plt.close(fig)
    return True


def plot_layer_density(group: Group, out: Path) -> bool:
    """Heatmap: one row per prunable layer, one column per level; density in % (mean over seeds)."""
    frames = [e.layers for e in group.members if len(e.layers)]
    if not frames:
        return False
    layers = pd.concat(frames)
    order = list(dict.fromkeys(layers["layer"]))  # the model's order, as layers.csv lists them
    table = layers.groupby(["layer", "level"])["density"].mean().unstack("level").reindex(order) * 100
    plt = _pyplot()
    from matplotlib import colors
    rows, columns = table.shape
    width = min(16.0, 3.2 + 0.65 * columns + 0.07 * max(len(str(n)) for n in order))
    height = min(18.0, max(3.2, 1.6 + 0.32 * rows))
    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    smallest = float(table.min().min())
    norm = colors.LogNorm(vmin=max(min(smallest, 99.0), 1e-3), vmax=100.0)
    image = ax.imshow(table.to_numpy(), aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
    ax.set_yticks(range(rows))
    ax.set_yticklabels(order, fontsize=7 if rows > 20 else 8)
    summary = summarize(group).set_index("level")
    ax.set_xticks(range(columns))
    ax.set_xticklabels([f"{level}\n{summary['density'].get(level, math.nan) * 100:.3g}%" for level in table.columns],
                       fontsize=7)
    ax.set_xlabel("level (overall density)")
    if rows * columns <= 400:
        for i in range(rows):
            for j in range(columns):
                value = table.iat[i, j]
                if not math.isnan(value):
                    shade = norm(max(value, norm.vmin))
                    ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=6,
                            color="black" if shade > 0.55 else "white")
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    _plain_log_labels(bar.ax.yaxis)
    bar.set_label("layer density (% kept, log scale)", fontsize=8)
    ax.set_title(f"{group.gid}: {group.label}\nper-layer density", fontsize=9)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return True


# ============================================================================ report.md
def plot(experiments: List[tuple], out: Path) -> None:
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    dense_points = []   # (accuracy, colour, marker, gid), drawn once the layout is done
    for index, (label, frame) in enumerate(experiments):
        frame = frame.sort_values("density", ascending=False)
        line, = ax.plot(frame["density"] * 100, frame["final_test_acc"], marker=marker_for(index), label=label)
        dense = frame[frame["level"] == 0]
        if not dense.empty and abs(float(dense["density"].iloc[0]) - 1.0) < 1e-9:
            ax.axhline(float(dense["final_test_acc"].iloc[0]), color=line.get_color(), linestyle=":", linewidth=1)
            dense_points.append((float(dense["final_test_acc"].iloc[0]), line.get_color(), marker_for(index),
                                 f"dense:{index}"))
    ax.set_xscale("log")
    densities = sorted({round(float(d) * 100, 2) for _, f in experiments for d in f["density"]})
    if len(densities) > 12:  # keep the axis readable: every k-th level's density
        densities = densities[:: math.ceil(len(densities) / 12)] + [densities[-1]]
    ax.set_xticks(densities)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    all_densities = [float(d) * 100 for _, f in experiments for d in f["density"]]
    if all_densities:
        ax.set_xlim(max(all_densities) * 1.15, min(all_densities) / 1.15)
    else:
        ax.invert_xaxis()
    ax.set_xlabel("density (% of prunable weights kept, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy against density (dense level: large marker and dotted line; dense\n"
                 "markers that would cover one another set side by side in legend order, all at 100%)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if all_densities:
        place_dense_markers(ax, dense_points, max(all_densities), min(all_densities))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


