"""Sweeps: a base config x a grid of overrides -> runs, launched locally or on Slurm.

    python -m utils.sweep configs/sweeps/digits_imp_vs_lrr.yaml --dry-run     # list runs and commands
    python -m utils.sweep configs/sweeps/digits_imp_vs_lrr.yaml               # run what is missing, then report
    python -m utils.sweep SWEEP.yaml --runs-per-gpu 2                         # 2 runs at once per GPU (or on CPU)
    python -m utils.sweep SWEEP.yaml --launcher slurm --partition gpu --time-min 240 [--wait]

A sweep file::

    base: configs/resnet20_lrr_cifar10.yaml   # the base config (relative to the working directory,
                                              # else to the sweep file's directory)
    name: r20_lrr_vs_wr                       # the sweep's directory under experiment.base_dir
    overrides: {training.epochs: 160}         # fixed for every run (optional)
    grid: {experiment.seed: [0, 1, 2], prune.training_type: [lrr, wr]}   # the product
    zip: {experiment.seed: [0, 1, 2], optimizer.lr: [0.1, 0.2, 0.4]}     # optional: varied together
    controls: {reinit: {seed_offset: 1000}, shuffle: {}}                 # optional: each run's controls
    launcher: local                           # optional: local (default) or slurm
    nproc_per_node: 1                         # optional: processes per run (torchrun --nproc-per-node)
    runs_per_gpu: 1                           # optional, local: runs at once per GPU (on CPU: at once)
    slurm: {partition: gpu, time_min: 240, gpus_per_node: 1, cpus_per_task: 8, mem_gb: 32}   # optional

Runs: every combination of the ``grid`` lists (their product) times every row of the ``zip``
lists (lists of one length, the i-th values of all of them together: seeds paired with their
own masks, say).  Either section may be left out, not both.  Run ``r`` is
``experiment.base_dir/<name>/<run name>``, the run name made of the grid values, then the zip
values (``seed-0_training_type-lrr``).

``controls`` gives each of those runs (a *source*) its control runs (utils/controls.py), listed
after all the sources -- a launcher starts runs in list order, and a control waits for the
levels of its source anyway: ``<source name>_<control>`` trains with the source's config plus
``--prune.masks_from=<source's directory> --prune.control=<control>`` and
``--experiment.seed=<source's seed + seed_offset>``.  ``seed_offset`` defaults to 0 (``none``,
``shuffle``: the source's seed and initial weights, so the level 0 of a ``shuffle`` control is the
source's and is taken, not retrained) and to 1000 for ``reinit``, whose fresh initialisation must
come from another seed (0 is refused).  ``overrides`` in a control's entry apply to that control's
runs only.  Written ``controls: [reinit, shuffle]`` for the defaults.  Every expanded run is checked by the harness's own config
validation before anything runs; a bad sweep file is refused in one line, exit status 2.
Finished runs are skipped; a run with a directory but not finished is launched again and the
harness resumes it; a re-run of the sweep only does what is missing.  At the end the report of
the whole sweep goes to ``<sweep dir>/report`` (``python -m utils.report``).  Each run's output
goes to ``<sweep dir>/logs/<run name>.log`` (local) or ``<sweep dir>/slurm/`` (Slurm).

Exit status: 0 all runs finished (or submitted), 1 a run failed, 2 a bad sweep file or flag,
143 stopped by SIGINT/SIGTERM (forwarded once to the running runs, which checkpoint).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from utils import rundir

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 1, 2, 143
REPO_ROOT = Path(__file__).resolve().parents[1]
SWEEP_KEYS = {"base", "name", "overrides", "grid", "zip", "controls", "launcher", "nproc_per_node", "runs_per_gpu",
              "slurm"}
CONTROL_ENTRY_KEYS = {"seed_offset", "overrides"}
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
    from utils.controls import CONTROLS
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
        specs.append(ControlSpec(control, offset, extra))
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
    the harness will refuse it, naming the keys).  The harness's own rule: utils.rundir.run_state
    with the harness's defaults for keys an older config.yaml lacks."""
    import harness_params
    state = rundir.run_state(run.directory, run.config, harness_params.defaults())
    return {"new": "new", "finished": "finished", "resume": "partial", "other": "conflict"}[state]


# ============================================================================ commands
def torchrun_executable() -> str:
    candidate = Path(sys.executable).with_name("torchrun")
    return str(candidate) if candidate.exists() else "torchrun"


def harness_script() -> str:
    script = REPO_ROOT / "harness.py"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def run_command(run: Run, nproc_per_node: int) -> List[str]:
    return [torchrun_executable(), "--standalone", f"--nproc-per-node={nproc_per_node}", harness_script(), *run.argv]


def show_command(command: Sequence[str]) -> str:
    shown = list(command)
    if shown and shown[0] == torchrun_executable():
        shown[0] = "torchrun"
    return " ".join(shlex.quote(part) for part in shown)


# ============================================================================ local launcher
def visible_gpus() -> List[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def local_slots(nproc_per_node: int, runs_per_gpu: int, gpus: Sequence[str]) -> List[Optional[str]]:
    """CUDA_VISIBLE_DEVICES of each slot (None: CPU).  GPUs are split into groups of
    nproc_per_node (one per process of a run); each group holds runs_per_gpu runs at once."""
    if not gpus:
        return [None] * runs_per_gpu
    if len(gpus) < nproc_per_node:
        raise SweepError(f"nproc_per_node={nproc_per_node} needs that many GPUs; {len(gpus)} visible")
    groups = [",".join(gpus[i:i + nproc_per_node]) for i in range(0, len(gpus) - nproc_per_node + 1, nproc_per_node)]
    return [group for group in groups for _ in range(runs_per_gpu)]


def cpu_threads_per_run(runs_at_once: int, nproc_per_node: int) -> int:
    """Threads per process when runs share the CPU: the cores split between every process of
    the runs at once (torch would otherwise give each process all cores).  At least 1."""
    return max(1, (os.cpu_count() or 1) // max(1, runs_at_once * nproc_per_node))


class _Stop:
    """SIGINT/SIGTERM: stop launching; forward SIGTERM to the running runs (their own session,
    so a terminal's Ctrl-C reaches them only this way, once).  A second signal forwards again:
    the harness then stops at once (its last checkpoint stays intact)."""

    def __init__(self):
        self.count = 0
        self.children: Dict[str, subprocess.Popen] = {}
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        self.count += 1
        print(f"sweep: {signal.Signals(signum).name} received: stopping the running runs (they checkpoint); "
              f"re-run the sweep to resume", file=sys.stderr, flush=True)
        for child in self.children.values():
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGTERM)


def launch_local(sweep: Sweep, runs: Sequence[Run], *, poll_s: float = 0.5) -> int:
    slots = local_slots(sweep.nproc_per_node, sweep.runs_per_gpu, visible_gpus())
    logs = sweep.directory / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending = list(runs)
    free = list(range(len(slots)))
    running: Dict[str, tuple] = {}
    failed: List[str] = []
    stopped = False
    total, started_count = len(runs), 0
    with _Stop() as stop:
        while pending or running:
            while pending and free and not stop.count:
                run, slot = pending.pop(0), free.pop(0)
                env = dict(os.environ)
                if slots[slot] is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slots[slot]
                else:
                    env.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_run(len(slots), sweep.nproc_per_node)))
                command = run_command(run, sweep.nproc_per_node)
                log_path = logs / f"{run.name}.log"
                log = open(log_path, "a")
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {show_command(command)}\n")
                log.flush()
                child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
                started_count += 1
                where = f" on GPU {slots[slot]}" if slots[slot] is not None else ""
                print(f"[{started_count}/{total}] {run.name}: started{where} (log: {log_path})", flush=True)
                stop.children[run.name] = child
                running[run.name] = (run, child, slot, log, log_path, time.monotonic())
            if stop.count and pending:
                stopped = True
                pending.clear()
            time.sleep(poll_s if running else 0)
            for name in list(running):
                run, child, slot, log, log_path, began = running[name]
                code = child.poll()
                if code is None:
                    continue
                log.close()
                del running[name]
                del stop.children[name]
                free.append(slot)
                seconds = time.monotonic() - began
                if code == 0:
                    print(f"    {name}: done in {seconds:.0f} s", flush=True)
                elif code == EXIT_STOPPED or stop.count:
                    stopped = True
                    print(f"    {name}: stopped (exit {code}); its checkpoint is intact", flush=True)
                else:
                    failed.append(name)
                    print(f"    {name}: FAILED (exit {code}) after {seconds:.0f} s; last lines of {log_path}:", flush=True)
                    for line in _tail(log_path, 8):
                        print(f"      {line}", flush=True)
    if stopped:
        return EXIT_STOPPED
    if failed:
        print(f"sweep {sweep.name}: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _tail(path: Path, count: int) -> List[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-count:]
    except OSError:
        return []


# ============================================================================ Slurm launcher
def launch_slurm(sweep: Sweep, runs: Sequence[Run], *, cluster: str = "slurm", wait: bool = False) -> int:
    """One job array, one task per run (each: torchrun --nproc-per-node on one node): utils/slurm.py."""
    from utils import slurm
    gpus_default = sweep.nproc_per_node if visible_gpus() or sweep.slurm.get("partition") else 0
    parameters = slurm.executor_parameters(f"sweep-{sweep.name}", sweep.slurm, sweep.nproc_per_node, gpus_default)
    hint = (f"when they are done, run the same command again: it launches nothing more and writes the report "
            f"(or: python -m utils.report {sweep.directory} --out-dir {sweep.directory / 'report'})")
    return slurm.launch_array(f"sweep {sweep.name}", sweep.directory / "slurm", [run.name for run in runs],
                              [run_command(run, sweep.nproc_per_node) for run in runs], os.getcwd(), parameters,
                              cluster=cluster, wait=wait, after_hint=hint)


# ============================================================================ report
def write_sweep_report(sweep: Sweep) -> Optional[Path]:
    from utils import report
    dirs = [run.directory for run in sweep.runs if rundir.RunFiles(run.directory).config.is_file()]
    if not dirs:
        return None
    out = sweep.directory / "report"
    try:
        report.write_report(dirs, out, command=f"python -m utils.report {sweep.directory} --out-dir {out}")
    except report.ReportError as error:
        print(f"sweep {sweep.name}: no report: {error}", file=sys.stderr)
        return None
    return out


# ============================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils.sweep",
                                     description="Expand a sweep file into runs and launch what is missing")
    parser.add_argument("sweep_file", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="list the runs, their state and commands; run nothing")
    parser.add_argument("--launcher", choices=["local", "slurm"], default=None)
    parser.add_argument("--nproc-per-node", type=int, default=None, help="processes per run (torchrun)")
    parser.add_argument("--runs-per-gpu", type=int, default=None,
                        help="local: runs at once on each visible GPU (on CPU: runs at once)")
    slurm = parser.add_argument_group("slurm (override the sweep file's slurm section)")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--qos", default=None)
    slurm.add_argument("--time-min", dest="time_min", type=int, default=None)
    slurm.add_argument("--gpus-per-node", dest="gpus_per_node", type=int, default=None)
    slurm.add_argument("--cpus-per-task", dest="cpus_per_task", type=int, default=None)
    slurm.add_argument("--mem-gb", dest="mem_gb", type=int, default=None)
    slurm.add_argument("--array-parallelism", dest="array_parallelism", type=int, default=None)
    slurm.add_argument("--wait", action="store_true", help="slurm: wait for the jobs, then write the report")
    slurm.add_argument("--cluster", choices=["slurm", "local"], default="slurm",
                       help="slurm launcher back-end: a real Slurm (sbatch), or submitit's local executor (testing)")
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = {"launcher": args.launcher, "nproc_per_node": args.nproc_per_node, "runs_per_gpu": args.runs_per_gpu,
             "partition": args.partition, "account": args.account, "qos": args.qos, "time_min": args.time_min,
             "gpus_per_node": args.gpus_per_node, "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem_gb,
             "array_parallelism": args.array_parallelism}
    try:
        sweep = parse_sweep(args.sweep_file, flags)
        validate_runs(sweep)
        if sweep.launcher == "local":
            local_slots(sweep.nproc_per_node, sweep.runs_per_gpu, visible_gpus())  # refuse too few GPUs now
    except SweepError as error:
        print(f"sweep error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    states = {run.name: run_status(run) for run in sweep.runs}
    todo = [run for run in sweep.runs if states[run.name] != "finished"]
    print(f"sweep {sweep.name}: {len(sweep.runs)} run(s) under {sweep.directory}; "
          f"{len(sweep.runs) - len(todo)} finished, {len(todo)} to run ({sweep.launcher} launcher)")
    if args.dry_run:
        for run in sweep.runs:
            role = "" if run.source is None else \
                f"  (control {run.control.control} of {run.source.name}, seed {run.config['experiment.seed']})"
            print(f"  {run.name} [{states[run.name]}]{role}")
            print(f"    {show_command(run_command(run, sweep.nproc_per_node))}")
        return 0
    conflicts = [run.name for run in todo if states[run.name] == "conflict"]
    if conflicts:
        print(f"note: {', '.join(conflicts)}: the directory holds a run with another config; "
              f"the harness will refuse it (move it away, or rename the sweep)", file=sys.stderr)
    status = 0
    if todo:
        if sweep.launcher == "local":
            status = launch_local(sweep, todo)
        else:
            status = launch_slurm(sweep, todo, cluster=args.cluster, wait=args.wait or args.cluster == "local")
            if status == 0 and not (args.wait or args.cluster == "local"):
                return 0
    if status != EXIT_STOPPED and not args.no_report:
        out = write_sweep_report(sweep)
        if out is not None:
            print(f"report: {out / 'report.md'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
