"""K independent training runs sharing one device: aggregate images/s for K = 1, 2, 4.

Small models (CIFAR ResNet-20) leave a big GPU mostly idle between kernel launches; running
K experiments side by side on one GPU (a sweep's "K at once per GPU") fills it.  This bench
starts K processes, each training its own masked ResNet-20 (density 0.2) with the harness's
step (utils.training.step.TrainingStep) on synthetic device tensors; all processes wait at a
barrier, then each times ``--steps`` steps.  Aggregate images/s = K * batch * steps / the
slowest process's time (they run concurrently).  On CPU the processes share the cores (one
thread each), so the figure shows the core count, not a GPU's headroom.

    python bench/runs_per_gpu.py                       # CUDA when present, else CPU
    python bench/runs_per_gpu.py --ks 1,2,4,8 --batch 512 --precision bf16 --channels-last
    python bench/runs_per_gpu.py --quick               # fewer steps, batch 64
    python bench/runs_per_gpu.py --smoke               # K = 1, 2 on CPU, one step: seconds

Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

DENSITY = 0.2


def worker(rank: int, args, barrier, results) -> None:
    """One run: build, warm up, wait for the others, time ``args.steps`` steps; puts (rank, seconds)."""
    torch.set_num_threads(args.threads)
    from utils.models import mask_layers
    from utils.models.registry import get_model
    from utils.training.schedulers import LRSchedule, ScheduleSpec
    from utils.training.step import PRECISIONS, TrainingStep

    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(rank)
    model = mask_layers.prepare_model(get_model(args.model, num_classes=10, image_size=32))
    generator = torch.Generator().manual_seed(rank)
    mask_layers.set_masks(model, {name: torch.rand(mask.shape, generator=generator) < DENSITY
                                  for name, mask in mask_layers.get_masks(model).items()})
    model = model.to(device=device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5)
    schedule = LRSchedule(optimizer, ScheduleSpec(name="cosine", epochs=1000, iterations_per_epoch=100))
    autocast_dtype = PRECISIONS[args.precision] if device.type == "cuda" else None
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    step = TrainingStep(train_model=torch.compile(model) if args.compile else model, model=model,
                        optimizer=optimizer, schedule=schedule, scaler=scaler, autocast_dtype=autocast_dtype)
    images = torch.randn(args.batch, 3, 32, 32, generator=generator).to(device, memory_format=memory_format)
    labels = torch.randint(0, 10, (args.batch,), generator=generator).to(device)
    for _ in range(args.warmup):
        step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    barrier.wait()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: CPU-GPU sync point, once at the end
    results.put((rank, time.perf_counter() - start))


def measure(k: int, args) -> float:
    context = mp.get_context("spawn")  # CUDA cannot be forked into children
    barrier = context.Barrier(k)
    results = context.SimpleQueue()
    processes = [context.Process(target=worker, args=(rank, args, barrier, results)) for rank in range(k)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    seconds = dict(results.get() for _ in range(k)) if all(p.exitcode == 0 for p in processes) else {}
    if len(seconds) != k:
        raise RuntimeError(f"K={k}: a worker failed (exit codes {[p.exitcode for p in processes]})")
    return k * args.batch * args.steps / max(seconds.values())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", default="1,2,4", help="comma list of process counts")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=128, help="per process")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per process (default 50; quick 3)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 5; quick 1)")
    parser.add_argument("--device", default="auto", help="cpu or cuda (auto: cuda when present)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"], help="CUDA autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--quick", action="store_true", help="3 timed steps, batch 64")
    parser.add_argument("--smoke", action="store_true", help="K = 1, 2 on CPU, batch 8, 1 timed step: seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch = 64 if args.batch == 128 else args.batch
    if args.smoke:
        args.ks, args.batch, args.steps, args.warmup, args.device = "1,2", 8, 1, 1, "cpu"
    args.steps = args.steps or (3 if args.quick else 50)
    args.warmup = args.warmup or (1 if args.quick else 5)
    try:
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        parser.error(f"--ks {args.ks!r}: a comma list of integers")
    if not ks or min(ks) < 1 or args.batch < 1 or args.steps < 1:
        parser.error("--ks values, --batch and --steps must be >= 1")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device}: cpu, or cuda when a CUDA device is present")
    args.ks = ks
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    ks = args.ks
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.model}, batch {args.batch} per process, {args.steps} timed steps after {args.warmup}; "
          f"device {name}; precision {args.precision if args.device == 'cuda' else 'fp32'}; "
          f"{args.threads} thread(s) per process; load average {load:.1f}")
    print(f"{'K':>3} {'images/s':>10} {'per run':>9} {'x first':>8}")
    first = None
    for k in ks:
        total = measure(k, args)
        first = first or total
        print(f"{k:>3} {total:>10.1f} {total / k:>9.1f} {total / first:>8.2f}", flush=True)
    print("images/s = all K runs together; per run = images/s / K; x first = images/s / the first K's images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
