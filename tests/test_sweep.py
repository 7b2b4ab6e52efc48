"""utils/launch/sweep.py: sweep files -> runs, refusals of bad files, the local launcher on real digits
runs (skip finished, resume interrupted, report at the end) and the Slurm launcher (a fake
sbatch on PATH; submitit's local executor)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from tests.helpers import ROOT, digits_config, write_config
from utils.launch import sweep as sweep_command
from utils.launch import sweep_local, sweep_spec


def base_config(tmp_path, digits, **overrides):
    tree = digits_config(digits, tmp_path / "runs", name="base", **{"training.epochs": 1, "prune.levels": 2,
                                                                      **overrides})
    return write_config(tmp_path / "base.yaml", tree)


def sweep_file(tmp_path, tree, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- expansion
@pytest.mark.parametrize("value", ["lrr", 0.1, 1e-3, 3, True, None, [1, 2.5], "yes", "1e-3", "a b", [], "null"])
def test_cli_values_round_trip_through_the_harness_parser(value):
    assert yaml.safe_load(sweep_spec.cli_value(value)) == value


def test_expansion_names_and_commands(tmp_path, digits, capsys):
    base = base_config(tmp_path, digits)
    path = sweep_file(tmp_path, {"base": str(base), "name": "demo", "overrides": {"training.epochs": 2},
                                 "grid": {"experiment.seed": [0, 1], "prune.training_type": ["lrr", "imp"],
                                          "optimizer.lr": [0.05]}})
    assert sweep_command.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    names = [f"seed-{s}_training_type-{t}_lr-0.05" for s in (0, 1) for t in ("lrr", "imp")]
    for name in names:
        assert f"{name} [new]" in out
    sweep = sweep_spec.parse_sweep(path)
    sweep_spec.validate_runs(sweep)
    assert [r.name for r in sweep.runs] == names
    run = sweep.runs[1]
    assert run.config["training.epochs"] == 2 and run.config["prune.training_type"] == "imp"
    assert run.config["experiment.base_dir"] == str(tmp_path / "runs" / "demo")
    assert run.directory == tmp_path / "runs" / "demo" / names[1]
    command = sweep_local.run_command(run, 2)
    assert command[1:3] == ["--standalone", "--nproc-per-node=2"] and "--prune.training_type=imp" in command
    assert not (tmp_path / "runs").exists()  # a dry run creates nothing


def test_zip_varies_lists_together_beside_the_grid(tmp_path, digits):
    base = base_config(tmp_path, digits)
    path = sweep_file(tmp_path, {"base": str(base), "name": "paired", "grid": {"prune.training_type": ["imp", "lrr"]},
                                 "zip": {"experiment.seed": [0, 1, 2], "optimizer.lr": [0.1, 0.2, 0.4]}})
    sweep = sweep_spec.parse_sweep(path)
    sweep_spec.validate_runs(sweep)
    assert [r.name for r in sweep.runs] == [f"training_type-{t}_seed-{s}_lr-{lr}" for t in ("imp", "lrr")
                                            for s, lr in ((0, 0.1), (1, 0.2), (2, 0.4))]
    assert [(r.config["experiment.seed"], r.config["optimizer.lr"]) for r in sweep.runs[:3]] == \
        [(0, 0.1), (1, 0.2), (2, 0.4)]
    only_zip = sweep_file(tmp_path, {"base": str(base), "name": "z", "zip": {"experiment.seed": [3, 4]}}, "z.yaml")
    assert [r.name for r in sweep_spec.parse_sweep(only_zip).runs] == ["seed-3", "seed-4"]


def test_controls_expand_after_their_sources_with_masks_and_seeds(tmp_path, digits, capsys):
    """Each run of the grid gets its reinit (seed + 1000 by default, or the offset given) and shuffle
    (its own seed) controls, listed after every source, reading the source's directory."""
    base = base_config(tmp_path, digits)
    path = sweep_file(tmp_path, {"base": str(base), "name": "study", "zip": {"experiment.seed": [0, 1, 2]},
                                 "controls": {"reinit": None, "shuffle": {"overrides": {"training.epochs": 2}}}})
    assert sweep_command.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "9 run(s)" in out and "control reinit of seed-1, seed 1001" in out and "control shuffle of seed-2, seed 2" in out
    sweep = sweep_spec.parse_sweep(path)
    sweep_spec.validate_runs(sweep)
    names = [r.name for r in sweep.runs]
    assert names == ["seed-0", "seed-1", "seed-2"] + [f"seed-{s}_{c}" for s in (0, 1, 2) for c in ("reinit", "shuffle")]
    directory = tmp_path / "runs" / "study"
    for run in sweep.runs[3:]:
        source = run.name.split("_")[0]
        seed = int(source.split("-")[1])
        assert run.config["prune.masks_from"] == str(directory / source)
        assert run.config["prune.control"] == run.control.control
        assert run.config["experiment.seed"] == (seed + 1000 if run.control.control == "reinit" else seed)
        assert run.config["training.epochs"] == (2 if run.control.control == "shuffle" else 1)
        assert run.directory == directory / run.name
    assert all(not r.config["prune.masks_from"] for r in sweep.runs[:3])
    listed = sweep_spec.parse_sweep(sweep_file(tmp_path, {"base": str(base), "name": "s2", "grid": {"experiment.seed": [5]},
                                                  "controls": ["reinit", "shuffle"]}, "s2.yaml"))
    sweep_spec.validate_runs(listed)
    assert [(r.name, r.config["experiment.seed"]) for r in listed.runs] == \
        [("seed-5", 5), ("seed-5_reinit", 1005), ("seed-5_shuffle", 5)]
    assert not (tmp_path / "runs").exists()


def test_ambiguous_short_names_use_the_full_key():
    assert sweep_spec.run_names(["model.name", "optimizer.name", "experiment.seed"], [("lenet", "sgd", 0)]) == \
        ["model.name-lenet_optimizer.name-sgd_seed-0"]


def test_local_slots():
    assert sweep_local.local_slots(1, 3, []) == [None, None, None]
    assert sweep_local.local_slots(1, 2, ["0", "1"]) == ["0", "0", "1", "1"]
    assert sweep_local.local_slots(2, 1, ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    with pytest.raises(sweep_spec.SweepError, match="nproc_per_node=4"):
        sweep_local.local_slots(4, 1, ["0", "1"])


# ------------------------------------------------------------------------------- refusals
BAD = {
    "unknown key in the grid": ({"grid": {"prune.rat": [0.1, 0.2]}}, ["run rat-0.1", "unknown key prune.rat",
                                                                      "did you mean prune.rate?"]),
    "unknown section in the grid": ({"grid": {"pruning.rate": [0.1]}}, ["unknown section 'pruning'",
                                                                        "did you mean prune.rate?"]),
    "wrong type in the grid": ({"grid": {"experiment.seed": [0, "x"]}}, ["run seed-x", "experiment.seed='x'"]),
    "value outside its set": ({"grid": {"prune.training_type": ["lrr", "bogus"]}}, ["prune.training_type='bogus'"]),
    "contradiction between keys": ({"grid": {"prune.training_type": ["at_init"]}}, ["at_init"]),
    "empty grid": ({"grid": {}}, ["grid is empty"]),
    "no grid": ({"grid": None}, ["grid must be a mapping"]),
    "grid value not a list": ({"grid": {"experiment.seed": 3}}, ["grid key experiment.seed must be a list"]),
    "grid value empty list": ({"grid": {"experiment.seed": []}}, ["experiment.seed has no values"]),
    "grid sets the run name": ({"grid": {"experiment.name": ["a", "b"]}}, ["set by the sweep"]),
    "missing base": ({"base": None}, ["missing 'base'"]),
    "base does not exist": ({"base": "nowhere.yaml"}, ["nowhere.yaml does not exist"]),
    "unknown top-level key": ({"grids": {"experiment.seed": [0]}}, ["unknown key 'grids'"]),
    "bad override": ({"overrides": {"training.epochs": 0}}, ["training.epochs=0"]),
    "bad name": ({"name": "a/b"}, ["must be a plain directory name"]),
    "colliding run names": ({"grid": {"optimizer.lr": [0.1, "0.1"]}}, ["give the same run name"]),
    "zip lists of unequal lengths": ({"zip": {"optimizer.lr": [0.1, 0.2, 0.3], "optimizer.momentum": [0.9, 0.8]}},
                                     ["zip lists are varied together and must have one length",
                                      "optimizer.lr: 3 values, optimizer.momentum: 2 values"]),
    "a key both in grid and zip": ({"zip": {"experiment.seed": [0, 1]}}, ["experiment.seed is both in the grid and in zip"]),
    "zip value not a list": ({"zip": {"optimizer.lr": 0.1}}, ["zip key optimizer.lr must be a list"]),
    "unknown control": ({"controls": ["shufle"]}, ["'shufle' is not a control; valid: none, reinit, shuffle"]),
    "reinit with its source's seed": ({"controls": {"reinit": {"seed_offset": 0}}}, ["seed_offset=0", "ticket's own"]),
    "a control sets its seed": ({"controls": {"shuffle": {"overrides": {"experiment.seed": 3}}}},
                                ["cannot set experiment.seed"]),
    "unknown key in a control": ({"controls": {"shuffle": {"seed": 3}}}, ["unknown key 'seed'"]),
    "none repeating its source": ({"controls": ["none"]}, ["would repeat the source run"]),
    "a bad control override": ({"controls": {"shuffle": {"overrides": {"training.epochs": 0}}}},
                               ["run seed-0_shuffle", "training.epochs=0"]),
    "controls of a control": ({"overrides": {"prune.masks_from": "runs/x"}, "controls": ["shuffle"]},
                              ["run seed-0 is itself a control"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sweep_files_are_refused_in_one_line_before_anything_runs(tmp_path, digits, capsys, case):
    change, expected = BAD[case]
    tree = {"base": str(base_config(tmp_path, digits)), "name": "bad", "grid": {"experiment.seed": [0, 1]}}
    for key, value in change.items():
        if value is None and key == "base":
            del tree["base"]
        else:
            tree[key] = value
    if "grids" in change:
        del tree["grid"]
    status = sweep_command.main([str(sweep_file(tmp_path, tree))])
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("sweep error: ")
    for text in expected:
        assert text in err
    assert not (tmp_path / "runs").exists()


def test_not_a_yaml_mapping_and_missing_file(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("- a\n- b\n")
    assert sweep_command.main([str(tmp_path / "s.yaml")]) == 2
    assert sweep_command.main([str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "expected a mapping" in err[0] and "does not exist" in err[1]


# --------------------------------------------------------------------------- local launcher
def test_runs_at_once_on_cpu_split_the_cores(monkeypatch):
    monkeypatch.setattr(sweep_local.os, "cpu_count", lambda: 16)
    assert [sweep_local.cpu_threads_per_run(runs, 1) for runs in (1, 2, 4, 32)] == [16, 8, 4, 1]
    assert sweep_local.cpu_threads_per_run(2, 4) == 2    # 2 runs of 4 processes each


def test_local_sweep_runs_two_at_once_then_skips_them(tmp_path, digits, monkeypatch, capsys):
    """Two 1-epoch, 1-level runs at once on CPU, then the same sweep again: nothing to run, the
    report of the whole sweep rewritten."""
    base = base_config(tmp_path, digits, **{"prune.levels": 1})
    path = sweep_file(tmp_path, {"base": str(base), "name": "quick", "grid": {"experiment.seed": [0, 1]}})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sweep_local.os, "cpu_count", lambda: 2)
    started, popen = [], subprocess.Popen
    monkeypatch.setattr(sweep_local.subprocess, "Popen", lambda *a, **k: started.append(k.get("env")) or popen(*a, **k))
    assert sweep_command.main([str(path), "--runs-per-gpu", "2"]) == 0
    runs = [env for env in started if env is not None]
    assert [env.get("OMP_NUM_THREADS") for env in runs] == ["1", "1"]  # 2 runs at once share the 2 cores
    out = capsys.readouterr().out
    assert "[1/2] seed-0: started" in out and "[2/2] seed-1: started" in out and out.count(": done in") == 2
    root = tmp_path / "runs" / "quick"
    for seed in (0, 1):
        assert len(pd.read_csv(root / f"seed-{seed}" / "levels.csv")) == 1
        assert (root / "logs" / f"seed-{seed}.log").read_text().count("writing results to") == 1
    summary = pd.read_csv(root / "report" / "summary.csv")
    assert list(summary["n_seeds"]) == [2]  # one group: the runs differ only in their seed
    (root / "report" / "summary.csv").unlink()
    assert sweep_command.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 finished, 0 to run" in out and "started" not in out
    assert (root / "report" / "summary.csv").exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="slow (~2.5 min on a busy 2-core machine): "
                                                           "RUN_SLOW=1 pytest -m slow tests/test_sweep.py")
def test_local_sweep_runs_resumes_skips_and_reports(tmp_path, digits):
    """Two 1-epoch, 2-level runs at once on CPU; one is killed after its last level's rows (before
    the checkpoint that marks it finished).  The sweep says it failed; a second sweep resumes only that one; a third
    launches nothing.  Each ends with the report of the whole sweep."""
    base = base_config(tmp_path, digits)
    path = sweep_file(tmp_path, {"base": str(base), "name": "local", "grid": {"prune.training_type": ["imp", "lrr"]},
                                 "runs_per_gpu": 2})
    marker = tmp_path / "killed"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "HARNESS_TEST_KILL_AT": "level_end:1", "HARNESS_TEST_KILL_MARKER": str(marker)}

    def sweep():
        return subprocess.run([sys.executable, "-m", "utils.sweep", str(path)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)

    first = sweep()
    assert first.returncode == 1, first.stdout + first.stderr
    assert marker.exists() and "FAILED" in first.stdout and "1 run(s) failed" in first.stderr
    root = tmp_path / "runs" / "local"
    killed = [name for name in ("training_type-imp", "training_type-lrr") if f"{name}: FAILED" in first.stdout]
    assert len(killed) == 1
    assert len(pd.read_csv(root / killed[0] / "levels.csv")) == 2  # level 1's row, no checkpoint after it

    second = sweep()
    assert second.returncode == 0, second.stdout + second.stderr
    assert "1 finished, 1 to run" in second.stdout and f"{killed[0]}: started" in second.stdout
    log = (root / "logs" / f"{killed[0]}.log").read_text()
    assert "resuming" in log
    for name in ("training_type-imp", "training_type-lrr"):
        levels = pd.read_csv(root / name / "levels.csv")
        assert list(levels["level"]) == [0, 1]  # the resumed run wrote level 1 once
    summary = pd.read_csv(root / "report" / "summary.csv")
    assert sorted(summary["prune.training_type"].unique()) == ["imp", "lrr"] and len(summary) == 4

    third = sweep()
    assert third.returncode == 0 and "2 finished, 0 to run" in third.stdout
    assert "started" not in third.stdout and "report:" in third.stdout


# --------------------------------------------------------------------------- Slurm launcher
def test_slurm_submits_one_job_array_through_sbatch(tmp_path, digits, monkeypatch, capsys):
    """A fake sbatch on PATH records the script submitit writes (no Slurm here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch_calls.txt"
    fake = bin_dir / "sbatch"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {record}\ncat \"$1\" >> {record}\necho 'Submitted batch job 4242'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    srun = bin_dir / "srun"  # submitit looks for it to know it is on a Slurm cluster; the tasks do not use it
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    base = base_config(tmp_path, digits)
    path = sweep_file(tmp_path, {"base": str(base), "name": "onslurm", "grid": {"experiment.seed": [0, 1, 2]},
                                 "launcher": "slurm", "nproc_per_node": 2,
                                 "slurm": {"partition": "gpu", "time_min": 90, "gpus_per_node": 2, "mem_gb": 16}})
    assert sweep_command.main([str(path), "--array-parallelism", "2"]) == 0
    out = capsys.readouterr().out
    assert "submitted 3 run(s) as Slurm job array 4242" in out and "run the same command again" in out
    script = record.read_text()
    assert script.count("#SBATCH --array=0-2%2") == 1
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=2", "#SBATCH --mem=16G",
                 "#SBATCH --job-name=sweep-onslurm"):
        assert line in script
    # the pickled tasks run torchrun with 2 processes on the node, one run each
    tasks = sorted((tmp_path / "runs" / "onslurm" / "slurm").glob("*_submitted.pkl"))
    assert len(tasks) == 3
    assert not (tmp_path / "runs" / "onslurm" / "seed-0").exists()  # nothing ran here


def test_slurm_path_through_submitits_local_executor(tmp_path, digits, monkeypatch):
    """The same SlurmRun tasks, run by submitit's LocalExecutor (the command replaced by a quick
    stand-in that records its arguments: the harness itself is tested above)."""
    base = base_config(tmp_path, digits)
    path = sweep_file(tmp_path, {"base": str(base), "name": "viasubmitit", "grid": {"experiment.seed": [0, 1]},
                                 "launcher": "slurm"})
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text("import sys, pathlib\n"
                        "name = [a for a in sys.argv if a.startswith('--experiment.name=')][0].split('=')[1]\n"
                        f"pathlib.Path({str(tmp_path)!r}, name + '.ran').write_text(' '.join(sys.argv[1:]))\n")
    monkeypatch.setattr(sweep_local, "run_command", lambda run, nproc: [sys.executable, str(stand_in), *run.argv])
    sweep = sweep_spec.parse_sweep(path)
    sweep_spec.validate_runs(sweep)
    assert sweep_command.launch_slurm(sweep, sweep.runs, cluster="local", wait=True) == 0
    for seed in (0, 1):
        ran = (tmp_path / f"seed-{seed}.ran").read_text()
        assert f"--experiment.seed={seed}" in ran and "--experiment.base_dir=" in ran


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_expand_and_validate(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert sweep_command.main([str(path.relative_to(ROOT)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "to run" in out and "torchrun --standalone" in out


def test_sweep_and_harness_judge_an_old_run_directory_by_one_rule(tmp_path):
    """A key an older config.yaml lacks counts as its default for the sweep exactly as for the
    harness: at its default the run resumes, at another value both call it another run."""
    import shutil

    import harness_params
    import harness_utils as hu
    from utils.runs import rundir

    base = {"model.name": "lenet_300_100", "dataset.name": "digits", "dataset.train_path": "a",
            "dataset.test_path": "b", "experiment.name": "old", "experiment.base_dir": str(tmp_path),
            "prune.levels": "2"}
    for value, expected in (("0.1", "partial"), ("0.3", "conflict")):
        resolved = harness_params.resolve(None, {**base, "prune.min_channel_fraction": value})
        old = {k: v for k, v in resolved.items() if k != "prune.min_channel_fraction"}  # written before the key
        root = tmp_path / "old"
        rundir.RunFiles(root).create(rundir.config_bytes(old))
        run = sweep_spec.Run(name="old", values={}, argv=[], config=resolved)
        assert sweep_spec.run_status(run) == expected
        if expected == "conflict":
            with pytest.raises(hu.UserError, match="prune.min_channel_fraction"):
                hu.decide_experiment_dir(resolved, restarted=False)
        else:
            assert hu.decide_experiment_dir(resolved, restarted=False).action == "resume"
        shutil.rmtree(root)
