"""Never lose a run: a run killed anywhere and started again with the same command ends with
the results of an uninterrupted run (issue 5).

The runs are short (LeNet-300-100 on digits, torch loader, 3 levels x 2-3 epochs) and the
kill points are named by a test hook (``HARNESS_TEST_KILL_AT``, see ``utils.runs.fault_injection``),
so every test kills exactly where it says.  Each killed run is a real process killed with
SIGKILL; the reference and the final resume run in this process (a second process per run
would double the time, mostly importing torch).  "Identical" means: every column of
epochs.csv / levels.csv / layers.csv as written (strings, not numbers), except the timing
columns, the masks of every level, and the final weights.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pandas as pd
import pytest
import torch

import harness
import harness_utils as hu
from tests.helpers import PYTHON, ROOT, digits_config, run_harness, write_config

TIMING_COLUMNS = {"epoch_time_s", "images_per_s", "train_time_s"}
CSV_FILES = ("epochs", "levels", "layers")

CONFIGS = {
    # 2 epochs x 3 levels, 22 batches per epoch
    "imp": {"prune.training_type": "imp"},
    # level 0: 3 epochs; levels 1, 2: epochs 1-2 from the state at the end of epoch 0 of level 0
    "wr": {"prune.training_type": "wr", "prune.rewind_epoch": 1, "training.epochs": 3},
}

# (kill point, what the next run says about where it resumes).  Each chain restarts after
# every kill with the same command; the resumed run reaches the next point.
KILL_CHAINS = {
    "imp": [
        ("batch:0:1:5", "resuming {root} at level 0, epoch 1"),   # mid-epoch: back to the end of epoch 0
        ("level_end:0", "resuming {root} at level 0, epoch 1"),   # level 0's rows written, its checkpoint not
        ("prune:1", "resuming {root} after level 0"),             # level 1's masks written, training not begun
        ("epoch_end:2:0", "resuming {root} after level 1"),       # a row written, its checkpoint not
    ],
    "wr": [
        ("epoch_end:0:0", "no checkpoint in {root} yet"),         # rewind.pt written, no last.pt yet
        ("level_end:0", "resuming {root} at level 0, epoch 2"),   # between levels
        ("batch:1:2:3", "resuming {root} at level 1, epoch 2"),   # mid-epoch of a rewound level
    ],
}



# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def environment(values: Dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_in_process(config: Path, *args: str, env: Optional[Dict[str, str]] = None) -> Tuple[int, str, str]:
    """harness.main in this process, one torch thread (as the subprocesses: OMP_NUM_THREADS=1),
    -> (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with environment(env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = harness.main(["--config", str(config), *args])
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def csv_text(root: Path, name: str) -> pd.DataFrame:
    frame = pd.read_csv(root / f"{name}.csv", dtype=str, keep_default_na=False)
    return frame[[c for c in frame.columns if c not in TIMING_COLUMNS]]


def assert_same_results(reference: Path, resumed: Path) -> None:
    """The output contract of ``resumed`` equals ``reference``'s, value for value."""
    for name in CSV_FILES:
        expected, got = csv_text(reference, name), csv_text(resumed, name)
        assert list(got.columns) == list(expected.columns), name
        assert len(got) == len(expected), f"{name}.csv: {len(got)} rows, uninterrupted run has {len(expected)}"
        pd.testing.assert_frame_equal(got, expected, check_exact=True, obj=f"{name}.csv")
    epochs = pd.read_csv(resumed / "epochs.csv")
    assert not epochs.duplicated(["level", "epoch"]).any()
    mask_files = sorted(p.name for p in (reference / "masks").iterdir())
    assert sorted(p.name for p in (resumed / "masks").iterdir()) == mask_files
    for file_name in mask_files:
        expected = torch.load(reference / "masks" / file_name, weights_only=True)
        got = torch.load(resumed / "masks" / file_name, weights_only=True)
        assert got.keys() == expected.keys()
        for layer in expected:
            assert torch.equal(got[layer], expected[layer]), f"{file_name}: {layer}"
    expected = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    got = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert got["finished"] and expected["finished"]
    for key, tensor in expected["model"].items():
        assert torch.equal(got["model"][key], tensor), f"final weights differ: {key}"


def assert_checkpoints_bounded(root: Path, kind: str) -> None:
    # previous.pt: the checkpoint last.pt replaced, the fallback when last.pt cannot be read (issue 9)
    expected = {"init.pt", "last.pt", "previous.pt"} | ({"rewind.pt"} if kind == "wr" else set())
    assert {p.name for p in (root / "checkpoints").iterdir()} == expected
    assert not [p for p in root.rglob("*") if p.name.endswith(hu.TEMPORARY_SUFFIX)]


def rows(root: Path, name: str) -> List[Tuple[str, ...]]:
    return [tuple(r) for r in hu.CsvLog(root / f"{name}.csv", []).rows()]


@pytest.fixture(scope="module")
def references(tmp_path_factory, digits) -> Dict[str, Tuple[Path, Path]]:
    """kind -> (config file, directory of its uninterrupted run)."""
    made = {}
    for kind, overrides in CONFIGS.items():
        base = tmp_path_factory.mktemp(f"reference_{kind}")
        config = write_config(base / "config.yaml", digits_config(digits, base / "runs", **overrides))
        code, out, err = run_in_process(config)
        assert code == 0, err
        made[kind] = (config, base / "runs" / "exp")
    return made


def same_config_elsewhere(tmp_path: Path, digits: Path, kind: str) -> Path:
    return write_config(tmp_path / "config.yaml", digits_config(digits, tmp_path / "runs", **CONFIGS[kind]))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", sorted(KILL_CHAINS))
def test_sigkill_anywhere_then_restart_gives_the_uninterrupted_results(tmp_path, digits, references, kind):
    config = same_config_elsewhere(tmp_path, digits, kind)
    root = tmp_path / "runs" / "exp"
    expected_resume = None
    for point, resume_message in KILL_CHAINS[kind]:
        result = run_harness(config, env={"HARNESS_TEST_KILL_AT": point}, timeout=120)
        assert result.returncode == -signal.SIGKILL, (point, result.stdout, result.stderr)
        assert f"SIGKILL at {point}" in result.stderr
        if expected_resume is not None:
            assert expected_resume in result.stdout, (point, result.stdout)
        expected_resume = resume_message.format(root=root)
        # What a reader sees after the kill: whole rows, none twice.
        for name in CSV_FILES:
            written = rows(root, name)
            assert all(len(r) == len(written[0]) for r in written), name
        keys = [r[:2] for r in rows(root, "epochs")]
        assert len(keys) == len(set(keys))
    # A write killed half-way leaves a temporary file: the resume removes it.
    stale = root / "checkpoints" / ".last.pt.killed.tmp"
    stale.write_bytes(b"half a checkpoint")
    code, out, err = run_in_process(config)
    assert code == 0, err
    assert expected_resume in out
    assert not stale.exists()
    assert_same_results(references[kind][1], root)
    assert_checkpoints_bounded(root, kind)


def test_sigterm_mid_epoch_checkpoint_resumes_exactly(tmp_path, digits, references):
    """SIGTERM at batch 7 of level 1, epoch 0: the run writes a mid-epoch checkpoint, exits
    with 143, and the resumed run continues from batch 7 to the uninterrupted results."""
    config = same_config_elsewhere(tmp_path, digits, "imp")
    root = tmp_path / "runs" / "exp"
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    code, out, err = run_in_process(config, env={"HARNESS_TEST_KILL_AT": "batch:1:0:7",
                                                 "HARNESS_TEST_KILL_SIGNAL": "SIGTERM"})
    assert code == harness.EXIT_PREEMPTED, err
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers, \
        "the harness gives the signal handlers back"
    state = hu.load_checkpoint(root / "checkpoints" / "last.pt", required=hu.LAST_CHECKPOINT_KEYS)
    assert (state["phase"], state["level"], state["next_epoch"]) == ("mid_epoch", 1, 0)
    assert state["partial_epoch"]["batches_done"] == 7 and not state["finished"]
    assert [r[:2] for r in rows(root, "epochs")] == [("0", "0"), ("0", "1")]
    code, out, err = run_in_process(config)
    assert code == 0, err
    assert f"resuming {root} at level 1, epoch 0, batch 7" in out
    assert_same_results(references["imp"][1], root)


def test_sigterm_from_outside_stops_within_seconds_and_resumes(tmp_path, digits, references):
    config = same_config_elsewhere(tmp_path, digits, "imp")
    root = tmp_path / "runs" / "exp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_TEST_STEP_DELAY_S": "0.02"}  # ~0.5 s per epoch
    process = subprocess.Popen([PYTHON, "harness.py", "--config", str(config)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while len(rows(root, "epochs")) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be signalled"
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        stopped_after = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == harness.EXIT_PREEMPTED, (stdout, stderr)
    assert stopped_after < 10, f"took {stopped_after:.1f} s to stop"
    assert "stopped on request" in stdout and "Traceback" not in stderr
    state = hu.load_checkpoint(root / "checkpoints" / "last.pt", required=hu.LAST_CHECKPOINT_KEYS)
    assert not state["finished"]
    assert_checkpoints_bounded(root, "imp")
    code, out, err = run_in_process(config)
    assert code == 0, err
    assert f"resuming {root}" in out
    assert_same_results(references["imp"][1], root)


def test_finished_run_says_so_and_a_different_config_is_refused(tmp_path, digits, references):
    config, root = references["imp"]
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    code, out, err = run_in_process(config)
    assert code == 0 and "is finished" in out
    code, out, err = run_in_process(config, "--prune.rate=0.5")
    assert code == harness.EXIT_USER_ERROR
    assert err.count("\n") == 1 and "prune.rate (0.2 there, 0.5 now)" in err
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before, "nothing was touched"
    # resume=false starts fresh beside it, never in it.
    code, out, err = run_in_process(config, "--experiment.resume=false", "--prune.levels=1")
    assert code == 0, err
    assert f"writing results to {root}_1" in out
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
