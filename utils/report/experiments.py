"""Experiment directories read and grouped: what a report counts (``python -m utils.report``).

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
  config does not say is read from the run's checkpoints (utils/runs/run_facts.py): with
  BatchNorm and per-rank statistics (on CPU, or ``distributed.sync_bn: false``) N processes
  train another model than 1, so the number of processes becomes the grouping key
  ``bn_processes`` (1 for one process, no BatchNorm, or SyncBatchNorm).  Such runs form
  separate groups, labelled by it -- never refused, never averaged together.
* Runs of different data are never pooled: the identity of the data a run trained and tested
  on (its ``data.json``, utils/runs/data_identity.py: the files' fingerprints) is the grouping
  key ``data``; runs made before runs recorded their data share the value ``not recorded``.
  report.md names the data in "Common to all" (or in the groups' table when it differs).
* A run at chance level is flagged: a finished level whose every epoch's test accuracy stays
  at or below ``100 / classes`` plus a margin (``chance_margin``: 2 points or a fifth of the
  chance level, the larger) is named in report.md's warnings and in the run's status.  The
  number of classes comes from the test set's write record, else the dataset registry.
* The ±1 std bands are clipped to 0-100 (accuracies are percentages)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pandas as pd

from utils.runs import rundir
from utils.report.run_details import bn_processes_of, number_of_classes, reused_levels

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
DATA_KEY = "data"           # the grouping key of the runs' data (utils/runs/data_identity.py)


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
    plan_problem: Optional[str] = None      # why its level plan cannot be built here (its levels not counted)
    iterations_per_epoch: Optional[int] = None  # optimizer steps per epoch, read only when its cost needs them (cost.py)
    data: Optional[str] = None              # data_identity.data_signature (None: not recorded)
    data_words: str = "not recorded"        # the same in words (file names, fingerprints, samples)

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
            if self.plan_problem:
                text += f" ({self.plan_problem})"
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
    as its default, as it does when the harness resumes that run (utils/runs/rundir.py)."""
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


def level_count(config: Dict[str, Any]) -> Tuple[Optional[int], Optional[str]]:
    """(how many levels the run will have when finished, None) from its level plan
    (utils/training/level_plan.py; a control's: its source's, ``LevelPlan.for_control``); (None,
    why: one line) when the plan cannot be built here."""
    from utils.training.level_plan import PlanError, plan_of_config
    source = config.get("prune.masks_from")
    try:
        if not source:
            return len(plan_of_config(config, config_defaults())), None
        source_config, held = _control_source(Path(str(source)))
        if source_config.get("prune.masks_from"):
            return None, f"prune.masks_from={source} is itself a control"
        count = len(plan_of_config(source_config, config_defaults()).for_control(config.get("prune.levels")))
        return (count if held is None else min(count, held)), None
    except ReportError as error:
        return None, str(error)
    except PlanError as error:
        return None, f"its level plan cannot be built here ({error})"


def _control_source(path: Path) -> Tuple[Dict[str, Any], Optional[int]]:
    """(a control source's config, how many levels it holds: None for a run directory, whose plan
    says; L + 1 for a ticket file of level L, utils.models.ticket_file, read from its header)."""
    if not path.is_file():
        return read_config(path), None
    from utils.models import ticket_file
    try:
        metadata = ticket_file.read_header(path).metadata
        return dict(metadata["config"]), int(metadata["level"]) + 1
    except (ticket_file.TicketError, KeyError, TypeError, ValueError) as error:
        raise ReportError(f"prune.masks_from={path}: {error}") from None


def expected_levels(config: Dict[str, Any]) -> Optional[int]:
    """How many levels the run will have when finished (None when its plan cannot be built here)."""
    return level_count(config)[0]


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
    count, plan_problem = level_count(config)
    from utils.report.cost import iterations_per_epoch_of
    from utils.runs import data_identity
    return Experiment(root, config, levels, epochs, layers, count, in_progress,
                      bn_processes=bn_processes_of(root, config), written_at=written,
                      num_classes=number_of_classes(config), reused=reused_levels(root), plan_problem=plan_problem,
                      iterations_per_epoch=iterations_per_epoch_of(root, config),
                      data=data_identity.data_signature(root), data_words=data_identity.data_words(root) or "not recorded")


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


def grouping_config(config: Dict[str, Any], depth: int = 0, bn_processes: Optional[int] = None,
                    data: Any = None) -> Dict[str, str]:
    """The config keys that define a group, as canonical strings, ``bn_processes`` when given
    (read from the run's checkpoints) and ``data`` when given (the run's data signature, or ""
    for one that records none).  ``prune.masks_from`` is replaced by the grouping key of the
    experiment it names (when that can be read)."""
    key = {k: _canonical(v) for k, v in {**config_defaults(), **config}.items() if k not in IGNORED_FOR_GROUPING}
    if bn_processes is not None:
        key[BN_PROCESSES_KEY] = _canonical(bn_processes)
    if data is not None:
        key[DATA_KEY] = _canonical(data)
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
        key = grouping_config(experiment.config, bn_processes=experiment.bn_processes, data=experiment.data or "")
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
    """A grouping key's value: from the config, ``bn_processes`` from the runs' checkpoints, or
    ``data`` (in words) from their data.json."""
    if key == DATA_KEY:
        return group.members[0].data_words
    return group.members[0].bn_processes if key == BN_PROCESSES_KEY else group.config.get(key)


def structure_words(config: Mapping[str, Any]) -> str:
    """What a label says of the pruning structure: its own words (``Structure.label``: nothing for
    unstructured, ``channel``, the N:M pattern, an outside structure's), then a space."""
    from utils.pruning.settings import PruneSettings, SettingsError
    from utils.pruning.structures import StructureRegistryError, get_structure
    name = str(config.get("prune.structure") or "unstructured")
    try:
        words = get_structure(name)(PruneSettings.from_config(config, config_defaults())).label()
    except (StructureRegistryError, SettingsError):
        words = name  # cannot be imported here: the name the config gives
    return f"{words} " if words else ""


METHOD_KEYS = ("prune.criterion", "prune.allocation", "prune.training_type")  # a label's first words


def label_groups(groups: List[Group]) -> None:
    """Each group's label: its method (structure, criterion/allocation/training type) when groups
    differ in it, then the other keys in which groups differ, each only where the group sets it
    away from the harness's default (absent = default).  When that would leave two groups the same
    label, or one none, every differing key is named, as ``key=value``."""
    keys = [k for k in differing_keys(groups) if k not in CONTROL_KEYS]
    short = _short_names(keys)
    defaults = config_defaults()

    def method_words(c: Mapping[str, Any]) -> str:
        return (f"{structure_words(c)}{c.get('prune.criterion', '?')}/{c.get('prune.allocation', '?')}/"
                f"{c.get('prune.training_type', '?')}")

    def concise(group: Group) -> str:
        parts = [method_words(group.config)] if any(k in METHOD_KEYS for k in keys) else []
        parts += [f"{short[k]}={_show(group_value(group, k))}" for k in keys if k not in METHOD_KEYS
                  and (k not in defaults or _show(group_value(group, k)) != _show(defaults[k]))]
        return ", ".join(parts)

    def every_key(group: Group) -> str:
        return ", ".join(f"{short[k]}={_show(group_value(group, k))}" for k in keys)

    plain = [g for g in groups if not g.is_control]
    texts = [concise(g) for g in plain]
    use = concise if all(texts) and len(set(texts)) == len(texts) else every_key
    for group in groups:
        c = group.config
        text = use(group) if keys else f"{c.get('model.name', '?')} {method_words(c)}"
        if group.is_control:
            source = source_group(group, groups)
            origin = source.gid if source else Path(str(c["prune.masks_from"])).name
            text = f"control {c.get('prune.control', 'none')} of {origin}" + (f", {text}" if keys and text else "")
        group.label = text


# ============================================================================ numbers
