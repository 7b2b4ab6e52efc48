"""Experiment directories -> tables, a tidy CSV and figures.

    python -m utils.report DIR [DIR ...] --out-dir OUT     # OUT/report.md, OUT/summary.csv, OUT/*.png
    python -m utils.report runs/EXP_A [runs/EXP_B ...] --out accuracy_vs_density.png   # one plot (kept)

A DIR is an experiment directory (it holds ``config.yaml``) or a directory of them (a sweep
directory, or ``runs/``).  Experiments whose resolved configs differ only in the keys of
``IGNORED_FOR_GROUPING`` (the seed, where results go, and settings that do not change the
numbers) form one group; a group's numbers are the mean and the sample standard deviation
(ddof=1) over its seeds, level by level.  Runs still in progress are read up to their last
finished level (a row of ``levels.csv``) and named as incomplete.

Controls (``prune.masks_from`` + ``prune.control``) are grouped like any other run, with one
twist: ``masks_from`` is compared by the group of the experiment it points to, so the controls
of seeds 0, 1, 2 (each reading its own seed's masks) form one group.

What the numbers count, so that they cannot mislead:

* One seed counts once.  Runs of one group with the same seed (for a control: the same seed
  and the same seed of its source) are copies -- a rerun by hand, a sweep's run, a run with
  another number of processes that trains the same model.  The newest complete one is kept
  (newest: the latest write to its CSV files; with no complete one, the one with the most
  finished levels); report.md names every copy dropped and the run kept instead.
* Runs that train different models are never pooled.  The config decides most of it
  (``dataset.loader`` and every other key that changes results split groups); what the
  config does not say is read from the run's checkpoints (utils/run_facts.py): with
  BatchNorm and per-rank statistics (on CPU, or ``distributed.sync_bn: false``) N processes
  train another model than 1, so the number of processes becomes the grouping key
  ``bn_processes`` (1 for one process, no BatchNorm, or SyncBatchNorm).  Such runs form
  separate groups, labelled by it -- never refused, never averaged together.
* A run at chance level is flagged: a finished level whose every epoch's test accuracy stays
  at or below ``100 / classes`` plus a margin (``chance_margin``: 2 points or a fifth of the
  chance level, the larger) is named in report.md's warnings and in the run's status.  The
  number of classes comes from the test set's write record, else the dataset registry.
* The ±1 std bands are clipped to 0-100 (accuracies are percentages).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pandas as pd

from utils import rundir
from utils.atomic_io import atomic_output, atomic_write_text
from utils.training_types import get_training_type

LEVEL_COLUMNS = ["level", "target_density", "density", "final_test_acc", "best_test_acc", "train_time_s"]
EPOCH_COLUMNS = ["level", "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc"]
LAYER_COLUMNS = ["level", "layer", "numel", "alive", "density"]

# Keys that never split a group: the seed (what the group averages over), where results go,
# and settings that do not change the numbers (harness_utils.NON_SEMANTIC_KEYS, trackers).
_WHERE = ("experiment.seed", "experiment.name", "experiment.base_dir")
IGNORED_FOR_GROUPING = _WHERE + tuple(sorted(rundir.NON_SEMANTIC_KEYS - set(_WHERE)))
CONTROL_KEYS = ("prune.masks_from", "prune.control")
# The grouping key read from the run's checkpoints, not its config (see the module docstring).
BN_PROCESSES_KEY = "bn_processes"


class ReportError(ValueError):
    pass


# ============================================================================ reading
@dataclass
class Experiment:
    path: Path
    config: Dict[str, Any]                  # flat {"section.key": value}
    levels: pd.DataFrame                    # finished levels only
    epochs: pd.DataFrame                    # rows of finished levels only
    layers: pd.DataFrame
    expected_levels: Optional[int]
    in_progress_epochs: int = 0             # epochs.csv rows of the level being trained
    bn_processes: int = 1                   # run_facts.batchnorm_processes of the run
    written_at: float = 0.0                 # latest write to its CSV files (s since the epoch)
    num_classes: Optional[int] = None       # for the chance level (None: unknown)
    reused: List[str] = field(default_factory=list)   # "level L from SOURCE" (controls.py's reused.csv)
    duplicate_of: Optional["Experiment"] = None        # set when another run of its seed is counted instead

    @property
    def seed(self) -> Any:
        return self.config.get("experiment.seed")

    @property
    def replicate(self) -> Tuple[str, str]:
        """What makes two runs of one group the same sample: the seed, and for a control also
        its source's seed (each seed's controls of each source are samples of their own)."""
        source_seed = ""
        source = self.config.get("prune.masks_from")
        if source:
            try:
                source_seed = _canonical(read_config(Path(str(source))).get("experiment.seed"))
            except ReportError:
                source_seed = "?" + str(source)
        return _canonical(self.seed), source_seed

    def chance_levels(self) -> List[int]:
        """Finished levels whose every epoch's test accuracy is at or below chance (+ margin)."""
        if not self.num_classes or not len(self.epochs):
            return []
        ceiling = 100.0 / self.num_classes + chance_margin(self.num_classes)
        best = self.epochs.groupby("level")["test_acc"].max()
        return [int(level) for level, value in best.items() if float(value) <= ceiling]

    @property
    def complete(self) -> bool:
        return self.expected_levels is not None and len(self.levels) >= self.expected_levels

    def status(self) -> str:
        done = len(self.levels)
        if self.complete:
            text = f"complete ({done} levels)"
        else:
            total = "?" if self.expected_levels is None else str(self.expected_levels)
            text = f"incomplete: {done} of {total} levels finished"
            if self.in_progress_epochs:
                epochs = self.config.get("training.epochs", "?")
                text += f", level {done} at epoch {self.in_progress_epochs} of {epochs}"
        chance = self.chance_levels()
        if chance:
            text += f"; **AT CHANCE** in level{'s' * (len(chance) > 1)} {_level_list(chance)}"
        if self.reused:
            text += "; " + "; ".join(self.reused)
        return text


def chance_margin(num_classes: int) -> float:
    """Points above 100/classes that still count as chance: 2, or a fifth of the chance level."""
    return max(2.0, 0.2 * 100.0 / num_classes)


def _level_list(levels: Sequence[int]) -> str:
    """[0, 3, 4, 5, 7] -> '0, 3-5, 7'."""
    parts, start = [], None
    ordered = sorted(levels)
    for index, level in enumerate(ordered):
        if start is None:
            start = level
        if index + 1 == len(ordered) or ordered[index + 1] != level + 1:
            parts.append(str(start) if start == level else f"{start}-{level}")
            start = None
    return ", ".join(parts)


def config_defaults() -> Dict[str, Any]:
    """Every config key's default (the harness's): a key an older run's config.yaml lacks counts
    as its default, as it does when the harness resumes that run (utils/rundir.py)."""
    try:
        import harness_params
        return harness_params.defaults()
    except ImportError:  # the report used without the harness beside it
        return {}


def read_config(experiment_dir: Path) -> Dict[str, Any]:
    try:
        return rundir.read_config(experiment_dir)
    except rundir.RunDirError as error:
        raise ReportError(str(error)) from None


def _read_csv(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=list(columns))
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=list(columns))
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ReportError(f"{path} is not a readable CSV file: {' '.join(str(error).split())[:200]}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReportError(f"{path}: missing columns {missing}")
    return frame


def expected_levels(config: Dict[str, Any], _depth: int = 0) -> Optional[int]:
    """How many levels the run will have when finished (None when the config does not say)."""
    try:
        if get_training_type(str(config.get("prune.training_type", "imp"))).one_shot:
            return 1
    except ValueError:  # a user's type that cannot be imported here: the levels the config says
        pass
    levels, target, rate = config.get("prune.levels"), config.get("prune.target_density"), config.get("prune.rate")
    if levels is not None and target is None:
        return int(levels)
    source = config.get("prune.masks_from")
    if levels is None and target is None and source and _depth < 4:  # a control trains all its source's levels
        try:
            return expected_levels(read_config(Path(str(source))), _depth + 1)
        except ReportError:
            return None
    try:
        from utils.pruning_utils import iterative_densities
        return len(iterative_densities(float(rate), levels=levels, target_density=target))
    except Exception:
        return None


def read_levels(experiment_dir) -> pd.DataFrame:
    """levels.csv of one experiment; refuses a directory without a finished level (old CLI)."""
    path = Path(experiment_dir) / "levels.csv"
    if not path.exists():
        raise ReportError(f"{experiment_dir}: no levels.csv (is it an experiment directory with a finished level?)")
    frame = _read_csv(path, LEVEL_COLUMNS)
    if frame.empty:
        raise ReportError(f"{path}: no finished level yet")
    return frame


def load_experiment(experiment_dir) -> Experiment:
    root = Path(experiment_dir)
    if not rundir.RunFiles(root).config.is_file():
        raise ReportError(f"{root} is not an experiment directory (no config.yaml)")
    config = read_config(root)
    levels = _read_csv(root / "levels.csv", LEVEL_COLUMNS).sort_values("level").reset_index(drop=True)
    finished = set(int(level) for level in levels["level"])
    epochs = _read_csv(root / "epochs.csv", EPOCH_COLUMNS)
    layers = _read_csv(root / "layers.csv", LAYER_COLUMNS)
    in_level = epochs["level"].astype(int).isin(finished) if len(epochs) else pd.Series([], dtype=bool)
    in_progress = int((~in_level).sum()) if len(epochs) else 0
    epochs = epochs[in_level].reset_index(drop=True) if len(epochs) else epochs
    if len(layers):
        layers = layers[layers["level"].astype(int).isin(finished)].reset_index(drop=True)
    written = max((p.stat().st_mtime for p in (root / "levels.csv", root / "epochs.csv") if p.exists()), default=0.0)
    return Experiment(root, config, levels, epochs, layers, expected_levels(config), in_progress,
                      bn_processes=bn_processes_of(root, config), written_at=written,
                      num_classes=number_of_classes(config), reused=reused_levels(root))


def bn_processes_of(root: Path, config: Dict[str, Any]) -> int:
    """run_facts.batchnorm_processes of the run in ``root`` (1 when its checkpoints do not say)."""
    from utils import run_facts
    execution = run_facts.recorded_execution(root, config.get("training.device"))
    if execution is None or execution.world_size <= 1:
        return 1
    return run_facts.batchnorm_processes(world_size=execution.world_size, device_type=execution.device_type,
                                         sync_bn=config.get("distributed.sync_bn", "auto"),
                                         has_batchnorm=bool(run_facts.initial_weights_have_batchnorm(root)))


def number_of_classes(config: Dict[str, Any]) -> Optional[int]:
    """Classes of the run's data: the test set's write record, else the dataset registry."""
    from utils import dataset
    try:
        record = dataset.read_record(str(config.get("dataset.test_path")))
    except Exception:  # noqa: BLE001 -- an unreadable record: fall back on the registry
        record = None
    if isinstance(record, dict):
        count = record.get("num_classes") or len(record.get("classes") or [])
        if isinstance(count, int) and count > 0:
            return count
    try:
        return int(dataset.get_dataset_spec(str(config.get("dataset.name"))).num_classes)
    except Exception:  # noqa: BLE001 -- a dataset this version does not know
        return None


def reused_levels(root: Path) -> List[str]:
    """What a control took from its source instead of training (utils/controls.py writes it)."""
    path = rundir.RunFiles(root).reused.path
    if not path.is_file():
        return []
    try:
        frame = pd.read_csv(path)
        return [f"level {int(row.level)} taken from `{row.source}` (identical: not retrained)"
                for row in frame.itertuples()]
    except Exception:  # noqa: BLE001 -- a note only: never stops the report
        return [f"{path.name} unreadable"]


def expand_dirs(dirs: Sequence) -> List[Path]:
    """Experiment directories named, or held one level down (a sweep directory); in order, once each."""
    found: List[Path] = []
    for entry in dirs:
        path = Path(entry)
        if not path.exists():
            raise ReportError(f"{path} does not exist")
        if not path.is_dir():
            raise ReportError(f"{path} is not a directory (give experiment directories or a sweep directory)")
        if rundir.RunFiles(path).config.is_file():
            children = [path]
        else:
            children = sorted(child for child in path.iterdir() if rundir.RunFiles(child).config.is_file())
            if not children:
                raise ReportError(f"{path} is not an experiment directory (no config.yaml) and holds none")
        for child in children:
            if child.resolve() not in {f.resolve() for f in found}:
                found.append(child)
    return found


# =========================================================================== grouping
def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def grouping_config(config: Dict[str, Any], depth: int = 0, bn_processes: Optional[int] = None) -> Dict[str, str]:
    """The config keys that define a group, as canonical strings, and ``bn_processes`` when
    given (read from the run's checkpoints).  ``prune.masks_from`` is replaced by the grouping
    key of the experiment it names (when that can be read)."""
    key = {k: _canonical(v) for k, v in {**config_defaults(), **config}.items() if k not in IGNORED_FOR_GROUPING}
    if bn_processes is not None:
        key[BN_PROCESSES_KEY] = _canonical(bn_processes)
    source = config.get("prune.masks_from")
    if source and depth < 4:
        source_dir = Path(str(source))
        if rundir.RunFiles(source_dir).config.is_file():
            try:
                source_config = read_config(source_dir)
                source_key = grouping_config(source_config, depth + 1, bn_processes_of(source_dir, source_config))
                key["prune.masks_from"] = "group:" + _canonical(source_key)
            except ReportError:
                pass
    return key


@dataclass
class Group:
    gid: str
    key: Dict[str, str]
    members: List[Experiment] = field(default_factory=list)   # the runs counted: one per seed
    label: str = ""
    dropped: List[Experiment] = field(default_factory=list)   # copies of a counted run's seed (duplicate_of)

    @property
    def config(self) -> Dict[str, Any]:
        return self.members[0].config

    @property
    def is_control(self) -> bool:
        return bool(self.config.get("prune.masks_from"))


def make_groups(experiments: Sequence[Experiment]) -> List[Group]:
    groups: List[Group] = []
    index: Dict[str, Group] = {}
    for experiment in experiments:
        key = grouping_config(experiment.config, bn_processes=experiment.bn_processes)
        signature = _canonical(key)
        if signature not in index:
            index[signature] = Group(f"g{len(groups) + 1}", key)
            groups.append(index[signature])
        index[signature].members.append(experiment)
    for group in groups:
        count_each_seed_once(group)
        group.members.sort(key=lambda e: (str(e.seed), str(e.path)))
    label_groups(groups)
    return groups


def preference(experiment: Experiment) -> Tuple[bool, int, float, str]:
    """Which of several runs of one seed is counted (the largest): complete first, then the
    most finished levels, then the newest (latest CSV write); the path breaks exact ties."""
    return experiment.complete, len(experiment.levels), experiment.written_at, str(experiment.path)


def count_each_seed_once(group: Group) -> None:
    """Keep one run per replicate (seed, source's seed) in ``group.members``; the others go to
    ``group.dropped`` with ``duplicate_of`` naming the run kept."""
    by_replicate: Dict[Tuple[str, str], List[Experiment]] = {}
    for experiment in group.members:
        by_replicate.setdefault(experiment.replicate, []).append(experiment)
    kept, dropped = [], []
    for copies in by_replicate.values():
        copies.sort(key=preference, reverse=True)
        kept.append(copies[0])
        for copy in copies[1:]:
            copy.duplicate_of = copies[0]
            dropped.append(copy)
    group.members, group.dropped = kept, sorted(dropped, key=lambda e: (str(e.seed), str(e.path)))


def differing_keys(groups: Sequence[Group]) -> List[str]:
    keys = sorted({k for g in groups for k in g.key})
    return [k for k in keys if len({g.key.get(k) for g in groups}) > 1]


def _short_names(keys: Sequence[str]) -> Dict[str, str]:
    last = [k.split(".")[-1] for k in keys]
    return {k: (short if last.count(short) == 1 else k) for k, short in zip(keys, last)}


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def source_group(group: Group, groups: Sequence[Group]) -> Optional[Group]:
    """The group holding the experiment a control's masks come from, when it is in the report
    (counted, or left out as a copy of a seed the group already counts)."""
    source = group.config.get("prune.masks_from")
    if not source:
        return None
    wanted = Path(str(source)).resolve()
    for other in groups:
        if any(member.path.resolve() == wanted for member in [*other.members, *other.dropped]):
            return other
    return None


def value_in_table(group: Group, key: str, groups: Sequence[Group]) -> str:
    if key == "prune.masks_from" and group.config.get(key):
        source = source_group(group, groups)
        return f"masks of {source.gid}" if source else f"masks of {Path(str(group.config[key])).name}"
    return _show(group_value(group, key))


def group_value(group: Group, key: str) -> Any:
    """A grouping key's value: from the config, or ``bn_processes`` from the runs' checkpoints."""
    return group.members[0].bn_processes if key == BN_PROCESSES_KEY else group.config.get(key)


def structure_words(config: Mapping[str, Any]) -> str:
    """What a label says of the pruning structure: nothing for unstructured (the default),
    ``channel `` or ``N:M `` otherwise."""
    structure = config.get("prune.structure") or "unstructured"
    if structure == "unstructured":
        return ""
    return f"{config.get('prune.nm', 'N:M')} " if structure == "nm" else f"{structure} "


def label_groups(groups: List[Group]) -> None:
    keys = [k for k in differing_keys(groups) if k not in CONTROL_KEYS]
    short = _short_names(keys)
    for group in groups:
        c = group.config
        if keys:
            text = ", ".join(f"{short[k]}={_show(group_value(group, k))}" for k in keys)
        else:
            text = (f"{c.get('model.name', '?')} {structure_words(c)}{c.get('prune.criterion', '?')}/"
                    f"{c.get('prune.allocation', '?')}/{c.get('prune.training_type', '?')}")
        if group.is_control:
            source = source_group(group, groups)
            origin = source.gid if source else Path(str(c["prune.masks_from"])).name
            text = f"control {c.get('prune.control', 'none')} of {origin}" + (f", {text}" if keys else "")
        group.label = text


# ============================================================================ numbers
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
    for ax, metric, title in ((axes[0], "final_test_acc", "final test accuracy (last epoch)"),
                              (axes[1], "best_test_acc", "best test accuracy (any epoch)")):
        for group in groups:
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
            line, = ax.plot(x, mean, marker="o", markersize=4, label=label)
            if n > 1:
                low, high = band_limits(mean, std)
                ax.fill_between(x, low, high, color=line.get_color(), alpha=band_alpha, linewidth=0)
            dense = frame[frame["level"] == 0]
            if not dense.empty and abs(float(dense["density"].iloc[0]) - 1.0) < 1e-9:
                value = float(dense[f"{metric}_mean"].iloc[0])
                ax.axhline(value, color=line.get_color(), linestyle=":", linewidth=1)
                ax.plot(100, value, marker="*", markersize=13, color=line.get_color(), zorder=5)
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
    fig.suptitle("Test accuracy against density: mean over seeds, band = ±1 std, star and dotted line = dense level",
                 fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=legend_columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_height / height, 1, 1))
    _save(fig, out)
    plt.close(fig)


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
    shown = ("model.name", "dataset.name", "prune.structure", "prune.nm", "prune.criterion", "prune.allocation",
             "prune.training_type", "prune.rate", "training.epochs", "optimizer.lr")
    common = [k for k in shown if k not in keys and k in groups[0].config
              and (k != "prune.nm" or groups[0].config.get("prune.structure") == "nm")]
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
        lines += ["| level | target density | density | final test acc | best test acc | n |",
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


def plot(experiments: List[tuple], out: Path) -> None:
    plt = _pyplot()
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


if __name__ == "__main__":
    sys.exit(main())
