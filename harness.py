"""Pruning harness entry point: config -> distributed context -> level loop.

    torchrun --nproc_per_node=N harness.py --config configs/EXPERIMENT.yaml [--section.key=value ...]
    python harness.py --config ...          # the same, one process

Each level: prune -> reset (per prune.training_type) -> train -> evaluate every epoch ->
log.  All ranks compute; only rank 0 writes.

Never losing a run:
* After every epoch rank 0 writes ``checkpoints/last.pt`` atomically (temporary file,
  fsync, rename): model and masks, optimizer, LR-schedule position, grad scaler, every RNG
  state, level statistics and the number of rows of each CSV file.  ``init.pt`` (IMP) and
  ``rewind.pt`` (WR) hold the states later levels restart from.  Nothing else is kept.
* Starting the same config again resumes from ``last.pt``: CSV rows written after it are
  dropped, so the results equal an uninterrupted run's (tests/test_resume.py).  The data
  order and the torch loader's augmentation are pure functions of (seed, epoch, sample).
  ffcv's random augmentations (flip, translate, resized crop) draw from numba's unseeded
  per-thread RNG: with dataset.loader=ffcv on augmented data not even two uninterrupted
  runs match, so neither can a resumed one (data without augmentation stays exact).
* SIGTERM/SIGINT: the ranks agree on a batch at which to stop, rank 0 writes a mid-epoch
  checkpoint (its per-rank partial sums included) and every rank exits with 143; resuming
  from it is exact too.
* torchrun --max-restarts: a restarted job resumes the directory its launch created.
* Bad input ends in one line on stderr and exit status 2 before anything is written; an
  error in one rank's process ends that process at once, so torchrun stops the others.
"""
from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import nullcontext, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import harness_params
import harness_utils as hu
from utils import distributed_utils as du
from utils import mask_layers, pruning_utils
from utils.dataset import DataError, get_dataset_spec, make_loader, validate_beton
from utils.models import ModelError, get_model
from utils.schedulers import LRSchedule, ScheduleSpec

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the run stopped on request; its checkpoint is intact
EXIT_USER_ERROR = 2   # bad input, refused before anything is written (harness_params uses the same)
EXIT_MASK_SYNC = 3
EXIT_FAILED = 1
SNIP_EPOCH_OFFSET = 1_000_000  # data order of SNIP batches: epoch id disjoint from training epochs
# With several processes the ranks agree on stopping with one all-reduce every this many
# batches (and at every epoch end): a preempted run stops within this many batches, and a
# CUDA run pays one host-device sync per this many steps.  One process checks every batch.
STOP_CHECK_INTERVAL = 10
LOST_PEER_GRACE_S = 2.0  # see report_failure_and_exit


class MaskSyncError(RuntimeError):
    pass


class Preempted(Exception):
    pass


@dataclass
class TestHooks:
    """Fault injection for tests only; read once, from variables no user sets.

    * ``HARNESS_TEST_CRASH_RANK`` / ``_CRASH_AFTER_STEPS`` / ``_CRASH_MARKER``: that rank
      exits with status 17 after that many optimizer steps of this process, once (the
      marker file records that it happened, so torchrun's restart does not crash again).
    * ``HARNESS_TEST_RAISE_RANK`` / ``_RAISE_AFTER_STEPS``: that rank raises a RuntimeError
      (an ordinary bug in one process) after that many steps.
    * ``HARNESS_TEST_KILL_AT``: the process SIGKILLs itself at a named point:
      ``batch:L:E:B`` (after B optimizer steps of epoch E of level L), ``epoch_end:L:E``
      (epoch E's row written, its checkpoint not yet), ``level_end:L`` (level L's rows
      written, its checkpoint not yet), ``prune:L`` (level L's masks computed and written,
      its training not started).  ``HARNESS_TEST_KILL_MARKER``: only once, as above;
      ``HARNESS_TEST_KILL_RANK``: only on that rank; ``HARNESS_TEST_KILL_SIGNAL``: another
      signal than SIGKILL (e.g. SIGTERM: a preemption at an exact batch).
    * ``HARNESS_TEST_STEP_DELAY_S``: sleep after every step (a slow run to signal).
    * ``HARNESS_TEST_CORRUPT_MASKS_RANK``: that rank flips one mask bit after pruning.
    """
    crash_rank: int = -1
    crash_after_steps: int = -1
    crash_marker: str = ""
    corrupt_masks_rank: int = -1
    raise_rank: int = -1
    raise_after_steps: int = -1
    kill_at: str = ""
    kill_marker: str = ""
    kill_rank: int = -1
    kill_signal: str = "SIGKILL"
    step_delay_s: float = 0.0

    @classmethod
    def from_env(cls) -> "TestHooks":
        env = os.environ
        return cls(int(env.get("HARNESS_TEST_CRASH_RANK", -1)), int(env.get("HARNESS_TEST_CRASH_AFTER_STEPS", -1)),
                   env.get("HARNESS_TEST_CRASH_MARKER", ""), int(env.get("HARNESS_TEST_CORRUPT_MASKS_RANK", -1)),
                   int(env.get("HARNESS_TEST_RAISE_RANK", -1)), int(env.get("HARNESS_TEST_RAISE_AFTER_STEPS", -1)),
                   env.get("HARNESS_TEST_KILL_AT", ""), env.get("HARNESS_TEST_KILL_MARKER", ""),
                   int(env.get("HARNESS_TEST_KILL_RANK", -1)), env.get("HARNESS_TEST_KILL_SIGNAL", "SIGKILL"),
                   float(env.get("HARNESS_TEST_STEP_DELAY_S", 0.0)))

    def kill_if_at(self, rank: int, *point: Any) -> None:
        if not self.kill_at or self.kill_at != ":".join(str(p) for p in point):
            return
        if self.kill_rank not in (-1, rank):
            return
        if self.kill_marker:
            if os.path.exists(self.kill_marker):
                return
            open(self.kill_marker, "w").close()
        print(f"test hook: {self.kill_signal} at {self.kill_at} (rank {rank})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), getattr(signal, self.kill_signal))


class StopFlag:
    """SIGTERM/SIGINT set a flag; the training loop stops at a batch boundary that every
    rank agrees on (see ``Experiment.stop_agreed``); a second signal stops at once.
    ``restore()`` puts the previous handlers back (main() may run inside another program,
    e.g. a test)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.raised = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.raised:  # asked twice: stop now (every file is written atomically, the last checkpoint stays whole)
            self.restore()
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice: stopping without a checkpoint")
        self.raised = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Experiment:
    def __init__(self, config: Dict[str, Any], ctx: du.DistributedContext, use_ddp: bool = True):
        self.c = config
        self.ctx = ctx
        self.use_ddp = use_ddp and ctx.is_distributed
        self.hooks = TestHooks.from_env()
        self.stop: Optional[StopFlag] = None
        self.steps_this_process = 0
        self._snip_loader = None
        self.resume_partial_epoch: Optional[Dict[str, Any]] = None

    # --------------------------------------------------------------------- messages
    def say(self, message: str) -> None:
        if self.ctx.is_primary:
            print(message, flush=True)

    # ---------------------------------------------------------------------- set-up
    def check_inputs(self) -> None:
        """Everything that can be refused before anything is written (same on every rank)."""
        c, world = self.c, self.ctx.world_size
        hu.seed_everything(c["experiment.seed"])  # before the model is built: its init draws from torch's RNG
        if c["dataset.batch_size"] % world:
            raise hu.UserError(f"dataset.batch_size={c['dataset.batch_size']} is not divisible by the number of "
                               f"processes ({world}); use a multiple of {world}")
        if c["distributed.sync_bn"] and world > 1 and self.ctx.device.type != "cuda":
            raise hu.UserError("distributed.sync_bn=true needs CUDA devices (SyncBatchNorm does not run on CPU); set it to false")
        try:
            self.spec = get_dataset_spec(c["dataset.name"])
        except DataError as error:
            raise hu.UserError(str(error)) from None
        self.train_resolution = c["dataset.resolution"] or self.spec.resolution
        self.eval_resolution = c["dataset.eval_resolution"] or self.train_resolution
        for key in ("dataset.train_path", "dataset.test_path"):
            try:
                validate_beton(c[key], self.spec)
            except DataError as error:
                raise hu.UserError(f"{key}: {error}") from None
        try:
            self.model = get_model(c["model.name"], num_classes=self.spec.num_classes,
                                   in_channels=self.spec.channels, image_size=self.train_resolution)
        except ModelError as error:
            raise hu.UserError(f"model.name={c['model.name']} does not fit dataset.name={c['dataset.name']} "
                               f"({self.spec.channels}x{self.train_resolution}x{self.train_resolution} inputs, "
                               f"{self.spec.num_classes} classes): {error}") from None
        try:
            mask_layers.prepare_model(self.model, exclude=c["prune.exclude"])
        except mask_layers.MaskError as error:
            raise hu.UserError(f"prune.exclude={c['prune.exclude']}: {error}") from None
        if c["prune.training_type"] == "at_init":
            self.densities = [c["prune.target_density"]]
        else:
            self.densities = pruning_utils.iterative_densities(
                c["prune.rate"], levels=c["prune.levels"], target_density=c["prune.target_density"])

    def decide_directory(self) -> hu.DirDecision:
        """Rank 0 decides; every rank learns the decision (or the same error)."""
        outcome: Any = None
        if self.ctx.is_primary:
            try:
                outcome = hu.decide_experiment_dir(self.c, restarted=du.restart_count() > 0,
                                                   launch_id=du.launch_id())
            except hu.UserError as error:
                outcome = str(error)
        outcome = du.broadcast_object(outcome)
        if isinstance(outcome, str):
            raise hu.UserError(outcome)
        return outcome

    def agreed(self, step: Callable[[], Any]) -> Any:
        """Run a set-up ``step`` (no collectives inside) on every rank.  When it refuses the
        input on any rank, every rank raises the same UserError: rank 0's message, or the
        first failing rank's naming that rank (e.g. a file missing on one node only).  So
        each UserError reaches main() on all ranks at once, and no rank is left waiting in
        a collective for one that has gone."""
        message, result = None, None
        try:
            result = step()
        except hu.UserError as error:
            message = str(error)
        messages = du.all_gather_object(message)
        failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
        if failed:
            rank, text = failed[0]
            raise hu.UserError(text if rank == 0 else f"(rank {rank}) {text}")
        return result

    def build_loaders(self) -> None:
        c, ctx = self.c, self.ctx
        device = ctx.device
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c["training.precision"])
        if device.type != "cuda" and self.autocast_dtype is not None:
            self.say(f"note: training.precision={c['training.precision']} applies on CUDA; this CPU run trains in fp32")
            self.autocast_dtype = None
        loader_args = dict(num_workers=c["dataset.num_workers"], device=device, rank=ctx.rank,
                           world_size=ctx.world_size, seed=c["experiment.seed"],
                           channels_last=c["training.channels_last"], backend=c["dataset.loader"])
        try:
            self.train_loader = make_loader(c["dataset.train_path"], self.spec, train=True,
                                            batch_size=c["dataset.batch_size"], resolution=self.train_resolution,
                                            **loader_args)
            self.test_loader = make_loader(c["dataset.test_path"], self.spec, train=False,
                                           batch_size=c["dataset.batch_size"], resolution=self.eval_resolution,
                                           **loader_args)
        except DataError as error:
            raise hu.UserError(str(error)) from None
        if len(self.train_loader) == 0:
            raise hu.UserError(f"dataset.batch_size={c['dataset.batch_size']} is larger than the training set "
                               f"({self.train_loader.num_samples} samples): no full batch per epoch")

    def build_training_model(self) -> None:
        """Device, memory format, DDP (its constructor broadcasts rank 0's weights), compile."""
        c, device = self.c, self.ctx.device
        self.memory_format = torch.channels_last if c["training.channels_last"] else torch.contiguous_format
        model = self.model.to(device=device, memory_format=self.memory_format)
        if c["distributed.sync_bn"] and self.use_ddp:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.model = model
        self.train_model = model
        if self.use_ddp:
            # Masks are identical on every rank by construction (and checked after pruning):
            # keep them out of DDP's per-forward buffer broadcast.  BatchNorm running stats are
            # still broadcast from rank 0 at each forward (DDP's default).
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, mask_layers.mask_buffer_names(model))
            self.train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if c["training.compile"]:
            self.train_model = torch.compile(self.train_model)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)

    def build_training_objects(self) -> None:
        self.agreed(self.build_loaders)
        self.build_training_model()

    def new_optimizer(self) -> None:
        c = self.c
        self.optimizer = hu.build_optimizer(self.model.parameters(), name=c["optimizer.name"], lr=c["optimizer.lr"],
                                            momentum=c["optimizer.momentum"], nesterov=c["optimizer.nesterov"],
                                            weight_decay=c["optimizer.weight_decay"], betas=c["optimizer.betas"])
        spec = ScheduleSpec(name=c["schedule.name"], epochs=c["training.epochs"],
                            iterations_per_epoch=len(self.train_loader), warmup_epochs=c["schedule.warmup_epochs"],
                            warmup_start_factor=c["schedule.warmup_start_factor"], milestones=tuple(c["schedule.milestones"]),
                            gamma=c["schedule.gamma"], step_size=c["schedule.step_size"],
                            peak_epoch=c["schedule.peak_epoch"], final_factor=c["schedule.final_factor"])
        self.schedule = LRSchedule(self.optimizer, spec)

    # ------------------------------------------------------------------- snapshots
    def model_state(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def load_weights(self, state: Dict[str, torch.Tensor]) -> None:
        """Weights and buffers from ``state``, masks kept as they are, pruned weights zeroed."""
        masks = set(mask_layers.mask_buffer_names(self.model))
        own = self.model.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                if key not in masks:
                    own[key].copy_(value)
        mask_layers.apply_masks_(self.model)

    def snapshot(self) -> Dict[str, Any]:
        """Model, optimizer and schedule state as CPU copies that later training cannot change
        (``optimizer.state_dict()`` alone returns the live momentum buffers)."""
        return {"model": self.model_state(), "optimizer": hu.detached_copy(self.optimizer.state_dict()),
                "schedule": dict(self.schedule.state_dict())}

    def checkpoint(self, *, level: int, next_epoch: int, phase: str, finished: bool = False,
                   partial_epoch: Optional[Dict[str, Any]] = None) -> None:
        """``phase``: 'train' (after epoch next_epoch - 1), 'mid_epoch' (``partial_epoch``
        holds the batches done, every rank's partial sums, the epoch's LR and time so far) or
        'level_done' (after the level's rows)."""
        if not self.ctx.is_primary:
            return
        state = {
            "format": hu.CHECKPOINT_FORMAT, "config": self.c, "level": level, "next_epoch": next_epoch,
            "phase": phase, "finished": finished, **self.snapshot(),
            "scaler": self.scaler.state_dict(), "rng": hu.rng_state(),
            "level_stats": dict(self.level_stats),
            "csv_rows": {name: log.count() for name, log in self.files.logs().items()},
            "world_size": self.ctx.world_size,
        }
        if partial_epoch is not None:
            state["partial_epoch"] = partial_epoch
        hu.atomic_torch_save(state, self.files.last_checkpoint)

    # ---------------------------------------------------------------------- pruning
    def prune_to(self, level: int, density: float) -> None:
        c = self.c
        batches = None
        if c["prune.criterion"] == "snip":
            batches = self.snip_loader().batches(SNIP_EPOCH_OFFSET + level)
        masks = pruning_utils.compute_masks(
            self.model, density=density, criterion=c["prune.criterion"], allocation=c["prune.allocation"],
            batches=batches, loss_fn=F.cross_entropy, num_batches=c["prune.snip_batches"],
            synflow_iterations=c["prune.synflow_iterations"],
            input_shape=(self.spec.channels, self.train_resolution, self.train_resolution),
            seed=c["experiment.seed"] * 1000 + level, device=self.ctx.device)
        # Scores can differ in the last bit across GPUs; rank 0's masks are the masks.
        masks = du.broadcast_object(masks)
        if self.hooks.corrupt_masks_rank == self.ctx.rank:
            first = next(iter(masks))
            masks[first].view(-1)[0] = ~masks[first].view(-1)[0]
        self.check_masks_in_sync(masks)
        mask_layers.set_masks(self.model, masks)

    def snip_loader(self):
        """Built once per run (an FFCV loader compiles its pipeline when first used).

        Every rank scores the same GLOBAL batches (world_size=1 order), so the masks do not
        depend on the number of processes and every rank computes the same thing.
        """
        if self._snip_loader is None:
            c = self.c
            self._snip_loader = make_loader(
                c["dataset.train_path"], self.spec, train=True, batch_size=c["dataset.batch_size"],
                num_workers=c["dataset.num_workers"], device=self.ctx.device, rank=0, world_size=1,
                seed=c["experiment.seed"], channels_last=c["training.channels_last"],
                backend=c["dataset.loader"], resolution=self.train_resolution)
        return self._snip_loader

    def check_masks_in_sync(self, masks) -> None:
        checksums = du.all_gather_object(mask_layers.masks_checksum(masks))
        if len(set(checksums)) > 1:
            bad = [rank for rank, s in enumerate(checksums) if s != checksums[0]]
            raise MaskSyncError(f"masks differ between ranks after pruning (ranks {bad} disagree with rank 0); stopping")

    # ------------------------------------------------------------------ level loop
    def begin_level(self, level: int) -> int:
        """prune -> reset for ``level``; returns the first epoch to train."""
        c, kind = self.c, self.c["prune.training_type"]
        density = self.densities[level]
        if kind == "at_init" or level > 0:
            self.prune_to(level, density)
        start_epoch = 0
        if level > 0 and kind == "imp":
            self.load_weights(self.init_state["model"])
            self.new_optimizer()
        elif level > 0 and kind == "wr":
            self.load_weights(self.rewind_state["model"])
            self.new_optimizer()
            # A copy: the optimizer adopts the tensors it is given and updates them in place,
            # which would change the rewind state that later levels restart from.
            self.optimizer.load_state_dict(hu.detached_copy(self.rewind_state["optimizer"]))
            self.schedule.load_state_dict(self.rewind_state["schedule"])
            start_epoch = c["prune.rewind_epoch"]
        else:  # level 0, lrr (weights kept), at_init
            self.new_optimizer()
        mask_layers.apply_masks_(self.model)
        if self.ctx.is_primary:
            hu.atomic_torch_save(mask_layers.get_masks(self.model), self.files.masks(level))
        self.level_stats = {"best_test_acc": 0.0, "train_time_s": 0.0}
        self.hooks.kill_if_at(self.ctx.rank, "prune", level)
        return start_epoch

    def capture_rewind_state(self, level: int, epochs_done: int) -> None:
        c = self.c
        if c["prune.training_type"] == "wr" and level == 0 and epochs_done == c["prune.rewind_epoch"]:
            self.rewind_state = self.snapshot()
            if self.ctx.is_primary:
                hu.atomic_torch_save({"format": hu.CHECKPOINT_FORMAT, "config": self.c, **self.rewind_state},
                                     self.files.rewind_checkpoint)

    def run_levels(self, start_level: int, start_epoch: Optional[int]) -> None:
        epochs = self.c["training.epochs"]
        last_level = len(self.densities) - 1
        for level in range(start_level, last_level + 1):
            if start_epoch is None:
                epoch = self.begin_level(level)
            else:
                epoch, start_epoch = start_epoch, None
            self.capture_rewind_state(level, epoch)
            while epoch < epochs:
                partial, self.resume_partial_epoch = self.resume_partial_epoch, None
                row = self.train_and_evaluate(level, epoch, partial)
                epoch += 1
                self.capture_rewind_state(level, epoch)
                if self.ctx.is_primary:
                    self.files.epochs.append(row)
                if epoch < epochs:
                    self.hooks.kill_if_at(self.ctx.rank, "epoch_end", level, epoch - 1)
                    self.checkpoint(level=level, next_epoch=epoch, phase="train")
                    self.stop_if_requested()
            self.finish_level(level, row)
            if level < last_level:
                self.stop_if_requested()

    def finish_level(self, level: int, last_row: Dict[str, Any]) -> None:
        masks = mask_layers.get_masks(self.model)
        if self.ctx.is_primary:
            self.files.levels.append({
                "level": level, "target_density": self.densities[level], "density": mask_layers.overall_density(masks),
                "final_test_acc": last_row["test_acc"], "best_test_acc": self.level_stats["best_test_acc"],
                "train_time_s": self.level_stats["train_time_s"]})
            for layer in mask_layers.density_report(masks):
                self.files.layers.append({"level": level, **layer})
        self.hooks.kill_if_at(self.ctx.rank, "level_end", level)
        last = level == len(self.densities) - 1
        self.checkpoint(level=level, next_epoch=self.c["training.epochs"], phase="level_done", finished=last)
        self.say(f"level {level}: density {mask_layers.overall_density(masks):.4f}, "
                 f"test acc {last_row['test_acc']:.2f}% (best {self.level_stats['best_test_acc']:.2f}%)")

    # -------------------------------------------------------------- stopping on request
    def stop_agreed(self, batches_done: Optional[int] = None) -> bool:
        """Whether to stop now.  All ranks get the same answer at the same batch: with
        several processes it is an all-reduce of the ranks' flags, made at the same batch
        counts on every rank (every STOP_CHECK_INTERVAL batches; ``None``: an epoch
        boundary, always) so that every rank takes part in it."""
        raised = self.stop is not None and self.stop.raised
        if not self.ctx.is_distributed:
            return raised
        if batches_done is not None and batches_done % STOP_CHECK_INTERVAL:
            return False
        flag = torch.tensor([1.0 if raised else 0.0], device=self.ctx.device)
        du.all_reduce_sum(flag)
        return flag.item() > 0  # note: a CPU-GPU sync point, once per STOP_CHECK_INTERVAL steps

    def stop_if_requested(self) -> None:
        """At an epoch or level boundary, just after a checkpoint: nothing more to save."""
        if self.stop_agreed():
            raise Preempted()

    # ------------------------------------------------------------------ train / eval
    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)

    def train_and_evaluate(self, level: int, epoch: int, partial: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Train one epoch and evaluate; -> its epochs.csv row.

        ``partial``: resume the epoch after ``partial['batches_done']`` batches, with this
        rank's partial sums, the LR the epoch began with and the time spent so far (what a
        mid-epoch checkpoint holds), so the row equals an uninterrupted epoch's.
        """
        c = self.c
        self.train_model.train()
        device = self.ctx.device
        sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss * n, correct, n
        batches_done, lr_at_start, time_before = 0, self.schedule.lr, 0.0
        if partial is not None:
            batches_done, lr_at_start, time_before = partial["batches_done"], partial["lr_at_start"], partial["time_s"]
            sums.copy_(partial["sums"])
        total_batches = len(self.train_loader)
        batches = self.train_loader.batches(epoch, start_batch=batches_done)
        if self.ctx.is_primary and c["training.progress"]:
            from tqdm import tqdm
            batches = tqdm(batches, total=total_batches, initial=batches_done, desc=f"level {level} epoch {epoch}",
                           leave=False, dynamic_ncols=True, file=sys.stderr,
                           disable=None)  # None: off when stderr is not a terminal (logs stay clean)
        started = time.perf_counter()
        for images, labels in batches:
            with self.autocast():
                logits = self.train_model(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=c["optimizer.label_smoothing"])
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if c["training.grad_clip"] > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c["training.grad_clip"])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            mask_layers.apply_masks_(self.model)
            self.schedule.step()
            with torch.no_grad():  # on-device sums: no host sync per step
                n = labels.shape[0]
                sums[0] += loss.detach().double() * n
                sums[1] += (logits.argmax(1) == labels).sum()
                sums[2] += n
            batches_done += 1
            self.after_step(level, epoch, batches_done)
            if batches_done < total_batches and self.stop_agreed(batches_done):
                self.checkpoint_mid_epoch(level, epoch, batches_done, sums, lr_at_start,
                                          time_before + time.perf_counter() - started)
                raise Preempted()
        du.all_reduce_sum(sums)
        loss_sum, correct, count = sums.tolist()  # note: a CPU-GPU sync point, once per epoch
        epoch_time = time_before + time.perf_counter() - started
        test_loss, test_acc = self.evaluate()
        self.level_stats["best_test_acc"] = max(self.level_stats["best_test_acc"], test_acc)
        self.level_stats["train_time_s"] += epoch_time
        return {"level": level, "epoch": epoch, "lr": lr_at_start, "train_loss": loss_sum / count,
                "train_acc": 100.0 * correct / count, "test_loss": test_loss, "test_acc": test_acc,
                "epoch_time_s": epoch_time, "images_per_s": count / epoch_time}

    def checkpoint_mid_epoch(self, level: int, epoch: int, batches_done: int, sums: torch.Tensor,
                             lr_at_start: float, time_s: float) -> None:
        """Every rank's partial sums go to rank 0 (a collective: all ranks call this at the
        same batch, see stop_agreed), which writes them with the rest of the state."""
        every_rank_sums = du.all_gather_object(sums.detach().to("cpu", copy=True))
        self.checkpoint(level=level, next_epoch=epoch, phase="mid_epoch", partial_epoch={
            "batches_done": batches_done, "sums": every_rank_sums, "lr_at_start": lr_at_start, "time_s": time_s})
        self.say(f"stopping on request at level {level}, epoch {epoch}, batch {batches_done}: checkpoint written")

    def after_step(self, level: int, epoch: int, batches_done: int) -> None:
        self.steps_this_process += 1
        hooks = self.hooks
        if (hooks.crash_rank == self.ctx.rank and self.steps_this_process == hooks.crash_after_steps
                and hooks.crash_marker and not os.path.exists(hooks.crash_marker)):
            open(hooks.crash_marker, "w").close()
            print(f"test hook: rank {self.ctx.rank} crashing after {self.steps_this_process} steps", file=sys.stderr, flush=True)
            os._exit(17)
        if hooks.raise_rank == self.ctx.rank and self.steps_this_process == hooks.raise_after_steps:
            raise RuntimeError(f"test hook: injected failure on rank {self.ctx.rank} "
                               f"after {self.steps_this_process} steps")
        hooks.kill_if_at(self.ctx.rank, "batch", level, epoch, batches_done)
        if hooks.step_delay_s > 0:
            time.sleep(hooks.step_delay_s)

    @torch.no_grad()
    def evaluate(self) -> tuple:
        """Loss and accuracy over the whole test set, each example counted once across ranks."""
        model = self.model  # not the DDP wrapper: ranks may hold different numbers of test batches
        # BatchNorm running statistics: DDP broadcasts rank 0's at each training forward, then each
        # rank's own batch updates them.  Evaluate rank 0's (the checkpointed ones) on every rank.
        du.broadcast_buffers_(model, exclude=mask_layers.mask_buffer_names(model))
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, device=self.ctx.device, dtype=torch.float64)
        for images, labels in self.test_loader.batches(0):
            with self.autocast():
                logits = model(images)
            sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            sums[1] += (logits.argmax(1) == labels).sum()
            sums[2] += labels.shape[0]
        du.all_reduce_sum(sums)
        model.train(was_training)
        loss_sum, correct, count = sums.tolist()
        if count != self.test_loader.num_samples:
            raise RuntimeError(f"evaluation saw {int(count)} examples, the test set has {self.test_loader.num_samples}")
        return loss_sum / count, 100.0 * correct / count

    # ------------------------------------------------------------------------ run
    def start_fresh(self) -> None:
        if self.ctx.is_primary:
            files = self.files
            hu.make_dirs(files.root / "masks")
            hu.make_dirs(files.checkpoints)
            launch = hu.usable_launch_id(du.launch_id())
            if launch is not None:  # first: an elastic restart finds this directory by it
                hu.atomic_write_bytes(files.launch_id, (launch + "\n").encode())
            hu.atomic_write_bytes(files.config, hu.config_yaml(self.c))
            for log in files.logs().values():
                log.create()
        self.init_state = {"model": self.model_state()}
        if self.ctx.is_primary:
            hu.atomic_torch_save({"format": hu.CHECKPOINT_FORMAT, "config": self.c, **self.init_state},
                                 self.files.init_checkpoint)
        du.barrier()

    def load_checkpoints(self) -> Any:
        """Rank 0 reads the checkpoints -> {'last', 'init'[, 'rewind']}, None when no epoch
        finished yet, or the one-line message refusing them (the same on every rank)."""
        if not self.ctx.is_primary:
            return None
        files = self.files
        if not files.last_checkpoint.exists():
            return None
        try:
            state = {"last": hu.load_checkpoint(files.last_checkpoint, self.c, required=hu.LAST_CHECKPOINT_KEYS),
                     "init": hu.load_checkpoint(files.init_checkpoint, self.c, required=("model",))}
            if files.rewind_checkpoint.exists():
                state["rewind"] = hu.load_checkpoint(files.rewind_checkpoint, self.c,
                                                     required=("model", "optimizer", "schedule"))
            elif (self.c["prune.training_type"] == "wr" and
                  (state["last"]["level"], state["last"]["next_epoch"]) > (0, self.c["prune.rewind_epoch"])):
                raise hu.UserError(f"checkpoint {files.rewind_checkpoint} is missing but level 0 is past epoch "
                                   f"{self.c['prune.rewind_epoch']}; the experiment directory is incomplete: "
                                   f"move it away to start over")
        except hu.UserError as error:
            return str(error)
        return state

    def resume(self) -> tuple:
        """Load rank 0's checkpoint on every rank; -> (start_level, start_epoch or None)."""
        state = du.broadcast_object(self.load_checkpoints())
        if isinstance(state, str):
            raise hu.UserError(state)
        if self.ctx.is_primary:
            for stale in hu.remove_stale_temporaries(self.files.root):
                self.say(f"removed {stale}, left by an interrupted write")
        if state is None:  # the directory exists but no epoch finished: start over in it
            self.say(f"no checkpoint in {self.files.root} yet: starting the run from the beginning")
            self.start_fresh()
            return 0, None
        last = state["last"]
        if self.ctx.is_primary:
            for name, log in self.files.logs().items():
                log.truncate(last["csv_rows"][name])
        self.init_state = {"model": state["init"]["model"]}
        if "rewind" in state:
            self.rewind_state = {k: state["rewind"][k] for k in ("model", "optimizer", "schedule")}
        self.model.load_state_dict(last["model"])
        self.new_optimizer()
        self.optimizer.load_state_dict(last["optimizer"])
        self.schedule.load_state_dict(last["schedule"])
        self.scaler.load_state_dict(last["scaler"])
        hu.set_rng_state(last["rng"])
        self.level_stats = dict(last["level_stats"])
        self.check_masks_in_sync(mask_layers.get_masks(self.model))
        level, phase, epoch = last["level"], last["phase"], last["next_epoch"]
        if phase == "level_done":
            self.say(f"resuming {self.files.root} after level {level}")
            return level + 1, None
        if phase == "mid_epoch":
            self.resume_partial_epoch = self.partial_epoch_for_this_rank(last["partial_epoch"])
            self.say(f"resuming {self.files.root} at level {level}, epoch {epoch}, "
                     f"batch {last['partial_epoch']['batches_done']}")
        else:
            self.say(f"resuming {self.files.root} at level {level}, epoch {epoch}")
        return level, epoch

    def partial_epoch_for_this_rank(self, partial: Dict[str, Any]) -> Dict[str, Any]:
        """This rank's share of a mid-epoch checkpoint's partial sums.  With the world size it
        was written with, each rank continues its own sums (the row is bit-identical); with
        another, rank 0 carries their total (the loss mean may then differ in the last bits;
        the data order itself is defined per global batch, so it is unaffected)."""
        every_rank = partial["sums"]
        if len(every_rank) == self.ctx.world_size:
            mine = every_rank[self.ctx.rank]
        elif self.ctx.is_primary:
            mine = torch.stack(list(every_rank)).sum(0)
        else:
            mine = torch.zeros_like(every_rank[0])
        return {**partial, "sums": mine}

    def run(self) -> int:
        self.agreed(self.check_inputs)
        decision = self.decide_directory()
        self.files = hu.ExperimentFiles(decision.root)
        if decision.action == "finished":
            self.say(f"{decision.root} is finished ({len(self.densities)} levels); nothing to do")
            return 0
        self.build_training_objects()
        self.level_stats = {"best_test_acc": 0.0, "train_time_s": 0.0}
        self.new_optimizer()
        self.stop = StopFlag()
        try:
            if decision.action == "resume":
                start_level, start_epoch = self.resume()
            else:
                self.say(f"writing results to {decision.root}")
                self.start_fresh()
                start_level, start_epoch = 0, None
            self.run_levels(start_level, start_epoch)
        except Preempted:
            self.say("stopped on request (SIGTERM/SIGINT); the checkpoint is intact: run the same command to resume")
            return EXIT_PREEMPTED
        finally:
            self.stop.restore()
        du.barrier()
        self.say(f"done: {self.files.root}")
        return 0


def load_config_on_every_rank(argv: Optional[List[str]]):
    """harness_params.load_config, with its message (or --help) printed by rank 0 only:
    every rank parses the same files, so every rank fails the same way.  -> the config, or
    the exit status to end with."""
    quiet = du.rank_from_env() != 0
    sink = io.StringIO()
    try:
        with redirect_stderr(sink if quiet else sys.stderr), redirect_stdout(sink if quiet else sys.stdout):
            return harness_params.load_config(argv)
    except SystemExit as exit_request:
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USER_ERROR)


def _is_lost_peer(error: BaseException) -> bool:
    """A collective failed because another process went away (it failed, or torchrun
    stopped it), not because of anything on this rank."""
    if isinstance(error, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted"))


def report_failure_and_exit(ctx: du.DistributedContext, error: BaseException) -> None:
    """An error in one process of a multi-process job: say what happened and end this
    process NOW, without tearing down the process group (a collective with a rank that
    will never join can block teardown).  torchrun sees the exit within its monitor
    interval (0.1 s) and stops the other ranks (SIGTERM, then SIGKILL after 30 s); a rank
    blocked in a gloo collective with this one fails at once and says so in one line."""
    if _is_lost_peer(error):
        first = (str(error).strip().splitlines() or [""])[0][:200]
        print(f"error (rank {ctx.rank}): stopping: lost contact with another process, which probably failed "
              f"(its message is above) [{type(error).__name__}: {first}]", file=sys.stderr, flush=True)
        # Give torchrun time to see the failed process first: its failure summary then names
        # that process (and its message) as the root cause, not this one.  SIGTERM ends the wait.
        time.sleep(LOST_PEER_GRACE_S)
    else:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        print(f"error (rank {ctx.rank}): {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        du.record_error_for_launcher(error)  # torchrun's failure summary then shows this message
    sys.stdout.flush()
    os._exit(EXIT_FAILED)


def main(argv: Optional[List[str]] = None, use_ddp: bool = True) -> int:
    """-> exit status: 0 done (or already finished), 2 bad input (one line on stderr,
    nothing written), 3 masks out of sync, 143 stopped on request (resumable).  An
    unexpected error raises in a single process, and ends the process with status 1 in a
    multi-process job."""
    config = load_config_on_every_rank(argv)
    if isinstance(config, int):
        return config
    try:
        ctx = du.setup(device=config["training.device"], backend=config["distributed.backend"],
                       timeout_s=config["distributed.timeout_s"])
    except RuntimeError as error:  # this process's own device / process group: every rank says its own
        print(f"error (rank {du.rank_from_env()}): {error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    try:
        return Experiment(config, ctx, use_ddp=use_ddp).run()
    except (hu.UserError, MaskSyncError) as error:
        # Raised on every rank at once (Experiment.agreed, broadcast decisions, all-gathered
        # mask checksums): rank 0 says it, once, and no rank exits before it has (torchrun
        # stops the others as soon as one exits).
        if ctx.is_primary:
            print(f"error: {error}", file=sys.stderr, flush=True)
        du.barrier()
        return EXIT_MASK_SYNC if isinstance(error, MaskSyncError) else EXIT_USER_ERROR
    except Exception as error:
        if not ctx.is_distributed:
            raise
        report_failure_and_exit(ctx, error)
        raise  # not reached
    finally:
        du.teardown()


if __name__ == "__main__":
    sys.exit(main())
