"""Fashion-MNIST (and MNIST) from their idx files as they lie on disk (utils/data/idx.py): Debian's flat
folder of .gz files, torchvision's FashionMNIST/raw/ layout, and an incomplete download refused in
one line.  The files here are tiny but in the real format (idx headers, gzip)."""
from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT
from utils.data import writer as wb
from utils.data.idx import FASHION_MNIST_CLASSES
from utils.data.loaders import make_loader
from utils.data.records import resolve_dataset_spec, validate_beton
from utils.data.sources import DataError

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
COUNTS = {"train": 20, "test": 10}


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file of uint8 values: magic (0, 0, 0x08, ndim), big-endian counts, the values."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split_files(folder: Path, *, gz: bool, seed: int = 0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = {}
    for split, (images_stem, labels_stem) in FILES.items():
        images = rng.integers(0, 256, size=(COUNTS[split], 28, 28), dtype=np.uint8)
        labels = (np.arange(COUNTS[split]) % 10).astype(np.uint8)
        for stem, array in ((images_stem, images), (labels_stem, labels)):
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array)))
            else:
                (folder / stem).write_bytes(idx_bytes(array))
        data[split] = (images, labels)
    return data


def read_back(path: Path, spec) -> tuple:
    loader = make_loader(path, spec, train=False, batch_size=64, num_workers=1, device="cpu", backend="torch")
    (images, labels), = list(loader.batches(0))
    pixels = (images[:, 0].numpy() * spec.std[0] + spec.mean[0]) * 255
    return np.round(pixels).astype(np.uint8), labels.numpy()


def test_debian_flat_gz_files_become_betons_with_their_record(tmp_path):
    debian = tmp_path / "usr/share/datasets/fashion-mnist"
    data = write_split_files(debian, gz=True)
    with pytest.warns(UserWarning, match="not the published files: train-images-idx3-ubyte.gz holds 20 images"):
        train, test = wb.write_dataset("fashion_mnist", debian, tmp_path / "out", num_workers=1)
    assert (train.name, test.name) == ("fashion_mnist_train.beton", "fashion_mnist_test.beton")
    spec = resolve_dataset_spec("fashion_mnist", train_path=train)
    for split, path in (("train", train), ("test", test)):
        summary = validate_beton(path, spec)
        record = json.loads(Path(f"{path}.json").read_text())
        assert record["classes"] == list(FASHION_MNIST_CLASSES) and record["classes"][0] == "T-shirt/top"
        assert record["size"] == [28, 28] and record["channels"] == 1 and record["num_samples"] == COUNTS[split]
        images, labels = data[split]
        assert record["mean"][0] == pytest.approx(images.mean() / 255, abs=1e-5)
        assert summary["num_samples"] == COUNTS[split]
        got_images, got_labels = read_back(path, spec)
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)


def test_torchvision_raw_layout_and_mnist(tmp_path):
    data = write_split_files(tmp_path / "FashionMNIST" / "raw", gz=False, seed=1)
    with pytest.warns(UserWarning, match="not the published files"):
        train, _ = wb.write_dataset("fashion_mnist", tmp_path, tmp_path / "out", num_workers=1)
    images, labels = read_back(train, resolve_dataset_spec("fashion_mnist", train_path=train))
    np.testing.assert_array_equal(images, data["train"][0])
    # MNIST reads the same layouts (MNIST/raw here) with its own class names
    write_split_files(tmp_path / "MNIST" / "raw", gz=True, seed=2)
    with pytest.warns(UserWarning):
        train, _ = wb.write_dataset("mnist", tmp_path, tmp_path / "out", num_workers=1)
    assert json.loads(Path(f"{train}.json").read_text())["classes"] == [str(d) for d in range(10)]


def write_beton_cli(root: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "utils.write_beton", "--dataset", "fashion_mnist", "--root", str(root),
                           "--out", str(out), "--num-workers", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("damage", ["gzip_cut", "short_payload", "missing"])
def test_an_incomplete_download_is_refused_in_one_line_naming_the_file(tmp_path, damage):
    root = tmp_path / "fashion-mnist"
    write_split_files(root, gz=True)
    victim = root / "train-images-idx3-ubyte.gz"
    if damage == "gzip_cut":          # the download stopped: the gzip stream ends early
        victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
        expected = "truncated (the gzip stream ends early)"
    elif damage == "short_payload":   # a whole gzip stream of a file cut short: fewer bytes than its header says
        content = gzip.decompress(victim.read_bytes())
        victim.write_bytes(gzip.compress(content[:-100]))
        expected = "truncated: its header says 20 x 28 x 28 values (15680 bytes), the file holds 15580"
    else:
        victim.unlink()
        expected = "train-images-idx3-ubyte[.gz] not found in"
    with pytest.raises(DataError, match=re.escape(expected)) as info:
        wb.write_dataset("fashion_mnist", root, tmp_path / "out", num_workers=1)
    assert "\n" not in str(info.value) and ("train-images-idx3-ubyte" in str(info.value))
    if damage == "gzip_cut":
        result = write_beton_cli(root, tmp_path / "out")
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(victim) in lines[0] and "truncated" in lines[0], result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_installed_debian_files_if_present():
    """The real package's files, when installed (make data-fashion): the headers say 60,000 and 10,000
    images of 28x28 and the content is the published one (no warning)."""
    root = Path("/usr/share/datasets/fashion-mnist")
    if not (root / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    import warnings

    from utils.data.idx import read_idx_split
    unusual = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source = read_idx_split("fashion_mnist", "test", root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz",
                                FASHION_MNIST_CLASSES, unusual)
    assert unusual == [] and source.images.shape == (10000, 28, 28, 1)
    assert np.bincount(source.labels).tolist() == [1000] * 10


def test_the_lenet_study_gives_controls_only_to_the_imp_runs(tmp_path):
    from utils.launch.sweep_spec import SweepError, parse_sweep
    sweep = parse_sweep(ROOT / "configs" / "sweeps" / "fashion_lenet_study.yaml")
    names = [run.name for run in sweep.runs]
    assert len(names) == 12
    controls = [run for run in sweep.runs if run.source is not None]
    assert len(controls) == 6 and all(run.source.values["prune.criterion"] == "magnitude" for run in controls)
    assert sum(run.values.get("prune.criterion") == "random" and run.source is None for run in sweep.runs) == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {ROOT / 'configs' / 'lenet_300_100_imp_fashion.yaml'}\nzip: {{experiment.seed: [0]}}\n"
                   "controls: {shuffle: {only_for: {prune.criterion: magnitude}}}\n")
    with pytest.raises(SweepError, match="only_for: prune.criterion is not a grid or zip key"):
        parse_sweep(bad)
