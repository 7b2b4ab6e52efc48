"""Training-loader throughput (images/s) on a CIFAR-format ``.beton``.

Measures ``make_loader(..., train=True)`` the way the harness uses it: every batch of an
epoch, augmented (CIFAR-10's flip + translate), normalized float32 on the device.  The
first epoch is a warm-up (numba compiles the ffcv pipeline, caches fill); the figure is the
median over the ``--epochs`` timed epochs after it.

Without ``--path`` a synthetic CIFAR-10 training set (``--images`` random 32x32 images in
the CIFAR pickle format) is written to a temporary folder by ``bench/synthetic_beton.py`` (no ffcv needed).

    python bench/loader_throughput.py                                  # ffcv, CPU, 20000 images
    python bench/loader_throughput.py --backend ffcv torch memory --workers 4
    python bench/loader_throughput.py --path data/cifar10_train.beton --device cuda
    python bench/loader_throughput.py --smoke            # torch and memory back-ends, 512 images: seconds

Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))      # the other bench modules

from utils.data.loaders import make_loader
from utils.data.specs import get_dataset_spec


def synthetic_cifar10(folder: Path, images: int, seed: int = 0) -> Path:
    """A CIFAR-10 training .beton of ``images`` random images (the test split is tiny), written
    without ffcv by bench/synthetic_beton.py."""
    import synthetic_beton
    train, _ = synthetic_beton.synthetic_dataset("cifar10", folder / "beton", train=images, test=10, seed=seed)
    return train


def measure(path: Path, dataset: str, backend: str, *, batch_size: int, workers: int, device: str,
            epochs: int) -> tuple:
    spec = get_dataset_spec(dataset)
    started = time.perf_counter()
    loader = make_loader(path, spec, train=True, batch_size=batch_size, num_workers=workers, device=device,
                         seed=0, backend=backend)
    rates = []
    for epoch in range(epochs + 1):
        begin = time.perf_counter()
        count = 0
        for images, _ in loader.batches(epoch):
            count += len(images)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - begin
        if epoch == 0:
            warmup = time.perf_counter() - started
        else:
            rates.append(count / elapsed)
    return statistics.median(rates), min(rates), max(rates), warmup


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, default=None, help="a CIFAR-format training .beton (default: synthetic)")
    parser.add_argument("--dataset", default="cifar10", help="dataset spec of --path (cifar10, cifar100, svhn)")
    parser.add_argument("--images", type=int, default=20000, help="synthetic set size (without --path)")
    parser.add_argument("--backend", nargs="+", default=["ffcv"], help="ffcv / torch / memory (several allowed)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=1, help="loader threads (ffcv: numba threads)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up epoch")
    parser.add_argument("--smoke", action="store_true", help="512 images, torch and memory, 1 epoch: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.backend, args.epochs, args.batch_size = 512, ["torch", "memory"], 1, 128
    torch.set_num_threads(max(1, args.workers))

    with tempfile.TemporaryDirectory() as scratch:
        path = args.path or synthetic_cifar10(Path(scratch), args.images)
        print(f"file: {path if args.path else f'synthetic cifar10, {args.images} images'}; batch {args.batch_size}, "
              f"{args.workers} worker(s), device {args.device}, median of {args.epochs} epochs after a warm-up")
        for backend in args.backend:
            median, low, high, warmup = measure(path, args.dataset, backend, batch_size=args.batch_size,
                                                workers=args.workers, device=args.device, epochs=args.epochs)
            print(f"{backend:>6}: {median:10.0f} images/s (range {low:.0f}..{high:.0f}); "
                  f"construction + warm-up epoch {warmup:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
