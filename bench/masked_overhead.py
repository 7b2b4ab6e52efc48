"""Cost of masking: training-step time of a masked model / the same model unmasked.

A training step is forward + backward + SGD step (momentum 0.9, weight decay 1e-4), and
for the masked model also ``apply_masks_`` (how the harness keeps pruned weights at zero;
the masked layers' forward is the plain layer's forward, no ``weight * mask``).  The
masked model has ~80% of its prunable weights pruned at random (i.i.d. per weight).

Dense and masked steps are interleaved in one process (the order alternates every round,
so slow drift of a shared machine hits both alike); the figure is the median over rounds.
Target: masked / dense <= 1.05.

    python bench/masked_overhead.py                 # CPU, and CUDA when available
    python bench/masked_overhead.py --quick         # fewer rounds
    python bench/masked_overhead.py --smoke         # ResNet-20 at batch 8 on CPU, one round: seconds
    python bench/masked_overhead.py --repeats 9 --devices cpu --threads 1

Cases: CIFAR ResNet-20 at 32 px, batch 128; torchvision ResNet-18 at 224 px, batch 32 on
CPU and 256 on CUDA.  Columns: dense and masked step time (wall ms, median), their ratio,
the same ratio in process CPU time (CPU only), and ``apply_masks_`` alone (wall ms,
median), which is all the masked step adds to the dense one.  On a machine shared with
other jobs, 2 OpenMP threads on 2 cores stall whenever a core is taken (steps vary
2-10x); ``--threads 1`` gives steadier figures.

Evidence (2 shared CPU cores, load average 5-7, torch 2.15 CPU; no GPU was available):
apply_masks_ alone takes 0.43-0.50 ms for ResNet-20 (0.27 M weights) and 13-18 ms for
ResNet-18 (11.7 M weights), i.e. ~0.1% and ~0.2% of a step (~470 ms CPU time and ~7 s).
Whole-step ratios came out between 0.94 and 1.13 across runs; an A/A control (two
identical dense copies, 12 interleaved rounds, 1 thread) differs by up to 3% in wall
median, and the minimum CPU times of dense and masked steps agree within 1%: the spread
is the machine's load, not the masking.

apply_masks_ became one ``torch._foreach_mul_`` over all masked weights with cached masks in the
weight dtype (was: ``weight.mul_(bool_mask)`` layer by layer, kept as ``apply_masks_per_layer_``
and timed beside it).  Same machine, load average 4-10, ``--quick --threads 1``: ResNet-20
apply 0.51 ms fused vs 0.92 ms per layer (before the change: 0.75 ms), ResNet-18 21 ms vs 96 ms
(before: 53 ms); whole-step ratios 0.97 / 1.46 wall, 1.07 / 1.02 CPU time (noise, see above).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from utils.models.mask_layers import (
    apply_masks_,
    apply_masks_per_layer_,
    get_masks,
    overall_density,
    prepare_model,
    set_masks,
)
from utils.models.registry import get_model

DENSITY = 0.2  # fraction of prunable weights kept


@dataclass
class Case:
    model: str
    image_size: int
    batch_cpu: int
    batch_cuda: int


CASES = [Case("resnet20", 32, 128, 128), Case("resnet18", 224, 32, 256)]
SMOKE_CASES = [Case("resnet20", 32, 8, 8)]


@dataclass
class Trainee:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    masked: bool


def make_trainees(case: Case, device: torch.device, seed: int = 0) -> List[Trainee]:
    torch.manual_seed(seed)
    dense = get_model(case.model, num_classes=10, image_size=case.image_size)
    masked = prepare_model(copy.deepcopy(dense))
    generator = torch.Generator().manual_seed(seed)
    set_masks(masked, {name: torch.rand(mask.shape, generator=generator) < DENSITY
                       for name, mask in get_masks(masked).items()})
    trainees = []
    for model, is_masked in ((dense, False), (masked, True)):
        model.to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        trainees.append(Trainee(model, optimizer, is_masked))
    return trainees


def timed(function: Callable[[], None], device: torch.device) -> Tuple[float, float]:
    """(wall ms, process CPU ms) of ``function``; on CUDA, waits for queued work before and after.

    CPU time (all threads of this process) does not grow while the process is descheduled,
    so on a shared machine it is the steadier gauge of the work a CPU step does.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: CPU-GPU sync points bracket the timed region
    start, start_cpu = time.perf_counter(), time.process_time()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3


def training_step(trainee: Trainee, images: torch.Tensor, labels: torch.Tensor) -> None:
    trainee.optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(trainee.model(images), labels).backward()
    trainee.optimizer.step()
    if trainee.masked:
        apply_masks_(trainee.model)


def measure(case: Case, device: torch.device, repeats: int, warmup: int) -> dict:
    batch = case.batch_cuda if device.type == "cuda" else case.batch_cpu
    dense, masked = make_trainees(case, device)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, case.image_size, case.image_size, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)
    times = {False: [], True: []}
    cpu_times = {False: [], True: []}
    apply_times, per_layer_times = [], []
    for round_index in range(warmup + repeats):
        order = (dense, masked) if round_index % 2 == 0 else (masked, dense)
        for trainee in order:
            elapsed, elapsed_cpu = timed(lambda: training_step(trainee, images, labels), device)
            if round_index >= warmup:
                times[trainee.masked].append(elapsed)
                cpu_times[trainee.masked].append(elapsed_cpu)
        # apply_masks_ alone, timed separately: what the masked step adds to the dense one.
        elapsed, _ = timed(lambda: apply_masks_(masked.model), device)
        # the layer-by-layer loop it replaced (weight.mul_(bool mask) per layer), for comparison
        elapsed_per_layer, _ = timed(lambda: apply_masks_per_layer_(masked.model), device)
        if round_index >= warmup:
            apply_times.append(elapsed)
            per_layer_times.append(elapsed_per_layer)
    for _, layer in masked.model.named_modules():  # the masks held: pruned weights are zero
        if hasattr(layer, "mask"):
            assert bool((layer.weight[~layer.mask] == 0).all())
    dense_ms, masked_ms = statistics.median(times[False]), statistics.median(times[True])
    return {"model": f"{case.model}@{case.image_size}px", "device": device.type, "batch": batch,
            "dense_ms": dense_ms, "masked_ms": masked_ms, "ratio": masked_ms / dense_ms,
            "apply_ms": statistics.median(apply_times), "per_layer_ms": statistics.median(per_layer_times),
            "density": overall_density(masked.model),
            # the same ratio in process CPU time; meaningless on CUDA (the host mostly waits)
            "cpu_ratio": (statistics.median(cpu_times[True]) / statistics.median(cpu_times[False])
                          if device.type == "cpu" else float("nan"))}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true", help="3 timed rounds, 1 warm-up: a smoke check")
    parser.add_argument("--devices", default="auto", help="comma list of cpu,cuda; auto = cpu (+ cuda if any)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--models", default=",".join(c.model for c in CASES), help="subset of the cases")
    parser.add_argument("--smoke", action="store_true", help="ResNet-20 at batch 8 on CPU, 1 round: seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    if args.smoke:
        args.repeats, args.warmup, args.models, args.devices = 1, 0, "resnet20", "cpu"
    args.cases = SMOKE_CASES if args.smoke else CASES
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    wanted = {m.strip() for m in args.models.split(",")}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} cores, "
          f"load average {load:.1f} (above ~0 the machine is shared: expect noise), "
          f"{args.repeats} timed rounds after {args.warmup} warm-up, density {DENSITY}")
    header = f"{'model':<16} {'device':<6} {'batch':>5} {'dense ms':>9} {'masked ms':>9} {'ratio':>6} {'cpu ratio':>9} {'apply ms':>8} {'per-layer ms':>12}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for device_name in devices:
        device = torch.device(device_name)
        for case in args.cases:
            if case.model not in wanted:
                continue
            row = measure(case, device, args.repeats, args.warmup)
            worst = max(worst, row["ratio"])
            print(f"{row['model']:<16} {row['device']:<6} {row['batch']:>5} {row['dense_ms']:>9.1f} "
                  f"{row['masked_ms']:>9.1f} {row['ratio']:>6.3f} {row['cpu_ratio']:>9.3f} "
                  f"{row['apply_ms']:>8.2f} {row['per_layer_ms']:>12.2f}", flush=True)
    print(f"worst ratio {worst:.3f} (target <= 1.05).  ratio = median masked / median dense; "
          f"cpu ratio = the same in process CPU time; apply ms = apply_masks_ alone "
          f"(one torch._foreach_mul_); per-layer ms = the per-layer loop it replaced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
