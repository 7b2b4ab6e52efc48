"""Level-loop helpers that know the config: CSV logs, the experiment directory's files and
the decision fresh / resume / finished / refuse, the optimizer, seeding, checkpoints of
this config.  (How files are written atomically and what a checkpoint holds:
utils/runs/checkpointing.py, re-exported here.)

Every function that writes takes plain arguments and is called on rank 0 only (the
harness routes writes through ``primary_only``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

import harness_params
from utils.core.errors import UserError
from utils.data.loaders import make_loader
from utils.data.records import resolve_dataset_spec, validate_beton
from utils.data.sources import DataError
from utils.data.validation import split_indices
from utils.models import mask_layers, pretrained
from utils.models.blurpool import add_blurpool_
from utils.models.registry import ModelError, get_model
from utils.pruning import criteria
from utils.pruning.structures.base import Scoring
from utils.runs import checkpointing, data_identity, rundir
from utils.runs.checkpointing import (  # noqa: F401  (re-exported: the harness layer's one import)
    CHECKPOINT_FORMAT,
    LAST_CHECKPOINT_KEYS,
    TEMPORARY_SUFFIX,
    atomic_torch_save,
    atomic_write_bytes,
    detached_copy,
    make_dirs,
    remove_stale_temporaries,
    rng_state,
    set_rng_state,
)
from utils.runs.rundir import (  # noqa: F401  (re-exported: the run directory's rules live in utils/runs/rundir.py)
    EPOCH_COLUMNS,
    LAYER_COLUMNS,
    LEVEL_COLUMNS,
    NON_SEMANTIC_KEYS,
    STABILITY_COLUMNS,
    CsvLog,
    DirDecision,
    usable_launch_id,
)
from utils.runs.rundir import RunFiles as ExperimentFiles  # noqa: F401
from utils.runs.rundir import config_bytes as config_yaml  # noqa: F401
from utils.runs.rundir import read_config as read_config_yaml  # noqa: F401
from utils.training.optimizers import OPTIMIZERS, build_optimizer  # noqa: F401
from utils.training.schedulers import LRSchedule, ScheduleSpec
from utils.training.level_plan import LevelPlan, plan_levels
from utils.training import selection
from utils.training.training_types import get_training_type

BN_BATCHES_EPOCH = 3_000_000  # data order of the batches the stability analysis re-estimates BatchNorm on


# ---------------------------------------------------------------- experiment directory
def semantic_difference(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    """Keys whose values differ in what a run computes (a key one side lacks counts as its default)."""
    return rundir.semantic_difference(a, b, harness_params.defaults())


def decide_experiment_dir(resolved: Dict[str, Any], *, restarted: bool, launch_id: Optional[str] = None,
                          planned_levels: Optional[rundir.PlannedLevels] = None) -> DirDecision:
    """utils.runs.rundir.decide with this harness's defaults; a refusal is one UserError line."""
    try:
        decision = rundir.decide(resolved, harness_params.defaults(), restarted=restarted, launch_id=launch_id,
                                 planned_levels=planned_levels)
    except rundir.RunDirError as error:
        raise UserError(str(error)) from None
    if decision.action == "resume":  # never continue results on other data (utils/runs/data_identity.py)
        try:
            data_identity.check_run_data(decision.root, data_files(resolved), doing="resume it")
        except data_identity.DataChanged as error:
            raise UserError(str(error)) from None
    return decision


def data_files(c: Dict[str, Any]) -> Dict[str, str]:
    """{role: .beton path} of the config's data (what data.json records)."""
    return data_identity.data_paths(c["dataset.train_path"], c["dataset.test_path"])


# ------------------------------------------------------------------------------ seeding
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: Path, resolved: Optional[Dict[str, Any]] = None, required: Sequence[str] = (),
                    planned_levels: Optional[rundir.PlannedLevels] = None) -> Dict[str, Any]:
    """utils.runs.checkpointing.load_checkpoint, and refused (one-line UserError) when the
    checkpoint belongs to another config (the keys that differ are named): one that ``resolved``
    only makes deeper (``planned_levels``: the level plan's word, utils/runs/rundir.run_state) is
    this run's."""
    state = checkpointing.load_checkpoint(path, required=required)
    if resolved is not None:
        stored = state.get("config", {})
        differing = semantic_difference(stored, resolved)
        if differing and (planned_levels is None or planned_levels(stored, resolved, differing) is None):
            raise UserError(f"checkpoint {path} belongs to another config (differs in {', '.join(differing[:6])}); "
                            f"use the config it was made with, or move it away")
    return state


def read_run_checkpoints(files: ExperimentFiles, resolved: Dict[str, Any], rewind_at: Any = None,
                         planned_levels: Optional[rundir.PlannedLevels] = None) -> Optional[Dict[str, Any]]:
    """Rank 0 reads a run's checkpoints -> {'last', 'init'[, 'rewind', 'level_start'], 'note'},
    or None when no epoch finished yet; a damaged or foreign set is refused (UserError).  An
    unreadable last.pt falls back to previous.pt (with a note).  ``rewind_at``: WR's rewind
    point (epoch, batch), past which rewind.pt must exist.  ``planned_levels``: checkpoints of a run
    that ``resolved`` makes deeper are this run's (``load_checkpoint``)."""
    def load(path: Path, required: Sequence[str]) -> Dict[str, Any]:
        return load_checkpoint(path, resolved, required, planned_levels)

    previous = checkpointing.previous_of(files.last_checkpoint)
    if not files.last_checkpoint.exists() and not previous.exists():
        return None
    note = None
    try:
        last = load(files.last_checkpoint, LAST_CHECKPOINT_KEYS)
    except checkpointing.CorruptCheckpoint as error:  # a missing last.pt is refused the same way
        if not previous.exists():
            raise
        last = load(previous, LAST_CHECKPOINT_KEYS)
        note = (f"note: {str(error).split('; ')[0]}: resuming from {previous}, the checkpoint before it "
                f"(the work since then is done again)")
    state = {"last": last, "init": load(files.init_checkpoint, ("model",)),
             "note": note}
    if files.rewind_checkpoint.exists():
        state["rewind"] = load(files.rewind_checkpoint, ("model", "optimizer", "schedule"))
    elif rewind_at is not None:
        batches = last["partial_epoch"]["batches_done"] if last["phase"] == "mid_epoch" else 0
        if (last["level"], last["next_epoch"], batches) > (0, rewind_at.epoch, rewind_at.batch):
            raise UserError(f"checkpoint {files.rewind_checkpoint} is missing but level 0 is past its rewind point "
                            f"(epoch {rewind_at.epoch}, batch {rewind_at.batch}); the experiment directory is "
                            f"incomplete: move it away to start over")
    if files.level_start_checkpoint.exists():
        state["level_start"] = load(files.level_start_checkpoint, ("model", "optimizer", "schedule", "epoch", "batches_done"))
    return state


# ------------------------------------------------------------------ set-up from the config
@dataclass
class Inputs:
    """What the config asks for, checked: dataset spec, resolutions, the masked model."""
    spec: Any
    train_resolution: int
    eval_resolution: int
    model: torch.nn.Module
    notes: List[str]
    split: Optional[Tuple[np.ndarray, np.ndarray]] = None   # dataset.val_fraction: (training, validation) indices


def check_inputs(c: Dict[str, Any], world_size: int, device: torch.device) -> Inputs:
    """Everything that can be refused before anything is written (UserError, one line)."""
    seed_everything(c["experiment.seed"])  # before the model is built: its init draws from torch's RNG
    if c["dataset.batch_size"] % world_size:
        raise UserError(f"dataset.batch_size={c['dataset.batch_size']} is not divisible by the number of "
                        f"processes ({world_size}); use a multiple of {world_size}")
    if c["distributed.sync_bn"] is True and world_size > 1 and device.type != "cuda":
        raise UserError("distributed.sync_bn=true needs CUDA devices (SyncBatchNorm does not run on CPU); set it to false")
    try:
        spec = resolve_dataset_spec(c["dataset.name"], train_path=c["dataset.train_path"], augment=c["dataset.augment"])
    except DataError as error:
        raise UserError(str(error)) from None
    train_resolution = c["dataset.resolution"] or spec.resolution
    eval_resolution = c["dataset.eval_resolution"] or train_resolution
    notes, split = [], None
    for key in ("dataset.train_path", "dataset.test_path") + (("dataset.val_path",) if c["dataset.val_path"] else ()):
        try:
            summary = validate_beton(c[key], spec)
        except DataError as error:
            raise UserError(f"{key}: {error}") from None
        if summary.get("note"):
            notes.append(f"note: {key}: {summary['note']}")
        if key == "dataset.train_path":
            split = validation_split(c, summary["num_samples"])
            if split is not None:
                notes.append(f"training on {len(split[0])} of the {summary['num_samples']} samples of "
                             f"{c['dataset.train_path']}, {len(split[1])} held out for validation "
                             f"(dataset.val_fraction={c['dataset.val_fraction']}, dataset.train_samples="
                             f"{c['dataset.train_samples']}, dataset.val_seed={c['dataset.val_seed']})")
    try:
        model = get_model(c["model.name"], num_classes=spec.num_classes, in_channels=spec.channels,
                          image_size=train_resolution)
    except ModelError as error:
        raise UserError(f"model.name={c['model.name']} does not fit dataset.name={c['dataset.name']} "
                        f"({spec.channels}x{train_resolution}x{train_resolution} inputs, "
                        f"{spec.num_classes} classes): {error}") from None
    if c["model.blurpool"]:  # before the masks: the blurred convolutions stay prunable layers
        add_blurpool_(model)
    try:
        mask_layers.prepare_model(model, exclude=c["prune.exclude"])
    except mask_layers.MaskError as error:
        raise UserError(f"prune.exclude={c['prune.exclude']}: {error}") from None
    notes.append(mask_layers.dense_summary(model))
    try:
        notes += pretrained.apply_given_weights(model, c["model.weights"], c["prune.masks_from"] and c["prune.control"])
    except pretrained.WeightsError as error:
        raise UserError(str(error)) from None
    return Inputs(spec, train_resolution, eval_resolution, model, notes, split)


def has_validation(c: Dict[str, Any]) -> bool:
    """Whether the run has validation data (dataset.val_fraction or dataset.val_path): then its best and
    early-stopping epochs are chosen on it (utils/training/selection.py), else the best on the test set."""
    return c["dataset.val_fraction"] > 0 or bool(c["dataset.val_path"])


def validation_split(c: Dict[str, Any], num_samples: Optional[int] = None) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """dataset.val_fraction, dataset.train_samples: (training indices, validation indices) of the training file,
    a function of its sample count, those keys and dataset.val_seed only (utils/data/validation.py); None
    without either (every sample trains)."""
    if not (c["dataset.val_fraction"] > 0 or c["dataset.train_samples"]):
        return None
    if num_samples is None:
        from utils.data.beton import BetonFile
        num_samples = BetonFile(c["dataset.train_path"]).num_samples
    try:
        return split_indices(num_samples, c["dataset.val_fraction"], c["dataset.val_seed"], c["dataset.train_samples"])
    except DataError as error:
        raise UserError(f"dataset.train_path={c['dataset.train_path']}: {error}") from None


def make_data_loader(c: Dict[str, Any], spec: Any, device: torch.device, *, train: bool, resolution: int,
                     rank: int, world_size: int, validation: bool = False,
                     split: Optional[Tuple[np.ndarray, np.ndarray]] = None):
    """A loader of the config's training (``train``), test or validation (``validation``) data for this
    rank's share.  With dataset.val_fraction the training loader reads the training file's samples
    left after the validation split (``split``; computed here when not given) and the validation loader
    the held-out ones; dataset.val_path is a file of its own."""
    if validation and not has_validation(c):
        raise UserError("no validation data: set dataset.val_fraction or dataset.val_path")
    path, indices = c["dataset.train_path" if train else "dataset.test_path"], None
    if train or validation:
        split = split if split is not None else validation_split(c)
        if validation and not c["dataset.val_fraction"] > 0:
            path = c["dataset.val_path"]
        elif split is not None:
            path, indices = c["dataset.train_path"], split[1 if validation else 0]
    try:
        return make_loader(path, spec, train=train and not validation,
                           batch_size=c["dataset.batch_size"], resolution=resolution,
                           num_workers=c["dataset.num_workers"], device=device, rank=rank, world_size=world_size,
                           seed=c["experiment.seed"], channels_last=c["training.channels_last"],
                           backend=c["dataset.loader"], indices=indices)
    except DataError as error:
        raise UserError(str(error)) from None


def autocast_dtype(c: Dict[str, Any], device: torch.device) -> Tuple[Optional[torch.dtype], Optional[str]]:
    """-> (the autocast dtype of training.precision on this device, a note to print or None)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c["training.precision"])
    if device.type != "cuda" and dtype is not None:
        return None, f"note: training.precision={c['training.precision']} applies on CUDA; this CPU run trains in fp32"
    return dtype, None


def build_optimizer_and_schedule(c: Dict[str, Any], parameters: Iterable[torch.nn.Parameter],
                                 iterations_per_epoch: int) -> Tuple[torch.optim.Optimizer, LRSchedule]:
    optimizer = build_optimizer(parameters, name=c["optimizer.name"], lr=c["optimizer.lr"],
                                momentum=c["optimizer.momentum"], nesterov=c["optimizer.nesterov"],
                                weight_decay=c["optimizer.weight_decay"], betas=c["optimizer.betas"])
    spec = ScheduleSpec(name=c["schedule.name"], epochs=c["training.epochs"], iterations_per_epoch=iterations_per_epoch,
                        warmup_epochs=c["schedule.warmup_epochs"], warmup_start_factor=c["schedule.warmup_start_factor"],
                        milestones=tuple(c["schedule.milestones"]), gamma=c["schedule.gamma"],
                        step_size=c["schedule.step_size"], peak_epoch=c["schedule.peak_epoch"],
                        final_factor=c["schedule.final_factor"])
    return optimizer, LRSchedule(optimizer, spec)


def training_model(model: torch.nn.Module, c: Dict[str, Any], ctx: Any, use_ddp: bool):
    """-> (bare model, model as trained): on the device in the config's memory format,
    SyncBatchNorm when asked, wrapped in DDP (its constructor broadcasts rank 0's weights) and
    compiled when asked."""
    device = ctx.device
    memory_format = torch.channels_last if c["training.channels_last"] else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    if use_ddp and wants_sync_bn(c["distributed.sync_bn"], device):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model = model
    if use_ddp:
        # Masks are identical on every rank by construction (and checked after pruning): keep
        # them out of DDP's per-forward buffer broadcast.  BatchNorm running stats are still
        # broadcast from rank 0 at each forward (DDP's default).
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, mask_layers.mask_buffer_names(model))
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if c["training.compile"]:
        train_model = torch.compile(train_model)
    return model, train_model


def wants_sync_bn(setting: Any, device: torch.device) -> bool:
    """distributed.sync_bn for a multi-process run: true, false, or auto = on CUDA (SyncBatchNorm
    does not run on CPU: there each rank normalises over its own share of the batch)."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def scoring(c: Dict[str, Any], *, level: int, batches, device, input_shape) -> Scoring:
    """What level ``level``'s masks are scored with: the config's criterion (its own options, e.g.
    snip's prune.snip_mode) and allocation, seeded per level."""
    criterion = criteria.get_criterion(c["prune.criterion"])
    return Scoring(criterion=c["prune.criterion"], allocation=c["prune.allocation"],
                   seed=criteria.level_seed(c["experiment.seed"], level), device=device, batches=batches,
                   loss_fn=torch.nn.functional.cross_entropy, num_batches=c["prune.score_batches"],
                   synflow_iterations=c["prune.synflow_iterations"], input_shape=input_shape,
                   criterion_options={name: c[f"prune.{name}"] for name in criterion.options})


def extra_columns(c: Dict[str, Any], structure) -> Dict[str, List[str]]:
    """The columns the run's features add to levels.csv / layers.csv: its structure's
    (``Structure.level_columns``, ``layer_columns``) and ``instability`` (stability analysis);
    and the logs they add (``mask_updates``: a training type whose masks change during training)."""
    level = list(structure.level_columns) + (["instability"] if c["analysis.stability"] else [])
    level += selection.VALIDATION_LEVEL_COLUMNS if has_validation(c) else []
    logs = ["mask_updates"] if get_training_type(c["prune.training_type"]).updates_masks else []
    return {"level_extra": level, "layer_extra": list(structure.layer_columns), "extra_logs": logs,
            "epoch_extra": selection.VALIDATION_EPOCH_COLUMNS if has_validation(c) else []}


# The config's pruning structure, made with its prune settings (the config loader's, which has
# refused one that cannot be had before the harness runs).
structure_of = harness_params.structure_of


def level_plan(c: Dict[str, Any], model: torch.nn.Module, structure) -> LevelPlan:
    """The run's own level plan (a control's is its source's: ``LevelPlan.for_control``)."""
    try:
        return plan_levels(structure.settings, get_training_type(c["prune.training_type"]), structure,
                           mask_layers.layer_shapes(model))
    except ValueError as error:
        raise UserError(str(error)) from None


def build_loaders(c: Dict[str, Any], spec: Any, ctx: Any, train_resolution: int, eval_resolution: int,
                  split: Optional[Tuple[np.ndarray, np.ndarray]] = None):
    """-> (training loader, test loader, validation loader or None) of this rank's share; a batch
    larger than the training set is refused.  ``split``: dataset.val_fraction's indices (``Inputs.split``)."""
    shard = dict(rank=ctx.rank, world_size=ctx.world_size, split=split)
    train = make_data_loader(c, spec, ctx.device, train=True, resolution=train_resolution, **shard)
    test = make_data_loader(c, spec, ctx.device, train=False, resolution=eval_resolution, **shard)
    validation = (make_data_loader(c, spec, ctx.device, train=False, validation=True, resolution=eval_resolution,
                                   **shard) if has_validation(c) else None)
    if len(train) == 0:
        raise UserError(f"dataset.batch_size={c['dataset.batch_size']} is larger than the training set "
                        f"({train.num_samples} samples): no full batch per epoch")
    return train, test, validation


def create_experiment_dir(files: ExperimentFiles, resolved: Dict[str, Any], launch_id: Optional[str]) -> None:
    """A new experiment directory (rank 0 only): utils.runs.rundir.RunFiles.create, and the
    identity of the data it trains on (``data.json``: utils/runs/data_identity.py)."""
    files.create(config_yaml(resolved), usable_launch_id(launch_id))
    data_identity.record_run_data(files.root, data_files(resolved))


def resume_message(root: Path, last: Dict[str, Any]) -> str:
    """Where a resumed run goes on from, in words."""
    if last["phase"] == "level_done":
        return f"resuming {root} after level {last['level']}"
    where = f"resuming {root} at level {last['level']}, epoch {last['next_epoch']}"
    if last["phase"] == "mid_epoch":
        where += f", batch {last['partial_epoch']['batches_done']}"
    return where
