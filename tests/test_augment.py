"""Seeded augmentation (docs/data-loaders.md): the ffcv back-end's flip, translate and
random resized crop draw their numbers from (seed, epoch, sample index) like the torch
back-end, so for raw-stored images both give bit-identical training batches.

Three ffcv Loaders in this file (numba compiles each pipeline once): CIFAR-10 training with
2 numba threads (the prange code path), ImageNet-format raw training with 1 thread, and
CIFAR-10 with ``dataset.augment=rrc``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_data import augmentation_of, unnormalize, write_cifar10_tree
from utils.data import augment as A
from utils.data import writer as wb
from utils.data.loaders import make_loader
from utils.data.specs import get_dataset_spec, with_augment

CIFAR10 = get_dataset_spec("cifar10")
IMAGENET = get_dataset_spec("imagenet")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar_raw")
    train_x, train_y, _, _ = write_cifar10_tree(root, per_batch=60, test=10, seed=4)     # 300 training images
    with pytest.warns(UserWarning, match="MD5"):
        train, _ = wb.write_dataset("cifar10", root, tmp_path_factory.mktemp("cifar_beton"), num_workers=1)
    return dict(train=train, x=train_x, y=train_y)


def loader(path, spec, backend, **kwargs):
    args = dict(train=True, batch_size=60, num_workers=1, device="cpu", seed=7)
    return make_loader(path, spec, backend=backend, **{**args, **kwargs})


@pytest.fixture(scope="module")
def ffcv_cifar(cifar):
    return loader(cifar["train"], CIFAR10, "ffcv", num_workers=2)


def images_of(batches) -> torch.Tensor:
    return torch.cat([x for x, _ in batches])


# --------------------------------------------------------------------------- the numbers
def test_jitted_uniforms_equal_the_vectorized_ones():
    from utils.data.ffcv_augment import AugmentState, _epoch_key_from, _sample_base, _uniform_at
    indices = np.array([0, 1, 2, 17, 49999, 2 ** 40 + 3], dtype=np.uint64)
    for seed, epoch in ((0, 0), (7, 3), (2 ** 31 - 1, 250)):
        expected = A.augment_uniforms(seed, epoch, indices, 41)
        state = AugmentState(seed)
        state.set_epoch(epoch)
        key = np.uint64(_epoch_key_from(state.address))      # read through the address, as the ops do
        assert key == A.epoch_key(seed, epoch)
        # (numba hands uint64 results to Python as int: wrap them again before passing them back)
        got = np.array([[_uniform_at(np.uint64(_sample_base(key, i)), j) for j in range(41)] for i in indices])
        np.testing.assert_array_equal(got, expected)
        assert 0 <= expected.min() and expected.max() < 1 and len(np.unique(expected)) == expected.size


def test_jitted_crop_box_equals_the_python_one():
    from utils.data.ffcv_augment import _random_crop_box
    rng = np.random.default_rng(0)
    bounds = (A.RRC_SCALE[0], A.RRC_SCALE[1], A.RRC_LOG_RATIO[0], A.RRC_LOG_RATIO[1],
              min(A.RRC_RATIO), max(A.RRC_RATIO))
    for trial in range(3000):
        height, width = (int(v) for v in rng.integers(1, 600, size=2))
        if trial % 3 == 0:
            width = int(rng.integers(1, 12)) * height + 1          # very wide or tall: tries often fail
            height, width = (height, width) if trial % 2 else (width, height)
        u = rng.random(40)
        if trial % 10 == 0:
            u[0::4] = 0.999 + 0.001 * u[0::4]                       # near-full area: forces the fallback
        python = A.random_crop_box(height, width, u, *bounds)
        assert _random_crop_box(height, width, u, *bounds) == python
        top, left, h, w = python
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
    # the fallback: a 10 x 200 image, every try too large -> centered, clamped to ratio 4/3
    u = np.full(40, 0.9999)
    assert A.random_crop_box(10, 200, u, *bounds) == _random_crop_box(10, 200, u, *bounds) == (0, 93, 10, 13)


# --------------------------------------------------------------------------- CIFAR: flip + translate
def test_ffcv_epoch_is_reproducible_and_epochs_differ(cifar, ffcv_cifar):
    first = list(ffcv_cifar.batches(0))
    again = list(ffcv_cifar.batches(0))
    assert len(first) == 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other = list(ffcv_cifar.batches(1))
    assert not torch.equal(images_of(first), images_of(other))
    # each output is a flip/translate of its stored image, and the flips and shifts vary
    order = ffcv_cifar.order(0)
    found = [augmentation_of(out, cifar["x"][i], 4, True) for out, i in zip(unnormalize(images_of(first), CIFAR10),
                                                                              order)]
    assert all(f is not None for f in found)
    assert {f[2] for f in found} == {False, True} and len({f[:2] for f in found}) > 40


def test_ffcv_and_torch_give_identical_training_batches(cifar, ffcv_cifar):
    torch_loader = loader(cifar["train"], CIFAR10, "torch")
    for epoch in (0, 5):
        pairs = list(zip(ffcv_cifar.batches(epoch), torch_loader.batches(epoch)))
        assert len(pairs) == 5
        for (fx, fy), (tx, ty) in pairs:
            assert torch.equal(fx, tx) and torch.equal(fy, ty)
    # ... whatever the number of processes and the resume point of the torch side
    shards = [list(loader(cifar["train"], CIFAR10, "torch", rank=r, world_size=2).batches(2, start_batch=1))
              for r in (0, 1)]
    single = list(ffcv_cifar.batches(2))[1:]
    for (x0, _), (x1, _), (x, _) in zip(*shards, single):
        assert torch.equal(torch.cat([x0, x1]), x)


def test_memory_loader_equals_ffcv(cifar, ffcv_cifar):
    memory = loader(cifar["train"], CIFAR10, "memory")
    for epoch in (0, 2):
        pairs = list(zip(ffcv_cifar.batches(epoch), memory.batches(epoch)))
        assert len(pairs) == 5
        assert all(torch.equal(fx, mx) and torch.equal(fy, my) for (fx, fy), (mx, my) in pairs)


def test_ffcv_early_break_does_not_leak_into_the_next_epoch(ffcv_cifar):
    reference = images_of(ffcv_cifar.batches(3))
    for index, _ in enumerate(ffcv_cifar.batches(4)):
        if index == 1:
            break
    unfinished = ffcv_cifar.batches(6)
    next(unfinished)                                    # left open: the next call stops it
    assert torch.equal(images_of(ffcv_cifar.batches(3)), reference)
    assert torch.equal(images_of(ffcv_cifar.batches(3, start_batch=2)), reference[120:])


# --------------------------------------------------------------------------- ImageNet format: resized crops
@pytest.fixture(scope="module")
def raw_imagenet(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("imagenet_raw")
    rng = np.random.default_rng(5)
    for split, per_class in (("train", 12), ("val", 1)):
        for c in range(3):
            folder = root / split / f"n{c:02d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = (int(v) for v in rng.integers(12, 80, size=2))
                Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    train, _ = wb.write_dataset("imagenet", root, tmp_path_factory.mktemp("imagenet_beton"), num_workers=1,
                                max_resolution=64, compress_probability=0.0)       # raw storage
    return train


def test_ffcv_and_torch_resized_crops_are_identical_for_raw_images(raw_imagenet):
    args = dict(batch_size=12, resolution=16)
    ffcv_loader = loader(raw_imagenet, IMAGENET, "ffcv", **args)
    torch_loader = loader(raw_imagenet, IMAGENET, "torch", **args)
    epochs = {}
    for epoch in (0, 1):
        pairs = list(zip(ffcv_loader.batches(epoch), torch_loader.batches(epoch)))
        assert len(pairs) == 3
        for (fx, fy), (tx, ty) in pairs:
            assert fx.shape == (12, 3, 16, 16)
            assert torch.equal(fx, tx) and torch.equal(fy, ty)
        epochs[epoch] = images_of(ffcv_loader.batches(epoch))
    assert not torch.equal(epochs[0], epochs[1])


# --------------------------------------------------------------------------- dataset.augment on any dataset
def test_crop_without_flip_on_cifar_same_in_torch_and_memory(cifar):
    spec = with_augment(CIFAR10, "crop")
    torch_batches = list(loader(cifar["train"], spec, "torch").batches(1))
    memory_batches = list(loader(cifar["train"], spec, "memory").batches(1))
    assert all(torch.equal(tx, mx) and torch.equal(ty, my) for (tx, ty), (mx, my) in zip(torch_batches, memory_batches))
    order = loader(cifar["train"], spec, "torch").order(1)
    found = [augmentation_of(out, cifar["x"][i], 4, True) for out, i in zip(unnormalize(images_of(torch_batches), spec),
                                                                             order)]
    assert all(f is not None for f in found)
    # translated, never mirrored (an image and its mirror image can coincide only when symmetric)
    assert {f[2] for f in found} == {False} and len({f[:2] for f in found}) > 40


def test_resized_crops_on_cifar_same_in_ffcv_and_torch(cifar):
    spec = with_augment(CIFAR10, "rrc")
    ffcv_loader = loader(cifar["train"], spec, "ffcv", resolution=24)
    torch_loader = loader(cifar["train"], spec, "torch", resolution=24)
    pairs = list(zip(ffcv_loader.batches(2), torch_loader.batches(2)))
    assert len(pairs) == 5
    for (fx, fy), (tx, ty) in pairs:
        assert fx.shape == (60, 3, 24, 24) and torch.equal(fx, tx) and torch.equal(fy, ty)
    with pytest.raises(Exception, match="dataset.loader=memory flips and pad-and-crops on the device"):
        loader(cifar["train"], spec, "memory")
