"""One's own image folder: ``write_beton --dataset folder`` (PNG trees written here, grey and RGB,
28x28, 10 classes), its write record, ``dataset.name: folder`` runs of the harness with each
loader, ``dataset.augment``, and the refusals (one line, exit 2, nothing written)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import harness_params as hp
from tests.helpers import digits_config, run_harness, write_config
from utils.data import writer as wb
from utils.data.loaders import make_loader
from utils.data.records import read_record, record_path, resolve_dataset_spec, validate_beton
from utils.data.sources import DataError
from utils.data.specs import get_dataset_spec, with_augment

CLASSES = [f"class_{c}" for c in "abcdefghij"]          # 10 classes, sorted = label order
SIZE = 28


def write_png_tree(root: Path, *, grey: bool, per_class=(3, 1), splits=("train", "test"), seed=0):
    """root/{train,test}/<class>/*.png with random pixels; returns {split: (images (N, H, W, C), labels)}
    in the order the writer lists them (class folders sorted, files sorted)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in zip(splits, per_class):
        images, labels = [], []
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                shape = (SIZE, SIZE) if grey else (SIZE, SIZE, 3)
                # classes differ in brightness, so a network can learn them in an epoch or two
                pixels = np.clip(rng.normal(20 + 22 * label, 30, size=shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
                images.append(pixels.reshape(SIZE, SIZE, -1))
                labels.append(label)
        written[split] = (np.stack(images), np.array(labels))
    return written


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    root = tmp_path_factory.mktemp("grey_tree")
    written = write_png_tree(root, grey=True, per_class=(8, 2))
    out = tmp_path_factory.mktemp("grey_beton")
    train, test = wb.write_dataset("folder", root, out, files_name="greys", num_workers=1)
    return dict(root=root, out=out, train=train, test=test, written=written)


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    root = tmp_path_factory.mktemp("rgb_tree")
    written = write_png_tree(root, grey=False, per_class=(4, 1), splits=("train", "val"), seed=1)
    out = tmp_path_factory.mktemp("rgb_beton")
    train, test = wb.write_dataset("folder", root, out, files_name="colours", num_workers=1)
    return dict(root=root, out=out, train=train, test=test, written=written)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- writing and the record
@pytest.mark.parametrize("which", ["grey", "rgb"])
def test_record_holds_what_was_written(which, request):
    data = request.getfixturevalue(which)
    assert data["train"].name == ("greys_train.beton" if which == "grey" else "colours_train.beton")
    channels = 1 if which == "grey" else 3
    for split, path, source_split in (("train", data["train"], "train"),
                                      ("test", data["test"], "test" if which == "grey" else "val")):
        record = read_record(path)
        images, labels = data["written"][source_split]
        pixels = images.reshape(-1, channels) / 255.0
        assert record["dataset"] == "folder" and record["name"] == data["train"].name.split("_")[0]
        assert record["split"] == split and record["classes"] == CLASSES and record["num_classes"] == 10
        assert record["num_samples"] == len(labels) and record["size"] == [SIZE, SIZE]
        assert record["channels"] == channels and record["storage"] == "raw"
        np.testing.assert_allclose(record["mean"], pixels.mean(axis=0), atol=1e-6)
        np.testing.assert_allclose(record["std"], pixels.std(axis=0), atol=1e-6)
        # the pixels and labels themselves, in the writer's order
        loader = make_loader(path, resolve_dataset_spec("folder", train_path=data["train"]), train=False,
                             batch_size=len(labels), num_workers=1, device="cpu", backend="torch")
        (x, y), = list(loader.batches(0))
        np.testing.assert_array_equal(y.numpy(), labels)
        spec = loader.spec
        restored = (x * torch.tensor(spec.std).view(1, -1, 1, 1) * 255
                    + torch.tensor(spec.mean).view(1, -1, 1, 1) * 255).round().permute(0, 2, 3, 1)
        np.testing.assert_array_equal(restored.numpy().astype(np.uint8), images)


def test_spec_comes_from_the_training_record(grey):
    spec = resolve_dataset_spec("folder", train_path=grey["train"])
    record = read_record(grey["train"])
    assert (spec.resolution, spec.channels, spec.num_classes, spec.storage) == (SIZE, 1, 10, "gray")
    assert spec.classes == tuple(CLASSES) and list(spec.mean) == record["mean"] and list(spec.std) == record["std"]
    assert spec.train_augment == "none"                           # the folder default: nothing is assumed
    assert resolve_dataset_spec("folder", train_path=grey["train"], augment="flip_crop").train_augment == "flip_crop"
    validate_beton(grey["test"], spec)


def test_jpeg_storage_is_recorded_as_written(tmp_path, rgb):
    train, _ = wb.write_dataset("folder", rgb["root"], tmp_path, files_name="jpg", storage="jpg", jpeg_quality=95,
                                num_workers=1)
    record = read_record(train)
    assert record["storage"] == "jpg" and record["jpg_fraction"] == 1.0
    spec = resolve_dataset_spec("folder", train_path=train)
    assert spec.storage == "rgb_jpg"
    loader = make_loader(train, spec, train=False, batch_size=8, num_workers=1, device="cpu", backend="memory")
    x, _ = next(iter(loader.batches(0)))
    assert x.shape == (8, 3, SIZE, SIZE)


def test_split_folders_by_name(tmp_path):
    write_png_tree(tmp_path / "tree", grey=True, per_class=(2, 1), splits=("learn", "check"))
    train, test = wb.write_dataset("folder", tmp_path / "tree", tmp_path / "out", files_name="x", num_workers=1,
                                   splits=wb.parse_splits("train=learn,test=check"))
    assert read_record(train)["num_samples"] == 20 and read_record(test)["num_samples"] == 10


# --------------------------------------------------------------------------- the three loaders agree
def test_the_three_loaders_give_the_same_augmented_batches(grey):
    """flip_crop on a folder: the same (seed, epoch, sample) numbers in ffcv, torch and memory."""
    spec = resolve_dataset_spec("folder", train_path=grey["train"], augment="flip_crop")
    batches = {}
    for backend in ("torch", "memory", "ffcv"):
        loader = make_loader(grey["train"], spec, train=True, batch_size=16, num_workers=1, device="cpu", seed=4,
                             backend=backend)
        batches[backend] = [(x.clone(), y.clone()) for x, y in loader.batches(1)]
    assert len(batches["torch"]) == 5
    for backend in ("memory", "ffcv"):
        for (x, y), (tx, ty) in zip(batches[backend], batches["torch"]):
            assert torch.equal(y, ty) and torch.equal(x, tx), backend
    # and augmentation did happen: a training batch is not the stored images in the same order
    plain = make_loader(grey["train"], resolve_dataset_spec("folder", train_path=grey["train"]), train=True,
                        batch_size=16, num_workers=1, device="cpu", seed=4, backend="torch")
    assert not torch.equal(next(iter(plain.batches(1)))[0], batches["torch"][0][0])


# --------------------------------------------------------------------------- the harness on a folder
def folder_config(tmp_path, data, **overrides):
    tree = digits_config(tmp_path, tmp_path / "runs", **{"prune.levels": 2, "training.epochs": 1, **overrides})
    tree["dataset"].update(name=overrides.get("dataset.name", "folder"), train_path=str(data["train"]),
                           test_path=str(data["test"]), batch_size=16)
    return write_config(tmp_path / "c.yaml", tree)


@pytest.mark.parametrize("loader,augment", [("torch", "default"), ("memory", "flip_crop")])
def test_harness_trains_on_a_grey_folder(tmp_path, grey, loader, augment):
    config = folder_config(tmp_path, grey, **{"dataset.loader": loader, "dataset.augment": augment})
    result = run_harness(config)
    assert result.returncode == 0, result.stderr[-2000:]
    root = tmp_path / "runs" / "exp"
    assert [row["level"] for row in read_csv(root / "levels.csv")] == ["0", "1"]
    layers = {row["layer"]: int(row["numel"]) for row in read_csv(root / "layers.csv") if row["level"] == "0"}
    # LeNet-300-100 built for the record's 28x28x1 images and its 10 classes: no class count in the config
    assert layers == {"1": 28 * 28 * 300, "3": 300 * 100, "5": 100 * 10}


def test_harness_trains_a_user_network_on_an_rgb_folder_with_resized_crops(tmp_path, rgb):
    config = folder_config(tmp_path, rgb, **{"dataset.loader": "torch", "dataset.augment": "rrc",
                                             "model.name": "examples.custom:build_net"})
    result = run_harness(config)
    assert result.returncode == 0, result.stderr[-2000:]
    layers = {row["layer"]: int(row["numel"]) for row in read_csv(tmp_path / "runs" / "exp" / "layers.csv")}
    assert layers["0"] == 16 * 3 * 3 * 3 and layers["7"] == 64 * 10      # RGB in, 10 classes out


# --------------------------------------------------------------------------- refusals
def refused(call) -> str:
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_writer_refusals_are_one_line_and_write_nothing(tmp_path, grey):
    from PIL import Image
    out = tmp_path / "out"
    write = lambda root, **kw: wb.write_dataset("folder", root, out, num_workers=1, **kw)  # noqa: E731
    assert "needs --name NAME" in refused(lambda: write(grey["root"]))
    assert "--storage jpg: greyscale images are stored raw" in refused(lambda: write(grey["root"], files_name="g",
                                                                                   storage="jpg"))
    assert "max_resolution: folder images are stored at their own size" in refused(
        lambda: write(grey["root"], files_name="g", max_resolution=64))
    assert "--splits: only for image-folder datasets" in refused(
        lambda: wb.write_dataset("cifar10", grey["root"], out, splits={"train": "a", "test": "b"}))
    assert "--storage jpg: only for datasets stored as the writer is told" in refused(
        lambda: wb.write_dataset("digits", None, out, storage="jpg"))
    assert "give both split folders as train=DIR,test=DIR" in refused(lambda: wb.parse_splits("train=a"))
    assert "--name 'a/b'" in refused(lambda: write(grey["root"], files_name="a/b"))
    # images of another size, and a non-square tree
    odd = tmp_path / "odd"
    write_png_tree(odd, grey=True, per_class=(1, 1))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(odd / "train" / CLASSES[3] / "big.png")
    message = refused(lambda: write(odd, files_name="odd"))
    assert "big.png: image is 32x32" in message and "images of one size" in message
    flat = tmp_path / "flat"
    for split in ("train", "test"):
        (flat / split / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((20, 30), np.uint8)).save(flat / split / "a" / "x.png")
    assert "image is 30x20 (width x height)" in refused(lambda: write(flat, files_name="flat"))
    lonely = tmp_path / "lonely"
    write_png_tree(lonely, grey=True, per_class=(1,), splits=("train",))
    assert "no test split folder (test or val)" in refused(lambda: write(lonely, files_name="l"))
    assert not out.exists() or not any(out.iterdir())


def test_cli_writes_a_folder_and_refuses_in_one_line(tmp_path, grey, capsys):
    args = ["--dataset", "folder", "--root", str(grey["root"]), "--out", str(tmp_path / "out"), "--num-workers", "1"]
    assert wb.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs --name NAME" in err and not (tmp_path / "out").exists()
    assert wb.main(args + ["--name", "mine", "--splits", "train=train,test=test"]) == 0
    assert "80 samples, labels 0..9, 10 classes, 28x28, 1 channel(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "mine_test.beton", "mine_test.beton.json", "mine_train.beton", "mine_train.beton.json"]


def test_run_refusals_are_one_line(tmp_path, grey, rgb):
    import shutil
    spec = resolve_dataset_spec("folder", train_path=grey["train"])
    # rrc on grey images, flips on digits
    assert "dataset.augment=rrc does not suit dataset.name=folder" in refused(lambda: with_augment(spec, "rrc"))
    message = refused(lambda: with_augment(get_dataset_spec("digits"), "flip_crop"))
    assert "a mirrored digits image is another class" in message and "allowed: default, none, crop" in message
    assert "images vary in size; allowed: default, rrc" in refused(lambda: with_augment(get_dataset_spec("imagenet"), "flip_crop"))
    # a training file without its record, or one written for another dataset
    bare = tmp_path / "bare_train.beton"
    shutil.copyfile(grey["train"], bare)
    message = refused(lambda: resolve_dataset_spec("folder", train_path=bare))
    assert "reads its classes, image size, channels and normalisation from the file's write record" in message
    # a test file of other classes
    other = tmp_path / "other"
    write_png_tree(other, grey=True, per_class=(1, 1))
    (other / "test" / CLASSES[0]).rename(other / "test" / "zebra")
    (other / "train" / CLASSES[0]).rename(other / "train" / "zebra")
    _, other_test = wb.write_dataset("folder", other, tmp_path / "o", files_name="other", num_workers=1)
    assert "class 0 is 'class_b', not 'class_a'" in refused(lambda: validate_beton(other_test, spec))
    # the harness says the same in one line, exit 2, nothing written
    config = folder_config(tmp_path, {"train": grey["train"], "test": other_test})
    result = run_harness(config)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "differ from the training file's" in result.stderr and not (tmp_path / "runs").exists()
    # config-time refusals
    tree = json.loads(json.dumps(digits_config(tmp_path, tmp_path / "runs")))
    tree["dataset"]["augment"] = "flip_crop"
    with pytest.raises(hp.ConfigError, match="dataset.augment=flip_crop does not suit dataset.name=digits"):
        hp.resolve(str(write_config(tmp_path / "d.yaml", tree)), {})
    tree["dataset"].update(augment="default", name="no_such_module:DATA")
    with pytest.raises(hp.ConfigError, match="dataset.name: no_such_module:DATA: cannot import module"):
        hp.resolve(str(write_config(tmp_path / "d.yaml", tree)), {})
    assert not (tmp_path / "runs").exists() and record_path(other_test).endswith(".json")


# --------------------------------------------------------------------------- an outside dataset
def recipe_module() -> str:
    """The dataset module of the docs' recipe (docs/extending*.md), as the docs show it."""
    import re
    for doc in sorted((Path(__file__).resolve().parents[1] / "docs").glob("extending*.md")):
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S):
            if "STRIPES = DatasetSpec(" in block:
                return block
    raise AssertionError("no STRIPES recipe in docs/extending*.md")


def test_an_outside_module_adds_a_dataset_and_a_run_uses_it(tmp_path, monkeypatch, capsys):
    code = tmp_path / "code"
    code.mkdir()
    (code / "stripes.py").write_text(recipe_module())
    monkeypatch.syspath_prepend(str(code))
    assert wb.main(["--dataset", "stripes:STRIPES", "--out", str(tmp_path / "data"), "--num-workers", "1"]) == 0
    assert "256 samples, labels 0..1, 2 classes, 12x12, 1 channel(s)" in capsys.readouterr().out
    train, test = tmp_path / "data" / "stripes_train.beton", tmp_path / "data" / "stripes_test.beton"
    record = read_record(train)
    assert record["dataset"] == "stripes" and record["classes"] == ["horizontal", "vertical"]
    spec = get_dataset_spec("stripes:STRIPES")
    np.testing.assert_allclose(record["mean"], spec.mean, atol=0.01)     # the recipe's numbers are the data's
    np.testing.assert_allclose(record["std"], spec.std, atol=0.01)
    config = folder_config(tmp_path, {"train": train, "test": test}, **{"dataset.name": "stripes:STRIPES",
                                                                        "training.epochs": 2})
    result = run_harness(config, env={"PYTHONPATH": str(code)})
    assert result.returncode == 0, result.stderr[-2000:]
    levels = read_csv(tmp_path / "runs" / "exp" / "levels.csv")
    assert len(levels) == 2 and float(levels[0]["final_test_acc"]) > 90      # stripes are easy to tell apart
    layers = {row["layer"]: int(row["numel"]) for row in read_csv(tmp_path / "runs" / "exp" / "layers.csv")}
    assert layers["1"] == 12 * 12 * 300 and layers["5"] == 100 * 2
