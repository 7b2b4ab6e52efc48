"""Pruning harness entry point: config -> distributed context -> level loop.

    torchrun --nproc_per_node=N harness.py --config configs/EXPERIMENT.yaml [--section.key=value ...]
    python harness.py --config ...          # the same, one process

Each level: prune -> reset (per prune.training_type) -> train -> evaluate every epoch ->
log.  All ranks compute; only rank 0 writes.  After every epoch rank 0 writes an atomic
checkpoint; starting the same config again resumes from it (see harness_utils).
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

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

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the run stopped on request; the last checkpoint is intact
SNIP_EPOCH_OFFSET = 1_000_000  # data order of SNIP batches: epoch id disjoint from training epochs


class MaskSyncError(RuntimeError):
    pass


class Preempted(Exception):
    pass


@dataclass
class TestHooks:
    """Fault injection for tests only; read once, from variables no user sets."""
    crash_rank: int = -1
    crash_after_steps: int = -1
    crash_marker: str = ""
    corrupt_masks_rank: int = -1

    @classmethod
    def from_env(cls) -> "TestHooks":
        env = os.environ
        return cls(int(env.get("HARNESS_TEST_CRASH_RANK", -1)), int(env.get("HARNESS_TEST_CRASH_AFTER_STEPS", -1)),
                   env.get("HARNESS_TEST_CRASH_MARKER", ""), int(env.get("HARNESS_TEST_CORRUPT_MASKS_RANK", -1)))


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop stops at the next batch boundary."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.raised = True


class Experiment:
    def __init__(self, config: Dict[str, Any], ctx: du.DistributedContext, use_ddp: bool = True):
        self.c = config
        self.ctx = ctx
        self.use_ddp = use_ddp and ctx.is_distributed
        self.hooks = TestHooks.from_env()
        self.stop = StopFlag()
        self.steps_this_process = 0
        self._snip_loader = None

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
        self.spec = get_dataset_spec(c["dataset.name"])
        self.train_resolution = c["dataset.resolution"] or self.spec.resolution
        self.eval_resolution = c["dataset.eval_resolution"] or self.train_resolution
        try:
            for key in ("dataset.train_path", "dataset.test_path"):
                validate_beton(c[key], self.spec)
        except DataError as error:
            raise hu.UserError(str(error)) from None
        try:
            self.model = get_model(c["model.name"], num_classes=self.spec.num_classes,
                                   in_channels=self.spec.channels, image_size=self.train_resolution)
        except ModelError as error:
            raise hu.UserError(str(error)) from None
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
                outcome = hu.decide_experiment_dir(self.c, restarted=du.restart_count() > 0)
            except hu.UserError as error:
                outcome = str(error)
        outcome = du.broadcast_object(outcome)
        if isinstance(outcome, str):
            raise hu.UserError(outcome)
        return outcome

    def build_training_objects(self) -> None:
        c, ctx = self.c, self.ctx
        device = ctx.device
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c["training.precision"])
        if device.type != "cuda" and self.autocast_dtype is not None:
            self.say(f"note: training.precision={c['training.precision']} applies on CUDA; this CPU run trains in fp32")
            self.autocast_dtype = None
        self.memory_format = torch.channels_last if c["training.channels_last"] else torch.contiguous_format
        model = self.model.to(device=device, memory_format=self.memory_format)
        if c["distributed.sync_bn"] and self.use_ddp:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.model = model
        loader_args = dict(num_workers=c["dataset.num_workers"], device=device, rank=ctx.rank,
                           world_size=ctx.world_size, seed=c["experiment.seed"],
                           channels_last=c["training.channels_last"], backend=c["dataset.loader"])
        self.train_loader = make_loader(c["dataset.train_path"], self.spec, train=True, batch_size=c["dataset.batch_size"],
                                        resolution=self.train_resolution, **loader_args)
        self.test_loader = make_loader(c["dataset.test_path"], self.spec, train=False, batch_size=c["dataset.batch_size"],
                                       resolution=self.eval_resolution, **loader_args)
        if len(self.train_loader) == 0:
            raise hu.UserError(f"dataset.batch_size={c['dataset.batch_size']} is larger than the training set "
                               f"({self.train_loader.num_samples} samples): no full batch per epoch")
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
        return {"model": self.model_state(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict()}

    def checkpoint(self, *, level: int, next_epoch: int, phase: str, finished: bool = False) -> None:
        if not self.ctx.is_primary:
            return
        state = {
            "format": hu.CHECKPOINT_FORMAT, "config": self.c, "level": level, "next_epoch": next_epoch,
            "phase": phase, "finished": finished, **self.snapshot(),
            "scaler": self.scaler.state_dict(), "rng": hu.rng_state(),
            "level_stats": dict(self.level_stats),
            "csv_rows": {name: log.count() for name, log in self.files.logs().items()},
        }
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
            self.optimizer.load_state_dict(self.rewind_state["optimizer"])
            self.schedule.load_state_dict(self.rewind_state["schedule"])
            start_epoch = c["prune.rewind_epoch"]
        else:  # level 0, lrr (weights kept), at_init
            self.new_optimizer()
        mask_layers.apply_masks_(self.model)
        if self.ctx.is_primary:
            hu.atomic_torch_save(mask_layers.get_masks(self.model), self.files.masks(level))
        self.level_stats = {"best_test_acc": 0.0, "train_time_s": 0.0}
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
        for level in range(start_level, len(self.densities)):
            if start_epoch is None:
                epoch = self.begin_level(level)
            else:
                epoch, start_epoch = start_epoch, None
            self.capture_rewind_state(level, epoch)
            while epoch < epochs:
                row = self.train_and_evaluate(level, epoch)
                epoch += 1
                self.capture_rewind_state(level, epoch)
                if self.ctx.is_primary:
                    self.files.epochs.append(row)
                if epoch < epochs:
                    self.checkpoint(level=level, next_epoch=epoch, phase="train")
            self.finish_level(level, row)

    def finish_level(self, level: int, last_row: Dict[str, Any]) -> None:
        masks = mask_layers.get_masks(self.model)
        if self.ctx.is_primary:
            self.files.levels.append({
                "level": level, "target_density": self.densities[level], "density": mask_layers.overall_density(masks),
                "final_test_acc": last_row["test_acc"], "best_test_acc": self.level_stats["best_test_acc"],
                "train_time_s": self.level_stats["train_time_s"]})
            for layer in mask_layers.density_report(masks):
                self.files.layers.append({"level": level, **layer})
        last = level == len(self.densities) - 1
        self.checkpoint(level=level, next_epoch=self.c["training.epochs"], phase="level_done", finished=last)
        self.say(f"level {level}: density {mask_layers.overall_density(masks):.4f}, "
                 f"test acc {last_row['test_acc']:.2f}% (best {self.level_stats['best_test_acc']:.2f}%)")

    # ------------------------------------------------------------------ train / eval
    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)

    def train_and_evaluate(self, level: int, epoch: int) -> Dict[str, Any]:
        c = self.c
        self.train_model.train()
        device = self.ctx.device
        sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss * n, correct, n
        lr_at_start = self.schedule.lr
        batches = self.train_loader.batches(epoch)
        if self.ctx.is_primary and c["training.progress"]:
            from tqdm import tqdm
            batches = tqdm(batches, total=len(self.train_loader), desc=f"level {level} epoch {epoch}",
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
            with torch.no_grad():
                n = labels.shape[0]
                sums += torch.stack([loss.detach().double() * n, (logits.argmax(1) == labels).sum().double(),
                                     torch.tensor(float(n), device=device, dtype=torch.float64)])
            self.after_step()
        du.all_reduce_sum(sums)
        loss_sum, correct, count = sums.tolist()  # note: a CPU-GPU sync point, once per epoch
        epoch_time = time.perf_counter() - started
        test_loss, test_acc = self.evaluate()
        self.level_stats["best_test_acc"] = max(self.level_stats["best_test_acc"], test_acc)
        self.level_stats["train_time_s"] += epoch_time
        return {"level": level, "epoch": epoch, "lr": lr_at_start, "train_loss": loss_sum / count,
                "train_acc": 100.0 * correct / count, "test_loss": test_loss, "test_acc": test_acc,
                "epoch_time_s": epoch_time, "images_per_s": count / epoch_time}

    def after_step(self) -> None:
        self.steps_this_process += 1
        hooks = self.hooks
        if (hooks.crash_rank == self.ctx.rank and self.steps_this_process == hooks.crash_after_steps
                and hooks.crash_marker and not os.path.exists(hooks.crash_marker)):
            open(hooks.crash_marker, "w").close()
            print(f"test hook: rank {self.ctx.rank} crashing after {self.steps_this_process} steps", file=sys.stderr, flush=True)
            os._exit(17)
        if self.stop.raised:
            raise Preempted()

    @torch.no_grad()
    def evaluate(self) -> tuple:
        """Loss and accuracy over the whole test set, each example counted once across ranks."""
        model = self.model  # not the DDP wrapper: ranks may hold different numbers of test batches
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
            self.files.root.mkdir(parents=True, exist_ok=True)
            (self.files.root / "masks").mkdir(exist_ok=True)
            self.files.checkpoints.mkdir(exist_ok=True)
            hu.atomic_write_bytes(self.files.config, hu.config_yaml(self.c))
            for log in self.files.logs().values():
                log.create()
        self.init_state = {"model": self.model_state()}
        if self.ctx.is_primary:
            hu.atomic_torch_save({"format": hu.CHECKPOINT_FORMAT, "config": self.c, **self.init_state},
                                 self.files.init_checkpoint)
        du.barrier()

    def resume(self) -> tuple:
        """Load rank 0's checkpoint on every rank; -> (start_level, start_epoch or None)."""
        state = None
        if self.ctx.is_primary:
            files = self.files
            if files.last_checkpoint.exists():
                state = {"last": hu.load_checkpoint(files.last_checkpoint, self.c),
                         "init": hu.load_checkpoint(files.init_checkpoint, self.c)}
                if files.rewind_checkpoint.exists():
                    state["rewind"] = hu.load_checkpoint(files.rewind_checkpoint, self.c)
        state = du.broadcast_object(state)
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
        level, phase = last["level"], last["phase"]
        self.say(f"resuming {self.files.root} at level {level}, " +
                 (f"epoch {last['next_epoch']}" if phase == "train" else "after its end"))
        if phase == "level_done":
            return level + 1, None
        return level, last["next_epoch"]

    def run(self) -> int:
        self.check_inputs()
        decision = self.decide_directory()
        self.files = hu.ExperimentFiles(decision.root)
        if decision.action == "finished":
            self.say(f"{decision.root} is finished ({len(self.densities)} levels); nothing to do")
            return 0
        self.build_training_objects()
        self.level_stats = {"best_test_acc": 0.0, "train_time_s": 0.0}
        self.new_optimizer()
        if decision.action == "resume":
            start_level, start_epoch = self.resume()
        else:
            self.say(f"writing results to {decision.root}")
            self.start_fresh()
            start_level, start_epoch = 0, None
        try:
            self.run_levels(start_level, start_epoch)
        except Preempted:
            self.say("stopped on request (SIGTERM/SIGINT); the last checkpoint is intact, run the same command to resume")
            return EXIT_PREEMPTED
        du.barrier()
        self.say(f"done: {self.files.root}")
        return 0


def main(argv: Optional[List[str]] = None, use_ddp: bool = True) -> int:
    config = harness_params.load_config(argv)
    try:
        ctx = du.setup(device=config["training.device"], backend=config["distributed.backend"],
                       timeout_s=config["distributed.timeout_s"])
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return Experiment(config, ctx, use_ddp=use_ddp).run()
    except hu.UserError as error:
        if ctx.is_primary:
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except MaskSyncError as error:
        print(f"error (rank {ctx.rank}): {error}", file=sys.stderr, flush=True)
        return 3
    finally:
        du.teardown()


if __name__ == "__main__":
    sys.exit(main())
