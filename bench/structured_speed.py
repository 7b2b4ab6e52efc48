"""Channel pruning makes the network smaller AND faster: dense vs compacted, measured.

    python bench/structured_speed.py [--device cpu|cuda|all] [--repeats 5]
    python bench/structured_speed.py --smoke        # ResNet-20 at batch 8 on CPU, one repeat: seconds

For CIFAR ResNet-20 (32 px) and torchvision ResNet-18 (224 px, ImageNet stem), 50% of the
prunable channel units are kept (uniform allocation, filter-L1 scores, coupled channels
together: utils/pruning/channel_graph.py), the level is compacted (utils/pruning/compact.py), and the dense
network and the compacted one are timed: one SGD training step (forward, cross-entropy,
backward, momentum step) at a training batch, and eval-mode inference at batch 1 and at the
training batch.  Medians of --repeats runs after warm-up.  Printed: parameters, FLOPs per
image and their ratios, times and speedups (dense / compacted).  Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.models.mask_layers import prepare_model, set_masks
from utils.models.registry import get_model
from utils.pruning import channel_graph, channel_select, channel_zeroing, compact

CASES = [
    # (label, model name, image size, classes, training batch on CPU, on CUDA)
    ("ResNet-20, CIFAR 32 px", "resnet20", 32, 10, 128, 512),
    ("ResNet-18, 224 px", "resnet18", 224, 1000, 32, 128),
]
KEEP = 0.5


def build(name: str, size: int, classes: int):
    torch.manual_seed(0)
    model = prepare_model(get_model(name, num_classes=classes, image_size=size))
    shape = (3, size, size)
    structure = channel_graph.build_channel_structure(model, shape)
    masks = channel_select.compute_channel_masks(model, structure, density=KEEP, criterion="magnitude",
                                             allocation="uniform")
    set_masks(model, masks)
    channel_zeroing.DeadChannelZeroer(structure).refresh(model)(model)
    small = compact.compact_model(model, structure, shape)
    compact.check_same_outputs(model, small, shape, batch=2)
    dense = compact.strip_masks_(prepare_model(get_model(name, num_classes=classes, image_size=size)))
    return dense, small, shape, structure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="ResNet-20 at batch 8 on CPU, 1 repeat: seconds")
    args = parser.parse_args(argv)
    cases = CASES
    if args.smoke:
        label, name, size, classes, _, cuda_batch = CASES[0]
        args.device, args.repeats, cases = "cpu", 1, [(label, name, size, classes, 8, cuda_batch)]
    devices = compact.devices_present() if args.device == "all" else [torch.device(args.device)]
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}"
          + (f", CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(f"channels kept: {KEEP:.0%} of the prunable units (uniform, magnitude), compacted vs dense\n")
    for label, name, size, classes, cpu_batch, cuda_batch in cases:
        dense, small, shape, structure = build(name, size, classes)
        params = compact.count_parameters(dense), compact.count_parameters(small)
        flops = compact.flops_per_image(dense, shape), compact.flops_per_image(small, shape)
        print(f"== {label}: {structure.total_units} channel units in {len(structure.groups)} groups")
        print(f"   parameters {params[0]:,} -> {params[1]:,} ({params[1] / params[0]:.3f}x); "
              f"FLOPs/image {flops[0] / 1e6:,.1f} M -> {flops[1] / 1e6:,.1f} M "
              f"(ratio {flops[1] / flops[0]:.3f}, {flops[0] / flops[1]:.2f}x fewer)")
        for device in devices:
            batch = cuda_batch if device.type == "cuda" else cpu_batch
            rows = [("training step", batch, lambda m: compact.train_step_seconds(m, shape, batch, classes, device,
                                                                                  args.repeats)),
                    ("inference", 1, lambda m: compact.inference_seconds(m, shape, 1, device, args.repeats)),
                    ("inference", batch, lambda m: compact.inference_seconds(m, shape, batch, device, args.repeats))]
            for what, size_used, measure in rows:
                before, after = measure(dense), measure(small)
                print(f"   {device.type:4s} {what:13s} batch {size_used:4d}: dense {before * 1e3:9.2f} ms, "
                      f"compacted {after * 1e3:9.2f} ms, speedup {before / after:5.2f}x")
            dense.to("cpu"), small.to("cpu")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
