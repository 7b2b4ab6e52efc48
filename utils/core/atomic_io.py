"""The project's one way of writing a file: a temporary file beside the target, fsync, rename.

A reader (or a process killed mid-write) sees the old file or the new one, never half of it.
Every file the project writes goes through here: checkpoints, masks, CSV headers, configs,
records, reports, figures, compacted networks, ``.beton`` files.

    atomic_write_bytes(path, data)           bytes -> file
    atomic_write_text(path, text)            str -> file (UTF-8)
    with atomic_output(path) as tmp: ...     for writers that want a file NAME (matplotlib,
                                             FFCV's writer, torch.export): write ``tmp``, and
                                             on a clean exit it becomes ``path``
    atomic_write(path, write)                ``write(handle)`` into a binary handle

A failure becomes one ``WriteFailed`` line naming the file and the cause (disk full, quota,
read-only...).  Files come out with the mode any new file gets here (0666 less the process's
umask: 0644 under umask 022, 0664 under 002), not the 0600 of ``mkstemp``'s temporary file, so
a group's shared run directory stays readable to the group.  Temporary files are named ``.NAME.XXXX.tmp`` (``remove_stale_temporaries``
deletes the ones a killed writer left).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

TEMPORARY_SUFFIX = ".tmp"  # temporary files: .NAME.XXXX.tmp beside NAME


class WriteFailed(Exception):
    """A file could not be written (disk full, quota, read-only, ...).  The message is one
    line naming the file and the cause; whatever was written before is intact."""


_CAUSES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EIO: "input/output error"}


def write_failure_cause(error: Optional[BaseException], directory) -> str:
    """A short cause for a failed write.  torch.save reports a full disk as a RuntimeError
    ('unexpected pos ...'), losing the errno: then the directory is probed."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _CAUSES:
            return _CAUSES[error.errno]
        error = error.__cause__ or error.__context__
    try:
        if shutil.disk_usage(directory).free < 1 << 20:
            return "no space left on device"
        if not os.access(directory, os.W_OK):
            return "the directory is not writable (read-only file system or permissions)"
    except OSError:
        pass
    return "write error"


@contextlib.contextmanager
def writing(path) -> Iterator[None]:
    """Turn any failure of the write of ``path`` into one WriteFailed line."""
    try:
        yield
    except WriteFailed:
        raise
    except (OSError, RuntimeError) as error:
        detail = " ".join(str(error).split())[:120]
        raise WriteFailed(f"cannot write {path}: {write_failure_cause(error, Path(path).parent)} "
                          f"({type(error).__name__}: {detail}); the last checkpoint is intact: fix that and run "
                          f"the same command to resume") from error


def fsync_dir(directory) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path) -> None:
    """mkdir -p, then fsync every parent whose entries changed, so a crash right after
    cannot lose the directory that files just written into it are in."""
    path = Path(path)
    with writing(path):
        missing = []
        probe = path
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        path.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):
            fsync_dir(created.parent)


def temporary_beside(path, suffix: str = "") -> Path:
    """A new empty temporary file ``.NAME.XXXX.tmp[suffix]`` in ``path``'s directory (for a writer
    that cannot run inside ``atomic_output``; ``commit`` it, or unlink it on failure)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX + suffix, dir=path.parent)
    try:
        os.fchmod(fd, NEW_FILE_MODE & ~current_umask())   # mkstemp's 0600 -> what open() would give
    finally:
        os.close(fd)
    return Path(tmp)


NEW_FILE_MODE = 0o666   # what open(path, "w") asks for; the umask takes its bits away


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status;
    setting and restoring it, elsewhere, is not safe against another thread creating a file)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def commit(tmp, path, keep_previous=None) -> None:
    """Make the finished temporary file ``tmp`` the file ``path``: fsync, rename, fsync the directory."""
    path = Path(path)
    with writing(path):
        _fsync_file(tmp)
        if keep_previous is not None and path.exists():
            _keep_previous(path, Path(keep_previous))
        os.replace(tmp, path)
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_output(path, *, keep_suffix: bool = False, keep_previous=None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit the file written there is
    fsynced and renamed to ``path``; on an error it is removed and ``path`` is untouched.
    ``keep_suffix``: the temporary name ends in ``path``'s suffix (``.NAME.XXXX.tmp.png``, for
    writers that choose a format by the name, e.g. ``.png``, ``.pt2``).  ``keep_previous``: the file
    being replaced is kept there (hard link, so ``path`` is never missing)."""
    path = Path(path)
    make_dirs(path.parent)
    with writing(path):
        tmp = temporary_beside(path, path.suffix if keep_suffix else "")
    try:
        yield tmp
        commit(tmp, path, keep_previous)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path, write: Callable[[Any], None], keep_previous=None) -> None:
    """``write(handle)`` (a binary file handle) into ``path`` atomically."""
    with atomic_output(path, keep_previous=keep_previous) as tmp, writing(path):
        with open(tmp, "wb") as handle:
            write(handle)


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _keep_previous(path: Path, previous: Path) -> None:
    link = temporary_beside(previous)
    os.unlink(link)
    try:
        os.link(path, link)
    except OSError:  # no hard links here: a copy, still never leaving ``path`` missing
        shutil.copyfile(path, link)
    os.replace(link, previous)


def remove_stale_temporaries(root) -> List[Path]:
    """Delete the temporary files a killed writer left (``.NAME.XXXX.tmp[.suffix]``) under ``root``.

    Only rank 0 writes and only while running, so at (re)start every such file is garbage:
    a checkpoint killed mid-write would otherwise leave up to a checkpoint's size behind.
    """
    removed = []
    for path in Path(root).rglob(f".*{TEMPORARY_SUFFIX}*"):
        if path.is_file() and (path.name.endswith(TEMPORARY_SUFFIX) or TEMPORARY_SUFFIX + "." in path.name):
            path.unlink()
            removed.append(path)
    return removed
