"""Workers follow their launcher: a torchrun worker whose torchrun has died stops.

torchrun starts each worker in a session of its own, so when torchrun itself is killed (an
out-of-memory kill, ``kill -9``, a scheduler without cgroups) nothing reaches the workers: they
would train on detached, or wait for the rendezvous store torchrun hosted for the whole
collective timeout.  A daemon thread of each worker looks at its parent process twice a second;
when the parent is gone:

* while the training loop can stop at a batch every rank agrees on (a stop request is
  registered: ``utils.runs.run_control.StopFlag`` does it), it asks for that stop, as a SIGTERM
  would: the run writes its checkpoint and ends, and the same command resumes it exactly.
  Every worker of the node sees its torchrun die, so every rank asks; on several nodes the
  other nodes' ranks join the agreed stop.  If the process has not ended ``GRACE_S`` later
  (a collective with a peer that is gone, a long evaluation), it exits at once;
* otherwise (start-up, process-group set-up, tear-down) it exits at once: nothing is lost that
  the last checkpoint does not hold.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Optional

POLL_S = 0.5      # how often a worker looks at its parent (a getppid call)
GRACE_S = 30.0    # a checkpointed stop must end the process within this (torchrun's own SIGTERM grace)
EXIT_LAUNCHER_GONE = 1

_stop_request: Optional[Callable[[], None]] = None
_started = False
_rank = 0


def set_stop_request(request: Optional[Callable[[], None]]) -> None:
    """While set, the launcher's death calls ``request()`` (a checkpointed stop at an agreed
    batch) instead of ending the process at once; None removes it."""
    global _stop_request
    _stop_request = request


def start(rank: int, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> None:
    """Watch the launcher (the parent process of this torchrun worker of global rank ``rank``)
    from now on; a no-op after the first call.  A worker whose launcher is already gone (its
    parent is init) ends here."""
    global _started, _rank
    if _started:
        return
    _started, _rank = True, rank
    parent = os.getppid()
    if parent == 1:
        _exit_now("before the process group was set up")
    threading.Thread(target=_watch, args=(parent, poll_s, grace_s), name="launcher-watch", daemon=True).start()


def _say(text: str) -> None:
    print(f"error (rank {_rank}): {text}", file=sys.stderr, flush=True)


def _exit_now(when: str) -> None:
    _say(f"the launcher (torchrun) is gone {when}: exiting now; the same command resumes from the last checkpoint")
    sys.stdout.flush()
    os._exit(EXIT_LAUNCHER_GONE)


def _watch(parent: int, poll_s: float, grace_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    request = _stop_request
    if request is None:
        _exit_now(f"(pid {parent})")
    _say(f"the launcher (torchrun, pid {parent}) is gone: stopping at the next batch all ranks agree on, "
         f"with a checkpoint; the same command resumes")
    request()
    time.sleep(grace_s)
    _exit_now(f"(pid {parent}) and the run did not stop within {grace_s:g} s")
