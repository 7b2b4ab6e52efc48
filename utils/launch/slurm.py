"""Slurm: a sweep's runs as one job array (submitit), requeued at a time limit or a preemption,
refused before submission when the cluster can never run them, waited for quietly.

How a time limit becomes a requeue (proven against a real one-node Slurm by tests/test_slurm_real.py):

* The array asks Slurm for ``--signal=B:USR2@N``: the warning signal goes to the batch shell
  only, and the batch shell *is* submitit's Python process (its command line starts with
  ``exec``), so nothing else hears it.  Without ``B:`` Slurm signals job steps only, and the
  tasks run no job step: nobody would hear it.
* submitit's USR2 handler calls ``SlurmTask.checkpoint``: one SIGTERM to torchrun, which
  forwards it once to its workers; the harness stops at a batch every rank agrees on, writes
  its checkpoint and exits.  Then submitit runs ``scontrol requeue``; the requeued task starts
  the same command, which resumes the run.
* Slurm sends the warning between N and N + 30 s before the limit (it checks limits every 30 s
  and sends the warning one check early), and ends the job at a later check, so the harness
  always has at least 30 s to stop; N is ``warning_lead_s(time_min)``.
* A preemption or ``scontrol requeue`` sends SIGTERM to every process of the job at once: the
  harness checkpoints the same way; the task then ends without a result (Slurm requeues it).

Plain-argument functions: ``utils/launch/sweep.py`` calls ``launch_array``.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
WARNING_SIGNAL = "USR2"          # submitit's checkpoint-and-requeue signal
# How many time limits a run may meet (each one a requeue from a checkpoint) before submitit
# stops requeueing it: a run that needs 12 h in 4 h slots needs 3; 50 leaves room.
MAX_TIMEOUT_REQUEUES = 50
POLL_S = 5.0                     # --wait: seconds between looks at the queue
FINAL_STATE_GRACE_S = 15.0       # a task gone from the queue: how long its result file may lag


def warning_lead_s(time_min: int) -> int:
    """N of ``--signal=B:USR2@N``: a tenth of the limit, between 10 s and submitit's 90 s.
    Slurm adds up to 30 s (see the module text), so a 1-minute task is warned 10-40 s before
    its end, after 20-50 s of work, and a 4-hour task 90-120 s before."""
    return int(min(90, max(10, time_min * 60 // 10)))


def executor_parameters(job_name: str, settings: Dict[str, Any], nproc_per_node: int,
                        gpus_default: int) -> Dict[str, Any]:
    """The sweep file's ``slurm:`` section -> submitit SlurmExecutor parameters (one node per run)."""
    s = settings
    time_min = int(s.get("time_min", 60))
    lead = warning_lead_s(time_min)
    parameters: Dict[str, Any] = {
        "job_name": job_name, "time": time_min, "nodes": 1, "ntasks_per_node": 1,
        "cpus_per_task": int(s.get("cpus_per_task", 4 * max(1, nproc_per_node))),
        "array_parallelism": int(s.get("array_parallelism", 256)), "use_srun": False,
        "signal_delay_s": lead, "additional_parameters": {"signal": f"B:{WARNING_SIGNAL}@{lead}"}}
    gpus = int(s.get("gpus_per_node", gpus_default))
    if gpus:
        parameters["gpus_per_node"] = gpus
    for key in ("partition", "account", "qos", "constraint", "setup"):
        if key in s:
            parameters[key] = s[key]
    if "mem_gb" in s:
        parameters["mem"] = f"{int(s['mem_gb'])}G"
    return parameters


# ============================================================================ the task
class SlurmTask:
    """What one array task runs: ``command`` (torchrun) in ``cwd``.  ``checkpoint`` is called by
    submitit on the warning signal: it stops the run at a checkpoint and asks for a requeue."""

    def __init__(self, command: Sequence[str], cwd: str):
        self.command, self.cwd = list(command), cwd
        self.child: Optional[subprocess.Popen] = None
        self.terminated = False

    def __call__(self) -> int:
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):  # Slurm ends the job (preemption, requeue, cancel): the run checkpoints
            self.terminated = True
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
        self.child = subprocess.Popen(self.command, cwd=self.cwd, start_new_session=True)
        # Poll rather than block in wait(): the warning's handler (checkpoint) runs in this thread
        # and must be able to wait for the child itself (Popen.wait holds a lock while it blocks).
        while self.child.poll() is None:
            time.sleep(0.5)
        code = self.child.returncode
        if code != 0 and self.terminated:
            # No result file: Slurm requeues the task (preemption, scontrol requeue), or it ends
            # cancelled; the harness has written its checkpoint either way.
            print(f"slurm task: stopped by Slurm's SIGTERM (exit {code}); the run's checkpoint is intact",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(143)
        if code != 0:
            raise RuntimeError(f"{' '.join(shlex.quote(c) for c in self.command)} exited with status {code}")
        return code

    def checkpoint(self, *args, **kwargs):
        import submitit
        if self.child is not None and _running(self.child.pid):
            print(f"slurm task: {WARNING_SIGNAL} (time limit or preemption ahead): stopping the run at a "
                  f"checkpoint, then requeueing", file=sys.stderr, flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signal.SIGTERM)  # torchrun forwards it once to every worker
            while _running(self.child.pid):  # Slurm's kill comes >= 30 s after the warning
                time.sleep(0.2)
        return submitit.helpers.DelayedSubmission(SlurmTask(self.command, self.cwd))

    def __getstate__(self):
        return {"command": self.command, "cwd": self.cwd}

    def __setstate__(self, state):
        self.command, self.cwd, self.child, self.terminated = state["command"], state["cwd"], None, False


def _running(pid: int) -> bool:
    """Whether child ``pid`` has not exited yet, without reaping it (WNOWAIT): the Popen object
    waiting for it in the interrupted frame still collects its status."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


# ============================================================================ can it ever run?
def _sbatch_flags(parameters: Dict[str, Any]) -> List[str]:
    flags = [f"--time={parameters['time']}", f"--nodes={parameters['nodes']}",
             f"--ntasks-per-node={parameters['ntasks_per_node']}", f"--cpus-per-task={parameters['cpus_per_task']}"]
    for key, flag in (("gpus_per_node", "--gpus-per-node"), ("mem", "--mem"), ("partition", "--partition"),
                      ("account", "--account"), ("qos", "--qos"), ("constraint", "--constraint")):
        if key in parameters:
            flags.append(f"{flag}={parameters[key]}")
    return flags


def _run(command: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=60)


def _fields(line: str) -> Dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def _mb(text: str) -> Optional[int]:
    """'16G' / '24105' (MB) / '2T' -> MB."""
    match = re.fullmatch(r"(\d+)([KMGT]?)B?", str(text).strip().upper())
    if not match:
        return None
    return int(match.group(1)) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[match.group(2)]


def _minutes(text: str) -> Optional[float]:
    """Slurm's time format ([D-]HH:MM:SS, MM:SS, minutes) -> minutes; None: unlimited."""
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    hours, minutes, seconds = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return (int(days or 0) * 24 + hours) * 60 + minutes + seconds / 60


def partition_offer(partition: Optional[str]) -> Dict[str, Any]:
    """What a partition (None: the default one) offers: name, nodes, CPUs / memory (MB) / GPUs of
    its largest node, time limit (minutes, None: unlimited).  {'missing': [names]} when it does not exist."""
    shown = _run(["scontrol", "show", "partition", "-o"])
    partitions = [_fields(line) for line in shown.stdout.splitlines() if line.startswith("PartitionName=")]
    chosen = [p for p in partitions if (p.get("PartitionName") == partition if partition else p.get("Default") == "YES")]
    if not chosen:
        return {"missing": [p.get("PartitionName", "?") for p in partitions]}
    p = chosen[0]
    name = p["PartitionName"]
    cpus = memory = gpus = 0
    listing = _run(["sinfo", "-h", "-N", "-p", name, "-o", "%c|%m|%G"])
    for line in listing.stdout.splitlines():
        node_cpus, node_memory, gres = (line.split("|") + ["", "", ""])[:3]
        cpus = max(cpus, int(node_cpus) if node_cpus.strip().isdigit() else 0)
        memory = max(memory, _mb(node_memory) or 0)
        gpus = max(gpus, sum(int(m) for m in re.findall(r"gpu(?::[^:(,]+)?:(\d+)", gres)))
    for limit, key in (("MaxCPUsPerNode", "cpus"), ("MaxMemPerNode", "memory")):
        value = p.get(limit, "UNLIMITED")
        if value.isdigit():
            if key == "cpus":
                cpus = min(cpus, int(value))
            else:
                memory = min(memory, int(value))
    nodes = int(p["TotalNodes"]) if p.get("TotalNodes", "").isdigit() else 0
    if p.get("MaxNodes", "").isdigit():
        nodes = min(nodes, int(p["MaxNodes"]))
    return {"name": name, "nodes": nodes, "cpus": cpus, "memory_mb": memory, "gpus": gpus,
            "time_min": _minutes(p.get("MaxTime", "UNLIMITED"))}


def describe_offer(offer: Dict[str, Any]) -> str:
    limit = "no time limit" if offer["time_min"] is None else f"a time limit of {offer['time_min']:g} min"
    return (f"{offer['nodes']} node(s) of at most {offer['cpus']} CPUs, {offer['memory_mb'] / 1024:.0f} GB "
            f"and {offer['gpus']} GPUs each, {limit}")


def request_problem(parameters: Dict[str, Any]) -> Optional[str]:
    """None when Slurm could run the request some day (``sbatch --test-only``: a busy cluster is
    fine), else one line naming what the partition cannot give and what it offers."""
    try:
        tested = _run(["sbatch", "--test-only", *_sbatch_flags(parameters), "--wrap", "true"])
    except (OSError, subprocess.TimeoutExpired):
        return None  # the submission itself will say what is wrong
    if tested.returncode == 0:
        return None
    said = [line for line in (tested.stderr + tested.stdout).splitlines() if line.strip()]
    error = re.sub(r"^sbatch: error: (Batch job submission failed: )?", "", said[-1] if said else "refused")
    if re.search(r"contact|timed out|connection|credential", error, re.I):
        return None  # the controller, not the request
    try:
        offer = partition_offer(parameters.get("partition"))
    except (OSError, subprocess.TimeoutExpired):
        return f"Slurm cannot run this request (sbatch --test-only: {error})"
    if "missing" in offer:
        return (f"slurm partition {parameters.get('partition')!r} does not exist (partitions: "
                f"{', '.join(offer['missing']) or 'none'}) (sbatch --test-only: {error})")
    cpus = int(parameters["cpus_per_task"]) * int(parameters["ntasks_per_node"])
    wanted = [("cpus_per_task", cpus, offer["cpus"], f"{cpus} CPUs on one node"),
              ("gpus_per_node", int(parameters.get("gpus_per_node", 0)), offer["gpus"],
               f"{parameters.get('gpus_per_node', 0)} GPUs on one node"),
              ("mem_gb", _mb(parameters.get("mem", "0")) or 0, offer["memory_mb"], f"{parameters.get('mem')} of memory"),
              ("nodes", int(parameters["nodes"]), offer["nodes"], f"{parameters['nodes']} node(s)")]
    if offer["time_min"] is not None:
        wanted.append(("time_min", float(parameters["time"]), offer["time_min"], f"{parameters['time']} min"))
    over = [(key, text) for key, need, have, text in wanted if need > have]
    what = (f"slurm.{over[0][0]} asks for {over[0][1]}" if over else "the request")
    return (f"{what}, which partition {offer['name']} can never give: it offers {describe_offer(offer)} "
            f"(sbatch --test-only: {error})")


# ============================================================================ submit and wait
def make_executor(folder: Path, parameters: Dict[str, Any], cluster: str):
    """submitit's SlurmExecutor (``cluster='slurm'``) or its LocalExecutor (the same tasks on this
    machine: tests)."""
    import submitit
    if cluster == "local":
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=int(parameters["time"]), gpus_per_node=int(parameters.get("gpus_per_node", 0)))
        return executor
    # `exec`: submitit's Python replaces the batch shell, so `--signal=B:...` reaches it (bash would die of USR2).
    executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=MAX_TIMEOUT_REQUEUES,
                                      python=f"exec {shlex.quote(sys.executable)}")
    executor.update_parameters(**parameters)
    return executor


def queue_states(array_id: str) -> Optional[Dict[str, str]]:
    """{task job id: state} of an array's tasks still in the queue (pending, running, requeued);
    None when squeue cannot be asked."""
    try:
        listed = _run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i|%T"])
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode != 0:
        return {} if "Invalid job id" in listed.stderr else None
    return dict(line.split("|", 1) for line in listed.stdout.split() if "|" in line)


def final_state(job_id: str) -> str:
    """How Slurm ended a job (scontrol keeps it for MinJobAge, 300 s by default)."""
    try:
        shown = _run(["scontrol", "show", "job", "-o", job_id])
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return _fields(shown.stdout).get("JobState", "unknown")


def wait_for(jobs: Sequence[Any], names: Sequence[str], poll_s: float = POLL_S) -> List[str]:
    """Wait for an array's tasks; print one line per task as it ends; return the failed names.
    Reads the queue (squeue) and submitit's result files only: no sacct, so a cluster without
    job accounting gives no warning per poll."""
    pending = dict(zip(names, jobs))
    failed: List[str] = []
    gone_since: Dict[str, float] = {}
    array_id = str(jobs[0].job_id).split("_")[0]
    while pending:
        queued = queue_states(array_id)
        for name, job in list(pending.items()):
            if job.paths.result_pickle.exists():
                del pending[name]
                try:
                    job.result()
                    print(f"    {name}: done (job {job.job_id})", flush=True)
                except Exception as error:
                    failed.append(name)
                    print(f"    {name}: FAILED (job {job.job_id}): {' '.join(str(error).split())[-300:]}", flush=True)
            elif queued is not None and job.job_id not in queued:
                first = gone_since.setdefault(name, time.monotonic())
                if time.monotonic() - first >= FINAL_STATE_GRACE_S:
                    del pending[name]
                    failed.append(name)
                    print(f"    {name}: FAILED (job {job.job_id}): Slurm ended it as {final_state(job.job_id)} "
                          f"without a result; log: {job.paths.stdout}", flush=True)
            else:
                gone_since.pop(name, None)
        if pending:
            time.sleep(poll_s)
    return failed


def launch_array(label: str, folder: Path, names: Sequence[str], commands: Sequence[Sequence[str]], cwd: str,
                 parameters: Dict[str, Any], *, cluster: str = "slurm", wait: bool = False,
                 after_hint: str = "") -> int:
    """One job array, one task per command; -> exit status (0 submitted or all done, 1 a task
    failed or the submission failed, 2 a request the cluster can never run)."""
    try:
        executor = make_executor(folder, parameters, cluster)
    except ImportError:
        print(f"{label}: launcher=slurm needs the submitit package (pip install submitit)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as error:  # submitit: no srun on PATH, i.e. not on a Slurm login node
        print(f"{label}: launcher=slurm: {' '.join(str(error).split())[:300]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if cluster == "slurm":
        problem = request_problem(parameters)
        if problem:
            print(f"{label}: {problem}", file=sys.stderr)
            return EXIT_BAD_INPUT
    tasks = [SlurmTask(command, cwd) for command in commands]
    try:
        with executor.batch():
            jobs = [executor.submit(task) for task in tasks]
    except Exception as error:  # sbatch refused, not found, ...
        print(f"{label}: submission failed: {' '.join(str(error).split())[:400]}", file=sys.stderr)
        return EXIT_FAILED
    ids = [job.job_id for job in jobs]
    print(f"submitted {len(jobs)} run(s) as {'Slurm job array ' + ids[0].split('_')[0] if cluster == 'slurm' else 'local jobs'}"
          f" (logs under {executor.folder})", flush=True)
    for name, job in zip(names, jobs):
        print(f"    {name}: job {job.job_id}")
    if not wait and cluster == "slurm":
        if after_hint:
            print(after_hint)
        return 0
    if cluster == "slurm":
        failed = wait_for(jobs, names)
    else:
        failed = []
        for name, job in zip(names, jobs):
            try:
                job.result()
            except Exception as error:
                failed.append(name)
                print(f"    {name}: FAILED: {' '.join(str(error).split())[-300:]}", flush=True)
    if failed:
        print(f"{label}: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    return 0
