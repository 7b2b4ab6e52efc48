"""The pruning command: masks of one level for a checkpoint, as the harness would compute them.

    python -m utils.pruning_utils --config FILE --checkpoint CKPT --density D --out MASKS.pt \\
        [--criterion C] [--allocation A] [--seed S] [--level L] [--device cpu]

(``python -m utils.pruning.command`` is the same command.)  An entry point, like ``utils.sweep``:
it reads the experiment YAML through the harness's own loader (``harness_params.resolve``:
every key declared and checked, old key names read, the same defaults and refusals as
``harness.py``), and computes the masks with the harness's own call
(its structure's ``masks`` with ``harness_utils.scoring``), so with the same config, the weights
the harness pruned from and ``--level L``, the masks are the harness's masks of level L, bit for bit.
``--criterion``, ``--allocation`` and ``--seed`` override ``prune.criterion``,
``prune.allocation`` and ``experiment.seed``.

It builds ``model.name`` for ``dataset.name`` (``model.blurpool`` and ``prune.exclude``
applied), loads the checkpoint (a state_dict or a dict with key ``model``; its ``*.mask``
buffers, when present, are the current masks), and asks the criterion's registry entry what
it needs: a criterion that needs training batches (``snip``; an outside
``package.module:function`` unless it says otherwise) reads ``prune.score_batches`` batches of
``dataset.train_path``.  It writes the masks atomically and prints a per-layer density table.
A structure whose level target is a density (unstructured, channel: a density of channels)
takes ``--density``; one whose settings fix the targets (N:M) and per-layer rates
(``prune.layer_rates``) are refused (the harness computes those).  A bad argument or input: one line on stderr, exit status 2,
nothing written.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from utils.models.mask_layers import MaskError, Masks, density_report, prepare_model
from utils.pruning import allocations, criteria
from utils.runs.checkpointing import atomic_torch_save

PROG = "python -m utils.pruning_utils"


class UsageError(Exception):
    """A bad argument or input file: one line on stderr, exit status 2, nothing written."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(message)


def _checkpoint_state(path: str) -> Dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint {path} does not exist") from None
    except Exception as error:  # torch raises several types for a bad file
        raise UsageError(f"cannot load checkpoint {path}: {str(error).splitlines()[0]}") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"checkpoint {path} holds neither a state_dict nor a dict with key 'model'")
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def _load_state(model: nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith(".mask")]  # no masks = dense
    if missing or result.unexpected_keys:
        detail = []
        if missing:
            detail.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if result.unexpected_keys:
            keys = result.unexpected_keys
            detail.append(f"unexpected {keys[:3]}{'...' if len(keys) > 3 else ''}")
        raise UsageError(f"checkpoint {path} does not fit the model ({'; '.join(detail)})")


def format_density_table(masks: Masks) -> str:
    rows = density_report(masks)
    width = max([len("layer"), len("total")] + [len(row["layer"]) for row in rows])
    lines = [f"{'layer':<{width}}  {'numel':>11}  {'alive':>11}  {'density':>8}"]
    lines += [f"{row['layer']:<{width}}  {row['numel']:>11d}  {row['alive']:>11d}  {row['density']:>8.4f}"
              for row in rows]
    numel = sum(row["numel"] for row in rows)
    alive = sum(row["alive"] for row in rows)
    lines.append(f"{'total':<{width}}  {numel:>11d}  {alive:>11d}  {alive / numel:>8.4f}")
    return "\n".join(lines)


def _read_config(path: str, overrides: Dict[str, str]) -> Dict:
    """The experiment config through the harness's loader; its refusal becomes a UsageError."""
    import harness_params

    try:
        return harness_params.resolve(path, overrides)
    except harness_params.ConfigError as error:
        raise UsageError(f"config {path}: {error}") from None


def _run_cli(argv: Optional[Sequence[str]]) -> None:
    parser = _Parser(prog=PROG, description="Compute pruning masks for a checkpoint.")
    parser.add_argument("--config", required=True, help="experiment YAML (read as harness.py reads it)")
    parser.add_argument("--checkpoint", required=True, help="state_dict, or a dict with key 'model'")
    parser.add_argument("--density", required=True, type=float, help="fraction of ALL prunable weights to keep")
    parser.add_argument("--out", required=True, help="where to write the masks (dict layer -> bool tensor)")
    parser.add_argument("--criterion", help=f"overrides prune.criterion ({', '.join(criteria.SCORES)}, "
                                            f"or package.module:function)")
    parser.add_argument("--allocation", help=f"overrides prune.allocation ({', '.join(allocations.ALLOCATIONS)})")
    parser.add_argument("--seed", type=int, help="overrides experiment.seed")
    parser.add_argument("--level", type=int, default=0,
                        help="the level these masks are for (default 0): with the same config and the weights the "
                             "harness pruned from, the harness's masks of that level, bit for bit (random scores "
                             "seeded by seed*1000+level, a criterion's batches those of that level)")
    parser.add_argument("--device", default="cpu", help="where scores are computed (default cpu)")
    args = parser.parse_args(argv)

    if not 0.0 < args.density <= 1.0:  # also refuses nan
        raise UsageError(f"--density must be in (0, 1], got {args.density}")
    if args.level < 0:
        raise UsageError(f"--level must be >= 0, got {args.level}")
    overrides = {key: str(value) for key, value in (("prune.criterion", args.criterion),
                                                    ("prune.allocation", args.allocation),
                                                    ("experiment.seed", args.seed)) if value is not None}
    c = _read_config(args.config, overrides)
    import harness_utils as hu
    structure = hu.structure_of(c)
    if not structure.density_targets or c["prune.layer_rates"]:
        what = "prune.layer_rates" if c["prune.layer_rates"] else f"prune.structure={c['prune.structure']}"
        raise UsageError(f"{what}: this command computes unstructured masks and masks whose level target is a "
                         f"density (--density); the harness computes these")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")

    from utils.data.records import resolve_dataset_spec
    from utils.models.blurpool import add_blurpool_
    from utils.models.registry import get_model

    try:
        spec = resolve_dataset_spec(c["dataset.name"], train_path=c["dataset.train_path"])
        image_size = c["dataset.resolution"] or spec.resolution  # 0 = the dataset's own, as in the harness
        model = get_model(c["model.name"], num_classes=spec.num_classes, in_channels=spec.channels,
                          image_size=image_size)
        if c["model.blurpool"]:
            add_blurpool_(model)
        prepare_model(model, c["prune.exclude"])
    except (ValueError, KeyError, MaskError) as error:
        raise UsageError(str(error).strip("'\"").splitlines()[0]) from None
    _load_state(model, _checkpoint_state(args.checkpoint), args.checkpoint)
    model.to(device)

    criterion = criteria.get_criterion(c["prune.criterion"])  # the config loader checked it imports
    batches = None
    if criterion.needs_batches:
        train_path = c["dataset.train_path"]
        if not os.path.exists(train_path):
            raise UsageError(f"dataset.train_path {train_path} does not exist (criterion {c['prune.criterion']} "
                             f"needs training batches)")
        try:
            loader = hu.make_data_loader(c, spec, device, train=True, resolution=image_size, rank=0, world_size=1)
        except hu.UserError as error:
            raise UsageError(str(error).splitlines()[0]) from None
        batches = loader.batches(criteria.SCORE_EPOCH_OFFSET + args.level)
    input_shape = (spec.channels, image_size, image_size)
    try:
        structure.attach(model, input_shape, [args.density])
        scoring = hu.scoring(c, level=args.level, batches=batches, device=device, input_shape=input_shape)
        masks = structure.masks(model, args.density, scoring)
    except (ValueError, MaskError) as error:
        raise UsageError(str(error).splitlines()[0]) from None
    atomic_torch_save({name: mask.to("cpu", dtype=torch.bool) for name, mask in masks.items()}, args.out)
    print(f"{c['prune.criterion']} x {c['prune.allocation']}, density {args.density} -> {args.out}")
    print(format_density_table(masks))


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        _run_cli(argv)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
