"""Cost of one epoch checkpoint: time to write it and to read it back.

The checkpoint is what the harness writes after every epoch (``Experiment.checkpoint``):
model state with the masks, SGD momentum buffers, schedule position, grad scaler, RNG
states, run bookkeeping.  Three timings, each the median over ``--repeats`` rounds:

* snapshot: copying model and optimizer state to fresh CPU tensors (``model_state`` and
  ``hu.detached_copy``; on a GPU this is the device-to-host copy);
* write: ``harness_utils.atomic_torch_save`` (torch.save to a temporary file, fsync, rename,
  fsync of the directory);
* read: ``harness_utils.load_checkpoint`` (``torch.load(weights_only=True)`` + the format
  and config checks).  The file was just written, so it is read from the page cache:
  this is deserialization, not disk.

Models: torchvision ResNet-50 (1000 classes, 25.6 M parameters) and CIFAR ResNet-20
(``utils.models.registry.get_model('resnet20', num_classes=10)``, 0.27 M), both through
``utils.models.mask_layers.prepare_model``, momentum populated by one SGD step.
Target: ResNet-50 written in under 5 s (issue 5).

    python bench/checkpoint_cost.py                       # writes under runs/checkpoint_bench
    python bench/checkpoint_cost.py --dir /scratch/x --repeats 7
    python bench/checkpoint_cost.py --smoke                 # ResNet-20 once, in a temporary folder
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness_utils as hu  # noqa: E402
from utils.models import mask_layers
from utils.models.registry import get_model


def build(name: str) -> torch.nn.Module:
    if name == "resnet50":
        import torchvision
        model = torchvision.models.resnet50(num_classes=1000)
    else:
        model = get_model(name, num_classes=10)
    return mask_layers.prepare_model(model)


def optimizer_with_momentum(model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD as the harness builds it, after one step on random gradients (every parameter
    then has its momentum buffer, as in any checkpoint after the first epoch)."""
    optimizer = hu.build_optimizer(model.parameters(), name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    for parameter in model.parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator) * 1e-3
    optimizer.step()
    return optimizer


def checkpoint_state(model, optimizer, config) -> dict:
    """The same keys as Experiment.checkpoint (values of a run after some epochs)."""
    return {
        "format": hu.CHECKPOINT_FORMAT, "config": config, "level": 3, "next_epoch": 5, "phase": "train",
        "finished": False,
        "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "optimizer": hu.detached_copy(optimizer.state_dict()),
        "schedule": {"iteration": 12345},
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "rng": hu.rng_state(),
        "level_stats": {"best_test_acc": 76.1, "train_time_s": 1234.5},
        "csv_rows": {"epochs": 100, "levels": 3, "layers": 160},
        "world_size": 8,
    }


def tensor_megabytes(obj) -> float:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() / 1e6
    if isinstance(obj, dict):
        return sum(tensor_megabytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_megabytes(v) for v in obj)
    return 0.0


def measure(name: str, directory: Path, repeats: int) -> dict:
    model = build(name)
    optimizer = optimizer_with_momentum(model)
    config = {"model.name": name, "experiment.name": "bench"}
    path = directory / name / "last.pt"
    snapshot_s, write_s, read_s = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        state = checkpoint_state(model, optimizer, config)
        snapshot_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        hu.atomic_torch_save(state, path)
        write_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        loaded = hu.load_checkpoint(path, config, required=hu.LAST_CHECKPOINT_KEYS)
        read_s.append(time.perf_counter() - started)
        assert loaded["model"].keys() == state["model"].keys()  # read back, not just opened
    masks = sum(v.numel() for k, v in state["model"].items() if k.endswith(".mask")) / 1e6
    return {
        "name": name,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "model_mb": tensor_megabytes(state["model"]),
        "masks_mb": masks,  # bool: one byte per weight
        "momentum_mb": tensor_megabytes(state["optimizer"]),
        "file_mb": path.stat().st_size / 1e6,
        "snapshot_s": statistics.median(snapshot_s),
        "write_s": statistics.median(write_s),
        "write_max_s": max(write_s),
        "read_s": statistics.median(read_s),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="runs/checkpoint_bench",
                        help="where the checkpoints are written (a real disk, like experiment.base_dir); removed after")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per model; medians are reported")
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet50"])
    parser.add_argument("--smoke", action="store_true", help="ResNet-20 once, in a temporary folder: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="checkpoint-bench-") as scratch:
            return main(["--dir", str(Path(scratch) / "checkpoints"), "--repeats", "1", "--models", "resnet20"])
    directory = Path(args.dir)
    if directory.exists():
        print(f"{directory} exists; give a --dir that does not (it is deleted afterwards)", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, writing under {directory.resolve()}, "
          f"{args.repeats} rounds, medians")
    try:
        rows = [measure(name, directory, args.repeats) for name in args.models]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    header = (f"| model | params (M) | model state (MB) | of which masks (MB) | momentum (MB) | file (MB) | "
              f"snapshot (s) | write (s) | write max (s) | read (s) | write MB/s |")
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['parameters_m']:.2f} | {r['model_mb']:.1f} | {r['masks_mb']:.1f} | "
              f"{r['momentum_mb']:.1f} | {r['file_mb']:.1f} | {r['snapshot_s']:.3f} | {r['write_s']:.3f} | "
              f"{r['write_max_s']:.3f} | {r['read_s']:.3f} | {r['file_mb'] / r['write_s']:.0f} |")
    resnet50 = [r for r in rows if r["name"] == "resnet50"]
    if resnet50:
        total = resnet50[0]["snapshot_s"] + resnet50[0]["write_s"]
        verdict = "meets" if total < 5 else "MISSES"
        print(f"ResNet-50: snapshot + write {total:.2f} s: {verdict} the 5 s target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
