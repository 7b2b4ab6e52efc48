"""Fault injection for the tests: a callback installed only when ``HARNESS_TEST_*`` variables
are set (no user sets them), never a branch in production code.

* ``HARNESS_TEST_CRASH_RANK`` / ``_CRASH_AFTER_STEPS`` / ``_CRASH_MARKER``: that rank exits
  with status 17 after that many optimizer steps of this process, once (the marker file
  records that it happened, so torchrun's restart does not crash again).
* ``HARNESS_TEST_RAISE_RANK`` / ``_RAISE_AFTER_STEPS``: that rank raises a RuntimeError (an
  ordinary bug in one process) after that many steps.
* ``HARNESS_TEST_KILL_AT``: the process SIGKILLs itself at a named point: ``batch:L:E:B``
  (after B optimizer steps of epoch E of level L), ``epoch_end:L:E`` (epoch E's row
  written, its checkpoint not yet), ``level_end:L`` (level L's rows written, its checkpoint
  not yet), ``prune:L`` (level L's masks computed and written, its training not started).
  ``HARNESS_TEST_KILL_MARKER``: only once, as above; ``HARNESS_TEST_KILL_RANK``: only on that
  rank; ``HARNESS_TEST_KILL_SIGNAL``: another signal than SIGKILL (e.g. SIGTERM: a
  preemption at an exact batch).
* ``HARNESS_TEST_HOLD_AT`` / ``_HOLD_UNTIL``: the process waits at a named point (as
  ``KILL_AT``'s) until the file ``HOLD_UNTIL`` exists, writing ``HOLD_UNTIL.held`` when it
  starts waiting (a run held in its last seconds, its lock held, for a second launch to meet).
* ``HARNESS_TEST_STEP_DELAY_S``: sleep after every step (a slow run to signal).
* ``HARNESS_TEST_CORRUPT_MASKS_RANK``: that rank flips one mask bit after pruning.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from utils.core.callbacks import Callback, LevelInfo

PREFIX = "HARNESS_TEST_"


@dataclass
class FaultInjection(Callback):
    rank: int = 0
    crash_rank: int = -1
    crash_after_steps: int = -1
    crash_marker: str = ""
    corrupt_masks_rank: int = -1
    raise_rank: int = -1
    raise_after_steps: int = -1
    kill_at: str = ""
    kill_marker: str = ""
    kill_rank: int = -1
    kill_signal: str = "SIGKILL"
    step_delay_s: float = 0.0
    hold_at: str = ""
    hold_until: str = ""
    steps_this_process: int = 0

    @classmethod
    def from_env(cls, rank: int, env: Optional[Mapping[str, str]] = None) -> Optional["FaultInjection"]:
        """The callback, or None when no ``HARNESS_TEST_*`` variable is set."""
        env = os.environ if env is None else env
        if not any(key.startswith(PREFIX) for key in env):
            return None
        get = lambda name, default: env.get(PREFIX + name, default)  # noqa: E731
        return cls(rank, int(get("CRASH_RANK", -1)), int(get("CRASH_AFTER_STEPS", -1)), get("CRASH_MARKER", ""),
                   int(get("CORRUPT_MASKS_RANK", -1)), int(get("RAISE_RANK", -1)), int(get("RAISE_AFTER_STEPS", -1)),
                   get("KILL_AT", ""), get("KILL_MARKER", ""), int(get("KILL_RANK", -1)),
                   get("KILL_SIGNAL", "SIGKILL"), float(get("STEP_DELAY_S", 0.0)), get("HOLD_AT", ""),
                   get("HOLD_UNTIL", ""))

    def kill_if_at(self, *point: Any) -> None:
        self.hold_if_at(*point)
        if not self.kill_at or self.kill_at != ":".join(str(p) for p in point):
            return
        if self.kill_rank not in (-1, self.rank):
            return
        if self.kill_marker:
            if os.path.exists(self.kill_marker):
                return
            open(self.kill_marker, "w").close()
        print(f"test hook: {self.kill_signal} at {self.kill_at} (rank {self.rank})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), getattr(signal, self.kill_signal))

    def hold_if_at(self, *point: Any) -> None:
        if not self.hold_at or self.hold_at != ":".join(str(p) for p in point) or self.rank != 0:
            return
        open(self.hold_until + ".held", "w").close()
        print(f"test hook: held at {self.hold_at} until {self.hold_until} exists", file=sys.stderr, flush=True)
        while not os.path.exists(self.hold_until):
            time.sleep(0.02)

    # ------------------------------------------------------------------ hooks
    def on_masks_agreed(self, info: LevelInfo) -> None:
        if self.corrupt_masks_rank == self.rank:
            masks = info.extra["masks"]
            first = next(iter(masks))
            masks[first].view(-1)[0] = ~masks[first].view(-1)[0]

    def on_level_start(self, info: LevelInfo) -> None:
        self.kill_if_at("prune", info.level)

    def after_step(self, state) -> None:
        self.steps_this_process += 1
        steps = self.steps_this_process
        if (self.crash_rank == self.rank and steps == self.crash_after_steps
                and self.crash_marker and not os.path.exists(self.crash_marker)):
            open(self.crash_marker, "w").close()
            print(f"test hook: rank {self.rank} crashing after {steps} steps", file=sys.stderr, flush=True)
            os._exit(17)
        if self.raise_rank == self.rank and steps == self.raise_after_steps:
            raise RuntimeError(f"test hook: injected failure on rank {self.rank} after {steps} steps")
        self.kill_if_at("batch", state.level, state.epoch, state.batches_done)
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)

    on_step_end = after_step

    def on_epoch_logged(self, info: LevelInfo) -> None:
        if not info.final_epoch:  # the level's last epoch is checkpointed with the level: see level_end
            self.kill_if_at("epoch_end", info.level, info.epoch)

    def on_level_logged(self, info: LevelInfo) -> None:
        self.kill_if_at("level_end", info.level)
