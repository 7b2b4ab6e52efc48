"""images_per_s of the harness end to end: a few epochs of CIFAR ResNet-20 on a synthetic
CIFAR-10-format .beton written by the project's own writer, as epochs.csv reports them.

    python bench/harness_epochs.py                       # 5,120 images, batch 128, 2 epochs, ffcv, CPU
    python bench/harness_epochs.py --loader torch --images 10240 --epochs 3
    python bench/harness_epochs.py --repo /path/to/another/checkout    # the same run with other code

Prints one line per epoch (epoch_time_s, images_per_s).  Used for the before/after figures of a
change to the training loop: run it on both checkouts back to back on a quiet machine.
"""
from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_cifar_format(root: Path, images: int, seed: int = 0) -> None:
    """cifar-10-batches-py with random pixels: 5 training batches, 1 test batch."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    per_batch = images // 5
    for name, count in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", per_batch)]:
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, count)],
                 b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(count)]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5120, help="training images (default 5120)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--loader", default="ffcv", choices=["ffcv", "torch", "memory"])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--repo", default=str(ROOT), help="the checkout whose harness.py runs (default: this one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_cifar_format(scratch / "src", args.images)
        subprocess.run([sys.executable, "-m", "utils.write_beton", "--dataset", "cifar10", "--root",
                        str(scratch / "src"), "--out", str(scratch / "data")], cwd=ROOT, check=True,
                       capture_output=True)
        config = {
            "model": {"name": args.model},
            "dataset": {"name": "cifar10", "train_path": str(scratch / "data" / "cifar10_train.beton"),
                        "test_path": str(scratch / "data" / "cifar10_test.beton"), "batch_size": args.batch_size,
                        "num_workers": 2, "loader": args.loader},
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
            "schedule": {"name": "cosine"},
            "training": {"epochs": args.epochs, "progress": False, "device": "cpu"},
            "prune": {"criterion": "magnitude", "allocation": "global", "training_type": "imp", "rate": 0.2,
                      "levels": 1},
            "experiment": {"name": "bench", "base_dir": str(scratch / "runs"), "seed": 0},
        }
        (scratch / "c.yaml").write_text(yaml.safe_dump(config))
        run = subprocess.run([sys.executable, "harness.py", "--config", str(scratch / "c.yaml")], cwd=args.repo,
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        import pandas as pd
        epochs = pd.read_csv(scratch / "runs" / "bench" / "epochs.csv")
        print(f"{args.model}, {args.images} images, batch {args.batch_size}, {args.loader} loader, code at {args.repo}")
        for row in epochs.itertuples():
            print(f"epoch {row.epoch}: {row.epoch_time_s:7.2f} s  {row.images_per_s:8.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
