"""Every run knows its data, and the data writers never replace files silently.

* A run records the identity of its .beton files (``data.json``: utils/runs/data_identity.py);
  resuming it, a control of it and a sweep holding it are refused in one line naming the file
  once the file holds other data; the report never pools runs of different data.
* The start-up check reads no .beton: a record stamped with the file's size and time vouches
  for it (``write_beton --verify`` re-hashes on request and stamps it again).
* ``write_beton``: an existing output is refused without ``--overwrite``; ``--skip-existing``
  says it skipped and refuses files written from another request; an image folder mixing grey
  and colour images or with an empty class folder is refused, a test split missing a class is
  named (a warning; its record counts 0 images of it); a
  corrupt image is one line with no worker traceback; files honour the umask; a wrong
  ``dataset.train_path`` names the missing .beton.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PYTHON, ROOT, digits_config, write_config
from tests.test_folder import CLASSES, folder_config, write_png_tree
from tests.test_resume import run_in_process
from utils.core.atomic_io import atomic_write_text
from utils.data import records
from utils.data import writer as wb
from utils.data.sources import DataError
from utils.runs import data_identity


def refused(call) -> str:
    with pytest.raises(DataError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def write_folder(tmp_path, name, *, per_class, seed, out=None, **options):
    """A grey PNG tree of 10 classes written as out/shapes_{train,test}.beton; -> {train, test, root, out}."""
    root = tmp_path / name
    write_png_tree(root, grey=True, per_class=per_class, seed=seed)
    out = out or tmp_path / "data"
    train, test = wb.write_dataset("folder", root, out, files_name="shapes", num_workers=1, **options)
    return dict(train=train, test=test, root=root, out=out)


# --------------------------------------------------------------------------- runs know their data
def test_resume_a_control_and_a_sweep_on_rewritten_data_are_refused(tmp_path):
    """The issue's case: a ticket run on one image folder, the data rewritten from another (fewer
    images), then the ticket resumed, a control of it and a sweep holding it: all refused in one
    line naming the file, nothing written; back on the original data everything goes on."""
    first = write_folder(tmp_path, "v1", per_class=(3, 1), seed=0)
    config = folder_config(tmp_path, first)
    root = tmp_path / "runs" / "exp"
    code, _, err = run_in_process(config, env={"HARNESS_TEST_KILL_AT": "batch:0:0:1",
                                               "HARNESS_TEST_KILL_SIGNAL": "SIGTERM"})
    assert code == 143, err                                   # stopped after level 0: resumable
    recorded = json.loads((root / "data.json").read_text())
    assert recorded["train"]["path"] == str(first["train"]) and recorded["train"]["num_samples"] == 30
    assert recorded["train"]["fingerprint"] == "sha256:" + records.read_record(first["train"])["sha256"]
    assert recorded["train"]["class_counts"] == [3] * 10 and recorded["train"]["record"] == "vouched"

    saved = {p.name: p.read_bytes() for p in first["out"].iterdir()}
    write_folder(tmp_path, "v2", per_class=(2, 1), seed=5, overwrite=True)     # same paths, other images
    before = (root / "epochs.csv").read_text()
    code, out, err = run_in_process(config)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"{root} was trained on other data: dataset.train_path={first['train']} is not the data recorded" in err
    assert "cannot resume it" in err and (root / "epochs.csv").read_text() == before

    tree = json.loads(json.dumps(__import__("yaml").safe_load(config.read_text())))
    tree["experiment"].update(name="shuffled")
    tree["prune"].update(masks_from=str(root), control="shuffle")
    control = write_config(tmp_path / "control.yaml", tree)
    code, out, err = run_in_process(control)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"prune.masks_from={root} was trained on other data: dataset.train_path={first['train']}" in err
    assert not (tmp_path / "runs" / "shuffled").exists()

    from utils.launch import sweep
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"base: {config}\nname: study\ngrid: {{experiment.seed: [0, 1]}}\n")
    (tmp_path / "runs" / "study").mkdir()
    os.rename(root, tmp_path / "runs" / "study" / "seed-0")
    proc = subprocess.run([PYTHON, "-m", "utils.sweep", str(sweep_file), "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == sweep.EXIT_BAD_INPUT and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"run seed-0: {tmp_path / 'runs' / 'study' / 'seed-0'} was trained on other data" \
        in proc.stderr and "cannot add runs to this sweep" in proc.stderr

    for name, content in saved.items():            # the original data back (times too: as a backup restores it)
        (first["out"] / name).write_bytes(content)
    os.utime(first["train"], ns=(recorded["train"]["mtime_ns"],) * 2)
    os.utime(first["test"], ns=(recorded["test"]["mtime_ns"],) * 2)
    proc = subprocess.run([PYTHON, "-m", "utils.sweep", str(sweep_file), "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "[partial]" in proc.stdout, proc.stderr


def test_the_identity_is_cheap_and_a_full_check_is_on_request(tmp_path, digits, monkeypatch, capsys):
    """No .beton is read to identify or validate it when its record vouches for it; a file touched
    or copied without its times is re-hashed at validation, and ``--verify`` re-hashes and stamps."""
    import shutil
    from utils.data.specs import get_dataset_spec
    spec = get_dataset_spec("digits")
    path = tmp_path / "digits_train.beton"
    shutil.copy2(digits / "digits_train.beton", path)                         # times kept: vouched
    shutil.copy2(records.record_path(digits / "digits_train.beton"), records.record_path(path))
    recorded = data_identity.identify(path)
    hashed = []
    real_hash = records.file_sha256
    monkeypatch.setattr(records, "file_sha256", lambda p, *a: hashed.append(p) or real_hash(p, *a))
    assert recorded["record"] == "vouched" and records.validate_beton(path, spec)["record"] and not hashed
    # the same bytes, the file's time changed (a copy without -p): not trusted until verified
    os.utime(path, ns=(1, 1))
    current = data_identity.identify(path)
    assert current["record"] == "unstamped" and "record does not vouch" in data_identity.difference(recorded, current)
    records.validate_beton(path, spec)
    assert hashed == [str(path)]                                              # re-hashed once, matched
    assert wb.main(["--verify", str(path)]) == 0
    assert "matches its write record" in capsys.readouterr().out
    assert data_identity.difference(recorded, data_identity.identify(path)) is None  # stamped: same data again
    # other bytes under the old record: --verify refuses in one line
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF
    path.write_bytes(bytes(data))
    assert wb.main(["--verify", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "SHA-256 differs from the record's" in err


def test_a_write_record_of_an_earlier_version_still_identifies_its_file(tmp_path, digits):
    """A record without per-class counts or a time stamp (format /2) is read: the identity has its
    fingerprint, compared with size and time (it cannot vouch)."""
    import shutil
    path = tmp_path / "old_train.beton"
    shutil.copy2(digits / "digits_train.beton", path)
    record = records.read_record(digits / "digits_train.beton")
    old = {k: v for k, v in record.items() if k not in ("class_counts", "written_from", "beton_mtime_ns")}
    Path(records.record_path(path)).write_text(json.dumps({**old, "format": "beton-write-record/2"}))
    identity = data_identity.identify(path)
    assert identity["fingerprint"] == "sha256:" + record["sha256"] and identity["record"] == "unstamped"
    assert data_identity.difference(identity, data_identity.identify(path)) is None
    assert records.resolve_dataset_spec("digits", train_path=path).name == "digits"


def test_the_report_pools_only_runs_of_the_same_data_and_names_it(tmp_path):
    from tests.test_report import make_experiment
    from utils.report import cli as report_cli
    from utils.report import experiments as report_experiments
    for name, content in (("a.beton", b"first"), ("b.beton", b"other data")):
        (tmp_path / name).write_bytes(content)
    base = tmp_path / "runs"
    roots = [make_experiment(base, f"s{seed}", seed=seed) for seed in (0, 1, 2)]
    for root, data in zip(roots, ("a.beton", "a.beton", "b.beton")):
        data_identity.record_run_data(root, {"train": tmp_path / data, "test": tmp_path / data})
    groups = report_experiments.make_groups([report_experiments.load_experiment(r) for r in roots])
    assert sorted(len(g.members) for g in groups) == [1, 2] and report_experiments.differing_keys(groups) == ["data"]
    report_cli.write_report(roots[:2], tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Common to all: " in text and "data: train a.beton (no write record, 5 bytes)" in text


# --------------------------------------------------------------------------- writers
def test_existing_outputs_are_refused_without_overwrite_and_skip_existing_checks_the_request(tmp_path, capsys):
    first = write_folder(tmp_path, "v1", per_class=(1, 1), seed=0)
    written = {p: p.stat().st_mtime_ns for p in (first["train"], first["test"])}
    message = refused(lambda: write_folder(tmp_path, "v2", per_class=(1, 1), seed=1))
    assert f"{first['train']}: exists already" in message and "pass --overwrite" in message
    # --skip-existing with the request the files were written from: skipped, and said so
    lines = []
    wb.write_dataset("folder", first["root"], first["out"], files_name="shapes", num_workers=1, skip_existing=True,
                     say=lines.append)
    assert lines == [f"{p}: exists and its write record matches this request: skipped, not rewritten" for p in written]
    # ... from another folder: refused, naming what differs
    message = refused(lambda: wb.write_dataset("folder", tmp_path / "v2", first["out"], files_name="shapes",
                                               num_workers=1, skip_existing=True))
    assert message.startswith(f"--skip-existing: {first['train']}: root '{first['root']}' there, "
                              f"'{tmp_path / 'v2'}' asked") and "pass --overwrite" in message
    assert {p: p.stat().st_mtime_ns for p in written} == written          # nothing rewritten
    # the command says the same in one line
    args = ["--dataset", "folder", "--root", str(tmp_path / "v2"), "--out", str(first["out"]), "--name", "shapes",
            "--num-workers", "1"]
    capsys.readouterr()
    assert wb.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "exists already" in err
    assert wb.main(args + ["--overwrite"]) == 0
    assert records.read_record(first["train"])["written_from"]["root"] == str(tmp_path / "v2")


def test_mixed_grey_and_colour_and_empty_classes_are_refused_and_a_missing_test_class_named(tmp_path):
    from PIL import Image
    import numpy as np
    out = tmp_path / "out"
    mixed = tmp_path / "mixed"
    write_png_tree(mixed, grey=True, per_class=(2, 1))
    colour = mixed / "train" / CLASSES[4] / "colour.png"
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(colour)
    message = refused(lambda: wb.write_dataset("folder", mixed, out, files_name="m", num_workers=1))
    assert "30 grey and 1 colour images" in message and str(colour) in message and "--channels 3" in message
    assert not out.exists()
    train, _ = wb.write_dataset("folder", mixed, out, files_name="m", num_workers=1, channels=3)
    assert records.read_record(train)["channels"] == 3
    assert "--channels 3: 1 or 3, and only for datasets" in refused(
        lambda: wb.write_dataset("digits", None, tmp_path / "d", channels=3))

    empty = tmp_path / "empty"
    write_png_tree(empty, grey=True, per_class=(1, 1))
    for image in (empty / "train" / CLASSES[7]).iterdir():
        image.unlink()
    message = refused(lambda: wb.write_dataset("folder", empty, tmp_path / "e", files_name="e", num_workers=1))
    assert f"{empty / 'train'}: class folder {CLASSES[7]} holds no image files" in message

    missing = tmp_path / "missing"
    write_png_tree(missing, grey=True, per_class=(1, 1))
    for image in (missing / "test" / CLASSES[2]).iterdir():
        image.unlink()
    (missing / "test" / CLASSES[2]).rmdir()
    with pytest.warns(UserWarning, match=f"{missing / 'test'}: no images of class {CLASSES[2]} "
                                         r"\(1 of the 10 train classes\): this split does not test it"):
        _, test = wb.write_dataset("folder", missing, tmp_path / "x", files_name="x", num_workers=1)
    assert records.read_record(test)["class_counts"] == [1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    assert not (tmp_path / "e").exists()


def test_a_corrupt_image_is_one_line_without_a_worker_traceback(tmp_path):
    tree = tmp_path / "tree"
    write_png_tree(tree, grey=True, per_class=(2, 1))
    broken = tree / "train" / CLASSES[1] / "001.png"
    broken.write_bytes(broken.read_bytes()[:60])        # the header reads, the pixels do not
    proc = subprocess.run([PYTHON, "-m", "utils.write_beton", "--dataset", "folder", "--root", str(tree), "--out",
                           str(tmp_path / "out"), "--name", "b", "--num-workers", "1"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
    assert errors[0].startswith("write_beton: error: b_train.beton: ") and f"{broken}: cannot read image" in errors[0]
    assert not list((tmp_path / "out").glob("*.beton"))


def test_files_honour_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
        train, _ = wb.write_dataset("digits", None, tmp_path / "data", num_workers=1)
        os.umask(0o002)
        atomic_write_text(tmp_path / "shared.md", "x")
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "report.md") == 0o644 and mode(train) == 0o644
    assert mode(records.record_path(train)) == 0o644 and mode(tmp_path / "shared.md") == 0o664


def test_a_wrong_train_path_names_the_missing_beton(tmp_path):
    wrong = tmp_path / "no_such_train.beton"
    message = refused(lambda: records.resolve_dataset_spec("folder", train_path=wrong))
    assert message.startswith(f"{wrong}: .beton file not found") and ".json" not in message
    tree = digits_config(tmp_path, tmp_path / "runs", **{"dataset.name": "folder"})
    tree["dataset"]["train_path"] = str(wrong)
    code, _, err = run_in_process(write_config(tmp_path / "c.yaml", tree))
    assert code == 2 and f"{wrong}: .beton file not found" in err and "write record" not in err
