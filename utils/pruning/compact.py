"""Compaction: a channel-pruned level -> a physically smaller network, checked and measured.

    python -m utils.compact --experiment DIR --level L --out FILE.pt [--batch-size N] [--repeats R]
    python -m utils.compact --experiment DIR --level L --format semi-structured [--batch-size N] [--repeats R]

``--format semi-structured`` (an N:M run's 2:4 level, ``utils/pruning/nm.py``): on a CUDA GPU of
compute capability >= 8.0, the level's 2:4 linear layers become torch's semi-structured sparse
tensors (fp16), the outputs are checked against the dense fp16 network and the inference time
of both is printed (nothing is written); anywhere else it says in one line that it needs such a
GPU (exit status 2).

* Reads ``DIR/config.yaml`` (model, dataset, ``prune.exclude``; ``prune.structure`` must be one
  whose masks compact by channels: the structure says, ``Structure.compaction``), the level's masks ``DIR/masks/level_L.pt`` and the level's FINAL weights:
  ``DIR/checkpoints/level_L.pt`` when the harness keeps one (a dict with key ``model``),
  otherwise ``DIR/checkpoints/last.pt`` when it holds level L finished (``phase ==
  'level_done'``), which is the case for the last level of a finished run.  Any other level
  is refused in one line: its final weights are not on disk (the harness overwrites
  ``last.pt`` every epoch).  The mask buffers inside the weights must equal the masks file.
* Compaction removes the dead units of every coupled channel group (``utils.pruning.channel_graph``:
  rows of the producing convs, their BatchNorm channels and biases, columns of the
  consuming layers) with torch-pruning's pruning functions, on a copy of the model whose
  masked layers were turned back into plain ``nn.Conv2d`` / ``nn.Linear``: the result is
  the same class of model (e.g. ``CifarResNet``) with fewer channels; groups without a dead
  unit and layers outside every group are untouched.
* The compacted network must compute the masked network's outputs (eval mode, float32, a
  random batch): otherwise nothing is written and the exit status is 1.
* It is saved in eval mode (BatchNorm uses its running statistics) so that plain PyTorch
  opens it without this project's code: ``FILE.pt2`` with ``torch.export`` (open with
  ``torch.export.load(FILE).module()``; the batch size is dynamic), any other name with
  TorchScript (``torch.jit.load(FILE)``).  Written atomically (temporary file + rename).
* Printed: parameters, FLOPs per image (``torch.utils.flop_counter``, dense arithmetic: the
  masked network computes its zeros too) and inference time (median of ``--repeats`` runs
  after warm-up) at batch 1 and at a training batch (``dataset.batch_size`` unless
  ``--batch-size``), on CPU, and on CUDA when present, before and after.

A bad argument or input: one line on stderr, exit status 2, nothing written.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from utils.core.atomic_io import atomic_output
from utils.models.mask_layers import MaskedLayer, masked_layers
from utils.pruning.channel_graph import ChannelStructure, StructureError, _torch_pruning, build_channel_structure
from utils.pruning.channel_select import get_current_masks, units_alive
from utils.runs.rundir import RunDirError, RunFiles, as_tree, read_config

PROG = "python -m utils.compact"


class CompactionError(RuntimeError):
    """The compacted network does not compute what the masked one does."""


class UsageError(Exception):
    """A bad argument or input: one line, exit status 2, nothing written."""


# ------------------------------------------------------------------------------ compaction
def strip_masks_(model: nn.Module) -> nn.Module:
    """Turn every masked layer back into its plain class and drop its ``mask`` buffer (in place)."""
    for _, layer in list(masked_layers(model)):
        base = next(cls for cls in type(layer).__mro__[1:]
                    if not issubclass(cls, MaskedLayer) and issubclass(cls, nn.Module))
        del layer._buffers["mask"]
        layer.__class__ = base
    return model


def compact_model(model: nn.Module, structure: ChannelStructure, input_shape: Sequence[int]) -> nn.Module:
    """A smaller copy of ``model`` (CPU, float32, eval mode, plain layers) without the dead
    channel units of ``structure``.  ``model`` itself is left as it is."""
    tp = _torch_pruning()
    alive = units_alive(structure, get_current_masks(model))
    small = strip_masks_(copy.deepcopy(model).to("cpu", torch.float32)).eval()
    for parameter in small.parameters():
        parameter.requires_grad_(True)
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(small, example_inputs=torch.zeros(1, *input_shape),
                                                      verbose=False)
    modules = dict(small.named_modules())
    for group in structure.groups:
        dead = ~alive[group.name]
        if not bool(dead.any()):
            continue
        root = group.producers[0]
        indices = sorted(int(i) for i in root.index[dead[root.unit]])
        module = modules[root.layer]
        pruner = graph.get_pruner_of_module(module)
        tp_group = graph.get_pruning_group(module, pruner.prune_out_channels, indices)
        if not graph.check_pruning_group(tp_group):
            raise CompactionError(f"torch-pruning refuses to remove {len(indices)} channels of group {group.name}")
        tp_group.prune(record_history=False)
    for parameter in small.parameters():
        parameter.requires_grad_(False)
    return small.eval()


@torch.no_grad()
def max_output_difference(reference: nn.Module, candidate: nn.Module, inputs: torch.Tensor) -> Tuple[float, float]:
    """(max |reference(x) - candidate(x)|, max |reference(x)|), both in eval mode on CPU float32."""
    reference = copy.deepcopy(reference).to("cpu", torch.float32).eval()
    candidate = candidate.to("cpu", torch.float32).eval()
    expected, got = reference(inputs), candidate(inputs)
    return float((expected - got).abs().max()), float(expected.abs().max())


def check_same_outputs(reference: nn.Module, candidate: nn.Module, input_shape: Sequence[int],
                       batch: int = 8, seed: int = 0, rtol: float = 1e-4) -> float:
    """Raise CompactionError unless the outputs agree to ``rtol`` of their scale; -> the max difference."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, *input_shape, generator=generator)
    difference, scale = max_output_difference(reference, candidate, inputs)
    if not difference <= rtol * max(scale, 1.0):
        raise CompactionError(f"compacted outputs differ from the masked network's by {difference:.3g} "
                              f"(output scale {scale:.3g}, tolerance {rtol:g} relative)")
    return difference


# ----------------------------------------------------------------------------- measurements
def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero_weights(model: nn.Module) -> int:
    return sum(int(p.count_nonzero()) for p in model.parameters())


@torch.no_grad()
def flops_per_image(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs (2 x multiply-adds) of one eval-mode forward on one image, as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape, device=device))
    return int(counter.get_total_flops())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function, device: torch.device, repeats: int = 10, warmup: int = 2,
                   budget_s: float = 30.0) -> float:
    """Median wall time of ``function()`` over ``repeats`` runs after ``warmup`` (stops early
    after ``budget_s`` seconds, with at least one timed run)."""
    for _ in range(warmup):
        function()
    _synchronize(device)
    times: List[float] = []
    started = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - started < budget_s):
        begin = time.perf_counter()
        function()
        _synchronize(device)  # note: a CPU-GPU sync point, so the time covers the kernels
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def inference_seconds(model: nn.Module, input_shape: Sequence[int], batch: int, device: torch.device,
                      repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    model = model.to(device).eval()
    inputs = torch.randn(batch, *input_shape, device=device, dtype=dtype)

    def run():
        with torch.inference_mode():
            model(inputs)
    return median_seconds(run, device, repeats)


def train_step_seconds(model: nn.Module, input_shape: Sequence[int], batch: int, num_classes: int,
                       device: torch.device, repeats: int = 10) -> float:
    """One SGD step (forward, cross-entropy, backward, step) on a random batch, train mode."""
    model = copy.deepcopy(model).to(device).train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    inputs = torch.randn(batch, *input_shape, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
    return median_seconds(step, device, repeats)


def devices_present() -> List[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def save_portable(model: nn.Module, input_shape: Sequence[int], path: str) -> str:
    """Save ``model`` (eval mode, CPU) so that plain PyTorch opens it, atomically; -> the format.

    ``*.pt2``: ``torch.export`` (batch dimension dynamic), open with
    ``torch.export.load(path).module()``.  Anything else: TorchScript (``torch.jit.trace``),
    open with ``torch.jit.load(path)``; PyTorch >= 2.9 marks TorchScript deprecated, and its
    FutureWarnings are silenced here because the user asked for that format by the name.
    """
    model = model.to("cpu").eval()
    exported = str(path).endswith(".pt2")
    with atomic_output(path, keep_suffix=True) as temporary:
        if exported:
            program = torch.export.export(model, (torch.zeros(2, *input_shape),),
                                          dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
            torch.export.save(program, str(temporary))
        else:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.save(torch.jit.trace(model, torch.zeros(1, *input_shape)), str(temporary))
    return "torch.export" if exported else "TorchScript"


# ------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _read_config(directory: Path) -> Dict[str, Dict]:
    """The run's config.yaml (utils.runs.rundir.read_config), nested by section."""
    try:
        return as_tree(read_config(directory))
    except RunDirError as error:
        raise UsageError(str(error)) from None


def _load(path: Path) -> Dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a bad file
        raise UsageError(f"cannot read {path}: {(str(error).strip().splitlines() or [type(error).__name__])[0][:200]}") \
            from None


def _model_state(checkpoint) -> Dict[str, torch.Tensor]:
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise UsageError("the checkpoint holds no 'model' state")
    for prefix in ("module.", "_orig_mod."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def level_weights(directory: Path, level: int) -> Tuple[Dict[str, torch.Tensor], str]:
    """(model state of level ``level``'s end, the file it came from), or UsageError."""
    per_level = RunFiles(directory).level_weights(level)
    if per_level.is_file():
        return _model_state(_load(per_level)), str(per_level)
    last = RunFiles(directory).last_checkpoint
    if not last.is_file():
        raise UsageError(f"{directory} has no checkpoints/last.pt: no finished level to compact")
    checkpoint = _load(last)
    held, phase = checkpoint.get("level"), checkpoint.get("phase")
    if held == level and phase == "level_done":
        return _model_state(checkpoint), str(last)
    if held == level:
        raise UsageError(f"level {level} is not finished yet (checkpoints/last.pt is at phase {phase!r}, "
                         f"epoch {checkpoint.get('next_epoch')})")
    raise UsageError(f"the final weights of level {level} are not on disk: checkpoints/last.pt holds level {held} "
                     f"({phase}) and there is no checkpoints/level_{level}.pt; only the level last.pt holds "
                     f"finished has them")


def _run(argv: Optional[Sequence[str]]) -> int:
    parser = _Parser(prog=PROG, description="Turn a channel-pruned level into a smaller network.")
    parser.add_argument("--experiment", required=True, help="experiment directory (config.yaml, masks/, checkpoints/)")
    parser.add_argument("--level", required=True, type=int, help="the level to compact")
    parser.add_argument("--out", help="output file: NAME.pt2 (torch.export) or NAME.pt (TorchScript); "
                                      "--format smaller only (required there)")
    parser.add_argument("--format", choices=("smaller", "semi-structured"), default="smaller",
                        help="smaller (default): channel-pruned -> fewer channels; semi-structured: a 2:4 level's "
                             "linear layers as torch's semi-structured sparse tensors, timed against dense (CUDA, "
                             "compute capability >= 8.0)")
    parser.add_argument("--batch-size", type=int, help="training batch for timing (default dataset.batch_size)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median; default 10)")
    parser.add_argument("--no-timing", action="store_true", help="skip the timings")
    args = parser.parse_args(argv)
    if args.format == "semi-structured":
        from utils.pruning import nm as nm_sparsity

        unavailable = nm_sparsity.semi_structured_unavailable()  # first: nothing else matters without it
        if unavailable:
            raise UsageError(f"--format semi-structured {unavailable}")
        if args.out is not None:
            raise UsageError("--out does not apply to --format semi-structured (it measures; nothing is written)")
    elif args.out is None:
        raise UsageError("the following arguments are required: --out")
    if args.level < 0:
        raise UsageError(f"--level must be >= 0, got {args.level}")
    if args.repeats < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise UsageError("--repeats and --batch-size must be >= 1")
    if args.out is not None and os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a directory")
    directory = Path(args.experiment)
    tree = _read_config(directory)
    prune = tree.get("prune") or {}
    if args.format == "semi-structured":
        return _run_semi_structured(args, directory, tree)
    if _compaction(prune) != "channels":
        raise UsageError(f"{directory} was not channel-pruned (prune.structure={prune.get('structure', 'unstructured')}); "
                         f"only channel-pruned levels can be compacted")
    model, spec, input_shape, source = level_model(directory, tree, args.level)
    model_name = tree["model"]["name"]
    try:
        structure = build_channel_structure(model, input_shape)
        small = compact_model(model, structure, input_shape)
    except StructureError as error:
        raise UsageError(str(error)) from None
    difference = check_same_outputs(model, small, input_shape)
    written_as = save_portable(small, input_shape, args.out)
    print(f"{PROG}: level {args.level} of {directory} ({model_name}, weights from {source}) -> {args.out} "
          f"({written_as})")
    print(f"outputs: compacted vs masked max |difference| {difference:.3g} (eval mode, float32, random batch of 8)")
    batch = args.batch_size or int(tree["dataset"].get("batch_size") or 128)
    print(format_comparison(model, small, input_shape, batch=batch, num_classes=spec.num_classes,
                            repeats=args.repeats, timing=not args.no_timing))
    return 0


def level_model(directory: Path, tree: Dict[str, Dict], level: int):
    """-> (the masked model holding level ``level``'s final weights, the dataset spec, the input
    shape, the file the weights came from), or UsageError."""
    masks_path = RunFiles(directory).masks(level)
    if not masks_path.is_file():
        raise UsageError(f"{masks_path} does not exist: level {level} was not reached")
    state, source = level_weights(directory, level)
    masks = {name: mask.to(torch.bool) for name, mask in _load(masks_path).items()}

    from utils.data.records import resolve_dataset_spec
    from utils.models.mask_layers import MaskError, prepare_model
    from utils.models.registry import get_model

    prune = tree.get("prune") or {}
    try:
        model_name, dataset_name = tree["model"]["name"], tree["dataset"]["name"]
        spec = resolve_dataset_spec(dataset_name, train_path=tree["dataset"].get("train_path"))
        resolution = (tree["dataset"].get("resolution") or 0) or spec.resolution
        model = get_model(model_name, num_classes=spec.num_classes, in_channels=spec.channels, image_size=resolution)
        prepare_model(model, prune.get("exclude") or [])
    except (KeyError, TypeError, ValueError, MaskError) as error:
        raise UsageError(f"cannot build the model of {directory}/config.yaml: {str(error).splitlines()[0]}") from None
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UsageError(f"{source} does not fit {model_name} (missing {result.missing_keys[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]})")
    held = get_current_masks(model)
    if set(held) != set(masks) or any(not torch.equal(held[name], masks[name]) for name in masks):
        raise UsageError(f"the masks in {source} differ from {masks_path}: the weights are not level {level}'s")
    return model, spec, (spec.channels, resolution, resolution), source


def _compaction(prune: Dict[str, object]) -> object:
    """What this command can make of a run's masks: its structure says (``Structure.compaction``)."""
    from utils.pruning.structures import StructureRegistryError, get_structure
    try:
        return get_structure(str(prune.get("structure") or "unstructured")).compaction
    except StructureRegistryError as error:
        raise UsageError(f"prune.structure: {error}") from None


def _run_semi_structured(args, directory: Path, tree: Dict[str, Dict]) -> int:
    """A 2:4 level's linear layers as semi-structured sparse tensors vs dense, fp16 on this GPU."""
    from utils.pruning import nm as nm_sparsity

    prune = tree.get("prune") or {}
    if _compaction(prune) != "semi-structured":
        raise UsageError(f"{directory} is not an N:M run (prune.structure={prune.get('structure', 'unstructured')}); "
                         f"--format semi-structured needs a level that keeps 2 of every 4")
    model, spec, input_shape, source = level_model(directory, tree, args.level)
    masks = get_current_masks(model)
    device = torch.device("cuda")
    dense = strip_masks_(copy.deepcopy(model)).to(device, torch.float16).eval()
    sparse = copy.deepcopy(dense)
    converted, skipped = nm_sparsity.to_semi_structured_(sparse, masks)
    if not converted:
        reasons = "; ".join(f"{name}: {why}" for name, why in list(skipped.items())[:3]) or "no linear layer"
        raise UsageError(f"level {args.level} of {directory} has no linear layer that torch can hold as 2:4 "
                         f"semi-structured ({reasons})")
    batch = args.batch_size or int(tree["dataset"].get("batch_size") or 128)
    inputs = torch.randn(batch, *input_shape, device=device, dtype=torch.float16)
    with torch.inference_mode():
        expected, got = dense(inputs).float(), sparse(inputs).float()
    difference, scale = float((expected - got).abs().max()), float(expected.abs().max())
    if not difference <= 1e-2 * max(scale, 1.0):  # fp16 rounding of the same products, summed in another order
        raise CompactionError(f"semi-structured outputs differ from dense by {difference:.3g} (scale {scale:.3g})")
    print(f"{PROG}: level {args.level} of {directory} (weights from {source}), {torch.cuda.get_device_name()}, fp16")
    print(f"2:4 semi-structured: {len(converted)} linear layers ({', '.join(converted[:6])}"
          f"{', ...' if len(converted) > 6 else ''}); dense: {len(skipped)} others"
          + (f" ({'; '.join(f'{name}: {why}' for name, why in list(skipped.items())[:3])})" if skipped else ""))
    print(f"outputs: semi-structured vs dense max |difference| {difference:.3g} (output scale {scale:.3g})")
    if not args.no_timing:
        for size in (1, batch):
            times = [inference_seconds(net, input_shape, size, device, args.repeats, dtype=torch.float16)
                     for net in (dense, sparse)]
            print(f"inference ms, batch {size}, cuda fp16: dense {1e3 * times[0]:.3f}, semi-structured "
                  f"{1e3 * times[1]:.3f}, speed-up {times[0] / times[1]:.2f}x")
    return 0


def format_comparison(before: nn.Module, after: nn.Module, input_shape: Sequence[int], *, batch: int,
                      num_classes: int, repeats: int = 10, timing: bool = True) -> str:
    """A table of parameters, FLOPs and inference times of ``before`` (masked) and ``after``."""
    before = strip_masks_(copy.deepcopy(before).to("cpu", torch.float32)).eval()
    rows = [("parameters", count_parameters(before), count_parameters(after), "{:,}"),
            ("nonzero parameters", count_nonzero_weights(before), count_nonzero_weights(after), "{:,}"),
            ("FLOPs per image", flops_per_image(before, input_shape), flops_per_image(after, input_shape), "{:,}")]
    if timing:
        for device in devices_present():
            for size in (1, batch):
                rows.append((f"inference ms, batch {size}, {device.type}",
                             1e3 * inference_seconds(before, input_shape, size, device, repeats),
                             1e3 * inference_seconds(after, input_shape, size, device, repeats), "{:.2f}"))
    width = max(len(row[0]) for row in rows)
    lines = [f"{'':<{width}}  {'masked':>16}  {'compacted':>16}  {'ratio':>7}"]
    for label, old, new, fmt in rows:
        ratio = old / new if new else float("inf")
        lines.append(f"{label:<{width}}  {fmt.format(old):>16}  {fmt.format(new):>16}  {ratio:>6.2f}x")
    before.to("cpu"), after.to("cpu")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _run(argv)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except CompactionError as error:
        print(f"{PROG}: error: {error}; nothing written", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
