"""Which data a run trained and tested on: recorded in its directory, checked whenever the run's
results are continued or reused.

A run's config holds only the paths of its ``.beton`` files; a file rewritten under the same
path (another image folder, more or fewer images) would silently make a resumed run, a control
or a sweep's later runs train on other data than the results they are compared with.  So a
fresh run writes ``data.json`` in its directory (``record_run_data``), one *identity* per role
(``train``, ``test``)::

    {"path": "/abs/NAME_train.beton", "file_size": 1234, "mtime_ns": ..., "fingerprint": "sha256:...",
     "num_samples": 500, "class_counts": [50, ...], "record": "vouched" | "unstamped" | "none"}

``fingerprint`` is the SHA-256 the write record (``NAME.beton.json``, utils/data/records.py)
holds, hashed once when the file was written; nothing here reads the ``.beton`` itself, so
taking or checking an identity costs a ``stat`` and a small JSON read, whatever the file's size.

Two identities are the same data (``difference`` returns None) when size and fingerprint are
equal and either the modification time is too or the file's record vouches for the file as it
is now (``records.record_vouches``: the writer, or ``write_beton --verify`` after a full
re-hash, stamped the record with the file's size and time).  So a file rewritten with other
content (a new record, another fingerprint) is another dataset; a byte-identical rewrite by the
writer, or the same file under another path (a control reading a copy), is the same; a file
changed without its record being rewritten, or copied without its times, is not trusted until
``python -m utils.write_beton --verify FILE`` has re-hashed it.

Files without a fingerprint: a ``.beton`` without a write record (written by another tool)
has ``fingerprint`` None and is identified by size and time only.  A record written by an
earlier version of the writer has a fingerprint but no time stamp (``record``: "unstamped"):
it is compared by fingerprint, size and time.  A run directory made before runs recorded their
data has no ``data.json``: its data cannot be checked (``check_run_data`` returns a note) and
a control does not take such a source's level 0 as its own (utils/lottery/controls.py).

Checked by: the harness before it resumes a run (harness_utils.decide_experiment_dir), a
control against its source (controls.read_source, and again before taking its level 0), a
sweep against its existing runs (utils/launch/sweep.py); the report groups only runs of the
same data (utils/report/experiments.py).  Everything takes plain arguments.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from utils.core.atomic_io import atomic_write_text
from utils.data.records import read_record, record_vouches
from utils.data.sources import DataError
from utils.runs.rundir import RunFiles

DATA_FORMAT = "run-data/1"
ROLE_KEYS = {"train": "dataset.train_path", "test": "dataset.test_path"}   # role -> the config key naming its file


class DataChanged(ValueError):
    """The data of a run differs from what it recorded; the message is one line naming the file."""


def data_paths(train_path: Any, test_path: Any) -> Dict[str, str]:
    """{role: path} of a run's data files (``dataset.train_path``, ``dataset.test_path``; unset ones left out)."""
    return {role: str(path) for role, path in (("train", train_path), ("test", test_path)) if path}


def identify(path) -> Dict[str, Any]:
    """The identity of the ``.beton`` at ``path`` as it is now (a stat and its write record; the
    file is not read).  DataError when the file is missing or its record unreadable."""
    where = os.path.abspath(os.fspath(path))
    try:
        status = os.stat(where)
    except FileNotFoundError:
        raise DataError(f"{where}: .beton file not found") from None
    record = read_record(where)
    identity = {"path": where, "file_size": int(status.st_size), "mtime_ns": int(status.st_mtime_ns),
                "fingerprint": None, "num_samples": None, "class_counts": None, "record": "none"}
    if record is not None:
        identity.update(fingerprint=f"sha256:{record['sha256']}", num_samples=record.get("num_samples"),
                        class_counts=record.get("class_counts"),
                        record="vouched" if record_vouches(record, status) else "unstamped")
    return identity


def difference(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> Optional[str]:
    """None when ``current`` is the same data as ``recorded`` (see the module docstring), else
    what differs (a phrase)."""
    if recorded.get("file_size") != current.get("file_size"):
        return f"{current.get('file_size')} bytes, recorded {recorded.get('file_size')}"
    if recorded.get("fingerprint") != current.get("fingerprint"):
        return (f"its write record's fingerprint is {_short(current.get('fingerprint'))}, "
                f"recorded {_short(recorded.get('fingerprint'))}")
    if recorded.get("mtime_ns") == current.get("mtime_ns"):
        return None
    if current.get("fingerprint") and current.get("record") == "vouched":
        return None
    if not current.get("fingerprint"):
        return "modified since (another time), and it has no write record"
    return (f"modified since (another time), and its write record does not vouch for it (if only its time changed, "
            f"e.g. a copy: python -m utils.write_beton --verify {current.get('path')} re-hashes it and stamps the record)")


def _short(fingerprint: Optional[str]) -> str:
    return "none (no write record)" if not fingerprint else fingerprint.split(":", 1)[-1][:12]


def describe(identity: Mapping[str, Any]) -> str:
    """``NAME.beton (sha256 1a2b3c4d5e6f, 500 samples)``: a file's identity in a few words."""
    name = os.path.basename(str(identity.get("path", "?")))
    parts = [f"sha256 {_short(identity.get('fingerprint'))}" if identity.get("fingerprint")
             else f"no write record, {identity.get('file_size')} bytes"]
    if identity.get("num_samples") is not None:
        parts.append(f"{identity['num_samples']} samples")
    return f"{name} ({', '.join(parts)})"


def run_data_path(root) -> Path:
    return RunFiles(root).data


def record_run_data(root, paths: Mapping[str, Any]) -> Dict[str, Any]:
    """Write ``root/data.json``: the identity of each role's file (rank 0, as a run starts)."""
    data = {"format": DATA_FORMAT, **{role: identify(path) for role, path in paths.items()}}
    atomic_write_text(run_data_path(root), json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


def read_run_data(root) -> Optional[Dict[str, Any]]:
    """``root/data.json`` as written, None when the run has none (made by an earlier version).
    DataChanged (one line) when it is unreadable."""
    path = run_data_path(root)
    try:
        with open(path) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise DataChanged(f"{path}: unreadable ({type(error).__name__}); the run's data cannot be checked: "
                          f"move the run away or restore the file") from None
    if not isinstance(data, dict) or data.get("format") != DATA_FORMAT:
        raise DataChanged(f"{path}: not a record of a run's data (format {DATA_FORMAT!r})")
    return data


def data_change(recorded: Mapping[str, Any], paths: Mapping[str, Any]) -> Optional[str]:
    """None when every role's file in ``paths`` is the data ``recorded`` (a run's data.json), else
    one line naming the first file that differs and how."""
    for role, path in paths.items():
        then = recorded.get(role)
        if not isinstance(then, dict):
            continue       # a role this run did not record (added by a later version): nothing to compare
        key = ROLE_KEYS.get(role, role)
        try:
            now = identify(path)
        except DataError as error:
            return f"{key}: {error}"
        why = difference(then, now)
        if why:
            return (f"{key}={path} is not the data recorded ({describe(then)} at {then.get('path')}): {why}")
    return None


NEW_RUN = "restore that data, or start a new run (another experiment.name) on the new data"


def check_run_data(root, paths: Mapping[str, Any], *, doing: str, instead: str = NEW_RUN) -> Optional[str]:
    """Refuse (DataChanged, one line) to ``doing`` (e.g. "resume it") with the run in ``root``
    when its data changed, saying what to do ``instead``; -> a note when the run records no
    data (made by an earlier version)."""
    recorded = read_run_data(root)
    if recorded is None:
        return (f"note: {root} does not record which data it used (made before runs recorded it): "
                f"its data is not checked")
    why = data_change(recorded, paths)
    if why:
        raise DataChanged(f"{root} was trained on other data: {why}; cannot {doing}: {instead}")
    return None


def data_signature(root) -> Optional[str]:
    """What identifies a run's data for pooling (the report): each role's fingerprint, or its
    file's name, size and time when it has none; None when the run records no data."""
    try:
        recorded = read_run_data(root)
    except DataChanged:
        return None
    if recorded is None:
        return None
    parts = []
    for role in sorted(k for k, v in recorded.items() if isinstance(v, dict)):
        identity = recorded[role]
        parts.append(f"{role}={identity.get('fingerprint') or ''}" if identity.get("fingerprint") else
                     f"{role}={identity.get('path')}:{identity.get('file_size')}:{identity.get('mtime_ns')}")
    return ";".join(parts)


def data_words(root) -> Optional[str]:
    """The data of the run in ``root`` in a few words (``describe`` of each role), None when unrecorded."""
    try:
        recorded = read_run_data(root)
    except DataChanged:
        return None
    if recorded is None:
        return None
    return ", ".join(f"{role} {describe(recorded[role])}"
                     for role in ("train", "test", *sorted(set(recorded) - {"train", "test", "format"}))
                     if isinstance(recorded.get(role), dict))
