"""The sweep command: a base config x a grid of overrides -> runs, launched locally or on Slurm, then the report.

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

``controls`` gives each of those runs (a *source*) its control runs (utils/lottery/controls.py), listed
after all the sources -- a launcher starts runs in list order, and a control waits for the
levels of its source anyway: ``<source name>_<control>`` trains with the source's config plus
``--prune.masks_from=<source's directory> --prune.control=<control>`` and
``--experiment.seed=<source's seed + seed_offset>``.  ``seed_offset`` defaults to 0 (``none``,
``shuffle``: the source's seed and initial weights, so the level 0 of a ``shuffle`` control is the
source's and is taken, not retrained) and to 1000 for ``reinit``, whose fresh initialisation must
come from another seed (0 is refused).  ``overrides`` in a control's entry apply to that control's
runs only; ``only_for: {section.key: value}`` gives the control only to the sources with those grid or zip
values (e.g. the IMP runs of a grid that also holds random pruning).  Written ``controls: [reinit, shuffle]``
for the defaults.  Every expanded run is checked by the harness's own config
validation before anything runs; a bad sweep file is refused in one line, exit status 2.
Finished runs are skipped; a run with a directory but not finished is launched again and the
harness resumes it; a re-run of the sweep only does what is missing.  When a run already there
(finished or not) was trained on other data than its files hold now (its ``data.json``:
utils/runs/data_identity.py), the sweep is refused in one line naming the file: its new runs
would be compared with results of other data.  At the end the report of
the whole sweep goes to ``<sweep dir>/report`` (``python -m utils.report``).  Each run's output
goes to ``<sweep dir>/logs/<run name>.log`` (local) or ``<sweep dir>/slurm/`` (Slurm).

Exit status: 0 all runs finished (or submitted), 1 a run failed, 2 a bad sweep file or flag,
143 stopped by SIGINT/SIGTERM (forwarded once to the running runs, which checkpoint)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from utils.launch import sweep_local  # run_command through the module: one place to replace it (tests)
from utils.launch.sweep_local import launch_local, local_slots, show_command, visible_gpus
from utils.launch.sweep_spec import (
    EXIT_BAD_INPUT,
    EXIT_STOPPED,
    Run,
    Sweep,
    SweepError,
    parse_sweep,
    run_status,
    validate_runs,
)
from utils.runs import data_identity, rundir

SWEEP_ON_NEW_DATA = "restore that data, or run the sweep on the new data under another name"


def launch_slurm(sweep: Sweep, runs: Sequence[Run], *, cluster: str = "slurm", wait: bool = False) -> int:
    """One job array, one task per run (each: torchrun --nproc-per-node on one node): utils/launch/slurm.py."""
    from utils.launch import slurm
    gpus_default = sweep.nproc_per_node if visible_gpus() or sweep.slurm.get("partition") else 0
    parameters = slurm.executor_parameters(f"sweep-{sweep.name}", sweep.slurm, sweep.nproc_per_node, gpus_default)
    hint = (f"when they are done, run the same command again: it launches nothing more and writes the report "
            f"(or: python -m utils.report {sweep.directory} --out-dir {sweep.directory / 'report'})")
    return slurm.launch_array(f"sweep {sweep.name}", sweep.directory / "slurm", [run.name for run in runs],
                              [sweep_local.run_command(run, sweep.nproc_per_node) for run in runs], os.getcwd(), parameters,
                              cluster=cluster, wait=wait, after_hint=hint)


# ============================================================================ report
def write_sweep_report(sweep: Sweep) -> Optional[Path]:
    from utils.report import cli as report_cli
    from utils.report import experiments as report_experiments
    dirs = [run.directory for run in sweep.runs if rundir.RunFiles(run.directory).config.is_file()]
    if not dirs:
        return None
    out = sweep.directory / "report"
    try:
        report_cli.write_report(dirs, out, command=f"python -m utils.report {sweep.directory} --out-dir {out}")
    except report_experiments.ReportError as error:
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


def plan_words(run: Run) -> str:
    """What a run's level plan says, for the dry run: its levels and their target densities."""
    import harness_params
    from utils.training.level_plan import PlanError, plan_of_config
    if run.source is not None:
        return "levels: its source's"
    try:
        plan = plan_of_config(run.config, harness_params.defaults())
    except PlanError as error:
        return f"levels: cannot be planned here ({error})"
    shown = ", ".join("?" if d is None else f"{100 * d:.3g}%" for d in plan.densities)
    return f"{len(plan)} level{'s' * (len(plan) != 1)} (target densities {shown})"


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
    try:
        for run in sweep.runs:
            if states[run.name] in ("partial", "finished"):
                files = data_identity.data_paths(run.config["dataset.train_path"], run.config["dataset.test_path"])
                data_identity.check_run_data(run.directory, files, doing="add runs to this sweep",
                                             instead=SWEEP_ON_NEW_DATA)
    except data_identity.DataChanged as error:
        print(f"sweep error: run {run.name}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    todo = [run for run in sweep.runs if states[run.name] != "finished"]
    print(f"sweep {sweep.name}: {len(sweep.runs)} run(s) under {sweep.directory}; "
          f"{len(sweep.runs) - len(todo)} finished, {len(todo)} to run ({sweep.launcher} launcher)")
    if args.dry_run:
        for run in sweep.runs:
            role = "" if run.source is None else \
                f"  (control {run.control.control} of {run.source.name}, seed {run.config['experiment.seed']})"
            print(f"  {run.name} [{states[run.name]}]{role}  {plan_words(run)}")
            print(f"    {show_command(sweep_local.run_command(run, sweep.nproc_per_node))}")
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

