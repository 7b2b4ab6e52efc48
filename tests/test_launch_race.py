"""A second launch of a run that is finishing (issue 29): the directory's state is decided again
once the run lock is held, so a launch that finds the run finished by then says so (exit 0,
"nothing to do"), one that finds it stopped resumes it, and none ends in a traceback.

The first run is a real process held at a named point by a test hook (``HARNESS_TEST_HOLD_AT``,
utils/runs/fault_injection.py); the second runs in this process, the first let go just after the
second's first look at the directory, or just before its lock (``in_window``): exactly the windows
in which the old code used a state that no longer held.  The timed loop then does the same without hooks, ten times.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import harness_utils as hu
from tests.helpers import PYTHON, ROOT, digits_config, write_config
from tests.test_resume import assert_same_results, run_in_process
from utils.runs import run_lock

pytestmark = pytest.mark.xdist_group("launch_race")

LEVELS = 2


def start_held(config: Path, point: str, release: Path) -> subprocess.Popen:
    """The first launch, held at ``point`` (its lock held) until ``release`` exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_TEST_HOLD_AT": point, "HARNESS_TEST_HOLD_UNTIL": str(release)}
    first = subprocess.Popen([PYTHON, "harness.py", "--config", str(config)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not Path(f"{release}.held").exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    return first


def in_window(monkeypatch, window: str, action) -> None:
    """The second launch runs ``action`` once, in ``window``: just after its first look at the
    directory (``look``: the old code then built everything and read the checkpoints of a run
    that had finished meanwhile: IndexError) or just before it takes the run lock (``lock``: the
    old code read the checkpoints before the lock, and retrained a level that had finished)."""
    done = []

    def once():
        if not done:
            done.append(True)
            action()

    if window == "lock":
        acquire = run_lock.acquire

        def late_acquire(directory, **options):
            once()
            return acquire(directory, **options)

        monkeypatch.setattr(run_lock, "acquire", late_acquire)
    else:
        decide = hu.decide_experiment_dir

        def look(*args, **kwargs):
            decision = decide(*args, **kwargs)
            once()
            return decision

        monkeypatch.setattr(hu, "decide_experiment_dir", look)


def test_a_lock_taken_before_the_checks_writes_nothing_until_announced(tmp_path):
    """The lock file keeps an earlier holder's record until the new holder announces itself; a
    launch refused meanwhile hears "holder unknown", never the earlier (dead) holder's pid."""
    import json
    import socket

    from utils.core.errors import UserError
    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": "earlier"}).encode()
    (tmp_path / run_lock.LOCK_NAME).write_bytes(record)
    lock = run_lock.acquire(tmp_path, announce=False)
    try:
        assert (tmp_path / run_lock.LOCK_NAME).read_bytes() == record
        with pytest.raises(UserError, match="holder unknown"):
            run_lock.acquire(tmp_path)
        lock.announce()
        with pytest.raises(UserError, match=f"pid {os.getpid()}, since "):
            run_lock.acquire(tmp_path)
    finally:
        lock.release()


@pytest.mark.parametrize("window", ["look", "lock"])
def test_a_run_that_finishes_before_the_second_launch_holds_the_lock_is_nothing_to_do(tmp_path, digits, monkeypatch,
                                                                                      window):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **{
        "training.epochs": 1, "prune.levels": LEVELS}))
    root = tmp_path / "runs" / "exp"
    release = tmp_path / "release"
    first = start_held(config, f"level_end:{LEVELS - 1}", release)  # last level's rows written, not checkpointed
    finished = {}

    def first_finishes():
        release.touch()
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
        finished.update({p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != run_lock.LOCK_NAME})

    in_window(monkeypatch, window, first_finishes)
    code, out, err = run_in_process(config)
    assert finished, "the second launch looked at the directory while the first ran"
    assert code == 0, err
    assert out.strip().splitlines()[-1] == f"{root} is finished ({LEVELS} levels); nothing to do", out
    assert "Traceback" not in err
    now = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != run_lock.LOCK_NAME}
    assert now == finished, "the second launch changed nothing"


def test_a_run_stopped_before_the_second_launch_holds_the_lock_is_resumed(tmp_path, digits, monkeypatch):
    overrides = {"training.epochs": 2, "prune.levels": LEVELS}
    reference = write_config(tmp_path / "ref.yaml", digits_config(digits, tmp_path / "runs", "ref", **overrides))
    assert run_in_process(reference)[0] == 0
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **overrides))
    release = tmp_path / "release"
    first = start_held(config, f"epoch_end:{LEVELS - 1}:0", release)

    def first_stops():
        first.send_signal(signal.SIGTERM)
        release.touch()
        first.communicate(timeout=120)
        assert first.returncode == 143

    in_window(monkeypatch, "lock", first_stops)
    code, out, err = run_in_process(config)
    assert code == 0, err
    assert f"resuming {tmp_path / 'runs' / 'exp'} at level {LEVELS - 1}, epoch 1" in out
    assert_same_results(tmp_path / "runs" / "ref", tmp_path / "runs" / "exp")


def test_a_new_run_started_by_another_launch_meanwhile_is_refused_never_overwritten(tmp_path, digits, monkeypatch):
    """The second launch found no directory; before it takes the lock another launch starts the
    run and finishes it.  Starting afresh there would overwrite that run: refused in one line."""
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", **{
        "training.epochs": 1, "prune.levels": 1}))
    root = tmp_path / "runs" / "exp"
    finished = {}

    def another_launch_runs():
        result = subprocess.run([PYTHON, "harness.py", "--config", str(config)], cwd=ROOT, capture_output=True,
                                text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr
        finished.update({p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != run_lock.LOCK_NAME})

    in_window(monkeypatch, "lock", another_launch_runs)
    code, out, err = run_in_process(config)
    assert finished
    assert code == 2 and err.count("\n") == 1 and "was started by another launch" in err, err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != run_lock.LOCK_NAME} == finished
    code, out, err = run_in_process(config)
    assert code == 0 and "nothing to do" in out


FIRST_LAUNCHES = """
import sys
sys.path.insert(0, {root!r})
import harness
for config in sys.argv[1:]:
    code = harness.main(["--config", config])
    if code != 0:
        sys.exit(code)
"""


def test_second_launches_timed_across_the_first_runs_last_seconds_never_end_in_a_traceback(tmp_path, digits):
    """Ten trials: ten short runs one after another in one process (importing torch once), and
    for each a second launch of the same command in this process, started 0 to 0.9 s after the
    first run's one level began (it trains about a second).  Each second launch is refused (the run is live: exit 2, one
    line), finds it finished (exit 0, nothing to do), never a traceback."""
    configs = [write_config(tmp_path / f"c{i}.yaml", digits_config(digits, tmp_path / "runs", f"exp{i}", **{
        "training.epochs": 3, "prune.levels": 1})) for i in range(10)]
    driver = tmp_path / "first.py"
    driver.write_text(FIRST_LAUNCHES.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_TEST_STEP_DELAY_S": "0.01"}
    first = subprocess.Popen([sys.executable, str(driver), *map(str, configs)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outcomes = []
    try:
        for trial, config in enumerate(configs):
            root = tmp_path / "runs" / f"exp{trial}"
            deadline = time.time() + 120
            while not (root / "masks" / "level_0.pt").exists():
                assert first.poll() is None and time.time() < deadline, first.communicate()
                time.sleep(0.01)
            time.sleep(0.1 * trial)
            code, out, err = run_in_process(config)
            assert "Traceback" not in err and "Error" not in err.replace("error:", ""), err
            if code == 2:
                assert err.count("\n") == 1 and "is in use by a live run" in err, err
            else:
                assert code == 0, err
                assert "nothing to do" in out, out
            outcomes.append(code)
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    for trial in range(10):
        assert len(pd.read_csv(tmp_path / "runs" / f"exp{trial}" / "levels.csv")) == 1
    print(f"second launches: {outcomes.count(2)} refused (live), {outcomes.count(0)} nothing to do")
