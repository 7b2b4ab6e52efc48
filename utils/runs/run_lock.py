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
writing anything and refuses when another launch started the run meanwhile.  Taking the lock
writes only the lock file (its holder), so a refused launch leaves the run as it was.  ``flock``
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
        return f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown: it is starting up"


def acquire(directory) -> RunLock:
    """Take ``directory``'s run lock (creating the directory when needed) or raise UserError."""
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
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    return RunLock(fd, path)


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
