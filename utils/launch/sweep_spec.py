"""The sweep file -> the list of runs (``parse_sweep``, ``expand``, ``validate_runs``).

What a sweep file holds and how it expands: ``utils/launch/sweep.py`` (the command).  Every
expanded run is checked by the harness's own config validation before anything runs; a bad
sweep file is refused in one line (``SweepError``); a run's status (missing, unfinished,
finished) comes from its run directory."""
from __future__ import annotations

import contextlib
import io
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from utils.runs import rundir

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 1, 2, 143
REPO_ROOT = Path(__file__).resolve().parents[2]
SWEEP_KEYS = {"base", "name", "overrides", "grid", "zip", "controls", "launcher", "nproc_per_node", "runs_per_gpu",
              "slurm"}
CONTROL_ENTRY_KEYS = {"seed_offset", "overrides", "only_for"}
DEFAULT_SEED_OFFSET = {"reinit": 1000}   # reinit needs another seed than its source's; the others keep it (0)
# Set by the sweep for each control run (a control entry's overrides may not set them).
CONTROL_SET_KEYS = ("prune.masks_from", "prune.control", "experiment.seed")
SLURM_KEYS = {"partition": str, "account": str, "qos": str, "constraint": str, "time_min": int, "gpus_per_node": int,
              "cpus_per_task": int, "mem_gb": int, "array_parallelism": int, "setup": list}
RESERVED_GRID_KEYS = ("experiment.name", "experiment.base_dir")  # the sweep decides where runs go



class SweepError(ValueError):
    """A bad sweep file or flag: one line."""


# ============================================================================ the sweep
@dataclass
class ControlSpec:
    control: str                    # none, reinit or shuffle (prune.control)
    seed_offset: int                # the control's experiment.seed = its source's + seed_offset
    overrides: Dict[str, Any] = field(default_factory=dict)
    only_for: Dict[str, Any] = field(default_factory=dict)   # grid/zip values a source must have ({}: every source)


@dataclass
class Run:
    name: str
    values: Dict[str, Any]          # the grid (and zip) values of this run
    argv: List[str]                 # harness arguments: --config BASE --k=v ...
    config: Dict[str, Any] = field(default_factory=dict)   # the resolved config (flat)
    source: Optional["Run"] = None  # a control run: the run whose masks it trains
    control: Optional[ControlSpec] = None

    @property
    def directory(self) -> Path:
        return Path(self.config["experiment.base_dir"]) / self.config["experiment.name"]


@dataclass
class Sweep:
    file: Path
    name: str
    base: Path
    overrides: Dict[str, Any]
    grid: Dict[str, List[Any]]
    launcher: str = "local"
    nproc_per_node: int = 1
    runs_per_gpu: int = 1
    slurm: Dict[str, Any] = field(default_factory=dict)
    runs: List[Run] = field(default_factory=list)
    directory: Optional[Path] = None
    zip: Dict[str, List[Any]] = field(default_factory=dict)
    controls: List[ControlSpec] = field(default_factory=list)


def cli_value(value: Any) -> str:
    """A value as the harness parses ``--key=value`` (YAML): lrr, 0.1, true, null, [1, 2], '1e-3'."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    elif text.endswith("..."):
        text = text[:-3].strip()
    return text


def name_part(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "-".join(name_part(v) for v in value) or "empty"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def run_names(grid_keys: Sequence[str], combos: Sequence[Sequence[Any]]) -> List[str]:
    last = [k.split(".")[-1] for k in grid_keys]
    short = [s if last.count(s) == 1 else k for k, s in zip(grid_keys, last)]
    return ["_".join(f"{s}-{name_part(v)}" for s, v in zip(short, combo)) for combo in combos]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SweepError(message)


def read_sweep_file(path: Path) -> Dict[str, Any]:
    _require(path.is_file(), f"sweep file {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SweepError(f"sweep file {path} is not valid YAML{where}: {getattr(error, 'problem', '') or error}") from None
    except UnicodeDecodeError:
        raise SweepError(f"sweep file {path} is not a text (UTF-8) YAML file") from None
    _require(isinstance(tree, dict), f"sweep file {path}: expected a mapping with base, name, grid (and overrides)")
    unknown = sorted(set(map(str, tree)) - SWEEP_KEYS)
    if unknown:
        raise SweepError(f"sweep file {path}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(SWEEP_KEYS))}")
    return tree


def _dotted(mapping: Dict[Any, Any], where: str) -> Dict[str, Any]:
    """{"a.b": v} or {a: {b: v}} -> {"a.b": v}."""
    flat: Dict[str, Any] = {}
    for key, value in mapping.items():
        key = str(key)
        if isinstance(value, dict) and "." not in key:
            for inner, inner_value in value.items():
                flat[f"{key}.{inner}"] = inner_value
        else:
            flat[key] = value
    for key in flat:
        _require(key.count(".") == 1, f"{where}: key {key!r} must be section.key (e.g. prune.rate)")
    return flat


def parse_sweep(path: Path, flags: Optional[Dict[str, Any]] = None) -> Sweep:
    """Read and check a sweep file (structure only; each run is checked by validate_runs)."""
    path = Path(path)
    tree = read_sweep_file(path)
    _require("base" in tree, f"sweep file {path}: missing 'base' (the base config file)")
    base = tree["base"]
    _require(isinstance(base, str) and base.strip() != "", f"sweep file {path}: base={base!r} must be a config file path")
    base_path = Path(base)
    if not base_path.is_absolute() and not base_path.exists() and (path.parent / base_path).exists():
        base_path = path.parent / base_path
    _require(base_path.is_file(), f"sweep file {path}: base config {base} does not exist")
    name = tree.get("name", path.stem)
    _require(isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name or "") is not None,
             f"sweep file {path}: name={name!r} must be a plain directory name (letters, digits, . _ + -)")
    overrides = tree.get("overrides") or {}
    _require(isinstance(overrides, dict), f"sweep file {path}: overrides must be a mapping of section.key: value, "
                                          f"got {type(overrides).__name__}")
    overrides = _dotted(overrides, f"sweep file {path}: overrides")
    _require("grid" in tree or "zip" in tree,
             f"sweep file {path}: missing 'grid' (section.key: [values, ...]; or 'zip', lists varied together)")
    grid = _varied_section(tree, "grid", path, name, overrides)
    paired = _varied_section(tree, "zip", path, name, overrides)
    _require(len(grid) + len(paired) > 0, f"sweep file {path}: the grid is empty; give at least one "
                                          f"section.key: [values]")
    both = sorted(set(grid) & set(paired))
    _require(not both, f"sweep file {path}: {both[0] if both else ''} is both in the grid and in zip")
    lengths = {key: len(values) for key, values in paired.items()}
    _require(len(set(lengths.values())) <= 1,
             f"sweep file {path}: zip lists are varied together and must have one length; got "
             + ", ".join(f"{key}: {count} values" for key, count in lengths.items()))
    control_specs = parse_controls(tree.get("controls"), path)
    _require("experiment.name" not in overrides,
             f"sweep file {path}: overrides cannot set experiment.name (the sweep names its runs)")
    settings = {"launcher": tree.get("launcher", "local"), "nproc_per_node": tree.get("nproc_per_node", 1),
                "runs_per_gpu": tree.get("runs_per_gpu", 1), "slurm": tree.get("slurm") or {}}
    _require(isinstance(settings["slurm"], dict), f"sweep file {path}: slurm must be a mapping "
                                                   f"({', '.join(sorted(SLURM_KEYS))})")
    for key, value in settings["slurm"].items():
        _require(key in SLURM_KEYS, f"sweep file {path}: unknown slurm key {key!r}; allowed: {', '.join(sorted(SLURM_KEYS))}")
        kind = SLURM_KEYS[key]
        _require(isinstance(value, kind) and not isinstance(value, bool),
                 f"sweep file {path}: slurm.{key}={value!r} must be {kind.__name__}")
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key in SLURM_KEYS:
            settings["slurm"][key] = value
        else:
            settings[key] = value
    _require(settings["launcher"] in ("local", "slurm"),
             f"launcher={settings['launcher']!r} is not allowed: expected local or slurm")
    for key in ("nproc_per_node", "runs_per_gpu"):
        value = settings[key]
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{key}={value!r} must be an integer >= 1")
    sweep = Sweep(path, name, base_path, overrides, grid, settings["launcher"], settings["nproc_per_node"],
                  settings["runs_per_gpu"], settings["slurm"], zip=paired, controls=control_specs)
    expand(sweep)
    return sweep


def _varied_section(tree: Dict[str, Any], section: str, path: Path, name: str,
                    overrides: Dict[str, Any]) -> Dict[str, List[Any]]:
    """The ``grid`` or ``zip`` section: section.key -> a non-empty list of values ({} when absent)."""
    if section not in tree:
        return {}
    varied = tree[section]
    _require(isinstance(varied, dict), f"sweep file {path}: {section} must be a mapping of section.key: [values], "
                                       f"got {type(varied).__name__}")
    varied = _dotted(varied, f"sweep file {path}: {section}")
    for key, values in varied.items():
        _require(isinstance(values, list), f"sweep file {path}: {section} key {key} must be a list of values, "
                                           f"got {type(values).__name__} {values!r}")
        _require(len(values) > 0, f"sweep file {path}: {section} key {key} has no values")
        _require(key not in RESERVED_GRID_KEYS, f"sweep file {path}: {section} key {key} is set by the sweep "
                                                f"(runs go to experiment.base_dir/{name}/<run name>)")
        _require(key not in overrides, f"sweep file {path}: {key} is both in overrides and in the {section}")
    return varied


def parse_controls(section: Any, path: Path) -> List[ControlSpec]:
    """``controls: {reinit: {seed_offset: 1000}, shuffle: {}}`` or ``controls: [reinit, shuffle]``."""
    from utils.lottery.controls import CONTROLS
    if section is None:
        return []
    where = f"sweep file {path}: controls"
    if isinstance(section, list):
        _require(all(isinstance(entry, str) for entry in section),
                 f"{where} must list control names ({', '.join(CONTROLS)}) or map them to settings")
        _require(len(set(section)) == len(section), f"{where} names a control twice")
        section = {entry: {} for entry in section}
    _require(isinstance(section, dict) and len(section) > 0,
             f"{where} must map control names ({', '.join(CONTROLS)}) to settings ({', '.join(sorted(CONTROL_ENTRY_KEYS))})")
    specs = []
    for control, settings in section.items():
        _require(control in CONTROLS, f"{where}: {control!r} is not a control; valid: {', '.join(CONTROLS)}")
        settings = settings if settings is not None else {}
        _require(isinstance(settings, dict), f"{where}.{control} must be a mapping "
                                             f"({', '.join(sorted(CONTROL_ENTRY_KEYS))}), got {settings!r}")
        unknown = sorted(set(map(str, settings)) - CONTROL_ENTRY_KEYS)
        _require(not unknown, f"{where}.{control}: unknown key {unknown[0] if unknown else ''!r}; "
                              f"allowed: {', '.join(sorted(CONTROL_ENTRY_KEYS))}")
        offset = settings.get("seed_offset", DEFAULT_SEED_OFFSET.get(control, 0))
        _require(isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0,
                 f"{where}.{control}: seed_offset={offset!r} must be an integer >= 0")
        _require(control != "reinit" or offset != 0,
                 f"{where}.reinit: seed_offset=0 gives the control its source's seed, so its 'fresh' initialisation "
                 f"would be the ticket's own; use another offset (default {DEFAULT_SEED_OFFSET['reinit']})")
        extra = settings.get("overrides") or {}
        _require(isinstance(extra, dict), f"{where}.{control}: overrides must be a mapping of section.key: value")
        extra = _dotted(extra, f"{where}.{control}: overrides")
        for key in (*CONTROL_SET_KEYS, *RESERVED_GRID_KEYS):
            _require(key not in extra, f"{where}.{control}: overrides cannot set {key} (the sweep sets it for "
                                       f"each control run; the seed through seed_offset)")
        _require(control != "none" or offset != 0 or extra,
                 f"{where}.none: with the source's seed and no overrides it would repeat the source run; "
                 f"give it a seed_offset or overrides")
        only_for = settings.get("only_for") or {}
        _require(isinstance(only_for, dict), f"{where}.{control}: only_for must be a mapping of section.key: value "
                                             f"(grid or zip values of the sources it applies to)")
        specs.append(ControlSpec(control, offset, extra, _dotted(only_for, f"{where}.{control}: only_for")))
    return specs


def varied_values(sweep: Sweep) -> List[Dict[str, Any]]:
    """The values of each run: the grid's product (in the grid's key order), times the zip rows."""
    grid_keys, zip_keys = list(sweep.grid), list(sweep.zip)
    rows = list(zip(*(sweep.zip[k] for k in zip_keys))) if zip_keys else [()]
    return [{**dict(zip(grid_keys, combo)), **dict(zip(zip_keys, row))}
            for combo in itertools.product(*(sweep.grid[k] for k in grid_keys)) for row in rows]


def expand(sweep: Sweep) -> None:
    """Sweep.runs: the sources (grid x zip), then each source's controls, in that order."""
    combos = varied_values(sweep)
    keys = list(sweep.grid) + list(sweep.zip)
    names = run_names(keys, [[values[k] for k in keys] for values in combos])
    seen: Dict[str, Dict[str, Any]] = {}

    def add(run: Run) -> None:
        if run.name in seen:
            raise SweepError(f"sweep file {sweep.file}: runs {_describe(seen[run.name])} and {_describe(run.values)} "
                             f"give the same run name {run.name!r}; make the values distinct")
        seen[run.name] = run.values
        sweep.runs.append(run)

    for name, values in zip(names, combos):
        argv = ["--config", str(sweep.base)]
        argv += [f"--{k}={cli_value(v)}" for k, v in sweep.overrides.items()]
        argv += [f"--{k}={cli_value(v)}" for k, v in values.items()]
        add(Run(name, values, argv))
    if not sweep.controls:
        return
    for source in list(sweep.runs):
        masks_from = {**sweep.overrides, **source.values}.get("prune.masks_from")
        _require(not masks_from, f"sweep file {sweep.file}: run {source.name} is itself a control "
                                 f"(prune.masks_from={masks_from}); controls: apply to runs that prune")
        for spec in sweep.controls:  # the source's arguments, its seed aside (validate_runs sets the control's)
            for key in spec.only_for:
                _require(key in sweep.grid or key in sweep.zip, f"sweep file {sweep.file}: controls.{spec.control}."
                                                                f"only_for: {key} is not a grid or zip key")
            if any(source.values[key] != value for key, value in spec.only_for.items()):
                continue
            argv = ["--config", str(sweep.base)]
            argv += [f"--{k}={cli_value(v)}" for k, v in {**sweep.overrides, **source.values, **spec.overrides}.items()
                     if k != "experiment.seed"]
            argv.append(f"--prune.control={spec.control}")
            add(Run(f"{source.name}_{spec.control}", {**source.values, "prune.control": spec.control}, argv,
                    source=source, control=spec))


def harness_check(argv: Sequence[str]) -> Dict[str, Any]:
    """harness_params.load_config on ``argv``; its one-line refusal becomes a SweepError."""
    import harness_params
    sink = io.StringIO()
    try:
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(io.StringIO()):
            return harness_params.load_config(list(argv))
    except SystemExit as stop:
        lines = [line for line in sink.getvalue().splitlines() if line.strip()]
        message = lines[-1] if lines else f"the harness refused the config (exit status {stop.code})"
        raise SweepError(message) from None


def validate_runs(sweep: Sweep) -> None:
    """Check every run's config with the harness's validation; fix base_dir/name of each run."""
    def check(run: Run, argv: List[str]) -> Dict[str, Any]:
        try:
            return harness_check(argv)
        except SweepError as error:
            raise SweepError(f"sweep {sweep.name}, run {run.name} ({_describe(run.values)}): {error}") from None

    # where runs go: experiment.base_dir of the base config with the fixed overrides
    first = sweep.runs[0]
    base_dir = check(first, first.argv + [f"--experiment.name={first.name}"])["experiment.base_dir"]
    sweep.directory = Path(base_dir) / sweep.name
    for run in sweep.runs:  # sources come first: a control's seed and masks are its checked source's
        if run.source is not None:
            seed = run.source.config["experiment.seed"] + run.control.seed_offset
            run.values["experiment.seed"] = seed
            run.argv += [f"--prune.masks_from={run.source.directory}", f"--experiment.seed={seed}"]
        run.argv += [f"--experiment.base_dir={sweep.directory}", f"--experiment.name={run.name}"]
        run.config = check(run, run.argv)


def _describe(values: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={cli_value(v)}" for k, v in values.items())


# ============================================================================ run state
def run_status(run: Run) -> str:
    """'new', 'finished', 'partial' (the harness resumes it) or 'conflict' (another config there:
    the harness will refuse it, naming the keys).  The harness's own rule: utils.runs.rundir.run_state
    with the harness's defaults for keys an older config.yaml lacks, and the level plan's word on a
    run this sweep makes deeper (utils.training.level_plan.deepening; a control's plan is its source
    run's as this sweep configures it)."""
    import harness_params
    from utils.training.level_plan import deepening, plan_of_config
    defaults = harness_params.defaults()

    def plan_of(config):
        if run.source is None:
            return plan_of_config(config, defaults)
        return plan_of_config(run.source.config, defaults).for_control(config.get("prune.levels"))

    def planned_levels(stored, new, differing):
        return deepening(differing, lambda: (plan_of(stored), plan_of(new)))

    state = rundir.run_state(run.directory, run.config, defaults, planned_levels)
    return {"new": "new", "finished": "finished", "resume": "partial", "other": "conflict"}[state]


# ============================================================================ commands
