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

A ticket file (``python -m utils.ticket export``, ``utils.models.ticket_file``) goes in wherever
a directory does: ``prune.masks_from=FILE`` takes its levels 0..L (the lineage it carries), its
initial weights and its config; it is finished, so nothing is waited for, and its level 0 is
always trained (it holds no CSV rows to take).  Every check below applies to it as to a directory.

Refused with a one-line ControlError (``read_source``): a source directory that does not
exist, is the control's own, has no readable ``config.yaml``, is itself a control, was
made with another ``model.name``, ``dataset.name``, ``prune.exclude`` or other training samples
(``dataset.val_fraction``, ``val_seed``, ``train_samples``), was trained on other
data than the control's files hold now (its ``data.json``: utils/runs/data_identity.py; a
source made before runs recorded their data is not checked), has no readable
``checkpoints/init.pt`` (key ``model``) fitting this model, or whose finished levels' mask
files are missing, unreadable or do not fit this model's prunable layers (names, shapes).

Level 0 taken from the source instead of retrained: ``utils/lottery/level_zero.py``.

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
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from utils.models import ticket_file
from utils.models.mask_layers import Masks, mask_buffer_names
from utils.models.mask_layers import layer_shapes as mask_layer_shapes
from utils.pruning.structures.base import Structure
from utils.training.level_plan import LevelPlan, PlanError, parts_of, plan_levels
from utils.runs import data_identity
from utils.runs.rundir import RunDirError, RunFiles, read_config

CONTROLS = ("none", "reinit", "shuffle")
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
    data: Optional[Dict[str, str]] = None       # role -> the control's data file (None: not checked)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], structure: Optional[Structure] = None) -> "ControlRequest":
        name = config.get("experiment.name")
        return cls(control=str(config.get("prune.control", "none")), levels=config.get("prune.levels"),
                   own_dir=Path(str(config.get("experiment.base_dir", ""))) / str(name) if name else None,
                   matching={key: config.get(key) for key in MATCHING_KEYS},
                   training_type=str(config.get("prune.training_type", "imp")), structure=structure,
                   stability=bool(config.get("analysis.stability", False)),
                   early_bird=bool(config.get("prune.early_bird", False)),
                   sync_bn=config.get("distributed.sync_bn", "auto"), epochs=int(config.get("training.epochs", 0)),
                   data=data_identity.data_paths(config.get("dataset.train_path"),
                                                 config.get("dataset.test_path")) or None)


@dataclass(frozen=True)
class Source:
    root: Path
    config: Dict[str, Any]                      # the source's config.yaml, dotted keys
    layer_shapes: Dict[str, Tuple[int, ...]]    # prunable layer -> weight shape (this model's, module order)
    plan: LevelPlan                             # the source's own level plan (a ticket's: levels 0..L)
    structure: Structure                        # the source's pruning structure
    ticket: Optional[ticket_file.Ticket] = None  # a ticket file's contents (root is the file)

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


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:160]}" if lines else type(error).__name__


def _read_config(root: Path) -> Dict[str, Any]:
    try:
        return read_config(root)
    except RunDirError as error:
        raise ControlError(f"prune.masks_from={error}") from None


def _check_source_data(root: Path, ticket: Optional[ticket_file.Ticket], data: Mapping[str, Any]) -> None:
    """Refuse (one line) a source trained on other data than ``data`` ({role: path}) holds now: a
    directory's ``data.json``, or the copy of it a ticket file carries (``run_data``; a file of a
    run that recorded no data is not checked, as such a directory is not)."""
    instead = "restore that data, or run the source again on the new data"
    if ticket is not None:
        recorded = ticket.metadata.get("run_data")
        why = data_identity.data_change(recorded, data) if isinstance(recorded, dict) else None
        if why:
            raise ControlError(f"prune.masks_from={root} was trained on other data: {why}; cannot train a control "
                               f"of it on this data: {instead}")
        return
    try:
        data_identity.check_run_data(root, data, doing="train a control of it on this data", instead=instead)
    except data_identity.DataChanged as error:
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
    ticket = None
    if root.is_file():
        try:
            ticket = ticket_file.read_ticket(root)
        except ticket_file.TicketError as error:
            raise ControlError(f"prune.masks_from={error}") from None
        source_config = ticket.config
    elif not root.is_dir():
        raise ControlError(f"prune.masks_from={path}: no such experiment directory or ticket file")
    elif request.own_dir is not None and _same_directory(root, request.own_dir):
        raise ControlError(f"prune.masks_from={path} is this run's own directory")
    else:
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
    if request.data is not None:
        _check_source_data(root, ticket, request.data)
    layer_shapes = mask_layer_shapes(model)
    plan, structure = _source_plan(source_config, defaults, layer_shapes, path)
    if ticket is not None:
        _fit_initial_weights(ticket.weights("init"), model, path)
        if ticket.level >= len(plan):
            raise ControlError(f"prune.masks_from={path} is level {ticket.level}, but its config plans {len(plan)} levels")
        plan = LevelPlan(plan.levels[:ticket.level + 1], plan.start_line)  # what the file holds
    else:
        _check_initial_weights(RunFiles(root).init_checkpoint, model, path)
    source = Source(root=root, config=source_config, layer_shapes=layer_shapes, plan=plan, structure=structure,
                    ticket=ticket)
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
                           f"({first_line(error)})") from None


def _check_initial_weights(path: Path, model: nn.Module, source_path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise ControlError(f"prune.masks_from={source_path}: {path} is missing (the source's initial weights)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- torch raises several types for a bad file
        raise ControlError(f"prune.masks_from={source_path}: {path} cannot be read ({first_line(error)})") from None
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ControlError(f"prune.masks_from={source_path}: {path} holds no initial weights (key 'model')")
    return _fit_initial_weights(state, model, source_path)


def _fit_initial_weights(state: Mapping[str, torch.Tensor], model: nn.Module, source_path) -> Dict[str, torch.Tensor]:
    """The source's initial weights (masks aside), checked against ``model``'s names and shapes."""
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
    the source may still be running).  A ticket file: all the levels it holds."""
    if source.ticket is not None:
        return len(source.plan)
    return finished_level_count(source.levels_csv, f"prune.masks_from={source.root}")


def finished_level_count(levels_csv: Path, what: str) -> int:
    """How many levels a run directory has finished: the rows 0, 1, 2, ... of its ``levels.csv``
    (a row is appended whole after the level's last epoch); ``what`` starts a refusal."""
    try:
        with open(levels_csv, newline="") as handle:
            rows = list(csv.reader(handle))[1:]
    except FileNotFoundError:
        return 0
    except OSError as error:
        raise ControlError(f"{what}: cannot read levels.csv ({first_line(error)})") from None
    count = 0
    for row in rows:
        if not row or row[0] != str(count):
            break
        count += 1
    return count


def load_level_masks(source: Source, level: int) -> Masks:
    """The source's masks of ``level`` as written, checked against this model's layers."""
    if source.ticket is not None:
        try:
            return _checked_masks(source, source.ticket.masks_at(level), f"its level {level}")
        except ticket_file.TicketError as error:
            raise ControlError(f"prune.masks_from={error}") from None
    path = source.mask_path(level)
    if not path.is_file():
        raise ControlError(f"prune.masks_from={source.root}: {path} is missing")
    try:
        masks = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise ControlError(f"prune.masks_from={source.root}: {path} cannot be read ({first_line(error)})") from None
    if not isinstance(masks, dict) or not all(isinstance(v, torch.Tensor) for v in masks.values()):
        raise ControlError(f"prune.masks_from={source.root}: {path} is not a dict of layer name -> mask tensor")
    return _checked_masks(source, masks, path)


def _checked_masks(source: Source, masks: Mapping[str, torch.Tensor], path) -> Masks:
    """``masks`` (read from ``path``) as bool, in this model's module order, fitting its prunable layers."""
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
    if source.ticket is not None:
        return _fit_initial_weights(source.ticket.weights("init"), model, source.root)
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
