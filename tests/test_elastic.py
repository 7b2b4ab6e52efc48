"""Elastic restarts and errors in one rank of a multi-process job (issue 5).

* ``torchrun --max-restarts=1`` with rank 1 dying mid-epoch: torchrun restarts both
  workers, they resume the directory this launch created, and the results equal an
  uninterrupted 2-process run.  The same job is then preempted (SIGTERM on rank 1 only):
  the ranks agree on a batch, rank 0 writes a mid-epoch checkpoint with both ranks'
  partial sums, and a new launch resumes from it to the same results.
* An exception on one rank ends the whole job within seconds, with that rank's message.
* What TORCHELASTIC_RESTART_COUNT / TORCHELASTIC_RUN_ID do in the directory decision.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

import harness_utils as hu
from tests.helpers import digits_config, run_harness, write_config
from tests.test_resume import assert_same_results


# ------------------------------------------------------------------ directory decision
def _experiment_dir(path: Path, config: dict, launch: str = "") -> None:
    path.mkdir(parents=True)
    hu.atomic_write_bytes(path / "config.yaml", hu.config_yaml(config))
    if launch:
        hu.atomic_write_bytes(path / "checkpoints" / "launch_id.txt", f"{launch}\n".encode())


def test_restart_resumes_the_directory_of_its_own_launch(tmp_path):
    config = {"experiment.base_dir": str(tmp_path), "experiment.name": "exp", "experiment.resume": False,
              "prune.rate": 0.2, "dataset.train_path": str(tmp_path / "train.beton"),
              "dataset.test_path": str(tmp_path / "test.beton")}
    _experiment_dir(tmp_path / "exp", config, launch="first")
    _experiment_dir(tmp_path / "exp_1", config, launch="second")
    _experiment_dir(tmp_path / "exp_2", config, launch="third")

    def decide(restarted, launch, **changes):
        decision = hu.decide_experiment_dir({**config, **changes}, restarted=restarted, launch_id=launch)
        return decision.action, decision.root.name

    # A first attempt with resume=false always starts fresh, whatever is there.
    assert decide(False, "second") == ("fresh", "exp_3")
    # A restart resumes the directory its launch created, not the newest one.
    assert decide(True, "second") == ("resume", "exp_1")
    # A restart whose launch had not created its directory yet decides as the first attempt.
    assert decide(True, "fourth") == ("fresh", "exp_3")
    # With resume=true a restart resumes what the first attempt resumed: exp, not exp_2.
    assert decide(True, "fourth", **{"experiment.resume": True}) == ("resume", "exp")
    # No usable launch id (torchrun's default rdzv id is 'none'): the newest matching directory.
    assert decide(True, "none") == ("resume", "exp_2")
    assert decide(True, None, **{"prune.rate": 0.5}) == ("fresh", "exp_3")
    # The directory of a resume=false run can be resumed by name later.
    assert decide(False, None, **{"experiment.resume": True, "experiment.name": "exp_1"}) == ("resume", "exp_1")


# ------------------------------------------------------------------ torchrun, 2 processes
@pytest.mark.slow  # 25-45 s here: RUN_SLOW=1 runs it (make test stays near its time budget)
def test_worker_crash_restart_and_preemption_give_the_uninterrupted_results(tmp_path, digits):
    """One uninterrupted 2-process run, then one job that loses rank 1 mid-epoch (restarted by
    torchrun) and is later preempted, then a launch that resumes it."""
    base = tmp_path / "runs"
    config = write_config(tmp_path / "c.yaml", digits_config(digits, base))
    reference = run_harness(config, nproc=2, timeout=180)
    assert reference.returncode == 0, reference.stderr

    # 22 batches per epoch: rank 1 dies at step 30 (level 0, epoch 1, batch 8); after the
    # restart it gets SIGTERM at level 2, epoch 0, batch 3 (rank 0 does not), and the ranks
    # stop together at batch 10, the next agreed check.
    env = {"HARNESS_TEST_CRASH_RANK": "1", "HARNESS_TEST_CRASH_AFTER_STEPS": "30",
           "HARNESS_TEST_CRASH_MARKER": str(tmp_path / "crashed"),
           "HARNESS_TEST_KILL_AT": "batch:2:0:3", "HARNESS_TEST_KILL_RANK": "1",
           "HARNESS_TEST_KILL_SIGNAL": "SIGTERM"}
    job = run_harness(config, "--experiment.resume=false", nproc=2, env=env, timeout=180,
                      extra_torchrun=["--max-restarts=1"])
    root = base / "exp_1"
    assert "rank 1 crashing after 30 steps" in job.stderr, job.stderr
    assert f"resuming {root} at level 0, epoch 1" in job.stdout, job.stdout  # the restart, same directory
    assert "stopping on request at level 2, epoch 0, batch 10" in job.stdout, job.stdout
    assert job.returncode != 0  # torchrun reports workers that stopped with 143 as failed
    assert sorted(p.name for p in base.iterdir()) == ["exp", "exp_1"]
    state = hu.load_checkpoint(root / "checkpoints" / "last.pt", required=hu.LAST_CHECKPOINT_KEYS)
    assert (state["phase"], state["level"], state["next_epoch"]) == ("mid_epoch", 2, 0)
    assert state["partial_epoch"]["batches_done"] == 10 and len(state["partial_epoch"]["sums"]) == 2

    resumed = run_harness(config, "--experiment.name=exp_1", nproc=2, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {root} at level 2, epoch 0, batch 10" in resumed.stdout
    assert_same_results(base / "exp", root)
    assert {p.name for p in (root / "checkpoints").iterdir()} == {"init.pt", "last.pt", "previous.pt", "launch_id.txt"}


def test_an_error_on_one_rank_stops_the_job_promptly_with_its_message(tmp_path, digits):
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs"))
    started = time.monotonic()
    result = run_harness(config, nproc=2, timeout=120,
                         env={"HARNESS_TEST_RAISE_RANK": "1", "HARNESS_TEST_RAISE_AFTER_STEPS": "30"})
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < 60, f"{elapsed:.0f} s"
    assert "error (rank 1): RuntimeError: test hook: injected failure on rank 1 after 30 steps" in result.stderr
    # Rank 0 says why it stops, in one line and without a traceback of its own.
    rank0 = [line for line in result.stderr.splitlines() if line.startswith("error (rank 0)")]
    assert len(rank0) == 1 and "lost contact with another process" in rank0[0], result.stderr
    assert "in after_step" in result.stderr  # rank 1's traceback
