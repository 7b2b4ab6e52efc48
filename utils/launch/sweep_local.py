"""The local sweep launcher: runs under torchrun, several at once (``runs_per_gpu``), each
pinned to its GPUs or, on CPU, to its share of the cores (``cpu_threads_per_run``); its
output to ``<sweep dir>/logs/<run name>.log``; SIGINT/SIGTERM forwarded once to the runs."""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from utils.launch.sweep_spec import EXIT_FAILED, EXIT_STOPPED, REPO_ROOT, Run, Sweep, SweepError


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
