"""Level-loop helpers that know the config: CSV logs, the experiment directory's files and
the decision fresh / resume / finished / refuse, the optimizer, seeding, checkpoints of
this config.  (How files are written atomically and what a checkpoint holds:
utils/checkpointing.py, re-exported here.)

Every function that writes takes plain arguments and is called on rank 0 only (the
harness routes writes through ``primary_only``).
"""
from __future__ import annotations

import csv
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

import harness_params
from utils import checkpointing, mask_layers, pruning_utils, run_lock, stability, structured
from utils import distributed_utils as du
from utils.blurpool import add_blurpool_
from utils.callbacks import Callback, LevelInfo
from utils.dataset import DataError, make_loader, resolve_dataset_spec, validate_beton
from utils.models import ModelError, get_model
from utils.schedulers import LRSchedule, ScheduleSpec
from utils.checkpointing import (  # noqa: F401  (re-exported: the harness layer's one import)
    CHECKPOINT_FORMAT, LAST_CHECKPOINT_KEYS, TEMPORARY_SUFFIX, atomic_torch_save, atomic_write_bytes,
    detached_copy, make_dirs, remove_stale_temporaries, rng_state, set_rng_state)
from utils.errors import UserError


EPOCH_COLUMNS = ["level", "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                 "epoch_time_s", "images_per_s"]
LEVEL_COLUMNS = ["level", "target_density", "density", "final_test_acc", "best_test_acc", "train_time_s"]
LAYER_COLUMNS = ["level", "layer", "numel", "alive", "density"]
STABILITY_COLUMNS = ["level", "alpha", "test_loss", "test_acc"]
BN_BATCHES_EPOCH = 3_000_000  # data order of the batches the stability analysis re-estimates BatchNorm on

# Keys that change how a run is watched or where it lives, not what it computes: a resumed
# run may differ in them (e.g. --experiment.name=NAME_1 resumes the run that
# --experiment.resume=false started in NAME_1; a moved base_dir still resumes).
NON_SEMANTIC_KEYS = {"experiment.resume", "training.progress", "dataset.num_workers", "logging.tensorboard",
                     "logging.wandb_project",
                     "experiment.name", "experiment.base_dir"}


# ---------------------------------------------------------------------------- CSV logs
class CsvLog:
    """An append-only CSV file with a fixed header.

    A row is written with one ``write`` of the whole line followed by fsync, so a reader
    never sees half a row.  ``truncate(n)`` keeps the first n rows (used on resume to drop
    rows written after the checkpoint being resumed, so no row is ever written twice).
    """

    def __init__(self, path, columns: Sequence[str]):
        self.path = Path(path)
        self.columns = list(columns)

    def create(self) -> None:
        atomic_write_bytes(self.path, (",".join(self.columns) + "\n").encode())

    def append(self, row: Dict[str, Any]) -> None:
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise KeyError(f"{self.path.name}: row lacks columns {missing}")
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow([_format(row[c]) for c in self.columns])
        data = buffer.getvalue().encode()
        with checkpointing.writing(self.path):  # a failure: one line (resume truncates a partial row)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                while data:  # a regular file takes it in one write; loop in case it does not
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)

    def rows(self) -> List[List[str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as handle:
            return list(csv.reader(handle))[1:]

    def count(self) -> int:
        return len(self.rows())

    def truncate(self, keep: int) -> None:
        rows = self.rows()
        if len(rows) == keep and self.path.exists():
            return
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(rows[:keep])
        atomic_write_bytes(self.path, buffer.getvalue().encode())


def _format(value: Any) -> str:
    if isinstance(value, float):
        return repr(round(value, 6)) if abs(value) >= 1e-4 or value == 0 else f"{value:.6g}"
    return str(value)


@dataclass
class ExperimentFiles:
    root: Path
    level_extra: Sequence[str] = ()   # columns features add to levels.csv / layers.csv (see extra_columns)
    layer_extra: Sequence[str] = ()

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def init_checkpoint(self) -> Path:
        return self.checkpoints / "init.pt"

    @property
    def rewind_checkpoint(self) -> Path:
        return self.checkpoints / "rewind.pt"

    @property
    def launch_id(self) -> Path:
        """The torchrun launch (TORCHELASTIC_RUN_ID) that created the directory: an elastic
        restart of that launch finds its directory again by it."""
        return self.checkpoints / "launch_id.txt"

    def masks(self, level: int) -> Path:
        return self.root / "masks" / f"level_{level}.pt"

    @property
    def epochs(self) -> CsvLog:
        return CsvLog(self.root / "epochs.csv", EPOCH_COLUMNS)

    @property
    def levels(self) -> CsvLog:
        return CsvLog(self.root / "levels.csv", LEVEL_COLUMNS + list(self.level_extra))

    @property
    def layers(self) -> CsvLog:
        return CsvLog(self.root / "layers.csv", LAYER_COLUMNS + list(self.layer_extra))

    @property
    def stability(self) -> CsvLog:
        return CsvLog(self.root / "stability.csv", STABILITY_COLUMNS)

    @property
    def level_start_checkpoint(self) -> Path:
        """The state a level started from (stability analysis: the second copy starts there)."""
        return self.checkpoints / "level_start.pt"

    def level_weights(self, level: int) -> Path:
        """A finished level's weights (channel structure: what utils.compact makes smaller)."""
        return self.checkpoints / f"level_{level}.pt"

    def logs(self) -> Dict[str, CsvLog]:
        logs = {"epochs": self.epochs, "levels": self.levels, "layers": self.layers}
        if "instability" in self.level_extra:
            logs["stability"] = self.stability
        return logs


def extra_columns(resolved: Dict[str, Any]) -> Dict[str, List[str]]:
    """The columns the config's features add: levels.csv ``instability`` (stability analysis),
    ``channel_density`` and layers.csv ``channels``, ``channels_alive`` (channel structure)."""
    level, layer = [], []
    if resolved.get("prune.structure") == "channel":
        level.append("channel_density")
        layer += ["channels", "channels_alive"]
    if resolved.get("analysis.stability"):
        level.append("instability")
    return {"level_extra": level, "layer_extra": layer}


# ---------------------------------------------------------------- experiment directory
@dataclass
class DirDecision:
    action: str          # "fresh", "resume" or "finished"
    root: Path
    note: str = ""


def config_yaml(resolved: Dict[str, Any]) -> bytes:
    return yaml.safe_dump(harness_params.as_tree(resolved), sort_keys=True).encode()


def read_config_yaml(path: Path) -> Dict[str, Any]:
    with open(path) as handle:
        tree = yaml.safe_load(handle) or {}
    return {f"{section}.{key}": value for section, keys in tree.items() for key, value in keys.items()}


def semantic_difference(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    """Keys whose values differ in what a run computes.  A key one side lacks (a config written
    before the key existed) counts as its default, so older runs still resume."""
    a, b = harness_params.with_defaults(a), harness_params.with_defaults(b)
    return [k for k in harness_params.differing_keys(a, b) if k not in NON_SEMANTIC_KEYS]


def _checkpoint_finished(files: ExperimentFiles) -> bool:
    if not files.last_checkpoint.exists():
        return False
    try:  # mmap: only the few bytes of the flag are read, not the whole model
        state = torch.load(files.last_checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False  # a corrupt checkpoint is refused, with a message, when resume loads it
    return isinstance(state, dict) and bool(state.get("finished", False))


def _launch_id_of(path: Path) -> Optional[str]:
    try:
        return ExperimentFiles(path).launch_id.read_text().strip()
    except OSError:
        return None


def usable_launch_id(launch_id: Optional[str]) -> Optional[str]:
    """torchrun's run id names one launch only when it is set and not the default 'none'
    (--standalone draws a fresh uuid; a multi-node job passes its own --rdzv-id)."""
    return launch_id if launch_id and launch_id != "none" else None


def decide_experiment_dir(resolved: Dict[str, Any], *, restarted: bool,
                          launch_id: Optional[str] = None) -> DirDecision:
    """Where this run goes and whether it resumes.  Creates nothing.

    * a new name -> fresh;
    * same config there -> resume (or 'finished' when the run is done);
    * another config there -> refuse, naming the keys that differ, unless
      experiment.resume=false, which starts fresh in NAME_1, NAME_2, ... (never overwriting);
    * an elastic restart (torchrun restarted the workers: ``restarted``) resumes the
      directory its own launch created (found by ``launch_id``, torchrun's run id, which
      ``start_fresh`` records); when that launch created none, it decides as the first
      attempt did.  Without a usable launch id, a restart of a resume=false run resumes
      the newest directory with the same config.
    """
    base = Path(resolved["experiment.base_dir"])
    name = resolved["experiment.name"]
    if "/" in name or name in ("", ".", ".."):
        raise UserError(f"experiment.name={name!r} must be a plain directory name (no '/')")
    candidates = [base / name] + [base / f"{name}_{k}" for k in range(1, 10_000)]
    existing = []
    for path in candidates:
        if not path.exists():
            break
        existing.append(path)
    first_free = candidates[len(existing)]

    def matches(path: Path) -> bool:
        files = ExperimentFiles(path)
        try:
            return files.config.exists() and not semantic_difference(read_config_yaml(files.config), resolved)
        except Exception:  # an unreadable config is nobody's match
            return False

    def resume_or_finished(path: Path) -> DirDecision:
        if _checkpoint_finished(ExperimentFiles(path)):
            return DirDecision("finished", path)
        return DirDecision("resume", path)

    if restarted:
        launch_id = usable_launch_id(launch_id)
        if launch_id is not None:
            for path in existing:
                if _launch_id_of(path) == launch_id and matches(path):
                    return resume_or_finished(path)
        elif not resolved["experiment.resume"]:
            for path in reversed(existing):
                if matches(path):
                    return resume_or_finished(path)
    if not resolved["experiment.resume"]:
        return DirDecision("fresh", first_free)
    root = base / name
    if not root.exists():
        return DirDecision("fresh", root)
    files = ExperimentFiles(root)
    if not files.config.exists():
        if root.is_dir() and not any(p.name != run_lock.LOCK_NAME for p in root.iterdir()):
            return DirDecision("fresh", root)
        raise UserError(f"{root} exists but is not an experiment directory (no config.yaml); "
                        f"choose another experiment.name or experiment.base_dir")
    try:
        previous = read_config_yaml(files.config)
    except Exception as error:
        raise UserError(f"{files.config} cannot be read ({_one_line(error)}); "
                        f"move the directory away or choose another experiment.name") from None
    differing = semantic_difference(previous, resolved)
    if differing:
        shown = ", ".join(f"{k} ({previous.get(k)!r} there, {resolved.get(k)!r} now)" for k in differing[:6])
        more = f" and {len(differing) - 6} more" if len(differing) > 6 else ""
        raise UserError(f"{root} holds a run with a different config: {shown}{more}; "
                        f"use another experiment.name, or --experiment.resume=false to start fresh in a new directory")
    return resume_or_finished(root)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())[:300]


# --------------------------------------------------------------------------- optimizer
OPTIMIZERS = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c["lr"], momentum=c["momentum"],
                                             nesterov=c["nesterov"], weight_decay=c["weight_decay"]),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c["lr"], betas=tuple(c["betas"]),
                                               weight_decay=c["weight_decay"]),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c["lr"], betas=tuple(c["betas"]),
                                                 weight_decay=c["weight_decay"]),
}


def build_optimizer(parameters: Iterable[torch.nn.Parameter], *, name: str, lr: float, momentum: float = 0.9,
                    nesterov: bool = False, weight_decay: float = 0.0, betas=(0.9, 0.999)) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(sorted(OPTIMIZERS))}")
    settings = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, betas=betas)
    return OPTIMIZERS[name](list(parameters), settings)


# ------------------------------------------------------------------------------ seeding
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: Path, resolved: Optional[Dict[str, Any]] = None,
                    required: Sequence[str] = ()) -> Dict[str, Any]:
    """utils.checkpointing.load_checkpoint, and refused (one-line UserError) when the
    checkpoint belongs to another config (the keys that differ are named)."""
    state = checkpointing.load_checkpoint(path, required=required)
    if resolved is not None:
        differing = semantic_difference(state.get("config", {}), resolved)
        if differing:
            raise UserError(f"checkpoint {path} belongs to another config (differs in {', '.join(differing[:6])}); "
                            f"use the config it was made with, or move it away")
    return state


def read_run_checkpoints(files: ExperimentFiles, resolved: Dict[str, Any], rewind_at: Any = None) -> Optional[Dict[str, Any]]:
    """Rank 0 reads a run's checkpoints -> {'last', 'init'[, 'rewind', 'level_start'], 'note'},
    or None when no epoch finished yet; a damaged or foreign set is refused (UserError).  An
    unreadable last.pt falls back to previous.pt (with a note).  ``rewind_at``: WR's rewind
    point (epoch, batch), past which rewind.pt must exist."""
    previous = checkpointing.previous_of(files.last_checkpoint)
    if not files.last_checkpoint.exists() and not previous.exists():
        return None
    note = None
    try:
        last = load_checkpoint(files.last_checkpoint, resolved, required=LAST_CHECKPOINT_KEYS)
    except checkpointing.CorruptCheckpoint as error:  # a missing last.pt is refused the same way
        if not previous.exists():
            raise
        last = load_checkpoint(previous, resolved, required=LAST_CHECKPOINT_KEYS)
        note = (f"note: {str(error).split('; ')[0]}: resuming from {previous}, the checkpoint before it "
                f"(the work since then is done again)")
    state = {"last": last, "init": load_checkpoint(files.init_checkpoint, resolved, required=("model",)),
             "note": note}
    if files.rewind_checkpoint.exists():
        state["rewind"] = load_checkpoint(files.rewind_checkpoint, resolved, required=("model", "optimizer", "schedule"))
    elif rewind_at is not None:
        batches = last["partial_epoch"]["batches_done"] if last["phase"] == "mid_epoch" else 0
        if (last["level"], last["next_epoch"], batches) > (0, rewind_at.epoch, rewind_at.batch):
            raise UserError(f"checkpoint {files.rewind_checkpoint} is missing but level 0 is past its rewind point "
                            f"(epoch {rewind_at.epoch}, batch {rewind_at.batch}); the experiment directory is "
                            f"incomplete: move it away to start over")
    if files.level_start_checkpoint.exists():
        state["level_start"] = load_checkpoint(files.level_start_checkpoint, resolved,
                                               required=("model", "optimizer", "schedule", "epoch", "batches_done"))
    return state


# ------------------------------------------------------------------ set-up from the config
@dataclass
class Inputs:
    """What the config asks for, checked: dataset spec, resolutions, the masked model, densities."""
    spec: Any
    train_resolution: int
    eval_resolution: int
    model: torch.nn.Module
    densities: List[float]
    notes: List[str]


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
    notes = []
    for key in ("dataset.train_path", "dataset.test_path"):
        try:
            summary = validate_beton(c[key], spec)
        except DataError as error:
            raise UserError(f"{key}: {error}") from None
        if summary.get("note"):
            notes.append(f"note: {key}: {summary['note']}")
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
    if c["prune.training_type"] == "at_init":
        densities = [c["prune.target_density"]]
    elif c["prune.masks_from"] and c["prune.levels"] is None and c["prune.target_density"] is None:
        densities = [1.0]  # a control: its source's densities replace these (harness_setup.check_inputs)
    else:
        densities = pruning_utils.iterative_densities(c["prune.rate"], levels=c["prune.levels"],
                                                      target_density=c["prune.target_density"])
    return Inputs(spec, train_resolution, eval_resolution, model, densities, notes)


def make_data_loader(c: Dict[str, Any], spec: Any, device: torch.device, *, train: bool, resolution: int,
                     rank: int, world_size: int):
    """A loader of the config's training (``train``) or test file for this rank's share."""
    try:
        return make_loader(c["dataset.train_path" if train else "dataset.test_path"], spec, train=train,
                           batch_size=c["dataset.batch_size"], resolution=resolution,
                           num_workers=c["dataset.num_workers"], device=device, rank=rank, world_size=world_size,
                           seed=c["experiment.seed"], channels_last=c["training.channels_last"],
                           backend=c["dataset.loader"])
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


def compute_masks(c: Dict[str, Any], model: torch.nn.Module, *, level: int, density: float, batches, device,
                  input_shape, layer_counts=None) -> Dict[str, torch.Tensor]:
    """Level ``level``'s masks by the config's criterion and allocation (seeded per level);
    ``layer_counts``: per-layer kept counts (prune.layer_rates) instead of ``density``."""
    return pruning_utils.compute_masks(
        model, density=None if layer_counts is not None else density, layer_counts=layer_counts, criterion=c["prune.criterion"], allocation=c["prune.allocation"], batches=batches,
        loss_fn=torch.nn.functional.cross_entropy, num_batches=c["prune.snip_batches"],
        synflow_iterations=c["prune.synflow_iterations"], input_shape=input_shape,
        seed=pruning_utils.level_seed(c["experiment.seed"], level), device=device, snip_mode=c["prune.snip_mode"])


def build_loaders(c: Dict[str, Any], spec: Any, ctx: Any, train_resolution: int, eval_resolution: int):
    """-> (training loader, test loader) of this rank's share; a batch larger than the
    training set is refused."""
    shard = dict(rank=ctx.rank, world_size=ctx.world_size)
    train = make_data_loader(c, spec, ctx.device, train=True, resolution=train_resolution, **shard)
    test = make_data_loader(c, spec, ctx.device, train=False, resolution=eval_resolution, **shard)
    if len(train) == 0:
        raise UserError(f"dataset.batch_size={c['dataset.batch_size']} is larger than the training set "
                        f"({train.num_samples} samples): no full batch per epoch")
    return train, test


def create_experiment_dir(files: ExperimentFiles, resolved: Dict[str, Any], launch_id: Optional[str]) -> None:
    """A new experiment directory: its folders, the launch id (first: an elastic restart finds
    this directory by it), the resolved config and the CSV headers (rank 0 only)."""
    make_dirs(files.root / "masks")
    make_dirs(files.checkpoints)
    launch = usable_launch_id(launch_id)
    if launch is not None:
        atomic_write_bytes(files.launch_id, (launch + "\n").encode())
    atomic_write_bytes(files.config, config_yaml(resolved))
    for log in files.logs().values():
        log.create()


def resume_message(root: Path, last: Dict[str, Any]) -> str:
    """Where a resumed run goes on from, in words."""
    if last["phase"] == "level_done":
        return f"resuming {root} after level {last['level']}"
    where = f"resuming {root} at level {last['level']}, epoch {last['next_epoch']}"
    if last["phase"] == "mid_epoch":
        where += f", batch {last['partial_epoch']['batches_done']}"
    return where


# ------------------------------------------------------------------ feature callbacks
class AfterBackward(Callback):
    """Puts ``hook(model)`` into every training step, after backward (e.g. training.bn_l1)."""
    in_every_training = True

    def __init__(self, hook):
        self.after_backward = hook


class ChannelReport(Callback):
    """Channel structure: channels alive in levels.csv / layers.csv, and each finished level's
    weights in checkpoints/level_L.pt (what ``python -m utils.compact`` makes smaller)."""

    def __init__(self, structure):
        self.structure = structure

    def on_level_end(self, info: LevelInfo) -> None:
        masks = mask_layers.get_masks(info.model)
        info.row["channel_density"] = structured.channel_density(self.structure, masks)
        alive = structured.channels_alive(masks)
        for layer in info.extra["layers"]:
            layer["channels_alive"], layer["channels"] = alive[layer["layer"]]

    def on_level_logged(self, info: LevelInfo) -> None:
        if info.is_primary:
            atomic_torch_save({"format": CHECKPOINT_FORMAT, "level": info.level,
                               "model": checkpointing.model_state(info.model)},
                              ExperimentFiles(Path(info.root)).level_weights(info.level))


class StabilityAnalysis(Callback):
    """analysis.stability: at each level's start the state is kept (and written, for resume);
    at its end a second copy trains from it with another data order, the test error along the
    linear path between the two goes to stability.csv and the barrier to levels.csv."""

    def __init__(self, experiment):
        self.x = experiment  # harness_setup.ExperimentBase: the training objects and the run's files

    def on_level_start(self, info: LevelInfo) -> None:
        x = self.x
        x.level_start_state = {**checkpointing.training_snapshot(x.model, x.optimizer, x.schedule),
                               "epoch": info.extra["start_epoch"], "batches_done": info.extra["start_batch"]}
        if info.is_primary:
            checkpointing.save_checkpoint(x.files.level_start_checkpoint, "rewind", config=x.c,
                                          snapshot=x.level_start_state)

    def on_level_end(self, info: LevelInfo) -> None:
        x, c = self.x, self.x.c
        du.broadcast_buffers_(x.model, exclude=mask_layers.mask_buffer_names(x.model))
        first = checkpointing.model_state(x.model)
        second = x.train_second_copy(x.level_start_state, info.level)
        offset = BN_BATCHES_EPOCH
        result = stability.evaluate_path(
            x.model, first, second, train_batches=lambda: x.snip_loader().batches(offset + info.level),
            test_batches=lambda: x.test_loader.batches(0), device=x.ctx.device,
            points=c["analysis.interpolation_points"], bn_batches=c["analysis.bn_batches"],
            reestimate_endpoints=c["analysis.reestimate_endpoints"], autocast_dtype=x.autocast_dtype,
            reduce=du.all_reduce_sum)
        info.row["instability"] = result.instability
        if info.is_primary:
            for row in result.rows(info.level):
                x.files.stability.append(row)
        x.say(f"level {info.level}: instability {result.instability:.2f} points "
              f"(error barrier on the path between two copies)")
