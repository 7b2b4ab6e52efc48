"""What ``python -m utils.write_beton`` does with output files that exist already, and
``--verify``: the files a run may have trained on are never replaced silently.

* ``keep_existing``: an existing output is refused in one line unless ``overwrite``;
  ``skip_existing`` keeps both files when their write records say they were written from the
  same request (``request_mismatch``: dataset, name, split, and for records that say how they
  were written, the source folder, split folders, channels and storage options), says so in a
  line each, and refuses files written otherwise.
* ``verify_files``: re-hash files and compare them with their records, on request; a file that
  matches gets its record stamped with its current size and time, so the cheap check at a run's
  start (utils/data/records.py, ``record_vouches``) trusts it again.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from utils.data.records import read_record, stamp_record, verify_file, write_record
from utils.data.sources import DataError


def request_mismatch(record: dict, dataset: str, files_name: str, split: str, written_from: dict) -> Optional[str]:
    """None when an existing file's write record says it was written as asked now, else what
    differs (a phrase).  A record written before records said how the file was written
    (``written_from``) is compared in dataset, name and split only."""
    asked = {"dataset": dataset, "name": files_name, "split": split}
    differing = [f"{key} {record.get(key)!r} there, {value!r} asked" for key, value in asked.items()
                 if record.get(key) != value]
    recorded = record.get("written_from")
    if isinstance(recorded, dict):
        differing += [f"{key} {recorded.get(key)!r} there, {value!r} asked" for key, value in written_from.items()
                      if recorded.get(key) != value]
    return "; ".join(differing) or None


def keep_existing(outputs: Sequence[Path], dataset: str, files_name: str, written_from: dict, *,
                  skip_existing: bool, overwrite: bool, say: Callable[[str], None]) -> bool:
    """Whether the existing outputs are kept as they are (``skip_existing``, records matching);
    False: write them.  Refuses an existing file that would be replaced without ``overwrite``."""
    existing: List[Path] = [path for path in outputs if path.exists()]
    if not existing:
        return False
    if skip_existing and len(existing) == len(outputs):
        differing = []
        for path, split in zip(outputs, ("train", "test")):
            record = read_record(path)
            why = ("no write record" if record is None
                   else request_mismatch(record, dataset, files_name, split, written_from))
            if why:
                differing.append(f"{path}: {why}")
        if not differing:
            for path in outputs:
                say(f"{path}: exists and its write record matches this request: skipped, not rewritten")
            return True
        if not overwrite:
            raise DataError(f"--skip-existing: {differing[0]}{' (and the test file)' if len(differing) > 1 else ''}; "
                            f"the existing files were written otherwise: pass --overwrite to rewrite them, "
                            f"or another --name or --out")
        return False
    if overwrite:
        return False
    others = " (and the test file)" if len(existing) > 1 else ""
    raise DataError(f"{existing[0]}: exists already{others}; pass --overwrite to replace it (runs trained on it "
                    f"then refuse to resume on the new data), --skip-existing to keep files written by the same "
                    f"request, or another --name or --out")


def verify_files(paths: Sequence[str]) -> int:
    """``--verify``: each file re-hashed and compared with its write record, one line each; a
    file that matches gets its record stamped with its current size and time (so the cheap check
    at a run's start vouches for it again).  -> 0 when every file matches, else 2."""
    status = 0
    for path in paths:
        try:
            record, differs = verify_file(path)
            if differs:
                print(f"write_beton: error: {path}: does not match its write record ({differs}): changed since "
                      f"it was written; rewrite it", file=sys.stderr)
                status = 2
                continue
            write_record(Path(path), stamp_record(path, record))
            print(f"{path}: matches its write record (SHA-256 {record['sha256'][:12]}, {record['num_samples']} "
                  f"samples); record stamped with the file's time")
        except DataError as error:
            print(f"write_beton: error: {error}", file=sys.stderr)
            status = 2
    return status
