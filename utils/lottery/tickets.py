"""Tickets leave the harness: ``python -m utils.ticket export | show | plain``.

    python -m utils.ticket export --experiment DIR --level L [--out FILE] [--without-trained]
    python -m utils.ticket show FILE
    python -m utils.ticket plain (--experiment DIR --level L | --ticket FILE) --out FILE.pt

``export`` writes level L of a run directory as one ticket file (``utils.models.ticket_file``;
default ``DIR/tickets/level_L.safetensors``): the masks of levels 0..L (the level's masks and
the lineage a control trains level by level), the initial weights (``checkpoints/init.pt``),
the weights at the level's end and, for WR, the rewind point's (``checkpoints/rewind.pt``).
Its metadata: model name and arguments, the dataset (its spec and the training file's write
record), the resolved config, per-layer densities, the levels.csv rows of levels 0..L, the
project's commit, and each tensor group's checksum.

The weights at a level's end are on disk only for the level ``checkpoints/last.pt`` holds
finished (the last level of a finished run) and for levels with ``checkpoints/level_L.pt``
(channel structure): the harness overwrites ``last.pt`` every epoch, and this is the rule of
``utils.compact`` (``level_weights``), reused here.  Any other level is refused in one line,
naming the level that can be exported, unless ``--without-trained`` (then the file holds no
``trained`` group, and ``plain`` and ``model.weights=FILE:trained`` refuse it).  A level that
is not finished (no levels.csv row) is refused.

``show`` prints the metadata and a per-layer table after checking the checksums; it reads the
file's header and bytes only (no torch, no model).

``plain`` (``utils.lottery.plain``) writes the trained network as a state dict of the ordinary
model class.

A ticket file goes in wherever a run directory does: ``prune.masks_from=FILE``
(``utils.lottery.controls``) and ``model.weights=FILE[:init|trained|rewind]``
(``utils.models.pretrained``).  A bad argument or input: one line on stderr, exit status 2,
nothing written.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from utils.models import ticket_file
from utils.runs.rundir import RunDirError, RunFiles, read_config

PROG = "python -m utils.ticket"
ROOT = Path(__file__).resolve().parents[2]


class UsageError(Exception):
    """A bad argument or input: one line, exit status 2, nothing written."""


# --------------------------------------------------------------------------- what a level holds
def model_arguments(config: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(the model's name and arguments, the dataset's description) of a run's config: what
    ``utils.models.registry.get_model`` and ``mask_layers.prepare_model`` need to rebuild it."""
    from utils.data.records import read_record, resolve_dataset_spec
    from utils.data.sources import DataError

    train_path = config.get("dataset.train_path")
    try:
        spec = resolve_dataset_spec(config["dataset.name"], train_path=train_path)
    except DataError as error:
        raise UsageError(f"dataset.name={config['dataset.name']}: {error}") from None
    try:
        record = read_record(train_path) if train_path else None
    except DataError:
        record = None
    resolution = config.get("dataset.resolution") or spec.resolution  # the harness's training resolution
    model = {"name": config["model.name"], "num_classes": spec.num_classes, "in_channels": spec.channels,
             "image_size": int(resolution), "blurpool": bool(config.get("model.blurpool", False)),
             "exclude": list(config.get("prune.exclude") or [])}
    data = {"name": spec.name, "num_classes": spec.num_classes, "channels": spec.channels,
            "resolution": spec.resolution, "classes": list(spec.classes) if spec.classes else None,
            "mean": list(spec.mean), "std": list(spec.std), "write_record": record}
    return model, data


def _load(path: Path) -> Any:
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- torch raises several types for a bad file
        raise UsageError(f"{path} cannot be read ({(str(error).strip().splitlines() or [type(error).__name__])[0][:160]})") \
            from None


def _level_masks(files: RunFiles, level: int) -> Dict[str, Any]:
    import torch
    path = files.masks(level)
    if not path.is_file():
        raise UsageError(f"{path} is missing")
    masks = _load(path)
    if not isinstance(masks, dict) or not all(isinstance(v, torch.Tensor) for v in masks.values()):
        raise UsageError(f"{path} is not a dict of layer name -> mask tensor")
    return {name: mask.to(torch.bool) for name, mask in masks.items()}


def _without_masks(state: Mapping[str, Any], masks: Mapping[str, Any]) -> Dict[str, Any]:
    buffers = {f"{name}.mask" for name in masks}
    return {key: value for key, value in state.items() if key not in buffers}


def _checkpoint_model(path: Path, kind: str) -> Dict[str, Any]:
    from utils.runs.checkpointing import CorruptCheckpoint, load_checkpoint
    try:
        return dict(load_checkpoint(path, kind)["model"])
    except CorruptCheckpoint as error:
        raise UsageError(str(error)) from None


def trained_state(directory: Path, level: int, masks: Mapping[str, Any]) -> Tuple[Dict[str, Any], str]:
    """(level ``level``'s weights at its end, masks aside, the file they came from); UsageError when
    they are not on disk or are not that level's (their mask buffers differ, a pruned weight is not 0)."""
    import torch
    from utils.pruning import compact
    try:
        state, source = compact.level_weights(directory, level)
    except compact.UsageError as error:
        raise UsageError(f"{error}; export with --without-trained to leave them out") from None
    for name, mask in masks.items():
        held = state.get(f"{name}.mask")
        if held is None or not torch.equal(held.to(torch.bool), mask):
            raise UsageError(f"the masks in {source} differ from masks/level_{level}.pt at {name}: "
                             f"they are not level {level}'s weights")
        weight = state.get(f"{name}.weight")
        if weight is not None and bool(weight[~mask].any()):
            raise UsageError(f"{source}: {name} has nonzero pruned weights; not a finished level")
    return _without_masks(state, masks), source


def commit_of(root: Path = ROOT) -> str:
    """The project's git commit (``-dirty`` when the work tree differs), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root, capture_output=True, timeout=30)
        return head.stdout.strip() + ("-dirty" if dirty.returncode else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _numbers(row: Mapping[str, str]) -> Dict[str, Any]:
    def value(text: str) -> Any:
        try:
            return int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            return text if text != "" else None
    return {key: value(text) for key, text in row.items()}


def export_ticket(directory, level: int, out=None, *, trained: bool = True) -> Tuple[Path, Dict[str, Any]]:
    """Write level ``level`` of run ``directory`` as a ticket file -> (its path, its metadata)."""
    from utils.core.atomic_io import atomic_write_bytes, make_dirs
    from utils.lottery.controls import ControlError, finished_level_count
    from utils.models.mask_layers import density_report
    from utils.training.training_types import TrainingTypeError, get_training_type

    root = Path(directory)
    try:
        config = read_config(root)
    except RunDirError as error:
        raise UsageError(str(error)) from None
    files = RunFiles(root)
    try:
        done = finished_level_count(files.levels.path, str(root))
    except ControlError as error:
        raise UsageError(str(error)) from None
    if not 0 <= level < done:
        raise UsageError(f"level {level} of {root} is not finished ({done} levels are: 0 to {done - 1})" if done
                         else f"{root} has no finished level yet (levels.csv has no rows)")
    masks = [_level_masks(files, k) for k in range(level + 1)]
    try:
        lineage = ticket_file.lineage_of(masks)
    except ValueError as error:
        raise UsageError(f"{root}: {error}") from None
    groups = {"masks": masks[-1], "lineage": lineage,
              "init": _without_masks(_checkpoint_model(files.init_checkpoint, "init"), masks[-1])}
    taken_from = {"masks": [str(files.masks(k).relative_to(root)) for k in range(level + 1)],
                  "init": str(files.init_checkpoint.relative_to(root))}
    if trained:
        groups["trained"], source = trained_state(root, level, masks[-1])
        taken_from["trained"] = str(Path(source).relative_to(root))
    try:
        rewinds = get_training_type(str(config.get("prune.training_type", "imp"))).captures_rewind
    except TrainingTypeError as error:
        raise UsageError(f"prune.training_type: {error}") from None
    if rewinds:
        groups["rewind"] = _without_masks(_checkpoint_model(files.rewind_checkpoint, "rewind"), masks[-1])
        taken_from["rewind"] = str(files.rewind_checkpoint.relative_to(root))
    model, data = model_arguments(config)
    layers = [{**row, "shape": list(masks[-1][row["layer"]].shape)} for row in density_report(masks[-1])]
    alive, total = sum(row["alive"] for row in layers), sum(row["numel"] for row in layers)
    metadata = {"level": level, "source": str(root.resolve()), "model": model, "data": data, "config": config,
                "layers": layers, "density": alive / total if total else 1.0,
                "levels": [_numbers(row) for row in files.levels.records()[:level + 1]],
                "commit": commit_of(), "taken_from": taken_from, "run_data": _run_data(root)}
    path = Path(out) if out else files.ticket(level)
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory")
    data_bytes = ticket_file.encode(groups, json.loads(json.dumps(metadata, default=str)))
    make_dirs(path.parent)
    atomic_write_bytes(path, data_bytes)
    return path, metadata


# ----------------------------------------------------------------------------------- show
def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def show_lines(path) -> List[str]:
    """What ``show`` prints: the metadata and a per-layer table (checksums checked; no torch)."""
    try:
        header = ticket_file.read_header(path)
        meta = ticket_file.verify_file(path)
    except ticket_file.TicketError as error:
        raise UsageError(str(error)) from None
    model, data, config = meta.get("model", {}), meta.get("data", {}), meta.get("config", {})
    counts = {}
    for name, (_, shape) in header.tensors.items():
        group = name.split("/", 1)[0]
        numel = 1
        for size in shape:
            numel *= size
        tensors, values = counts.get(group, (0, 0))
        counts[group] = (tensors + 1, values + numel)
    level = meta.get("level")
    row = next((r for r in meta.get("levels", []) if r.get("level") == level), {})
    record = data.get("write_record") or {}
    lines = [
        f"{path}: lottery ticket ({ticket_file.FORMAT}), level {level} of {meta.get('source')}",
        "checksums: OK (" + ", ".join(f"{g} {digest[:12]}" for g, digest in sorted(meta["checksums"].items())) + ")",
        "model: {name} (num_classes={num_classes}, in_channels={in_channels}, image_size={image_size}, "
        "blurpool={blurpool}, exclude={exclude})".format(**{k: model.get(k) for k in
                                                              ("name", "num_classes", "in_channels", "image_size",
                                                               "blurpool", "exclude")}),
        f"data: {data.get('name')}, {data.get('num_classes')} classes, {data.get('channels')} channel(s) of "
        f"{data.get('resolution')} px, mean {data.get('mean')}, std {data.get('std')}"
        + (f"; write record: {record.get('num_samples')} samples, sha256 {str(record.get('sha256'))[:12]}"
           if record else "; no write record"),
        f"pruning: {config.get('prune.training_type')} ({config.get('prune.structure', 'unstructured')}, "
        f"{config.get('prune.criterion')}, {config.get('prune.allocation')}), rate {config.get('prune.rate')}, "
        f"seed {config.get('experiment.seed')}; density {_fmt(meta.get('density'))}",
        "accuracy: " + (f"final {_fmt(row.get('final_test_acc'))}%, best {_fmt(row.get('best_test_acc'))}% "
                        f"(levels.csv row {level}); levels 0..{level}: "
                        + ", ".join(_fmt(r.get("final_test_acc")) for r in meta.get("levels", []))
                        if row else "not recorded"),
        "groups: " + ", ".join(f"{g} ({n} tensors, {v:,} values)" for g, (n, v) in sorted(counts.items())),
        f"commit: {meta.get('commit')}",
        "",
    ]
    table = [("layer", "shape", "numel", "alive", "density")] + [
        (r["layer"], "x".join(map(str, r["shape"])), f"{r['numel']:,}", f"{r['alive']:,}", f"{r['density']:.4f}")
        for r in meta.get("layers", [])]
    widths = [max(len(cells[i]) for cells in table) for i in range(5)]
    for cells in table:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths))))
    return lines


# ------------------------------------------------------------------------------------ command
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Lottery tickets as portable files: export a level of a run, show a "
                                            "ticket file, write a plain PyTorch state dict.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    export = commands.add_parser("export", help="level L of a run directory -> one .safetensors ticket file")
    export.add_argument("--experiment", required=True, help="experiment directory")
    export.add_argument("--level", required=True, type=int, help="the level to export (finished)")
    export.add_argument("--out", help="output file (default DIR/tickets/level_L.safetensors)")
    export.add_argument("--without-trained", action="store_true",
                        help="leave out the level's trained weights (for a level whose end weights are not on disk)")
    show = commands.add_parser("show", help="a ticket file's metadata and per-layer densities (no model is built)")
    show.add_argument("file", help="ticket file (.safetensors)")
    plain = commands.add_parser("plain", help="the trained level as a state dict of the ordinary model class")
    plain.add_argument("--experiment", help="experiment directory (with --level)")
    plain.add_argument("--level", type=int, help="the level (with --experiment)")
    plain.add_argument("--ticket", help="a ticket file instead of --experiment/--level")
    plain.add_argument("--out", required=True, help="output file (.pt: torch.save of the state dict)")
    return parser


def _run(argv: Optional[Sequence[str]]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "show":
        print("\n".join(show_lines(args.file)))
        return 0
    if args.command == "export":
        path, meta = export_ticket(args.experiment, args.level, args.out, trained=not args.without_trained)
        row = meta["levels"][-1] if meta["levels"] else {}
        print(f"{PROG} export: level {args.level} of {args.experiment} -> {path} ({path.stat().st_size:,} bytes; "
              f"density {meta['density']:.4g}, final test acc {_fmt(row.get('final_test_acc'))}%; groups "
              f"{', '.join(ticket_file.read_header(path).group_names())})")
        return 0
    from utils.lottery import plain
    if (args.ticket is None) == (args.experiment is None):
        raise UsageError("plain takes --experiment DIR --level L, or --ticket FILE (one of them)")
    if (args.experiment is None) != (args.level is None):
        raise UsageError("--level goes with --experiment (a ticket file is one level)")
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a directory")
    model_args, masks, trained, what = plain_inputs(args.experiment, args.level, args.ticket)
    try:
        print("\n".join(plain.write_plain(args.out, model_args, masks, trained, what=what)))
    except plain.PlainError as error:
        raise UsageError(str(error)) from None
    return 0


def plain_inputs(experiment, level: Optional[int], ticket) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any], str]:
    """(model arguments, the level's masks, its trained weights, a name for it) of a run's level or
    a ticket file; UsageError for a level ``plain`` does not write (``plain.refusal``)."""
    from utils.lottery import plain
    from utils.pruning.structures import StructureRegistryError, get_structure

    if ticket is not None:
        try:
            loaded = ticket_file.read_ticket(ticket)
            trained = loaded.weights("trained")
        except ticket_file.TicketError as error:
            raise UsageError(str(error)) from None
        config, model_args, masks = loaded.config, dict(loaded.metadata["model"]), loaded.groups["masks"]
        where, level = str(ticket), loaded.level
    else:
        try:
            config = read_config(experiment)
        except RunDirError as error:
            raise UsageError(str(error)) from None
        where = str(experiment)
    structure = str(config.get("prune.structure") or "unstructured")
    try:
        compaction = get_structure(structure).compaction
    except StructureRegistryError as error:
        raise UsageError(f"prune.structure: {error}") from None
    if ticket is None:
        model_args, _ = model_arguments(config)
    why_not = plain.refusal(structure, compaction, where, level, bool(model_args.get("blurpool")))
    if why_not:
        raise UsageError(why_not)
    if ticket is None:
        from utils.lottery.controls import ControlError, finished_level_count
        files = RunFiles(experiment)
        try:
            done = finished_level_count(files.levels.path, where)
        except ControlError as error:
            raise UsageError(str(error)) from None
        if not 0 <= level < done:
            raise UsageError(f"level {level} of {where} is not finished ({done} levels are)")
        masks = _level_masks(files, level)
        trained, _ = trained_state(Path(experiment), level, masks)
    return model_args, masks, trained, f"level {level} of {where}"


def _run_data(root: Path) -> Optional[Dict[str, Any]]:
    """The run's data.json (which data it trained and tested on), for a control from the file to
    check its own data against; None when the run records none or it cannot be read."""
    from utils.runs import data_identity
    try:
        return data_identity.read_run_data(root)
    except data_identity.DataChanged:
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _run(argv)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
