"""One live run per experiment directory.

Rank 0 holds an exclusive ``flock`` on ``DIR/.run.lock`` for the run's life.  A second launch
on the same directory (a double submission, a Slurm requeue while the old job still runs) is
refused in one line naming the holder (host, pid, since when), before it writes anything.
The lock goes with the process: a holder killed by SIGKILL, or a lost node, releases it, so
a restart (by hand, by torchrun, by Slurm) takes it over and resumes as usual.

When to take it (the harness, ``harness_setup.decide_directory`` / ``start_fresh``): a launch that
finds a run to resume takes the lock first and then looks at the directory again and reads its
checkpoints, so what it decides (resume, or finished: nothing to do) is the state under the lock,
not one that another launch changed in between; a launch that starts a run takes it just before
writing anything and refuses when another launch started the run meanwhile.  It writes itself
into the lock file (``announce``) only once nothing can refuse it any more, so a refused launch
leaves the directory as it was; until then a launch refused for it hears "holder unknown".  ``flock``
works on local file systems and on NFSv4 / Lustre (mounted with ``-o flock``); on a file
system without it the lock cannot be taken and the run is refused, saying so.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Optional

from utils.core.errors import UserError

LOCK_NAME = ".run.lock"


class RunLock:
    """A held lock; ``release()`` (or the process ending) lets the next run take it."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path
        self.announced = False

    def announce(self) -> None:
        """Write this process into the lock file (host, pid, since when), for a refused launch
        to name; once, after everything that can refuse this launch has been checked."""
        if self.fd is None or self.announced:
            return
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, record, 0)
        self.announced = True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __del__(self):
        self.release()


def _holder_text(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode() or "{}")
        if holder["host"] == socket.gethostname() and not _alive(int(holder["pid"])):
            raise ValueError("the record of an earlier holder: the new one has not written its own yet")
        return f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it is starting up"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        return True
    return True


def acquire(directory, announce: bool = True) -> RunLock:
    """Take ``directory``'s run lock (creating the directory when needed) or raise UserError.
    ``announce=False``: the lock file is not written yet (``RunLock.announce`` writes it), so a
    launch refused under the lock leaves the directory as it was."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _holder_text(fd)
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(f"{directory} is in use by a live run ({holder}); wait for it to finish or stop it "
                            f"(the same command then resumes), or choose another experiment.name") from None
        raise UserError(f"cannot lock {path} ({os.strerror(error.errno)}): this file system does not support "
                        f"flock; put experiment.base_dir on one that does") from None
    lock = RunLock(fd, path)
    if announce:
        lock.announce()
    return lock


def holder(directory) -> Optional[str]:
    """Who holds ``directory``'s lock now, or None when nobody does (for reports and sweeps)."""
    path = Path(directory) / LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _holder_text(fd)
        return None
    finally:
        os.close(fd)
