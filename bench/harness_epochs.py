"""images_per_s of the harness end to end: a few epochs of CIFAR ResNet-20 on a synthetic
CIFAR-10-format .beton written by the project's own writer, as epochs.csv reports them.

    python bench/harness_epochs.py                       # 5,120 images, batch 128, 2 epochs, ffcv, CPU
    python bench/harness_epochs.py --loader torch --images 10240 --epochs 3
    python bench/harness_epochs.py --repo /path/to/another/checkout    # the same run with other code
    python bench/harness_epochs.py --smoke                # 160 images, 1 epoch, torch loader: seconds

Prints one line per epoch (epoch_time_s, images_per_s).  Used for the before/after figures of a
change to the training loop: run it on both checkouts back to back on a quiet machine.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5120, help="training images (default 5120)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--loader", default="ffcv", choices=["ffcv", "torch", "memory"])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--repo", default=str(ROOT), help="the checkout whose harness.py runs (default: this one)")
    parser.add_argument("--smoke", action="store_true", help="160 images, 1 epoch, batch 32, torch loader: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.epochs, args.batch_size, args.loader = 160, 1, 32, "torch"
    import synthetic_beton
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        # random pixels in the CIFAR layout, written without ffcv (bench/synthetic_beton.py)
        synthetic_beton.synthetic_dataset("cifar10", scratch / "data", train=args.images, test=args.images // 5)
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
