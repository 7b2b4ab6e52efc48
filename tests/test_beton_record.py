"""The write record (``NAME.beton.json``) that utils/data/writer.py puts next to each file,
and validate_beton's use of it: a file written for another dataset is refused (CIFAR-10
labels 0..9 fit CIFAR-100's range, so the file checks alone pass it), a file changed
since it was written is refused, a file without a record gets a one-line note."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.test_data import write_cifar10_tree
from utils.data import writer as wb
from utils.data.loaders import make_loader
from utils.data.records import file_sha256, record_path, validate_beton
from utils.data.sources import DataError
from utils.data.specs import get_dataset_spec

CIFAR10 = get_dataset_spec("cifar10")
CIFAR100 = get_dataset_spec("cifar100")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar_raw")
    train_x, train_y, test_x, test_y = write_cifar10_tree(root, per_batch=4, test=6, seed=2)
    out = tmp_path_factory.mktemp("cifar_beton")
    with pytest.warns(UserWarning, match="MD5"):
        train, test = wb.write_dataset("cifar10", root, out, num_workers=1)
    return dict(root=root, out=out, train=train, test=test, images={"train": train_x, "test": test_x},
                labels={"train": np.asarray(train_y), "test": np.asarray(test_y)})


def copy_of(cifar, tmp_path, split="train", record=True):
    path = tmp_path / f"copy_{split}.beton"
    shutil.copyfile(cifar[split], path)
    if record:
        shutil.copyfile(record_path(cifar[split]), record_path(path))
    return path


def test_writer_records_what_it_wrote(cifar):
    assert sorted(p.name for p in cifar["out"].iterdir()) == [
        "cifar10_test.beton", "cifar10_test.beton.json", "cifar10_train.beton", "cifar10_train.beton.json"]
    for split, count in (("train", 20), ("test", 6)):
        path = cifar[split]
        record = json.loads(open(record_path(path)).read())
        pixels = cifar["images"][split].reshape(-1, 3) / 255.0            # what was written, per channel
        mean, std = record.pop("mean"), record.pop("std")
        np.testing.assert_allclose(mean, pixels.mean(axis=0), atol=1e-6)
        np.testing.assert_allclose(std, pixels.std(axis=0), atol=1e-6)
        labels = cifar["labels"][split]
        assert record == {"format": "beton-write-record/3", "dataset": "cifar10", "name": "cifar10", "split": split,
                          "num_samples": count, "num_classes": 10, "classes": None, "size": [32, 32], "channels": 3,
                          "class_counts": np.bincount(labels, minlength=10).tolist(),
                          "written_from": {"root": str(cifar["root"]), "splits": None, "channels": None, "jpg": False,
                                           "max_resolution": None, "jpeg_quality": 90, "compress_probability": 0.0},
                          "statistics_images": count, "storage": "raw", "jpg_fraction": 0.0,
                          "file_size": path.stat().st_size, "sha256": file_sha256(path),
                          "beton_mtime_ns": path.stat().st_mtime_ns}
        record.update(mean=mean, std=std)
        summary = validate_beton(path, CIFAR10)
        assert summary["record"] == record and summary["note"] is None


def test_a_file_of_another_dataset_is_refused(cifar):
    with pytest.raises(DataError, match=r"written for cifar10 \(train split, 10 classes; see cifar10_train.beton.json"
                                        r"\), not for cifar100 \(100 classes\)") as info:
        validate_beton(cifar["train"], CIFAR100)
    assert "\n" not in str(info.value) and str(cifar["train"]) in str(info.value)
    with pytest.raises(DataError, match="written for cifar10"):
        make_loader(cifar["train"], CIFAR100, train=True, batch_size=4, num_workers=1, device="cpu", backend="torch")


def test_without_a_record_the_file_works_with_a_note(cifar, tmp_path):
    path = copy_of(cifar, tmp_path, record=False)
    summary = validate_beton(path, CIFAR100)          # what the checks of the file alone can see: it fits
    assert summary["record"] is None
    assert summary["note"].startswith(f"{path}: no write record (copy_train.beton.json)")
    assert "\n" not in summary["note"]
    make_loader(path, CIFAR10, train=True, batch_size=4, num_workers=1, device="cpu", backend="torch")


def test_a_file_changed_after_writing_is_refused(cifar, tmp_path):
    path = copy_of(cifar, tmp_path)
    validate_beton(path, CIFAR10)
    data = bytearray(path.read_bytes())
    data[-24 * 20 - 100] ^= 0xFF                       # one pixel byte, shortly before the allocation table
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match its write record.*SHA-256 differs"):
        validate_beton(path, CIFAR10)
    assert validate_beton(path, CIFAR10, verify_checksum=False)["record"]["dataset"] == "cifar10"
    # the test split under the train split's record: sample count and size differ (no hashing needed)
    shutil.copyfile(cifar["test"], path)
    with pytest.raises(DataError, match="6 samples, the record says 20.*rewrite it with utils/data/writer.py"):
        validate_beton(path, CIFAR10, verify_checksum=False)


def test_a_broken_record_is_refused(cifar, tmp_path):
    path = copy_of(cifar, tmp_path)
    with open(record_path(path), "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match="copy_train.beton.json: unreadable write record"):
        validate_beton(path, CIFAR10)
    with open(record_path(path), "w") as f:
        json.dump({"dataset": "cifar10"}, f)
    with pytest.raises(DataError, match="not a write record of utils/data/writer.py"):
        validate_beton(path, CIFAR10)


def test_rewriting_replaces_the_record_and_leaves_no_temporary_files(cifar, tmp_path):
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="MD5"):
        train, _ = wb.write_dataset("cifar10", cifar["root"], out, num_workers=1)
    with open(record_path(train), "w") as f:
        json.dump({"stale": True}, f)
    with pytest.warns(UserWarning, match="MD5"):
        wb.write_dataset("cifar10", cifar["root"], out, num_workers=1, overwrite=True)
    assert validate_beton(train, CIFAR10)["record"]["split"] == "train"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_a_record_of_the_first_format_is_still_read(cifar, tmp_path):
    """Files written before records held classes and statistics keep working."""
    path = copy_of(cifar, tmp_path)
    record = json.loads(open(record_path(path)).read())
    old = {k: record[k] for k in ("dataset", "split", "num_samples", "num_classes", "file_size", "sha256")}
    with open(record_path(path), "w") as f:
        json.dump({**old, "format": "beton-write-record/1", "image_shape": [32, 32, 3], "storage": "rgb_raw"}, f)
    assert validate_beton(path, CIFAR10)["record"]["format"] == "beton-write-record/1"
    with pytest.raises(DataError, match="written for cifar10"):
        validate_beton(path, CIFAR100)
