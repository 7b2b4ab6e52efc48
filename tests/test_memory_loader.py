"""dataset.loader=memory (utils/data/memory_loader.py): the dataset decoded once into one uint8
tensor on the device, batches by tensor ops there.  On CPU its batches equal the torch
back-end's bit for bit (and so the ffcv back-end's: tests/test_augment.py compares those
two, and the memory loader with ffcv directly)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_data import augmentation_of, unnormalize, write_cifar10_tree
from utils.data import memory_loader as ml
from utils.data import writer as wb
from utils.data.loaders import make_loader
from utils.data.sources import DataError
from utils.data.specs import get_dataset_spec

CIFAR10 = get_dataset_spec("cifar10")
DIGITS = get_dataset_spec("digits")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar_raw")
    train_x, train_y, test_x, test_y = write_cifar10_tree(root, per_batch=20, test=30, seed=9)   # 100 train images
    with pytest.warns(UserWarning, match="MD5"):
        train, test = wb.write_dataset("cifar10", root, tmp_path_factory.mktemp("cifar_beton"), num_workers=1)
    return dict(train=train, test=test, x=train_x, y=train_y, test_x=test_x)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return wb.ensure_digits(tmp_path_factory.mktemp("digits"))


def loaders(path, spec, **kwargs):
    args = dict(batch_size=20, num_workers=1, device="cpu", seed=3, **kwargs)
    return make_loader(path, spec, backend="memory", **args), make_loader(path, spec, backend="torch", **args)


def assert_same(memory_batches, torch_batches, count):
    pairs = list(zip(memory_batches, torch_batches))
    assert len(pairs) == count
    for (mx, my), (tx, ty) in pairs:
        assert mx.dtype == torch.float32 and my.dtype == torch.int64
        assert mx.is_contiguous(memory_format=torch.channels_last) == tx.is_contiguous(
            memory_format=torch.channels_last)
        assert torch.equal(mx, tx) and torch.equal(my, ty)


def test_training_batches_equal_the_torch_backend(cifar):
    memory, torch_loader = loaders(cifar["train"], CIFAR10, train=True, channels_last=True)
    assert (len(memory), memory.num_samples, memory.batch_size) == (5, 100, 20)
    assert memory.nbytes == 100 * 32 * 32 * 3 + 100 * 8
    for epoch, start_batch in ((0, 0), (4, 0), (4, 3)):
        assert_same(memory.batches(epoch, start_batch), torch_loader.batches(epoch, start_batch), 5 - start_batch)
    # really augmented: flips and shifts of the stored images, different per epoch
    first = list(memory.batches(0))
    outs = unnormalize(torch.cat([x for x, _ in first]), CIFAR10)
    found = [augmentation_of(out, cifar["x"][i], 4, True) for out, i in zip(outs, memory.order(0))]
    assert all(f is not None for f in found) and {f[2] for f in found} == {False, True}
    assert not torch.equal(torch.cat([x for x, _ in first]), torch.cat([x for x, _ in memory.batches(1)]))


def test_ranks_see_their_part_of_the_same_global_batches(cifar):
    single, _ = loaders(cifar["train"], CIFAR10, train=True)
    shards = [loaders(cifar["train"], CIFAR10, train=True, rank=r, world_size=2)[0] for r in (0, 1)]
    assert all(len(s) == 5 and s.batch_size == 10 for s in shards)
    for (x, y), (x0, y0), (x1, y1) in zip(single.batches(2, 1), shards[0].batches(2, 1), shards[1].batches(2, 1)):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_evaluation_and_gray_images_equal_the_torch_backend(cifar, digits):
    memory, torch_loader = loaders(cifar["test"], CIFAR10, train=False, rank=1, world_size=2)
    assert len(memory) == 2                                 # 15 of 30 samples in batches of 10: 10 + 5
    assert_same(memory.batches(0), torch_loader.batches(0), 2)
    images = torch.cat([x for x, _ in memory.batches(0)])
    np.testing.assert_array_equal(unnormalize(images, CIFAR10), cifar["test_x"][15:])   # no augmentation
    memory, torch_loader = loaders(digits[0], DIGITS, train=True)
    assert_same(memory.batches(1), torch_loader.batches(1), 1437 // 20)
    assert next(iter(memory.batches(0)))[0].shape == (20, 1, 8, 8)


def test_imagenet_is_refused_before_reading_anything(tmp_path):
    with pytest.raises(DataError, match="imagenet has images of varying size.*use dataset.loader=ffcv") as info:
        make_loader(tmp_path / "missing.beton", get_dataset_spec("imagenet"), train=True, batch_size=8,
                    num_workers=1, device="cpu", backend="memory")
    assert "\n" not in str(info.value)


def test_a_dataset_that_does_not_fit_is_refused(cifar, monkeypatch):
    needed = 100 * 32 * 32 * 3 + 100 * 8
    monkeypatch.setattr(ml, "available_ram", lambda: 2 * needed - 1)        # may use half: 1 byte short
    with pytest.raises(DataError, match=r"needs 0\.00 GiB on RAM for 100 images of 32x32x3.*use dataset.loader=ffcv"):
        make_loader(cifar["train"], CIFAR10, train=True, batch_size=20, num_workers=1, device="cpu",
                    backend="memory")
    monkeypatch.setattr(ml, "available_ram", lambda: 2 * needed)
    make_loader(cifar["train"], CIFAR10, train=True, batch_size=20, num_workers=1, device="cpu", backend="memory")


def test_cuda_free_memory_is_what_is_compared(monkeypatch):
    calls = []

    def fake_mem_get_info(device):
        calls.append(device)
        return 123, 456

    monkeypatch.setattr(torch.cuda, "mem_get_info", fake_mem_get_info)
    assert ml.free_memory(torch.device("cuda", 1)) == 123 and calls == [torch.device("cuda", 1)]
    assert ml.free_memory(torch.device("cpu")) == ml.available_ram() > 0


def test_config_accepts_the_memory_loader(tmp_path):
    import yaml

    import harness_params as hp
    tree = {"model": {"name": "lenet_300_100"}, "experiment": {"name": "x"}, "prune": {"levels": 2},
            "dataset": {"name": "digits", "train_path": "a.beton", "test_path": "b.beton", "loader": "memory"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert hp.resolve(str(path), {})["dataset.loader"] == "memory"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_stay_on_the_device_and_equal_cpu(cifar):
    memory = make_loader(cifar["train"], CIFAR10, train=True, batch_size=20, num_workers=1, device="cuda",
                         seed=3, backend="memory")
    cpu, _ = loaders(cifar["train"], CIFAR10, train=True)
    for (gx, gy), (cx, cy) in zip(memory.batches(1), cpu.batches(1)):
        assert gx.is_cuda and gy.is_cuda
        torch.testing.assert_close(gx.cpu(), cx, rtol=0, atol=1e-6)
        assert torch.equal(gy.cpu(), cy)
