"""How fast is pruning?  ResNet-50 (torchvision, 224 px), every Conv2d/Linear weight prunable.

1. Global magnitude pruning to 20% density: ``utils.pruning.masks.prune_model`` against
   ``torch.nn.utils.prune.global_unstructured(..., pruning_method=L1Unstructured,
   amount=0.8)`` on the same weights, in the same process; median of ``--repeats`` runs
   each, the timed calls taking turns within every repeat so that a busy machine slows
   them alike (set-up such as copying the model is outside the timed region).  Both must
   produce identical masks.  L1Unstructured prunes ``round(0.8 * N)`` weights by
   ``torch.topk(largest=False)`` with unspecified tie order, and we keep ``round(0.2 * N)``
   with ties going to the lowest index, so the weights are drawn from N(0, 1) and redrawn
   until the cut is not a tie (the k-th and (k+1)-th largest |w| differ): then both
   methods must keep exactly the same set.  Target: ours >= 8x faster.
2. SNIP: one batch of 8 random 224 px images (random labels), global allocation.
3. SynFlow: 100 rounds (``--quick``: 10), global allocation, float64.

Usage (from the repository root):

    .venv/bin/python bench/pruning_speed.py            # full
    .venv/bin/python bench/pruning_speed.py --quick    # fewer repeats, 10 SynFlow rounds
    .venv/bin/python bench/pruning_speed.py --smoke    # SqueezeNet 1.1 at 64 px, 2 SynFlow rounds: seconds
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import prune  # noqa: E402

from utils.models.mask_layers import all_true_masks, masked_layers, prepare_model, set_masks
from utils.pruning import criteria
from utils.pruning import masks as pruning_masks
from utils.pruning import schedules as density_schedules

DENSITY = 0.2
SPEEDUP_TARGET = 8.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def draw_weights_without_tie_at_cut(model: nn.Module, seed: int) -> int:
    """N(0, 1) weights such that the k-th and (k+1)-th largest |w| differ; returns the seed used."""
    layers = [layer for _, layer in masked_layers(model)]
    total = sum(layer.weight.numel() for layer in layers)
    keep = density_schedules.target_keep_count(DENSITY, total)
    for attempt in range(seed, seed + 100):
        generator = torch.Generator().manual_seed(attempt)
        with torch.no_grad():
            for layer in layers:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
        magnitudes = torch.cat([layer.weight.detach().abs().reshape(-1).cpu() for layer in layers])
        kth = torch.kthvalue(magnitudes, total - keep + 1).values
        next_one = torch.kthvalue(magnitudes, total - keep).values
        if bool(kth > next_one):
            return attempt
    raise RuntimeError("could not draw weights without a tie at the cut")


def bench_global_magnitude(model: nn.Module, device: torch.device, repeats: int, model_name: str = "resnet50") -> dict:
    dense_masks = all_true_masks(model)
    weights = {name: layer.weight.detach().clone() for name, layer in masked_layers(model)}

    def reset() -> None:
        set_masks(model, dense_masks)
        with torch.no_grad():
            for name, layer in masked_layers(model):
                layer.weight.copy_(weights[name])

    # torch.nn.utils.prune works on a plain (unmasked) copy holding the same weights.
    plain = torchvision.models.get_model(model_name).to(device)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(".mask")})

    # The three methods take turns in every repeat, so a busy machine slows them alike.
    ours_prune, ours_compute, theirs_seconds = [], [], []
    for _ in range(repeats + 1):  # the first repeat warms up allocator and kernels, not counted
        reset()
        seconds, _ = timed(lambda: pruning_masks.compute_masks(
            model, density=DENSITY, criterion="magnitude", allocation="global"), device)
        ours_compute.append(seconds)
        reset()
        seconds, ours = timed(lambda: pruning_masks.prune_model(
            model, density=DENSITY, criterion="magnitude", allocation="global"), device)
        ours_prune.append(seconds)
        candidate = copy.deepcopy(plain)
        parameters = [(module, "weight") for module in candidate.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
        seconds, _ = timed(lambda: prune.global_unstructured(
            parameters, pruning_method=prune.L1Unstructured, amount=1 - DENSITY), device)
        theirs_seconds.append(seconds)
    reset()
    names = [name for name, _ in masked_layers(model)]
    modules = dict(candidate.named_modules())
    theirs = {name: modules[name].weight_mask.to("cpu", torch.bool) for name in names}
    identical = all(torch.equal(ours[name], theirs[name]) for name in names)
    return {
        "ours_prune": statistics.median(ours_prune[1:]),
        "ours_compute": statistics.median(ours_compute[1:]),
        "theirs": statistics.median(theirs_seconds[1:]),
        "min": {"ours_prune": min(ours_prune[1:]), "ours_compute": min(ours_compute[1:]),
                "theirs": min(theirs_seconds[1:])},
        "identical": identical,
        "kept_ours": sum(int(m.sum()) for m in ours.values()),
        "kept_theirs": sum(int(m.sum()) for m in theirs.values()),
        "total": sum(m.numel() for m in ours.values()),
    }


def time_snip(model: nn.Module, device: torch.device, image_size: int, runs: int, seed: int = 0,
              batch_size: int = 8) -> float:
    """Median seconds of a global SNIP score on one batch of random images (random labels)."""
    generator = torch.Generator().manual_seed(seed)
    batch = [(torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device),
              torch.randint(0, 1000, (batch_size,), generator=generator).to(device))]
    snip_seconds = []
    for _ in range(runs):
        seconds, _ = timed(lambda: pruning_masks.compute_masks(
            model, density=DENSITY, criterion="snip", allocation="global", batches=batch), device)
        snip_seconds.append(seconds)
    return statistics.median(snip_seconds)


def time_synflow(model: nn.Module, device: torch.device, image_size: int, rounds: int) -> tuple:
    """(seconds, median seconds per round) of a global SynFlow score over ``rounds`` rounds."""
    round_ends = []
    start = time.perf_counter()
    seconds, _ = timed(lambda: pruning_masks.compute_masks(
        model, density=DENSITY, criterion="synflow", allocation="global", input_shape=(3, image_size, image_size),
        synflow_iterations=rounds, on_round=lambda k, d, masks: round_ends.append(time.perf_counter())), device)
    per_round = [b - a for a, b in zip([start] + round_ends, round_ends)]
    return seconds, statistics.median(per_round)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, 10 SynFlow rounds, 1 SNIP run")
    parser.add_argument("--smoke", action="store_true", help="SqueezeNet 1.1 at 64 px, 1 repeat, 2 SynFlow rounds: seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 7; quick 3)")
    parser.add_argument("--synflow-iterations", type=int, default=None, help="default 100 (quick 10)")
    parser.add_argument("--model", default="resnet50", help="a torchvision model name (default resnet50)")
    parser.add_argument("--image-size", type=int, default=224, help="px of the SNIP batch and the SynFlow input")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.quick, args.model, args.image_size = True, "squeezenet1_1", 64
        args.repeats, args.synflow_iterations = args.repeats or 1, args.synflow_iterations or 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    synflow_iterations = args.synflow_iterations or (10 if args.quick else 100)
    snip_runs = 1 if args.quick else 3
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    model = prepare_model(torchvision.models.get_model(args.model)).to(device)
    seed = draw_weights_without_tie_at_cut(model, args.seed)
    print(f"{args.model}, {sum(m.numel() for m in all_true_masks(model).values()):,} prunable weights, "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, weight seed {seed}")

    result = bench_global_magnitude(model, device, repeats, args.model)
    speedup = result["theirs"] / result["ours_prune"]
    print(f"\nglobal magnitude to {DENSITY:.0%} density (median of {repeats} runs after 1 warm-up):")
    rows = [("torch.nn.utils.prune.global_unstructured (L1Unstructured, amount=0.8)", "theirs"),
            ("pruning_utils.prune_model (compute + install masks)", "ours_prune"),
            ("pruning_utils.compute_masks (masks only)", "ours_compute")]
    for label, key in rows:
        print(f"  {label:<72} {result[key] * 1e3:8.1f} ms  (min {result['min'][key] * 1e3:7.1f} ms)")
    print(f"  speed-up (prune_model): {speedup:.1f}x  (target >= {SPEEDUP_TARGET:.0f}x: "
          f"{'met' if speedup >= SPEEDUP_TARGET else 'NOT met'})")
    print(f"  kept {result['kept_ours']:,} (ours) / {result['kept_theirs']:,} (torch) of {result['total']:,}; "
          f"masks identical: {result['identical']}")

    side = args.image_size
    snip = time_snip(model, device, side, snip_runs, args.seed)
    print(f"\nSNIP, 1 batch of 8 x 3x{side}x{side}, global: {snip:.2f} s (median of {snip_runs})")
    seconds, per_round = time_synflow(model, device, side, synflow_iterations)
    print(f"SynFlow, {synflow_iterations} rounds, 1 x 3x{side}x{side} in "
          f"{criteria.synflow_dtype(device)}, global: {seconds:.1f} s ({per_round:.2f} s per round, median)")

    if not result["identical"] or result["kept_ours"] != result["kept_theirs"]:
        print("ERROR: masks differ from torch.nn.utils.prune's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
