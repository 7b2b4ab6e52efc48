"""Stopping on request and watching progress: callbacks of the training epoch.

* ``StopFlag``: SIGTERM/SIGINT set a flag; a second signal stops at once (one within 2 s of the
  first is the same request delivered twice: Slurm, then torchrun forwarding it).  The death of
  torchrun sets it too (``utils/core/launcher_watch.py``).
* ``StopRequests``: whether to stop now, the same answer on every rank at the same batch
  (with several processes an all-reduce of the ranks' flags every ``check_interval`` batches
  and at every epoch boundary, so that every rank takes part in it).
* ``StopOnRequest``: the callback that ends an epoch early when the ranks agree to stop.
* ``ProgressBar``: a tqdm bar per epoch on rank 0, off when stderr is not a terminal.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Optional

import torch

from utils.core import distributed as du
from utils.core import launcher_watch
from utils.core.callbacks import Callback

# With several processes the ranks agree on stopping with one all-reduce every this many
# batches (and at every epoch end): a preempted run stops within this many batches, and a
# CUDA run pays one host-device sync per this many steps.  One process checks every batch.
STOP_CHECK_INTERVAL = 10


class Preempted(Exception):
    """The run stopped on request at a checkpoint; the same command resumes it."""


class StopFlag:
    """SIGTERM/SIGINT set ``raised``; the training loop stops at a batch boundary that every
    rank agrees on (``StopRequests``); a second signal stops at once.  ``restore()`` puts the
    previous handlers back (the harness may run inside another program, e.g. a test)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    # Slurm signals every process of a job at once and torchrun forwards the same signal to its
    # workers a moment later: a second signal this soon after the first is that one request.
    SAME_REQUEST_S = 2.0

    def __init__(self):
        self.raised = False
        self._raised_at = 0.0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        launcher_watch.set_stop_request(self.request)  # torchrun dying asks for the same stop

    def request(self) -> None:
        if not self.raised:
            self.raised, self._raised_at = True, time.monotonic()

    def _handler(self, signum, frame):
        if self.raised and time.monotonic() - self._raised_at > self.SAME_REQUEST_S:
            # asked twice: stop now (every file is written atomically, the last checkpoint stays whole)
            self.restore()
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice: stopping without a checkpoint")
        self.request()

    def restore(self) -> None:
        launcher_watch.set_stop_request(None)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class StopRequests:
    def __init__(self, flag: Optional[StopFlag], ctx: du.DistributedContext,
                 check_interval: int = STOP_CHECK_INTERVAL):
        self.flag, self.ctx, self.check_interval = flag, ctx, check_interval

    def agreed(self, batches_done: Optional[int] = None) -> bool:
        """Whether to stop now (``batches_done``: inside an epoch; None: at an epoch boundary)."""
        raised = self.flag is not None and self.flag.raised
        if not self.ctx.is_distributed:
            return raised
        if batches_done is not None and batches_done % self.check_interval:
            return False
        flag = torch.tensor([1.0 if raised else 0.0], device=self.ctx.device)
        du.all_reduce_sum(flag)
        return flag.item() > 0  # note: a CPU-GPU sync point, once per check_interval steps


class StopOnRequest(Callback):
    def __init__(self, requests: StopRequests):
        self.requests = requests

    def on_step_end(self, state) -> None:
        if state.batches_done < state.total_batches and self.requests.agreed(state.batches_done):
            state.stop = True


class ProgressBar(Callback):
    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def on_epoch_start(self, state) -> None:
        if self.enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=state.total_batches, initial=state.batches_done,
                            desc=f"level {state.level} epoch {state.epoch}", leave=False, dynamic_ncols=True,
                            file=sys.stderr, disable=None)  # None: off when stderr is not a terminal (logs stay clean)

    def on_step_end(self, state) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_epoch_end(self, state) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
