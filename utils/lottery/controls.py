"""Controls: train, level by level, the masks another experiment wrote.

``prune.masks_from=runs/X`` makes a run (the *control*) train X's masks instead of pruning
by itself: at level L it trains ``X/masks/level_L.pt``, with its own config's training
settings (optimizer, schedule, epochs, training_type, seed), and writes its results to
its own directory as any run does.  ``prune.control`` says what it does with them:

``none``     X's masks and X's initial weights (``X/checkpoints/init.pt``) as they are: a
             rerun of X's tickets (with other training settings, if the config says so).
``reinit``   X's masks, but the weights this run's own model was initialised with (its
             seed): Frankle & Carbin's random-reinitialisation control.
``shuffle``  in each layer, as many kept weights as X's mask keeps there, at random
             positions, from X's initial weights: the random-pruning control.  Positions
             come from one random priority per weight, drawn from a CPU generator seeded
             with (``experiment.seed``, layer index in module order): level L keeps the
             count_l(L) weights of highest priority.  So each level's mask is a uniformly
             random one with X's per-layer counts, and the masks of successive levels nest
             (masks only shrink, as in every run) -- which per-level independent draws
             seeded by (seed, level) would not give; every level's marginal distribution is
             the same either way.

Which levels exist: X's mask file for level L is written when level L STARTS (before its
training), so its existence does not mean the level is done.  A level counts as finished
once its row is in ``X/levels.csv`` (rows are appended whole, after the level's last
epoch); ``finished_levels`` counts those rows, and ``masks_for_level`` refuses a level that
is not finished yet.  So a control can start while X is still running and train the
levels X has finished (``wait_for_level`` blocks until the next one is).

Refused with a one-line ControlError (``read_source``): a source directory that does not
exist, is the control's own, has no readable ``config.yaml``, is itself a control, was
made with another ``model.name``, ``dataset.name``, ``prune.exclude`` or other training samples
(``dataset.val_fraction``, ``val_seed``, ``train_samples``), has no readable
``checkpoints/init.pt`` (key ``model``) fitting this model, or whose finished levels' mask
files are missing, unreadable or do not fit this model's prunable layers (names, shapes).

Level 0 taken, not retrained (``take_level_zero``): a ``none`` or ``shuffle`` control starts
from its source's initial weights, and a source's level 0 is dense, so when nothing else
differs the control's level 0 would be an exact copy of the source's -- the same training
computed again.  It is taken instead: the source's level-0 rows of ``epochs.csv``,
``levels.csv`` and ``layers.csv`` are copied (timing columns included: what the numbers cost),
its ``masks/level_0.pt`` too, and ``reused.csv`` (``level, source, reason``) says which level
came from where; the control trains from level 1 on.  All of these must hold, else it trains
level 0 and says why in one line:

* ``prune.control`` is ``none`` or ``shuffle`` (``reinit`` starts from its own weights);
* ``prune.training_type`` is ``imp``: later levels start from the initial weights (the
  source's ``init.pt``, which the control has).  ``wr`` and ``lrr`` start them from level 0's
  rewind point or trained weights, which the source does not keep for others;
* the configs are the same apart from ``prune.masks_from``, ``prune.control``,
  ``prune.levels`` and the keys that never change results (the harness's rule: the caller
  passes the keys that differ, ``differing``): same seed (so the same data order), loader,
  optimizer, epochs, precision, ...; no stability analysis, Early-Bird or a structure with
  columns of its own (channel, N:M: they write files of their own at level 0);
* the source's level 0 is finished and dense (its mask keeps every weight), with every
  epoch's row and every layer's row there, in CSV files with the control's columns;
* it ran on the same device type as the control, with the same number of processes
  whenever that changes the model (BatchNorm with per-rank statistics:
  ``run_facts.batchnorm_processes``), as its last checkpoint records.

Everything here takes plain arguments and a typed view of what a control asks
(``ControlRequest``); nothing reads the global config.  A source's levels are its own level plan
(``utils.training.level_plan``), built from its ``config.yaml``.
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from utils.models.mask_layers import Masks, mask_buffer_names
from utils.models.mask_layers import layer_shapes as mask_layer_shapes
from utils.pruning.structures.base import Structure
from utils.training.level_plan import LevelPlan, PlanError, parts_of, plan_levels
from utils.runs.rundir import RunDirError, RunFiles, read_config

CONTROLS = ("none", "reinit", "shuffle")
# Keys in which a control may differ from its source and still train the same level 0.
LEVEL_ZERO_FREE_KEYS = ("prune.masks_from", "prune.control", "prune.levels")
# Keys whose values must be the same in the source's config and the control's.
# the training samples too: a control trains on its source's (the validation split and subset, by index)
MATCHING_KEYS = ("model.name", "dataset.name", "prune.exclude", "dataset.val_fraction", "dataset.val_seed",
                 "dataset.train_samples")


class ControlError(ValueError):
    """A source experiment that cannot be used (or a level it does not have yet); one line."""


@dataclass(frozen=True)
class ControlRequest:
    """What a control run asks of its source: the keys controls read, as a typed view."""

    control: str                                # prune.control: none, reinit, shuffle
    levels: Optional[int]                       # prune.levels: at most this many of the source's levels
    own_dir: Optional[Path]                     # experiment.base_dir / experiment.name (None: not known)
    matching: Dict[str, Any]                    # MATCHING_KEYS -> this run's values
    training_type: str                          # prune.training_type
    structure: Optional[Structure] = None       # this run's pruning structure (None: not asked)
    stability: bool = False                     # analysis.stability
    early_bird: bool = False                    # prune.early_bird
    sync_bn: Any = "auto"                       # distributed.sync_bn
    epochs: int = 0                             # training.epochs

    @classmethod
    def from_config(cls, config: Mapping[str, Any], structure: Optional[Structure] = None) -> "ControlRequest":
        name = config.get("experiment.name")
        return cls(control=str(config.get("prune.control", "none")), levels=config.get("prune.levels"),
                   own_dir=Path(str(config.get("experiment.base_dir", ""))) / str(name) if name else None,
                   matching={key: config.get(key) for key in MATCHING_KEYS},
                   training_type=str(config.get("prune.training_type", "imp")), structure=structure,
                   stability=bool(config.get("analysis.stability", False)),
                   early_bird=bool(config.get("prune.early_bird", False)),
                   sync_bn=config.get("distributed.sync_bn", "auto"), epochs=int(config.get("training.epochs", 0)))


@dataclass(frozen=True)
class Source:
    root: Path
    config: Dict[str, Any]                      # the source's config.yaml, dotted keys
    layer_shapes: Dict[str, Tuple[int, ...]]    # prunable layer -> weight shape (this model's, module order)
    plan: LevelPlan                             # the source's own level plan
    structure: Structure                        # the source's pruning structure

    @property
    def planned_levels(self) -> int:
        """Levels the source's config asks for."""
        return len(self.plan)

    @property
    def planned_densities(self) -> List[float]:
        """Their target densities, as the source computes them."""
        return self.plan.densities

    def mask_path(self, level: int) -> Path:
        return RunFiles(self.root).masks(level)

    @property
    def levels_csv(self) -> Path:
        return RunFiles(self.root).levels.path

    @property
    def init_checkpoint(self) -> Path:
        return RunFiles(self.root).init_checkpoint


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:160]}" if lines else type(error).__name__


def _read_config(root: Path) -> Dict[str, Any]:
    try:
        return read_config(root)
    except RunDirError as error:
        raise ControlError(f"prune.masks_from={error}") from None


def _same_directory(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def read_source(path, request: ControlRequest, model: nn.Module,
                defaults: Optional[Mapping[str, Any]] = None) -> Source:
    """Check that experiment directory ``path`` can be the source of a control run.

    ``request``: what the control asks (its model, dataset, exclusions, levels, directory).
    ``model``: the control's model, prepared (its masked layers are the prunable ones).
    ``defaults``: the harness's defaults, for keys an older source's config.yaml lacks.
    -> Source, or ControlError naming what does not fit.
    """
    root = Path(path)
    if not root.is_dir():
        raise ControlError(f"prune.masks_from={path}: no such experiment directory")
    if request.own_dir is not None and _same_directory(root, request.own_dir):
        raise ControlError(f"prune.masks_from={path} is this run's own directory")
    source_config = _read_config(root)
    if source_config.get("prune.masks_from"):
        raise ControlError(f"prune.masks_from={path} is itself a control (of {source_config['prune.masks_from']}); "
                           f"use its source")
    for key in MATCHING_KEYS:
        mine, theirs = request.matching.get(key), source_config.get(key, (defaults or {}).get(key))  # (older runs)
        if key == "prune.exclude":
            mine, theirs = list(mine or []), list(theirs or [])
        if mine != theirs:
            raise ControlError(f"prune.masks_from={path} was made with {key}={theirs!r}, this run has {key}={mine!r}")
    layer_shapes = mask_layer_shapes(model)
    _check_initial_weights(RunFiles(root).init_checkpoint, model, path)
    plan, structure = _source_plan(source_config, defaults, layer_shapes, path)
    source = Source(root=root, config=source_config, layer_shapes=layer_shapes, plan=plan, structure=structure)
    wanted = request.levels
    if wanted is not None and wanted > source.planned_levels:
        raise ControlError(f"prune.levels={wanted} but prune.masks_from={path} has {source.planned_levels} levels "
                           f"in all; use at most {source.planned_levels} (or leave prune.levels unset)")
    for level in range(finished_levels(source)):
        load_level_masks(source, level)  # every finished level's file is checked now, not mid-run
    return source


def _source_plan(source_config: Mapping[str, Any], defaults: Optional[Mapping[str, Any]],
                 shapes: Mapping[str, Tuple[int, ...]], path) -> Tuple[LevelPlan, Structure]:
    """The source's levels and structure, as its own run plans them."""
    try:
        settings, training_type, structure = parts_of(source_config, defaults)
        return plan_levels(settings, training_type, structure, shapes), structure
    except (PlanError, KeyError, TypeError, ValueError) as error:
        raise ControlError(f"prune.masks_from={path}: its config.yaml does not say which levels it runs "
                           f"({_first_line(error)})") from None


def _check_initial_weights(path: Path, model: nn.Module, source_path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise ControlError(f"prune.masks_from={source_path}: {path} is missing (the source's initial weights)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- torch raises several types for a bad file
        raise ControlError(f"prune.masks_from={source_path}: {path} cannot be read ({_first_line(error)})") from None
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ControlError(f"prune.masks_from={source_path}: {path} holds no initial weights (key 'model')")
    masks = set(mask_buffer_names(model))
    own = {k: v for k, v in model.state_dict().items() if k not in masks}
    theirs = {k: v for k, v in state.items() if k not in masks}
    missing, unknown = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
    if missing or unknown:
        raise ControlError(f"prune.masks_from={source_path}: its initial weights do not fit this model "
                           f"(missing {missing[:3]}, unexpected {unknown[:3]})")
    for key, value in own.items():
        if tuple(theirs[key].shape) != tuple(value.shape):
            raise ControlError(f"prune.masks_from={source_path}: its initial {key} has shape {tuple(theirs[key].shape)}, "
                               f"this model's has {tuple(value.shape)}")
    return theirs


def finished_levels(source: Source) -> int:
    """Levels of the source that are finished: its levels.csv rows 0, 1, 2, ... (read afresh:
    the source may still be running)."""
    try:
        with open(source.levels_csv, newline="") as handle:
            rows = list(csv.reader(handle))[1:]
    except FileNotFoundError:
        return 0
    except OSError as error:
        raise ControlError(f"prune.masks_from={source.root}: cannot read levels.csv ({_first_line(error)})") from None
    count = 0
    for row in rows:
        if not row or row[0] != str(count):
            break
        count += 1
    return count


def load_level_masks(source: Source, level: int) -> Masks:
    """The source's masks of ``level`` as written, checked against this model's layers."""
    path = source.mask_path(level)
    if not path.is_file():
        raise ControlError(f"prune.masks_from={source.root}: {path} is missing")
    try:
        masks = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise ControlError(f"prune.masks_from={source.root}: {path} cannot be read ({_first_line(error)})") from None
    if not isinstance(masks, dict) or not all(isinstance(v, torch.Tensor) for v in masks.values()):
        raise ControlError(f"prune.masks_from={source.root}: {path} is not a dict of layer name -> mask tensor")
    missing = sorted(set(source.layer_shapes) - set(masks))
    unknown = sorted(set(masks) - set(source.layer_shapes))
    if missing or unknown:
        raise ControlError(f"prune.masks_from={source.root}: {path} does not fit this model's prunable layers "
                           f"(missing {missing[:3]}, unknown {unknown[:3]})")
    checked = {}
    for name, shape in source.layer_shapes.items():  # this model's module order
        mask = masks[name]
        if tuple(mask.shape) != shape:
            raise ControlError(f"prune.masks_from={source.root}: {path} has a {tuple(mask.shape)} mask for {name}, "
                               f"whose weight is {shape}")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ControlError(f"prune.masks_from={source.root}: {path} holds values other than 0 and 1 for {name}")
        checked[name] = mask.to(torch.bool)
    return checked


def masks_for_level(source: Source, level: int, control: str, seed: int,
                    shuffle: Optional[Callable[[Masks, int], Masks]] = None) -> Masks:
    """What the control trains at ``level``: the source's masks (``none``, ``reinit``) or
    their counts at random positions within the structure (``shuffle``: ``shuffle(masks, seed)``,
    by default the source's structure's, ``Structure.shuffle``; see the module docstring)."""
    if control not in CONTROLS:
        raise ControlError(f"prune.control={control!r}; valid: {', '.join(CONTROLS)}")
    done = finished_levels(source)
    if level >= done:
        raise ControlError(f"level {level} of prune.masks_from={source.root} is not finished yet "
                           f"({done} of its {source.planned_levels} levels are)")
    masks = load_level_masks(source, level)
    if control != "shuffle":
        return masks
    return (shuffle or source.structure.shuffle)(masks, seed)


def initial_state(source: Source, control: str, model: nn.Module) -> Dict[str, torch.Tensor]:
    """The weights (and buffers, masks excluded) the control starts level 0 from, CPU copies:
    the source's initial weights (``none``, ``shuffle``) or ``model``'s own (``reinit``:
    the model as this run's seed built it)."""
    if control not in CONTROLS:
        raise ControlError(f"prune.control={control!r}; valid: {', '.join(CONTROLS)}")
    if control == "reinit":
        masks = set(mask_buffer_names(model))
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k not in masks}
    return _check_initial_weights(source.init_checkpoint, model, source.root)


def control_levels(source: Source, levels: Optional[int]) -> int:
    """How many levels the control trains: ``prune.levels``, or all of the source's."""
    return len(source.plan.for_control(levels))


def wait_for_level(source: Source, level: int, *, poll_s: float = 30.0, timeout_s: Optional[float] = None,
                   sleep: Callable[[float], None] = time.sleep, say: Callable[[str], None] = lambda _: None) -> None:
    """Block until the source has finished ``level`` (its levels.csv row exists).

    ControlError when the source will never have it (beyond its planned levels) or after
    ``timeout_s`` seconds (None: wait as long as it takes).
    """
    if level >= source.planned_levels:
        raise ControlError(f"prune.masks_from={source.root} has {source.planned_levels} levels; there is no level {level}")
    waited = 0.0
    announced = False
    while finished_levels(source) <= level:
        if timeout_s is not None and waited >= timeout_s:
            raise ControlError(f"level {level} of prune.masks_from={source.root} did not finish within {timeout_s:g} s")
        if not announced:
            say(f"waiting for level {level} of {source.root} to finish (checking every {poll_s:g} s)")
            announced = True
        step = poll_s if timeout_s is None else max(0.0, min(poll_s, timeout_s - waited))
        sleep(step)
        waited += step if step > 0 else math.inf


# ------------------------------------------------------------------ level 0 taken from the source
def _csv_rows(path: Path) -> Tuple[List[str], List[Dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def level_zero_difference(source: Source, request: ControlRequest, model: nn.Module, *, world_size: int,
                          device_type: str, columns: Mapping[str, List[str]], differing: Sequence[str]) -> Optional[str]:
    """None when this control's level 0 would be an exact copy of its source's (see the module
    docstring), else why not (a phrase).  ``columns``: the control's CSV logs' columns
    (``{"epochs": [...], "levels": [...], "layers": [...]}``); ``differing``: the keys in which
    the control's config differs from the source's in what a run computes (the harness's rule)."""
    from utils.runs import run_facts
    from utils.training.training_types import get_training_type
    control = request.control
    if control not in ("none", "shuffle"):
        return f"prune.control={control} starts from its own initial weights"
    kind = request.training_type
    if not get_training_type(kind).resets_to_init:
        return (f"prune.training_type={kind}: later levels start from level 0's trained state, which the "
                f"source does not keep")
    for key, on in (("analysis.stability", request.stability), ("prune.early_bird", request.early_bird)):
        if on:
            return f"{key}={on} writes files of its own at level 0"
    structure = request.structure or source.structure
    if structure.level_columns or structure.layer_columns:
        return f"prune.structure={structure.settings.structure} writes files of its own at level 0"
    differing = [k for k in differing if k not in LEVEL_ZERO_FREE_KEYS]
    if differing:
        return "its config differs from the source's in " + ", ".join(differing[:4]) + (" ..." if len(differing) > 4 else "")
    if finished_levels(source) < 1:
        return "the source's level 0 is not finished"
    masks = load_level_masks(source, 0)
    if not all(bool(mask.all()) for mask in masks.values()):
        return "the source's level 0 is pruned (not dense)"
    execution = run_facts.recorded_execution(source.root, source.config.get("training.device"))
    if execution is None:
        return "the source's checkpoints/last.pt does not say how it ran"
    if execution.device_type != device_type:
        return f"the source ran on {execution.device_type}, this run on {device_type}"
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    sync_bn = request.sync_bn
    theirs = run_facts.batchnorm_processes(world_size=execution.world_size, device_type=execution.device_type,
                                           sync_bn=source.config.get("distributed.sync_bn", "auto"),
                                           has_batchnorm=has_batchnorm)
    mine = run_facts.batchnorm_processes(world_size=world_size, device_type=device_type, sync_bn=sync_bn,
                                         has_batchnorm=has_batchnorm)
    if theirs != mine:
        return (f"its BatchNorm statistics were per-rank over {theirs} process(es), this run's over {mine} "
                f"(another model)")
    expected = {"epochs": request.epochs, "levels": 1, "layers": len(source.layer_shapes)}
    for name, wanted in columns.items():
        path = source.root / f"{name}.csv"
        try:
            header, rows = _csv_rows(path)
        except OSError as error:
            return f"{path} cannot be read ({_first_line(error)})"
        if header != list(wanted):
            return f"{path} has other columns than this run's"
        count = sum(1 for row in rows if row.get("level") == "0")
        if name in expected and count != expected[name]:
            return f"{path} has {count} level-0 rows, {expected[name]} expected"
    return None


def copy_level_zero(source: Source, root, logs: Mapping[str, Any]) -> int:
    """Append the source's level-0 rows to the control's CSV logs (objects with ``append(row)``,
    by name: epochs, levels, layers), write its level-0 masks and ``reused.csv``; -> rows copied."""
    from utils.runs.checkpointing import atomic_torch_save
    root = Path(root)
    copied = 0
    for name, log in logs.items():
        _, rows = _csv_rows(source.root / f"{name}.csv")
        for row in rows:
            if row.get("level") == "0":
                log.append(row)  # the strings as written: an exact copy
                copied += 1
    atomic_torch_save(load_level_masks(source, 0), RunFiles(root).masks(0))
    reused = RunFiles(root).reused
    reused.create()
    reused.append({"level": 0, "source": str(source.root),
                   "reason": "same config (masks_from, control, levels aside), seed and initial weights; dense level 0"})
    return copied


def take_level_zero(source: Source, request: ControlRequest, model: nn.Module, root, logs: Mapping[str, Any], *,
                    world_size: int, device_type: str, differing: Sequence[str]) -> Tuple[bool, str]:
    """Rank 0, in a fresh control directory: take the source's level 0 when it is identical
    (``level_zero_difference``), else leave it to be trained (and remove a ``reused.csv`` an
    interrupted start may have left).  -> (taken, the line to print)."""
    root = Path(root)
    try:
        why_not = level_zero_difference(source, request, model, world_size=world_size, device_type=device_type,
                                        columns={name: list(log.columns) for name, log in logs.items()},
                                        differing=differing)
    except ControlError as error:
        why_not = str(error)
    if why_not is not None:
        RunFiles(root).reused.path.unlink(missing_ok=True)
        return False, f"level 0 is trained, not taken from {source.root}: {why_not}"
    rows = copy_level_zero(source, root, logs)
    return True, (f"level 0 taken from {source.root} ({rows} CSV rows copied; see {RunFiles(root).reused.path}): "
                  f"it would be an exact copy of the source's")
