"""Against a real one-node Slurm that scripts/slurm_local.sh brings up on this machine (installed
when missing, as root with apt): a sweep whose run outlives its time limit checkpoints, requeues
itself and finishes with the results of a local run; a request the partition can never meet is
refused before submission; scripts/slurm_torchrun.sh runs 2 CPU processes and logs beside the
experiment.  Without Slurm (not root, no apt) these tests skip, saying why.

Also here (no Slurm needed): torchrun workers stop when torchrun is SIGKILLed.

The fake-sbatch tests in tests/test_sweep.py cover what one node cannot (the array script for
several GPUs and a named partition)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from tests.helpers import ROOT, TORCHRUN, digits_config, run_harness, write_config
from tests.test_resume import assert_same_results
from utils.data.writer import ensure_digits
from utils.launch import sweep as sw

# make test runs the suite on 2 workers (pytest-xdist, --dist loadgroup): this file's tests stay on
# one worker, in order: one local Slurm, brought up once and shared.
pytestmark = pytest.mark.xdist_group("slurm")

SLURM_LOCAL = ROOT / "scripts" / "slurm_local.sh"
ENV = {"OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def slurm_cluster():
    """A usable one-node Slurm: brought up by scripts/slurm_local.sh (and taken down again at the
    end when this fixture started it), or a skip saying why not."""
    status = subprocess.run(["bash", str(SLURM_LOCAL), "status"], capture_output=True, text=True)
    started_here = status.returncode != 0
    if started_here:
        if os.geteuid() != 0:
            pytest.skip("no local Slurm running and not root: scripts/slurm_local.sh up needs root and apt-get")
        up = subprocess.run(["bash", str(SLURM_LOCAL), "up"], capture_output=True, text=True, timeout=600)
        if up.returncode == 3:
            pytest.skip(f"no local Slurm: {up.stderr.strip().splitlines()[-1]}")
        assert up.returncode == 0, f"scripts/slurm_local.sh up failed:\n{up.stdout}\n{up.stderr}"
    cpus = int(subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])
    yield {"cpus": cpus}
    if started_here:
        subprocess.run(["bash", str(SLURM_LOCAL), "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    ensure_digits(out)
    return out


def write_sweep(tmp_path: Path, digits: Path, name: str, **settings) -> Path:
    base = write_config(tmp_path / "base.yaml", digits_config(digits, tmp_path / "runs", name="base",
                                                              **{"training.epochs": 2, "prune.levels": 2}))
    tree = {"base": str(base), "name": name, "grid": {"experiment.seed": [0]}, **settings}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def sweep(path: Path, *args: str, env: Dict[str, str] = None, timeout: int = 600, wait: bool = True):
    command = [sys.executable, "-m", "utils.sweep", str(path), *args]
    full_env = {**os.environ, **ENV, **(env or {})}
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def task_logs(sweep_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((sweep_dir / "slurm").glob("*_log.*")))


def queue() -> List[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()


# ----------------------------------------------------------------------------- refusals
def test_a_request_the_partition_can_never_meet_is_refused_and_a_busy_one_pends(tmp_path, digits, slurm_cluster,
                                                                                  capsys):
    cpus = slurm_cluster["cpus"]
    path = write_sweep(tmp_path, digits, "toobig", launcher="slurm", slurm={"time_min": 5})
    before = queue()
    # the default request: 4 CPUs per process, here 4 x 2 on a node of `cpus`
    assert sw.main([str(path), "--nproc-per-node", "2"]) == 2
    refused = capsys.readouterr()
    lines = [line for line in refused.err.splitlines() if line.strip()]
    assert len(lines) == 1, refused.err
    assert "slurm.cpus_per_task asks for 8 CPUs on one node" in lines[0]
    assert f"at most {cpus} CPUs" in lines[0] and "partition debug" in lines[0]
    assert "submitted" not in refused.out and queue() == before
    assert not list((tmp_path / "runs" / "toobig").glob("slurm/*.pkl"))

    # the other resources, named the same way
    from utils.launch import slurm
    ask = lambda **settings: slurm.request_problem(slurm.executor_parameters("x", {"cpus_per_task": 1, **settings}, 1, 0))
    assert ask(mem_gb=100_000).startswith("slurm.mem_gb asks for 100000G of memory, which partition debug can never give")
    assert ask(gpus_per_node=1).startswith("slurm.gpus_per_node asks for 1 GPUs on one node")
    assert ask(partition="nosuch").startswith("slurm partition 'nosuch' does not exist (partitions: debug)")
    assert ask(time_min=5) is None

    # a request that fits but must wait (the node is busy): submitted, pending, exit 0
    blocker = subprocess.run(["sbatch", "--parsable", f"--cpus-per-task={cpus}", "--time=5", "--output=/dev/null",
                              "--wrap", "sleep 300"], capture_output=True, text=True, check=True).stdout.strip()
    try:
        assert sw.main([str(path), "--cpus-per-task", "1"]) == 0
        pending = capsys.readouterr()
        assert "submitted 1 run(s)" in pending.out, pending.out + pending.err
        job = re.search(r"seed-0: job (\S+)", pending.out).group(1)
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        assert state == "PENDING"
    finally:
        subprocess.run(["scancel", "--name", "sweep-toobig"], capture_output=True)
        subprocess.run(["scancel", blocker], capture_output=True)


# ----------------------------------------------------------------------------- time limit
def test_a_run_longer_than_its_time_limit_checkpoints_requeues_and_finishes(tmp_path, digits, slurm_cluster):
    """time_min: 1, a run that needs over a minute (0.6 s per step, 88 steps): Slurm's
    warning signal stops it at a checkpoint, submitit requeues it, the requeued task resumes;
    nobody re-runs anything, and the CSVs equal those of the same run made locally (no delay)."""
    on_slurm = write_sweep(tmp_path, digits, "limited", launcher="slurm", nproc_per_node=1,
                           slurm={"time_min": 1, "cpus_per_task": 1})
    local = write_sweep(tmp_path, digits, "reference", launcher="local", nproc_per_node=1)
    began = time.monotonic()
    job = sweep(on_slurm, "--wait", env={"HARNESS_TEST_STEP_DELAY_S": "0.6"}, wait=False)
    reference = sweep(local, "--no-report")
    assert reference.returncode == 0, reference.stdout + reference.stderr
    try:
        out, err = job.communicate(timeout=900)  # about 2 min on a quiet machine; each attempt pays the start-up
    except subprocess.TimeoutExpired:
        job.kill()
        subprocess.run(["scancel", "--name", "sweep-limited"], capture_output=True)
        pytest.fail(f"the sweep did not finish in 15 min; task logs:\n{task_logs(tmp_path / 'runs' / 'limited')[-4000:]}")
    seconds = time.monotonic() - began
    logs = task_logs(tmp_path / "runs" / "limited")
    assert job.returncode == 0, f"{out}\n{err}\n{logs[-4000:]}"
    assert "seed-0: done" in out and "report:" in out
    assert "sacct" not in out + err and "Bypassing" not in out + err  # quiet --wait
    # the harness stopped at a checkpoint on the warning, before the limit, and the task requeued itself
    requeues = logs.count("Requeued job")
    assert requeues >= 1 and "Caught signal SIGUSR2" in logs, logs[-4000:]
    assert "stopped on request" in logs and "resuming" in logs
    assert "DUE TO TIME LIMIT" not in logs
    assert_same_results(tmp_path / "runs" / "reference" / "seed-0", tmp_path / "runs" / "limited" / "seed-0")
    print(f"time limit 1 min: {requeues} requeue(s), {seconds:.0f} s from submission to the report")


@pytest.mark.slow
def test_scontrol_requeue_preemption_checkpoints_and_resumes(tmp_path, digits, slurm_cluster):
    """A preemption as Slurm does it (SIGTERM to every process of the job, then requeue): the
    harness writes its checkpoint, the requeued task resumes, the results are a local run's."""
    on_slurm = write_sweep(tmp_path, digits, "preempted", launcher="slurm", nproc_per_node=2,
                           slurm={"time_min": 10, "cpus_per_task": 2})
    local = write_sweep(tmp_path, digits, "reference", launcher="local", nproc_per_node=2)
    reference = sweep(local, "--no-report")
    assert reference.returncode == 0, reference.stdout + reference.stderr
    job = sweep(on_slurm, "--wait", env={"HARNESS_TEST_STEP_DELAY_S": "0.3"}, wait=False)
    run_dir = tmp_path / "runs" / "preempted" / "seed-0"
    deadline = time.monotonic() + 240
    while not (run_dir / "epochs.csv").exists() or len((run_dir / "epochs.csv").read_text().splitlines()) < 2:
        assert time.monotonic() < deadline and job.poll() is None, "the run did not start training"
        time.sleep(1)
    time.sleep(3)  # mid-epoch
    job_id = re.match(r"(\d+)_", next((tmp_path / "runs" / "preempted" / "slurm").glob("*_log.out")).name).group(1)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    out, err = job.communicate(timeout=400)
    logs = task_logs(tmp_path / "runs" / "preempted")
    assert job.returncode == 0, f"{out}\n{err}\n{logs[-4000:]}"
    assert "stopped on request" in logs and "resuming" in logs and "stopped by Slurm's SIGTERM" in logs
    assert_same_results(tmp_path / "runs" / "reference" / "seed-0", run_dir)


# ----------------------------------------------------------------------------- slurm_torchrun.sh
@pytest.mark.slow  # 25-45 s here: RUN_SLOW=1 runs it (make test stays near its time budget)
def test_slurm_torchrun_script_runs_two_cpu_processes_and_logs_beside_the_experiment(tmp_path, digits,
                                                                                      slurm_cluster):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", name="viascript",
                                                             **{"training.epochs": 1, "prune.levels": 2}))
    submit_dir = tmp_path / "submitted_from"
    submit_dir.mkdir()
    env = {**os.environ, **ENV, "REPO_DIR": str(ROOT), "NPROC_PER_NODE": "2"}
    result = subprocess.run(["sbatch", "--parsable", "--wait", "--nodes=1", "--gpus-per-node=0",
                             f"--cpus-per-task={slurm_cluster['cpus']}", "--time=10",
                             str(ROOT / "scripts" / "slurm_torchrun.sh"), "--config", str(config)],
                            cwd=submit_dir, env=env, capture_output=True, text=True, timeout=400)
    job = result.stdout.strip().splitlines()[0] if result.stdout.strip() else "?"
    log = tmp_path / "runs" / "logs" / f"viascript-{job}.out"
    assert log.exists(), f"{result.stdout}\n{result.stderr}\n{sorted(map(str, tmp_path.rglob('*.out')))}"
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    assert f"job {job}, 1 nodes x 2 workers" in text and "done:" in text
    assert list(submit_dir.iterdir()) == []  # no slurm-<id>.out where sbatch ran
    levels = (tmp_path / "runs" / "viascript" / "levels.csv").read_text().splitlines()
    assert len(levels) == 3  # header + 2 levels


# ----------------------------------------------------------------------------- launcher death
def children(pid: int) -> List[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def seconds_until_gone(pids: List[int], limit: float) -> float:
    began = time.monotonic()
    while any(alive(p) for p in pids):
        if time.monotonic() - began > limit:
            for p in pids:  # leave nothing behind, then fail
                if alive(p):
                    os.kill(p, signal.SIGKILL)
            pytest.fail(f"workers {pids} still running {limit:.0f} s after torchrun was killed")
        time.sleep(0.1)
    return time.monotonic() - began


def start_torchrun(config: Path, log: Path, env: Dict[str, str] = None) -> subprocess.Popen:
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "harness.py", "--config", str(config)]
    return subprocess.Popen(command, cwd=ROOT, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            env={**os.environ, **ENV, **(env or {})}, start_new_session=True)


def workers_of(launcher: subprocess.Popen, count: int = 2, limit: float = 120) -> List[int]:
    deadline = time.monotonic() + limit
    while len(children(launcher.pid)) < count:
        assert launcher.poll() is None and time.monotonic() < deadline, "torchrun did not start its workers"
        time.sleep(0.05)
    return children(launcher.pid)


@pytest.mark.slow  # 25-45 s here: RUN_SLOW=1 runs it (make test stays near its time budget)
def test_workers_stop_when_torchrun_is_sigkilled_at_start_and_mid_run_and_the_run_resumes(tmp_path, digits):
    tree = digits_config(digits, tmp_path / "runs", name="orphaned", **{"training.epochs": 1, "prune.levels": 2})
    config = write_config(tmp_path / "c.yaml", tree)
    log = tmp_path / "torchrun.log"

    # at start: the workers are importing / setting up the process group
    launcher = start_torchrun(config, log)
    workers = workers_of(launcher)
    time.sleep(1.0)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    at_start = seconds_until_gone(workers, 60)

    # mid-run (level 0 written, level 1 training): slowed down so that the kill lands inside an epoch
    launcher = start_torchrun(config, log, env={"HARNESS_TEST_STEP_DELAY_S": "0.15"})
    workers = workers_of(launcher)
    epochs = tmp_path / "runs" / "orphaned" / "epochs.csv"
    deadline = time.monotonic() + 240
    while not epochs.exists() or len(epochs.read_text().splitlines()) < 2:
        assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    mid_run = seconds_until_gone(workers, 60)
    text = log.read_text()
    assert "the launcher (torchrun" in text and "is gone" in text
    assert "stopped on request" in text, text[-3000:]  # rank 0 wrote its checkpoint at an agreed batch

    # the same command resumes exactly: the results of an uninterrupted run
    resumed = run_harness(config, nproc=2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout
    reference_config = write_config(tmp_path / "r.yaml", {**tree, "experiment": {**tree["experiment"],
                                                                                  "name": "reference"}})
    reference = run_harness(reference_config, nproc=2)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    assert_same_results(tmp_path / "runs" / "reference", tmp_path / "runs" / "orphaned")
    print(f"workers gone {at_start:.1f} s after torchrun's SIGKILL at start, {mid_run:.1f} s mid-run")


# ----------------------------------------------------------------------------- pieces (no Slurm needed)
def test_the_warning_signal_goes_to_the_batch_shell_with_a_lead_that_fits_the_limit():
    from utils.launch import slurm
    assert [slurm.warning_lead_s(m) for m in (1, 2, 5, 15, 240)] == [10, 12, 30, 90, 90]
    parameters = slurm.executor_parameters("sweep-x", {"time_min": 1, "cpus_per_task": 2}, 2, 0)
    assert parameters["additional_parameters"] == {"signal": "B:USR2@10"} and parameters["use_srun"] is False
    assert parameters["cpus_per_task"] == 2 and "gpus_per_node" not in parameters
    default = slurm.executor_parameters("sweep-x", {"partition": "gpu", "mem_gb": 16}, 4, 4)
    assert default["cpus_per_task"] == 16 and default["gpus_per_node"] == 4 and default["mem"] == "16G"
    assert slurm._minutes("1-02:03:00") == 26 * 60 + 3 and slurm._minutes("30") == 30
    assert slurm._minutes("UNLIMITED") is None and slurm._mb("16G") == 16 * 1024 and slurm._mb("24105") == 24105
