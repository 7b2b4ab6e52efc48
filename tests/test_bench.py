"""The benchmarks cannot rot: every script under bench/ runs with --smoke, and the device check
rehearses every section on the CPU, all without ffcv (the lent GPU machine has none).

Figures are never asserted here (speed is what the benchmarks print); these tests check that the
scripts run, that the device check writes every section with a status, and that the .beton files
the benchmarks write without ffcv read back like the ones ffcv's writer makes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import PYTHON, ROOT

BENCH = ROOT / "bench"
BENCH_SCRIPTS = sorted(BENCH.glob("*.py"))
SECTIONS = ["throughput", "masked_overhead", "runs_per_device", "precision", "pruning", "distributed", "configs"]

sys.path.insert(0, str(BENCH))


def without_ffcv(tmp_path: Path) -> dict:
    """An environment in which ``import ffcv`` fails, as on the lent GPU machine: a package
    named ffcv that raises ImportError, first on PYTHONPATH (inherited by every child process)."""
    shim = tmp_path / "no_ffcv"
    (shim / "ffcv").mkdir(parents=True)
    (shim / "ffcv" / "__init__.py").write_text("raise ImportError('ffcv is not installed here (test shim)')\n")
    path = os.pathsep.join([str(shim), str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_there_are_bench_scripts():
    assert len(BENCH_SCRIPTS) >= 9, [p.name for p in BENCH_SCRIPTS]


@pytest.mark.parametrize("script", BENCH_SCRIPTS, ids=lambda path: path.name)
def test_every_bench_script_runs_with_smoke_without_ffcv(script, tmp_path):
    run = subprocess.run([PYTHON, str(script), "--smoke"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=without_ffcv(tmp_path))
    assert run.returncode == 0, f"{script.name} --smoke: exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    assert run.stdout.strip(), f"{script.name} --smoke printed nothing"
    assert "ffcv is not installed here" not in run.stderr


def test_device_check_imports_nothing_of_ffcv(tmp_path):
    """Importing the device check and every bench module it calls must not import ffcv."""
    code = ("import sys; sys.path[:0] = ['bench', '.']\n"
            "import device_check, train_throughput, masked_overhead, runs_per_gpu, pruning_speed, synthetic_beton\n"
            "import harness\n"
            "print(sorted(m for m in sys.modules if m == 'ffcv' or m.startswith('ffcv.')))\n")
    run = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout


# About 2 CPU minutes in all (seven section processes, every shipped config, torchrun, K=2 spawned
# runs).  Part of `make test` on purpose: the one GPU command must not rot before a GPU appears.
def test_device_check_rehearsal_writes_every_section(tmp_path):
    """python bench/device_check.py --cpu --tiny: every section ran (ok, or skipped where it does not
    apply on a CPU, such as NCCL) and is in the JSON and the Markdown, without ffcv."""
    out = tmp_path / "check"
    run = subprocess.run([PYTHON, "bench/device_check.py", "--cpu", "--tiny", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1500, env=without_ffcv(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    assert list(report["sections"]) == SECTIONS
    markdown = (out / "device_check.md").read_text()
    problems = []
    for name, section in report["sections"].items():
        assert f"## {name}: " in markdown
        if section["status"] != "ok":
            problems.append(f"{name}: {section['status']} {section.get('error', '')} "
                            f"{[i for i in section['items'] if i['status'] not in ('ok', 'skipped')]}\n"
                            + (out / "logs" / f"{name}.log").read_text()[-3000:])
        assert section["items"], f"{name}: no item measured"
        for item in section["items"]:
            assert item["status"] in ("ok", "skipped"), (name, item)
    assert not problems, "\n".join(problems)
    sections = report["sections"]
    # what each section is for, measured (values are not asserted, only that they are figures)
    assert any(isinstance(i.get("b/a"), float) and isinstance(i.get("c/a"), float) for i in sections["throughput"]["items"])
    assert {i["item"] for i in sections["precision"]["items"]} >= {"fp32", "bf16", "fp16+GradScaler"}
    assert all(i["loss_finite"] for i in sections["precision"]["items"])
    assert [i["item"] for i in sections["distributed"]["items"]] == ["nccl", "gloo"]
    assert sections["distributed"]["items"][0]["status"] == "skipped"           # NCCL needs CUDA
    shipped = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    ran = [i["item"] for i in sections["configs"]["items"] if i["item"].endswith(".yaml")]
    assert ran == shipped
    assert all(isinstance(i["images_per_s"], float) for i in sections["configs"]["items"] if "images_per_s" in i)
    assert next(i for i in sections["pruning"]["items"] if i["item"].startswith("magnitude"))["masks_equal_cpu"]


def test_device_check_out_of_time_keeps_going(tmp_path):
    """A section whose budget is spent before an item starts records the item as out_of_time and the
    section says so; the check goes on to the next section and exits 0."""
    out = tmp_path / "check"
    run = subprocess.run([PYTHON, "bench/device_check.py", "--cpu", "--tiny", "--out", str(out),
                          "--sections", "masked_overhead,precision", "--budget-scale", "0.001", "--grace-s", "300"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, env=without_ffcv(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    assert list(report["sections"]) == ["masked_overhead", "precision"]
    for section in report["sections"].values():
        assert section["status"] == "out_of_time", section
        assert section["items"] and all(i["status"] == "out_of_time" for i in section["items"])


def test_device_check_kills_a_section_past_its_budget_and_goes_on(tmp_path):
    """A section still running at budget + grace is killed (with what it started), recorded as
    timeout in the JSON and the Markdown, and the next section runs."""
    out = tmp_path / "check"
    run = subprocess.run([PYTHON, "bench/device_check.py", "--cpu", "--tiny", "--out", str(out),
                          "--sections", "pruning,precision", "--budget-scale", "0.001", "--grace-s", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, env=without_ffcv(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    assert [s["status"] for s in report["sections"].values()] == ["timeout", "timeout"]
    assert "killed 0 s past its 1 s budget" in report["sections"]["pruning"]["error"]
    assert "## pruning: timeout" in (out / "device_check.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--cpu", "--tiny", "--sections", "throughput,bogus"], "--sections bogus: unknown; allowed: throughput,"),
    (["--cpu", "--tiny"], "--out DIR is required"),
    (["--cpu", "--out", "X", "--budget-scale", "0"], "--budget-scale must be > 0"),
    (["--cpu", "--out", "X", "--grace-s", "-1"], "--grace-s >= 0"),
])
def test_device_check_refuses_bad_input(tmp_path, argv, message):
    argv = [str(tmp_path / "x") if a == "X" else a for a in argv]
    run = subprocess.run([PYTHON, "bench/device_check.py", *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ the ffcv-free writer
def _decoded(path):
    from utils.data.beton import BetonFile
    beton = BetonFile(path)
    return [beton.decode_image(i) for i in range(beton.num_samples)], np.asarray(beton.metadata["label"])


@pytest.mark.parametrize("dataset", ["cifar10", "mnist"])
def test_numpy_writer_matches_ffcv_writer(tmp_path, dataset):
    """The same images written by ffcv's writer (utils.write_beton) and by bench/synthetic_beton.py
    decode to the same pixels and labels, and ffcv's own Reader parses ours the same way."""
    pytest.importorskip("ffcv")
    import synthetic_beton
    from ffcv.reader import Reader

    from utils.data import writer as wb
    from utils.data.records import validate_beton
    from utils.data.specs import get_dataset_spec
    spec = get_dataset_spec(dataset)
    source = synthetic_beton.random_images(spec, 37, seed=3)
    ours = synthetic_beton.write_beton_numpy(source, tmp_path / "ours.beton", spec, split="train")
    theirs = wb._write_one(source, tmp_path / "theirs.beton", spec, split="train", num_workers=1, page_size=None,
                           files_name=dataset, classes=None,
                           field_options=dict(max_resolution=None, jpeg_quality=90, compress_probability=0.0))
    assert validate_beton(ours, spec)["record"]["dataset"] == dataset
    (our_images, our_labels), (their_images, their_labels) = _decoded(ours), _decoded(theirs)
    np.testing.assert_array_equal(our_labels, their_labels)
    np.testing.assert_array_equal(our_labels, source.labels)
    for index, (a, b) in enumerate(zip(our_images, their_images)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, source.images[index])
    our_reader, their_reader = Reader(str(ours)), Reader(str(theirs))
    assert our_reader.num_samples == their_reader.num_samples == 37
    assert our_reader.metadata.dtype == their_reader.metadata.dtype
    np.testing.assert_array_equal(our_reader.metadata["f1"], their_reader.metadata["f1"])
    assert len(our_reader.alloc_table) == len(their_reader.alloc_table) == 37


def test_numpy_writer_jpeg_dataset_from_generated_jpegs(tmp_path):
    """ImageNet format from generated JPEGs: mixed JPEG and raw storage, longest side cut to
    max_resolution, every image decodes, the harness's validation takes the file."""
    import synthetic_beton

    from utils.data.beton import BetonFile
    from utils.data.records import validate_beton
    from utils.data.specs import get_dataset_spec
    train, test = synthetic_beton.synthetic_dataset("imagenet", tmp_path, train=24, test=6, imagenet_side=48)
    spec = get_dataset_spec("imagenet")
    assert validate_beton(train, spec)["num_samples"] == 24 and validate_beton(test, spec)["num_samples"] == 6
    beton = BetonFile(train)
    modes = set(int(m) for m in beton.metadata["image"]["mode"])
    assert modes == {0, 1}, modes                         # both JPEG and raw (compress probability 0.5)
    for index in range(beton.num_samples):
        image = beton.decode_image(index)
        assert image.ndim == 3 and image.shape[2] == 3 and 38 <= max(image.shape[:2]) <= 60


def test_numpy_writer_refuses_a_sample_of_the_wrong_shape(tmp_path):
    import synthetic_beton

    from utils.data.sources import ArraySource, DataError
    from utils.data.specs import get_dataset_spec
    spec = get_dataset_spec("mnist")
    source = ArraySource(np.zeros((3, 27, 27), dtype=np.uint8), np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match="sample 0 is"):
        synthetic_beton.write_beton_numpy(source, tmp_path / "bad.beton", spec, split="train")
    assert not list(tmp_path.iterdir())
