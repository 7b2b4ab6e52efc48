"""Pruning harness entry point: config -> distributed context -> level loop.

    torchrun --nproc_per_node=N harness.py --config configs/EXPERIMENT.yaml [--section.key=value ...]
    python harness.py --config ...          # the same, one process

Each level: prune -> reset (per prune.training_type) -> train -> evaluate every epoch -> log;
all ranks compute, rank 0 writes.  The training epoch and evaluation: utils/training.py; what
a checkpoint holds: utils/checkpointing.py; stopping on request: utils/run_control.py; set-up
from the config: harness_utils.py.  Per-step, per-epoch and per-level work is a callback
(utils/callbacks.py): ``feature_callbacks`` is where a feature installs its own.  After every
epoch rank 0 checkpoints atomically; the same command resumes exactly (CSV rows after the
checkpoint dropped); SIGTERM/SIGINT stop at a batch all ranks agree on (exit 143); bad input
is one line and exit 2 before anything is written.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

import torch

import harness_utils as hu
from harness_params import load_config_on_every_rank  # noqa: F401  (part of this module's interface)
from utils import checkpointing, mask_layers, pruning_utils, run_lock, training
from utils import distributed_utils as du
from utils.callbacks import Callbacks, LevelInfo
from utils.errors import MaskSyncError
from utils.fault_injection import FaultInjection
from utils.run_control import Preempted, ProgressBar, StopFlag, StopOnRequest, StopRequests

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the run stopped on request; its checkpoint is intact
EXIT_USER_ERROR = 2   # bad input, refused before anything is written (harness_params uses the same)
EXIT_MASK_SYNC = 3
EXIT_FAILED = 1
EXIT_WRITE_FAILED = 4  # a file could not be written (disk full, quota, read-only); the last checkpoint is intact


def feature_callbacks(config: Dict[str, Any], ctx: du.DistributedContext) -> List:
    """The callbacks that optional features install (trackers, Early-Bird, ...), in order."""
    return []


class Experiment:
    def __init__(self, config: Dict[str, Any], ctx: du.DistributedContext, use_ddp: bool = True):
        self.c = config
        self.ctx = ctx
        self.use_ddp = use_ddp and ctx.is_distributed
        self.stop_requests = StopRequests(None, ctx)
        fault_injection = FaultInjection.from_env(ctx.rank)
        self.callbacks = Callbacks([cb for cb in (fault_injection,) if cb is not None])
        self.callbacks += [ProgressBar(ctx.is_primary and config["training.progress"]),
                           StopOnRequest(self.stop_requests), *feature_callbacks(config, ctx)]
        self._snip_loader = None
        self.lock = None  # rank 0: this directory's run lock, held for the run's life (utils/run_lock.py)
        self.resume_partial_epoch: Optional[Dict[str, Any]] = None

    def say(self, message: str) -> None:
        if self.ctx.is_primary:
            print(message, flush=True)

    # ---------------------------------------------------------------------- set-up
    def check_inputs(self) -> None:
        inputs = hu.check_inputs(self.c, self.ctx.world_size, self.ctx.device)
        self.spec, self.model, self.densities = inputs.spec, inputs.model, inputs.densities
        self.train_resolution, self.eval_resolution = inputs.train_resolution, inputs.eval_resolution

    def decide_directory(self) -> hu.DirDecision:
        return du.decided_by_primary(lambda: hu.decide_experiment_dir(
            self.c, restarted=du.restart_count() > 0, launch_id=du.launch_id()), self.ctx.is_primary)

    def build_loaders(self) -> None:
        self.autocast_dtype, note = hu.autocast_dtype(self.c, self.ctx.device)
        if note:
            self.say(note)
        self.train_loader, self.test_loader = hu.build_loaders(self.c, self.spec, self.ctx, self.train_resolution,
                                                               self.eval_resolution)

    def build_training_model(self) -> None:
        """Device, memory format, SyncBatchNorm, DDP (its constructor broadcasts rank 0's weights), compile."""
        self.model, self.train_model = hu.training_model(self.model, self.c, self.ctx, self.use_ddp)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.autocast_dtype == torch.float16)

    def build_training_objects(self) -> None:
        du.agreed(self.build_loaders)
        self.build_training_model()

    def new_optimizer(self) -> None:
        self.optimizer, self.schedule = hu.build_optimizer_and_schedule(self.c, self.model.parameters(),
                                                                        len(self.train_loader))

    def level_info(self, level: int, **fields: Any) -> LevelInfo:
        return LevelInfo(level=level, density=self.densities[level], model=self.model, root=self.files.root,
                         is_primary=self.ctx.is_primary, **fields)

    # ---------------------------------------------------------------------- pruning
    def prune_to(self, level: int, density: float) -> None:
        c = self.c
        batches = self.snip_loader().batches(pruning_utils.SNIP_EPOCH_OFFSET + level) if c["prune.criterion"] == "snip" else None
        masks = hu.compute_masks(c, self.model, level=level, density=density, batches=batches, device=self.ctx.device,
                                 input_shape=(self.spec.channels, self.train_resolution, self.train_resolution))
        masks = du.broadcast_object(masks)  # scores can differ in the last bit across GPUs: rank 0's are the masks
        self.callbacks.fire("on_masks_agreed", self.level_info(level, extra={"masks": masks}))
        self.check_masks_in_sync(masks)
        mask_layers.set_masks(self.model, masks)

    def snip_loader(self):
        """Built once per run (an FFCV loader compiles its pipeline when first used).  Every
        rank scores the same GLOBAL batches (world_size=1 order), so the masks do not depend
        on the number of processes."""
        if self._snip_loader is None:
            self._snip_loader = hu.make_data_loader(self.c, self.spec, self.ctx.device, train=True,
                                                    resolution=self.train_resolution, rank=0, world_size=1)
        return self._snip_loader

    def check_masks_in_sync(self, masks) -> None:
        bad = du.ranks_disagreeing(mask_layers.masks_checksum(masks))
        if bad:
            raise MaskSyncError(f"masks differ between ranks after pruning (ranks {bad} disagree with rank 0); stopping")

    # ------------------------------------------------------------------ level loop
    def begin_level(self, level: int) -> int:
        """prune -> reset for ``level``; returns the first epoch to train."""
        kind = self.c["prune.training_type"]
        if kind == "at_init" or level > 0:
            self.prune_to(level, self.densities[level])
        self.new_optimizer()
        start_epoch = 0
        if level > 0 and kind == "imp":
            checkpointing.restore(self.init_state, model=self.model)
        elif level > 0 and kind == "wr":
            checkpointing.restore(self.rewind_state, model=self.model, optimizer=self.optimizer, schedule=self.schedule)
            start_epoch = self.c["prune.rewind_epoch"]
        mask_layers.apply_masks_(self.model)  # lrr keeps the trained weights; level 0 and at_init the initial ones
        if self.ctx.is_primary:
            hu.atomic_torch_save(mask_layers.get_masks(self.model), self.files.masks(level))
        self.level_stats = {"best_test_acc": 0.0, "train_time_s": 0.0}
        self.callbacks.fire("on_level_start", self.level_info(level))
        return start_epoch

    def capture_rewind_state(self, level: int, epochs_done: int) -> None:
        c = self.c
        if c["prune.training_type"] == "wr" and level == 0 and epochs_done == c["prune.rewind_epoch"]:
            self.rewind_state = checkpointing.training_snapshot(self.model, self.optimizer, self.schedule)
            if self.ctx.is_primary:
                checkpointing.save_checkpoint(self.files.rewind_checkpoint, "rewind", config=c, snapshot=self.rewind_state)

    def run_levels(self, start_level: int, start_epoch: Optional[int]) -> None:
        epochs = self.c["training.epochs"]
        last_level = len(self.densities) - 1
        for level in range(start_level, last_level + 1):
            if start_epoch is None:
                epoch = self.begin_level(level)
            else:
                epoch, start_epoch = start_epoch, None
            if self.resume_partial_epoch is None:  # mid-epoch, the state is not the epoch's start state
                self.capture_rewind_state(level, epoch)
            while epoch < epochs:
                partial, self.resume_partial_epoch = self.resume_partial_epoch, None
                row = self.train_and_evaluate(level, epoch, partial)
                epoch += 1
                self.capture_rewind_state(level, epoch)
                if self.ctx.is_primary:
                    self.files.epochs.append(row)
                info = self.level_info(level, epoch=epoch - 1, row=row, final_epoch=epoch == epochs)
                self.callbacks.fire("on_epoch_logged", info)
                if info.end_level:
                    break
                if epoch < epochs:
                    self.checkpoint(level=level, next_epoch=epoch, phase="train")
                    self.stop_if_requested()
            self.finish_level(level, row)
            if level < last_level:
                self.stop_if_requested()
        self.callbacks.fire("on_run_end", self.level_info(last_level))

    def finish_level(self, level: int, last_row: Dict[str, Any]) -> None:
        masks = mask_layers.get_masks(self.model)
        row = {"level": level, "target_density": self.densities[level], "density": mask_layers.overall_density(masks),
               "final_test_acc": last_row["test_acc"], "best_test_acc": self.level_stats["best_test_acc"],
               "train_time_s": self.level_stats["train_time_s"]}
        if self.ctx.is_primary:
            self.files.levels.append(row)
            for layer in mask_layers.density_report(masks):
                self.files.layers.append({"level": level, **layer})
        self.callbacks.fire("on_level_logged", self.level_info(level, row=row))
        last = level == len(self.densities) - 1
        self.checkpoint(level=level, next_epoch=self.c["training.epochs"], phase="level_done", finished=last)
        self.say(f"level {level}: density {row['density']:.4f}, "
                 f"test acc {last_row['test_acc']:.2f}% (best {self.level_stats['best_test_acc']:.2f}%)")

    def stop_if_requested(self) -> None:
        """At an epoch or level boundary, just after a checkpoint: nothing more to save."""
        if self.stop_requests.agreed():
            raise Preempted()

    # ------------------------------------------------------------------ train / eval
    def train_and_evaluate(self, level: int, epoch: int, partial: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Train one epoch and evaluate; -> its epochs.csv row.  ``partial``: resume the epoch
        after ``partial['batches_done']`` batches, with this rank's partial sums, the LR the
        epoch began with and the time spent so far (what a mid-epoch checkpoint holds)."""
        state = training.EpochState(epoch=epoch, total_batches=len(self.train_loader), lr_at_start=self.schedule.lr,
                                    level=level, sums=torch.zeros(3, device=self.ctx.device, dtype=torch.float64))
        if partial is not None:
            state.batches_done, state.lr_at_start, state.time_before = (
                partial["batches_done"], partial["lr_at_start"], partial["time_s"])
            state.sums.copy_(partial["sums"])
        step = training.TrainingStep(
            self.train_model, self.model, self.optimizer, self.schedule, self.scaler, self.autocast_dtype,
            label_smoothing=self.c["optimizer.label_smoothing"], grad_clip=self.c["training.grad_clip"],
            after_backward=[cb.after_backward for cb in self.callbacks if hasattr(cb, "after_backward")])
        training.train_epoch(step, self.train_loader.batches(epoch, start_batch=state.batches_done), state,
                             self.callbacks)
        if state.stopped:
            self.checkpoint_mid_epoch(state)
            raise Preempted()
        epoch_time = state.elapsed
        du.all_reduce_sum(state.sums)
        loss_sum, correct, count = state.sums.tolist()  # note: a CPU-GPU sync point, once per epoch
        test_loss, test_acc = self.evaluate()
        self.level_stats["best_test_acc"] = max(self.level_stats["best_test_acc"], test_acc)
        self.level_stats["train_time_s"] += epoch_time
        return {"level": level, "epoch": epoch, "lr": state.lr_at_start, "train_loss": loss_sum / count,
                "train_acc": 100.0 * correct / count, "test_loss": test_loss, "test_acc": test_acc,
                "epoch_time_s": epoch_time,
                "images_per_s": state.steady_images_per_s(count) or count / epoch_time}

    def evaluate(self) -> tuple:
        """Loss and accuracy over the whole test set, each example counted once across ranks.
        The bare model (ranks may hold different numbers of test batches) with rank 0's
        BatchNorm statistics (the checkpointed ones) on every rank."""
        model = self.model
        du.broadcast_buffers_(model, exclude=mask_layers.mask_buffer_names(model))
        loss_sum, correct, count = training.evaluate(model, self.test_loader.batches(0), device=self.ctx.device,
                                                     autocast_dtype=self.autocast_dtype, reduce=du.all_reduce_sum)
        if count != self.test_loader.num_samples:
            raise RuntimeError(f"evaluation saw {int(count)} examples, the test set has {self.test_loader.num_samples}")
        return loss_sum / count, 100.0 * correct / count

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, *, level: int, next_epoch: int, phase: str, finished: bool = False,
                   partial_epoch: Optional[Dict[str, Any]] = None) -> None:
        """``phase``: 'train' (after epoch next_epoch - 1), 'mid_epoch' (``partial_epoch``) or
        'level_done' (after the level's rows)."""
        if self.ctx.is_primary:
            extra = {} if partial_epoch is None else {"partial_epoch": partial_epoch}
            checkpointing.save_checkpoint(
                self.files.last_checkpoint, "last", config=self.c, model=self.model, optimizer=self.optimizer,
                schedule=self.schedule, scaler=self.scaler, callbacks=self.callbacks, level=level,
                next_epoch=next_epoch, phase=phase, finished=finished, level_stats=dict(self.level_stats),
                csv_rows={name: log.count() for name, log in self.files.logs().items()},
                world_size=self.ctx.world_size, **extra)

    def checkpoint_mid_epoch(self, state: training.EpochState) -> None:
        """Every rank's partial sums go to rank 0 (a collective: all ranks stop at the same
        batch, see StopRequests), which writes them with the rest of the state."""
        every_rank_sums = du.all_gather_object(state.sums.detach().to("cpu", copy=True))
        self.checkpoint(level=state.level, next_epoch=state.epoch, phase="mid_epoch", partial_epoch={
            "batches_done": state.batches_done, "sums": every_rank_sums, "lr_at_start": state.lr_at_start,
            "time_s": state.elapsed})
        self.say(f"stopping on request at level {state.level}, epoch {state.epoch}, "
                 f"batch {state.batches_done}: checkpoint written")

    def hold_run_lock(self) -> None:
        """Rank 0 (inside du.decided_by_primary): take the directory's lock, or refuse the launch."""
        if self.lock is None:
            self.lock = run_lock.acquire(self.files.root)

    def start_fresh(self) -> None:
        du.decided_by_primary(self.hold_run_lock, self.ctx.is_primary)
        self.init_state = checkpointing.training_snapshot(self.model)
        if self.ctx.is_primary:
            hu.create_experiment_dir(self.files, self.c, du.launch_id())
            checkpointing.save_checkpoint(self.files.init_checkpoint, "init", config=self.c, snapshot=self.init_state)
        du.barrier()

    def resume(self) -> tuple:
        """Load rank 0's checkpoints on every rank; -> (start_level, start_epoch or None)."""
        def read_then_lock():  # everything that can refuse the run is read before the lock is taken
            checkpoints = hu.read_run_checkpoints(self.files, self.c)
            self.hold_run_lock()
            return checkpoints

        state = du.decided_by_primary(read_then_lock, self.ctx.is_primary)
        if self.ctx.is_primary:
            if state is not None and state["note"]:
                self.say(state["note"])
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
        self.new_optimizer()
        checkpointing.restore(last, model=self.model, optimizer=self.optimizer, schedule=self.schedule,
                              scaler=self.scaler, keep_masks=False, rng=True, callbacks=self.callbacks)
        self.level_stats = dict(last["level_stats"])
        self.check_masks_in_sync(mask_layers.get_masks(self.model))
        self.say(hu.resume_message(self.files.root, last))
        if last["phase"] == "level_done":
            return last["level"] + 1, None
        if last["phase"] == "mid_epoch":
            self.resume_partial_epoch = dict(last["partial_epoch"], sums=training.share_of_partial_sums(
                last["partial_epoch"]["sums"], self.ctx.rank, self.ctx.world_size))
        return last["level"], last["next_epoch"]

    def run(self) -> int:
        du.agreed(self.check_inputs)
        decision = self.decide_directory()
        self.files = hu.ExperimentFiles(decision.root)
        if decision.action == "finished":
            self.say(f"{decision.root} is finished ({len(self.densities)} levels); nothing to do")
            return 0
        self.build_training_objects()
        self.level_stats = {"best_test_acc": 0.0, "train_time_s": 0.0}
        self.new_optimizer()
        self.stop_requests.flag = StopFlag()
        try:
            if decision.action == "resume":
                start_level, start_epoch = self.resume()
            else:
                self.say(f"writing results to {decision.root}")
                self.start_fresh()
                start_level, start_epoch = 0, None
            self.callbacks.fire("on_run_start", self.level_info(start_level))
            self.run_levels(start_level, start_epoch)
        except Preempted:
            self.say("stopped on request (SIGTERM/SIGINT); the checkpoint is intact: run the same command to resume")
            return EXIT_PREEMPTED
        finally:
            self.stop_requests.flag.restore()
            if self.lock is not None:
                self.lock.release()
        du.barrier()
        self.say(f"done: {self.files.root}")
        return 0


def main(argv: Optional[List[str]] = None, use_ddp: bool = True) -> int:
    """-> exit status: 0 done (or already finished), 2 bad input (one line, nothing written),
    3 masks out of sync, 4 a write failed (one line; resumable), 143 stopped on request
    (resumable).  An unexpected error raises in one process; in a multi-process job it ends
    the process with status 1."""
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
    except (hu.UserError, MaskSyncError) as error:  # raised on every rank at once: rank 0 says it
        du.report_agreed_refusal(ctx, error)
        return EXIT_MASK_SYNC if isinstance(error, MaskSyncError) else EXIT_USER_ERROR
    except checkpointing.WriteFailed as error:  # rank 0 only (the others wait in a collective)
        print(f"error: {error}", file=sys.stderr, flush=True)
        if ctx.is_distributed:
            du.report_failure_and_exit(ctx, error, EXIT_WRITE_FAILED, one_line=True)
        return EXIT_WRITE_FAILED
    except Exception as error:
        if not ctx.is_distributed:
            raise
        du.report_failure_and_exit(ctx, error, EXIT_FAILED)
        raise  # not reached
    finally:
        du.teardown()


if __name__ == "__main__":
    sys.exit(main())
