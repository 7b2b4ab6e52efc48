"""utils/data/specs.py and utils/data/writer.py on small files written here in the real
on-disk formats (CIFAR pickle batches, MNIST idx, an SVHN .mat, an ImageFolder tree) and
on the bundled digits.

Two FFCV Loaders in the whole file (numba compiles each pipeline once, seconds each):
CIFAR-10 training (flip + translate, channels_last, rank 1 of 2) and digits evaluation
(compared bit for bit with the torch back-end).
"""
from __future__ import annotations

import gzip
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.data import beton as beton_format
from utils.data import loaders
from utils.data import order as data_order
from utils.data import specs as data_specs
from utils.data import writer as wb
from utils.data.beton import inspect_beton
from utils.data.loaders import make_loader
from utils.data.order import epoch_order
from utils.data.records import validate_beton
from utils.data.sources import DataError
from utils.data.specs import get_dataset_spec

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = get_dataset_spec("cifar10")
DIGITS = get_dataset_spec("digits")


# --------------------------------------------------------------------------- writers of real formats
def write_cifar10_tree(root: Path, per_batch: int = 8, test: int = 12, seed: int = 0):
    """cifar-10-batches-py with the real dict keys; returns (train images HWC, labels, test images, labels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    splits = {}
    for name, count in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=count)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(count)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        splits[name] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels))
    train = [splits[f"data_batch_{i}"] for i in range(1, 6)]
    return (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
            splits["test_batch"][0], splits["test_batch"][1])


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(payload)


def unnormalize(images: torch.Tensor, spec) -> np.ndarray:
    """Normalized float NCHW -> uint8 NHWC (exact up to float rounding)."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(spec.std).view(1, -1, 1, 1) * 255
    pixels = (images.cpu() * std + mean).round()
    assert pixels.min() >= 0 and pixels.max() <= 255
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def augmentation_of(out: np.ndarray, original: np.ndarray, pad: int, flips: bool):
    """(dy, dx, flipped) such that ``out`` = translate(flip?(original)) with zero fill, else None."""
    h, w = original.shape[:2]
    for flipped in ((False, True) if flips else (False,)):
        source = original[:, ::-1] if flipped else original
        padded = np.zeros((h + 2 * pad, w + 2 * pad, original.shape[2]), np.uint8)
        padded[pad:pad + h, pad:pad + w] = source
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                if np.array_equal(padded[dy:dy + h, dx:dx + w], out):
                    return dy, dx, flipped
    return None


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar_raw")
    train_x, train_y, test_x, test_y = write_cifar10_tree(root)
    out = tmp_path_factory.mktemp("cifar_beton")
    with pytest.warns(UserWarning, match="MD5"):
        train, test = wb.write_dataset("cifar10", root, out, num_workers=1)
    return dict(root=root, out=out, train=train, test=test, train_x=train_x, train_y=train_y,
                test_x=test_x, test_y=test_y)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return wb.ensure_digits(out)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist_raw")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    data = {}
    for split, count, suffix in (("train", 20, ".gz"), ("t10k", 10, "")):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count).astype(np.uint8)
        write_idx(raw / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte{suffix}", labels)
        data[split] = (images, labels)
    out = tmp_path_factory.mktemp("mnist_beton")
    train, test = wb.write_dataset("mnist", root, out, num_workers=1)
    return dict(train=train, test=test, data=data)


@pytest.fixture(scope="module")
def ffcv_cifar_train(cifar):
    """FFCV loader 1 of 2: CIFAR-10 training, rank 1 of 2, global batch 8, channels_last."""
    return make_loader(cifar["train"], CIFAR10, train=True, batch_size=8, num_workers=1, device="cpu",
                       rank=1, world_size=2, seed=5, channels_last=True, backend="ffcv")


# --------------------------------------------------------------------------- registry
def test_registry_specs_are_consistent():
    assert {"cifar10", "cifar100", "svhn", "mnist", "fashion_mnist", "imagenet", "digits", "folder"} <= set(data_specs.DATASETS)
    for spec in data_specs.DATASETS.values():
        assert spec.source is not None and callable(spec.source.read)     # the writer reads every entry
        data_specs.get_augment_policy(spec.train_augment)
        if spec.from_record:                                              # folder: completed from its record
            assert spec.channels == 0 and spec.mean == ()
            continue
        assert len(spec.mean) == len(spec.std) == spec.channels
        data_specs.get_storage(spec.storage)
    assert data_specs.AUGMENTATIONS["flip_crop"] == data_specs.AugmentPolicy(False, True, 4)
    assert not data_specs.AUGMENTATIONS[get_dataset_spec("svhn").train_augment].horizontal_flip
    assert (DIGITS.resolution, DIGITS.channels, DIGITS.num_classes) == (8, 1, 10)
    # whether a mirror image keeps its class lives on the entry (test-time flip, flip augmentations)
    assert {n for n, s in data_specs.DATASETS.items() if s.flip_changes_labels} >= {"digits", "mnist", "svhn"}
    assert not get_dataset_spec("cifar10").flip_changes_labels


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match="valid names: cifar10, cifar100, digits, fashion_mnist") as info:
        get_dataset_spec("cifar11")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="unknown loader back-end 'jax'"):
        loaders.get_loader_backend("jax")


def test_outside_dataset_names_are_checked_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(
        "from utils.data.specs import DatasetSpec, get_dataset_spec\n"
        "NOT_A_SPEC = 3\n"
        "COPY = get_dataset_spec('digits')\n"
        "CLASH = DatasetSpec('cifar10', 8, 1, 2, (0.5,), (0.5,), 'none', 'gray')\n"
        "OWN = DatasetSpec('my_own', 8, 1, 2, (0.5,), (0.5,), 'none', 'gray')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(data_specs, "DATASETS", dict(data_specs.DATASETS))          # registrations end with the test
    cases = {"no_such_module:X": "cannot import module 'no_such_module'",
             "my_data:MISSING": "module 'my_data' has no attribute 'MISSING'",
             "my_data:NOT_A_SPEC": "is a int, not a utils.data.specs.DatasetSpec",
             "my_data:CLASH": "is named 'cifar10', the name of another registered dataset"}
    for name, message in cases.items():
        with pytest.raises(DataError, match=message) as info:
            get_dataset_spec(name)
        assert "\n" not in str(info.value)
    assert get_dataset_spec("my_data:COPY") is get_dataset_spec("digits")
    own = get_dataset_spec("my_data:OWN")
    assert own.name == "my_own" and get_dataset_spec("my_own") is own and "my_own" in data_specs.dataset_names()


def test_config_takes_its_names_from_the_registries(tmp_path, monkeypatch):
    """dataset.name, dataset.loader and dataset.augment accept what the registries hold."""
    import yaml

    import harness_params as hp
    tree = {"model": {"name": "lenet_300_100"}, "experiment": {"name": "x"}, "prune": {"levels": 2},
            "dataset": {"name": "digits", "train_path": "a.beton", "test_path": "b.beton", "loader": "mine"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(hp.ConfigError, match="dataset.loader"):
        hp.resolve(str(path), {})
    monkeypatch.setitem(loaders.LOADER_BACKENDS, "mine", loaders.TorchBetonLoader)
    assert hp.resolve(str(path), {})["dataset.loader"] == "mine"
    for augment in data_specs.augment_names():
        allowed = augment in ("default", "none", "crop")                   # digits: no flips, no resized crops
        if allowed:
            assert hp.resolve(str(path), {"dataset.augment": augment})["dataset.augment"] == augment
        else:
            with pytest.raises(hp.ConfigError, match=f"dataset.augment={augment} does not suit dataset.name=digits"):
                hp.resolve(str(path), {"dataset.augment": augment})
    help_text = hp.help_text()
    assert all(name in help_text for name in data_specs.dataset_names())


# --------------------------------------------------------------------------- epoch_order
def test_epoch_order_matches_its_definition():
    n, g = 103, 10
    order = epoch_order(n, seed=3, epoch=7, rank=0, world_size=1, global_batch_size=g)
    perm = np.random.default_rng([3, 7]).permutation(n)
    np.testing.assert_array_equal(order, perm[:100])
    assert not np.array_equal(order, epoch_order(n, seed=3, epoch=8, rank=0, world_size=1, global_batch_size=g))
    np.testing.assert_array_equal(epoch_order(n, seed=3, epoch=7, rank=0, world_size=1, global_batch_size=g,
                                              shuffle=False), np.arange(100))


@pytest.mark.parametrize("world_size", [2, 5])
def test_epoch_order_same_global_batches_for_any_world_size(world_size):
    n, g = 53, 10
    single = epoch_order(n, seed=1, epoch=2, rank=0, world_size=1, global_batch_size=g).reshape(-1, g)
    shards = [epoch_order(n, seed=1, epoch=2, rank=r, world_size=world_size, global_batch_size=g)
              .reshape(-1, g // world_size) for r in range(world_size)]
    assert single.shape == (5, g)
    rebuilt = np.concatenate(shards, axis=1)        # batch b = rank 0's chunk, rank 1's chunk, ...
    np.testing.assert_array_equal(rebuilt, single)


def test_epoch_order_start_batch_skips_exactly():
    full = epoch_order(64, seed=0, epoch=1, rank=1, world_size=2, global_batch_size=8)
    rest = epoch_order(64, seed=0, epoch=1, rank=1, world_size=2, global_batch_size=8, start_batch=3)
    np.testing.assert_array_equal(rest, full[3 * 4:])
    assert len(epoch_order(64, seed=0, epoch=1, rank=1, world_size=2, global_batch_size=8, start_batch=8)) == 0


@pytest.mark.parametrize("n,world_size,g", [(10, 4, 4), (37, 3, 6), (2, 4, 4)])
def test_eval_order_covers_every_sample_once_in_contiguous_parts(n, world_size, g):
    parts = [epoch_order(n, seed=0, epoch=0, rank=r, world_size=world_size, global_batch_size=g,
                         shuffle=False, drop_last=False) for r in range(world_size)]
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(n))
    for r, part in enumerate(parts):
        assert data_order.batches_per_epoch(n, rank=r, world_size=world_size, global_batch_size=g, drop_last=False) \
            == -(-len(part) // (g // world_size))
    later = epoch_order(n, seed=0, epoch=0, rank=0, world_size=world_size, global_batch_size=g,
                        shuffle=False, drop_last=False, start_batch=1)
    np.testing.assert_array_equal(later, parts[0][g // world_size:])


def test_epoch_order_refuses_bad_arguments():
    with pytest.raises(DataError, match="global batch size 10 is not divisible by world_size=4"):
        epoch_order(100, seed=0, epoch=0, rank=0, world_size=4, global_batch_size=10)
    with pytest.raises(DataError, match="rank=2 must be < world_size=2"):
        epoch_order(100, seed=0, epoch=0, rank=2, world_size=2, global_batch_size=10)
    with pytest.raises(DataError, match="seed=-1"):
        epoch_order(100, seed=-1, epoch=0, rank=0, world_size=1, global_batch_size=10)


# --------------------------------------------------------------------------- CIFAR: writing and the torch back-end
def test_cifar_beton_holds_the_pickled_images(cifar):
    summary = validate_beton(cifar["train"], CIFAR10)
    assert summary["num_samples"] == 40 and summary["image_shape"] == (32, 32, 3)
    assert summary["jpg_fraction"] == 0.0
    loader = make_loader(cifar["test"], CIFAR10, train=False, batch_size=5, num_workers=1, device="cpu",
                         backend="torch")
    assert len(loader) == 3 and loader.batch_size == 5
    batches = list(loader.batches(0))
    assert [len(y) for _, y in batches] == [5, 5, 2]
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert images.dtype == torch.float32 and labels.dtype == torch.int64 and images.shape == (12, 3, 32, 32)
    np.testing.assert_array_equal(unnormalize(images, CIFAR10), cifar["test_x"])   # channel order, layout
    np.testing.assert_array_equal(labels.numpy(), cifar["test_y"])
    # normalization: (pixel/255 - mean) / std, per channel
    expected = (torch.from_numpy(cifar["test_x"]).permute(0, 3, 1, 2).float() / 255
                - torch.tensor(CIFAR10.mean).view(1, 3, 1, 1)) / torch.tensor(CIFAR10.std).view(1, 3, 1, 1)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)


def test_torch_backend_training_augmentation(cifar):
    def loader(**kwargs):
        args = dict(train=True, batch_size=8, num_workers=1, device="cpu", seed=11, backend="torch")
        return make_loader(cifar["train"], CIFAR10, **{**args, **kwargs})

    single = loader(channels_last=True)
    assert len(single) == 5
    first = list(single.batches(0))
    images, labels = first[0]
    assert images.shape == (8, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)
    order = single.order(0)
    # each image is a flip/translate (pad 4, zero fill) of its original; both flips occur
    outs = np.concatenate([unnormalize(x, CIFAR10) for x, _ in first])
    found = [augmentation_of(out, cifar["train_x"][i], 4, True) for out, i in zip(outs, order)]
    assert all(f is not None for f in found)
    assert {f[2] for f in found} == {False, True} and len({f[:2] for f in found}) > 5
    np.testing.assert_array_equal(torch.cat([y for _, y in first]).numpy(), cifar["train_y"][order])
    # deterministic: same seed and epoch -> same tensors; another epoch -> other augmentations
    again = list(loader(channels_last=True).batches(0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    other_epoch = torch.cat([x for x, _ in single.batches(1)])
    assert not torch.equal(torch.cat([x for x, _ in first]), other_epoch)
    # augmentation depends on the sample, not on rank / world size / start_batch
    halves = [list(loader(rank=r, world_size=2).batches(0, start_batch=2)) for r in (0, 1)]
    for b, ((x0, y0), (x1, y1)) in enumerate(zip(*halves)):
        torch.testing.assert_close(torch.cat([x0, x1]), first[b + 2][0], rtol=0, atol=0)
        assert torch.equal(torch.cat([y0, y1]), first[b + 2][1])


def test_resolution_override_only_for_resized_crops(cifar):
    make_loader(cifar["test"], CIFAR10, train=False, batch_size=4, num_workers=1, device="cpu",
                backend="torch", resolution=32)
    with pytest.raises(DataError, match="resolution=24: cifar10 images are used at their stored size 32x32"):
        make_loader(cifar["test"], CIFAR10, train=False, batch_size=4, num_workers=1, device="cpu",
                    backend="torch", resolution=24)


def test_start_batch_past_the_end_is_refused(cifar):
    loader = make_loader(cifar["train"], CIFAR10, train=True, batch_size=8, num_workers=1, device="cpu",
                         backend="torch")
    assert list(loader.batches(0, start_batch=5)) == []
    with pytest.raises(DataError, match="start_batch=6 is past the end of the epoch"):
        loader.batches(0, start_batch=6)


# --------------------------------------------------------------------------- the ffcv back-end
def test_ffcv_training_loader_follows_epoch_order(cifar, ffcv_cifar_train):
    loader = ffcv_cifar_train
    assert (len(loader), loader.batch_size, loader.num_samples) == (5, 4, 40)
    for epoch, start_batch in ((0, 0), (3, 0), (3, 2)):
        batches = list(loader.batches(epoch, start_batch))
        order = epoch_order(40, seed=5, epoch=epoch, rank=1, world_size=2, global_batch_size=8,
                            start_batch=start_batch)
        assert len(batches) == 5 - start_batch
        labels = torch.cat([y for _, y in batches])
        assert labels.dtype == torch.int64
        np.testing.assert_array_equal(labels.numpy(), cifar["train_y"][order])
        for images, _ in batches:
            assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
            assert images.is_contiguous(memory_format=torch.channels_last)
        outs = np.concatenate([unnormalize(x, CIFAR10) for x, _ in batches])
        found = [augmentation_of(out, cifar["train_x"][i], 4, True) for out, i in zip(outs, order)]
        assert all(f is not None for f in found), "ffcv output is not a flip/translate of the stored image"


def test_ffcv_loader_survives_an_early_break_and_keeps_torch_threads(ffcv_cifar_train):
    threads = torch.get_num_threads()
    for index, _ in enumerate(ffcv_cifar_train.batches(1)):
        if index == 1:
            break
    assert len(list(ffcv_cifar_train.batches(2))) == 5
    assert torch.get_num_threads() == threads


def test_ffcv_and_torch_backends_give_identical_eval_batches(digits):
    """FFCV loader 2 of 2 (gray NDArray field, partial last batch, rank 1 of 2)."""
    _, test = digits
    args = dict(train=False, batch_size=64, num_workers=1, device="cpu", rank=1, world_size=2, channels_last=True)
    ffcv_loader = make_loader(test, DIGITS, backend="ffcv", **args)
    torch_loader = make_loader(test, DIGITS, backend="torch", **args)
    assert len(ffcv_loader) == len(torch_loader) == 6         # 180 of 360 samples, 32 per batch
    for start_batch in (0, 4):
        pairs = list(zip(ffcv_loader.batches(0, start_batch), torch_loader.batches(0, start_batch)))
        assert len(pairs) == 6 - start_batch
        for (fx, fy), (tx, ty) in pairs:
            assert fx.shape[1:] == (1, 8, 8) and fx.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(fx, tx) and torch.equal(fy, ty)
        assert len(pairs[-1][0][1]) == 180 - 32 * 5


# --------------------------------------------------------------------------- other formats
def test_digits_split_and_statistics(digits):
    train, test = digits
    assert inspect_beton(train)["num_samples"] == 1437 and inspect_beton(test)["num_samples"] == 360
    loader = make_loader(train, DIGITS, train=False, batch_size=1437, num_workers=1, device="cpu", backend="torch")
    (images, labels), = list(loader.batches(0))
    assert images.shape == (1437, 1, 8, 8)
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05
    assert np.bincount(labels.numpy()).min() >= 139                 # stratified
    assert wb.ensure_digits(train.parent) == (train, test)           # present: not rewritten


def test_mnist_idx_files_plain_and_gzip(mnist):
    spec = get_dataset_spec("mnist")
    for split, path in (("train", mnist["train"]), ("t10k", mnist["test"])):
        images, labels = mnist["data"][split]
        summary = validate_beton(path, spec)
        assert summary["image_shape"] == (28, 28, 1) and summary["num_samples"] == len(labels)
        loader = make_loader(path, spec, train=False, batch_size=len(labels), num_workers=1, device="cpu",
                             backend="torch")
        (x, y), = list(loader.batches(0))
        assert x.shape == (len(labels), 1, 28, 28)
        np.testing.assert_array_equal(unnormalize(x, spec)[..., 0], images)
        np.testing.assert_array_equal(y.numpy(), labels)


def test_svhn_mat_labels_and_translate_without_flip(tmp_path):
    import scipy.io
    rng = np.random.default_rng(2)
    train_x = rng.integers(0, 256, size=(32, 32, 3, 12), dtype=np.uint8)
    train_y = np.array([10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1], dtype=np.uint8).reshape(-1, 1)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": train_x, "y": train_y})
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": train_x[..., :4], "y": train_y[:4]})
    spec = get_dataset_spec("svhn")
    with pytest.warns(UserWarning, match="MD5"):
        train, _ = wb.write_dataset("svhn", tmp_path, tmp_path / "out", num_workers=1)
    loader = make_loader(train, spec, train=True, batch_size=12, num_workers=1, device="cpu", backend="torch")
    (x, y), = list(loader.batches(0))
    order = loader.order(0)
    np.testing.assert_array_equal(y.numpy(), (train_y.reshape(-1) % 10)[order])
    originals = train_x.transpose(3, 0, 1, 2)
    found = [augmentation_of(out, originals[i], 4, False) for out, i in zip(unnormalize(x, spec), order)]
    assert all(f is not None for f in found)


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("imagenet_raw")
    rng = np.random.default_rng(3)
    sizes = [(40, 60), (64, 48), (33, 33), (80, 50)]
    for split, per_class in (("train", 3), ("val", 1)):
        for c, name in enumerate(["n01", "n02", "n03"]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = sizes[(c + i) % len(sizes)]
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                ext = ".JPEG" if i % 2 == 0 else ".png"
                Image.fromarray(pixels).save(folder / f"img{i}{ext}")
    return root


def test_imagefolder_tree_to_jpeg_beton_and_resized_crops(imagenet_tree, tmp_path):
    spec = get_dataset_spec("imagenet")
    train, test = wb.write_dataset("imagenet", imagenet_tree, tmp_path, num_workers=1, max_resolution=64,
                                   compress_probability=0.0)
    summary = validate_beton(train, spec)
    assert summary["num_samples"] == 9 and summary["image_shape"] is None and summary["max_resolution"] == 64
    assert (summary["label_min"], summary["label_max"]) == (0, 2)
    loader = make_loader(train, spec, train=True, batch_size=3, num_workers=2, device="cpu", backend="torch",
                         resolution=16, channels_last=True)
    batches = list(loader.batches(0))
    assert len(batches) == 3 and all(x.shape == (3, 3, 16, 16) for x, _ in batches)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, loader.batches(0)))
    # evaluation: center crop 224/256 of the short side, resized with INTER_AREA (raw storage here)
    import cv2
    evaluation = make_loader(test, spec, train=False, batch_size=3, num_workers=1, device="cpu",
                             backend="torch", resolution=12)
    (x, y), = list(evaluation.batches(0))
    beton = beton_format.BetonFile(test)
    stored = beton.decode_image(0)
    h, w = stored.shape[:2]
    side = int(224 / 256 * min(h, w))
    top, left = (h - side) // 2, (w - side) // 2
    expected = cv2.resize(np.ascontiguousarray(stored[top:top + side, left:left + side]), (12, 12),
                          interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(unnormalize(x, spec)[0], expected)
    np.testing.assert_array_equal(y.numpy(), [0, 1, 2])


def test_jpeg_storage_decodes_close_to_the_original(imagenet_tree, tmp_path):
    train, _ = wb.write_dataset("imagenet", imagenet_tree, tmp_path, num_workers=1, compress_probability=1.0,
                                jpeg_quality=95)
    assert inspect_beton(train)["jpg_fraction"] == 1.0
    beton = beton_format.BetonFile(train)
    from PIL import Image
    first = sorted((imagenet_tree / "train" / "n01").iterdir())[0]
    original = np.asarray(Image.open(first).convert("RGB")).astype(int)
    decoded = beton.decode_image(0).astype(int)
    assert decoded.shape == original.shape
    assert np.abs(decoded - original).mean() < 20      # lossy, but the same picture (noise is JPEG's worst case)


# --------------------------------------------------------------------------- errors
def test_missing_garbage_and_truncated_files(tmp_path, digits):
    train, _ = digits
    cases = {
        "missing": (tmp_path / "nope.beton", ".beton file not found"),
        "empty": (tmp_path / "empty.beton", "shorter than the 24-byte header"),
        "garbage": (tmp_path / "garbage.beton", "not an FFCV .beton file"),
        "truncated": (tmp_path / "truncated.beton", "truncated"),
        "tail_cut": (tmp_path / "tail.beton", "truncated"),
    }
    cases["empty"][0].write_bytes(b"")
    cases["garbage"][0].write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    data = train.read_bytes()
    cases["truncated"][0].write_bytes(data[:len(data) // 2])
    cases["tail_cut"][0].write_bytes(data[:-24 * 100])      # a whole number of allocation entries gone
    for name, (path, message) in cases.items():
        with pytest.raises(DataError, match=message) as info:
            validate_beton(path, DIGITS)
        assert str(path) in str(info.value) and "\n" not in str(info.value), name
        with pytest.raises(DataError):
            make_loader(path, DIGITS, train=True, batch_size=8, num_workers=1, device="cpu", backend="ffcv")


def test_a_beton_of_another_dataset_is_refused(mnist, digits):
    with pytest.raises(DataError, match=r"28x28 images with 1 channel\(s\), cifar10 expects 32x32 images with 3"):
        validate_beton(mnist["train"], CIFAR10)
    with pytest.raises(DataError, match=r"8x8 images with 1 channel\(s\), mnist expects 28x28"):
        validate_beton(digits[0], get_dataset_spec("mnist"))
    with pytest.raises(DataError, match="cifar10 expects"):
        make_loader(mnist["train"], CIFAR10, train=True, batch_size=4, num_workers=1, device="cpu", backend="torch")


def test_labels_out_of_range_are_refused(digits, tmp_path):
    assert validate_beton(digits[0], DIGITS)["label_max"] == 9
    with pytest.raises(DataError, match="labels span 0..9, digits allows 0..4"):
        validate_beton(digits[0], DIGITS, num_classes=5)
    # a gray 8x8 beton whose labels go up to 12, written with ffcv directly
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter
    path = tmp_path / "bad_labels.beton"
    samples = [(np.full((8, 8, 1), i, np.uint8), i) for i in range(13)]
    DatasetWriter(str(path), {"image": NDArrayField(np.dtype(np.uint8), (8, 8, 1)), "label": IntField()},
                  num_workers=1, page_size=1 << 21).from_indexed_dataset(samples)
    with pytest.raises(DataError, match="labels span 0..12, digits allows 0..9"):
        validate_beton(path, DIGITS)


def test_writer_input_errors_leave_no_beton(tmp_path, imagenet_tree):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="root folder not found"):
        wb.write_dataset("cifar10", tmp_path / "missing", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cifar10: files data_batch_1.*not found"):
        wb.write_dataset("cifar10", tmp_path / "empty", out)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        wb.write_dataset("mnist", tmp_path / "empty", out)
    with pytest.raises(DataError, match="only for JPEG-stored datasets"):
        wb.write_dataset("digits", None, out, jpeg_quality=50)
    with pytest.raises(DataError, match="unknown dataset 'cifar11'"):
        wb.write_dataset("cifar11", tmp_path, out)
    assert not out.exists() or not any(out.iterdir())


def test_unreadable_image_in_a_writer_process_is_an_error_not_a_hang(imagenet_tree, tmp_path):
    import shutil
    root = tmp_path / "tree"
    shutil.copytree(imagenet_tree, root)
    (root / "train" / "n02" / "broken.JPEG").write_bytes(b"not a jpeg at all")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="broken.JPEG: cannot read image"):
        wb.write_dataset("imagenet", root, out, num_workers=2)
    assert sorted(p.name for p in out.iterdir()) == []          # no .beton, no temporary file


def test_cli_exit_status_and_messages(tmp_path, capsys):
    assert wb.main(["--dataset", "svhn", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("write_beton: error:") and "root folder not found" in err
    assert not (tmp_path / "o").exists()
    result = subprocess.run([sys.executable, "-m", "utils.write_beton", "--dataset", "nope", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown dataset 'nope'; valid names:" in result.stderr


def test_own_parser_agrees_with_ffcv_reader(cifar):
    from ffcv.reader import Reader
    reader = Reader(str(cifar["train"]))
    beton = beton_format.BetonFile(cifar["train"])
    assert reader.num_samples == beton.num_samples
    assert reader.metadata.tobytes() == np.asarray(beton.metadata).tobytes()
    assert list(reader.handlers) == list(beton.fields)
