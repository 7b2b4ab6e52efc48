"""Which score normaliser keeps accuracy best when channel groups are ranked globally, at equal FLOPs.

    python bench/channel_normalizers.py                      # digits and CIFAR-format, 3 seeds (~25 min, 1 core)
    python bench/channel_normalizers.py --data digits --seeds 5
    python bench/channel_normalizers.py --data cifar-format --seeds 2 --epochs 3 --max-batches 12
    python bench/channel_normalizers.py --smoke              # seconds: the code paths once

``prune.structure=channel`` with ``prune.allocation=global`` ranks the channel units of all
coupled groups together (utils/pruning/channel_graph.py).  A filter's L1 norm grows with its fan-in, so
raw scores are compared on a common scale first; this script measures which scale.  For each
normaliser (``none`` = raw scores, ``mean``, ``max``, ``gaussian``; ``uniform`` allocation as
the reference that needs none) and each seed:

* ``at_init``: the network at initialisation is pruned, then trained ``--epochs`` epochs;
* ``trained``: the dense network is trained ``--epochs`` epochs (once per seed, shared by all
  normalisers), pruned, and fine-tuned ``--epochs`` epochs with a fresh schedule (LRR).

Every method keeps the largest number of channel units whose compacted network (utils/pruning/compact.py)
costs at most ``--flops`` of the dense FLOPs per image, so the comparison is at equal compute,
not at equal channel count.  No per-layer floor (``min_fraction=0``): the normaliser alone decides.
Data: the bundled digits (8 px, 1 channel) and a small CIFAR-10-format data set (32 px RGB,
written through the CIFAR pickle batches and the writer's reader, bench/synthetic_beton.py): the digits upscaled 4x, drawn
in a random colour on a random background with pixel noise, so that it is learnable.
Printed: per data set, model, scenario and method, the test accuracy (mean +- std over seeds),
the kept channel density, FLOPs and parameter ratios, and the smallest fraction of its output
channels any layer keeps.  Nothing is asserted.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import pickle
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))      # the other bench modules

from utils.data.loaders import make_loader
from utils.data.specs import get_dataset_spec
from utils.models.mask_layers import apply_masks_, prepare_model, set_masks
from utils.models.registry import get_model
from utils.pruning import channel_graph, channel_select, channel_zeroing, compact

METHODS = [("none", "global"), ("mean", "global"), ("max", "global"), ("gaussian", "global"), ("mean", "uniform")]
# (data set, model, criteria of the trained scenario)
CASES = {"digits": [("lenet_300_100", ["magnitude"]), ("resnet20", ["magnitude", "bn_gamma"])],
         "cifar-format": [("resnet20", ["magnitude"])]}


def write_cifar_format_digits(root: Path, seed: int = 0) -> None:
    """cifar-10-batches-py holding the digits at 32 px in colour: 5 training batches, 1 test batch."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    ink = np.kron(digits.images[order] / 16.0, np.ones((4, 4)))                  # N, 32, 32 in [0, 1]
    foreground = rng.uniform(0.5, 1.0, size=(len(order), 3, 1, 1)) * 255
    background = rng.uniform(0.0, 0.4, size=(len(order), 3, 1, 1)) * 255
    pixels = ink[:, None] * foreground + (1 - ink[:, None]) * background + rng.normal(0, 20, (len(order), 3, 32, 32))
    data = np.clip(pixels, 0, 255).astype(np.uint8).reshape(len(order), 3072)  # CIFAR rows: R, G, B planes
    labels = digits.target[order]
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    test = 297
    train_parts = np.array_split(np.arange(test, len(order)), 5)
    for name, rows in [(f"data_batch_{i + 1}", part) for i, part in enumerate(train_parts)] + [("test_batch", np.arange(test))]:
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels[rows]], b"data": data[rows],
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(len(rows))]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)


def prepare_data(kind: str, scratch: Path):
    """The .beton files, written without ffcv (bench/synthetic_beton.py: the writer's own readers)."""
    import synthetic_beton
    if kind == "digits":
        train, test = synthetic_beton.write_from_root("digits", None, scratch / "digits")
        return get_dataset_spec("digits"), train, test
    write_cifar_format_digits(scratch / "cifar_src")
    train, test = synthetic_beton.write_from_root("cifar10", scratch / "cifar_src", scratch / "cifar")
    return get_dataset_spec("cifar10"), train, test


class Trainer:
    def __init__(self, spec, train_path, test_path, batch_size: int, max_batches: int = 0):
        self.spec = spec
        self.train = make_loader(train_path, spec, train=True, batch_size=batch_size, num_workers=1, device="cpu",
                                 backend="memory")
        self.test = make_loader(test_path, spec, train=False, batch_size=256, num_workers=1, device="cpu",
                                backend="memory")
        self.max_batches = max_batches

    def fit(self, model: nn.Module, structure, epochs: int, seed: int) -> None:
        zeroer = channel_zeroing.DeadChannelZeroer(structure).refresh(model)
        zeroer(model)
        steps = epochs * len(self.train)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
        model.train()
        for epoch in range(epochs):
            for index, (images, labels) in enumerate(self.train.batches(1000 * seed + epoch)):
                if self.max_batches and index >= self.max_batches:
                    break
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(images), labels).backward()
                optimizer.step()
                schedule.step()
                apply_masks_(model)
                zeroer(model)

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        model.eval()
        correct = total = 0
        for images, labels in self.test.batches(0):
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
        return 100.0 * correct / total


def flops_of(model: nn.Module, structure, shape) -> int:
    return compact.flops_per_image(compact.compact_model(model, structure, shape), shape)


def prune_to_flops(model: nn.Module, structure, shape, *, budget: int, criterion: str, normalizer: str,
                   allocation: str, seed: int):
    """(masks, density): the most channel units whose compacted network costs <= ``budget`` FLOPs."""
    total = structure.total_units
    low, high = len(structure.groups), total   # low always fits (checked), high may not
    best = None

    def masks_for(keep: int):
        return channel_select.compute_channel_masks(model, structure, density=keep / total, criterion=criterion,
                                                allocation=allocation, normalizer=normalizer, seed=seed,
                                                min_fraction=0.0)

    def cost(masks) -> int:
        trial = copy.deepcopy(model)
        set_masks(trial, masks)
        return flops_of(trial, structure, shape)

    best = masks_for(low)
    while low < high:  # largest keep with cost <= budget (the cost grows with keep)
        middle = (low + high + 1) // 2
        masks = masks_for(middle)
        if cost(masks) <= budget:
            low, best = middle, masks
        else:
            high = middle - 1
    return best, low / total


def smallest_layer_fraction(masks) -> float:
    return min(alive / channels for alive, channels in channel_select.channels_alive(masks).values())


def run_case(trainer: Trainer, shape, model_name: str, criteria, args, out) -> None:
    spec = trainer.spec
    results = {}   # (scenario, criterion, method) -> list of (acc, density, flops ratio, params ratio, smallest)
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        init = prepare_model(get_model(model_name, num_classes=spec.num_classes, in_channels=spec.channels,
                                       image_size=spec.resolution))
        structure = channel_graph.build_channel_structure(init, shape)
        dense_flops = flops_of(init, structure, shape)
        dense_params = compact.count_parameters(compact.strip_masks_(copy.deepcopy(init)))
        trained = copy.deepcopy(init)
        trainer.fit(trained, structure, args.epochs, seed)
        dense_acc = trainer.accuracy(trained)
        results.setdefault(("dense", "-", "-"), []).append((dense_acc, 1.0, 1.0, 1.0, 1.0))
        starts = [("at_init", "magnitude", init)] + [("trained", criterion, trained) for criterion in criteria]
        for scenario, criterion, start in starts[:1] if args.smoke else starts:
            for normalizer, allocation in METHODS[:2] if args.smoke else METHODS:
                masks, density = prune_to_flops(start, structure, shape, budget=int(args.flops * dense_flops),
                                                criterion=criterion, normalizer=normalizer, allocation=allocation,
                                                seed=seed)
                model = copy.deepcopy(start)
                set_masks(model, masks)
                small = compact.compact_model(model, structure, shape)
                trainer.fit(model, structure, args.epochs, seed + 100)
                method = normalizer if allocation == "global" else "uniform"
                results.setdefault((scenario, criterion, method), []).append((
                    trainer.accuracy(model), density, compact.flops_per_image(small, shape) / dense_flops,
                    compact.count_parameters(small) / dense_params, smallest_layer_fraction(masks)))
    print(f"\n{args.current_data}, {model_name}: FLOPs budget {args.flops:.2f} of dense, {args.epochs} epochs per "
          f"training, {args.seeds} seed(s)", file=out)
    print(f"{'scenario':<9} {'criterion':<10} {'method':<9} {'test acc %':>14} {'ch. density':>11} {'FLOPs':>6} "
          f"{'params':>6} {'min layer':>9}", file=out)
    for (scenario, criterion, method), rows in results.items():
        accs = [row[0] for row in rows]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        means = [statistics.fmean(row[i] for row in rows) for i in range(1, 5)]
        print(f"{scenario:<9} {criterion:<10} {method:<9} {statistics.fmean(accs):>7.2f} +- {spread:>4.2f} "
              f"{means[0]:>11.3f} {means[1]:>6.3f} {means[2]:>6.3f} {means[3]:>9.3f}", file=out, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="all", choices=["all", *CASES])
    parser.add_argument("--models", default="", help="comma-separated subset of the models (default: all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--flops", type=float, default=0.3, help="FLOPs budget as a fraction of the dense network's")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-batches", type=int, default=0, help="batches per epoch at most (0 = all)")
    parser.add_argument("--smoke", action="store_true", help="digits, ResNet-20, 1 seed, 1 epoch of 2 batches, "
                        "at_init with none and mean only")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.smoke:
        args.data, args.models, args.seeds, args.epochs = "digits", "resnet20", 1, 1
    wanted = [m for m in args.models.split(",") if m]
    with tempfile.TemporaryDirectory() as scratch:
        for kind in (CASES if args.data == "all" else [args.data]):
            spec, train, test = prepare_data(kind, Path(scratch))
            trainer = Trainer(spec, train, test, args.batch_size, max_batches=2 if args.smoke else args.max_batches)
            shape = (spec.channels, spec.resolution, spec.resolution)
            args.current_data = kind
            for model_name, criteria in CASES[kind]:
                if not wanted or model_name in wanted:
                    run_case(trainer, shape, model_name, criteria, args, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
