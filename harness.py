"""Pruning harness entry point: config -> distributed context -> level loop.

    torchrun --nproc_per_node=N harness.py --config configs/EXPERIMENT.yaml [--section.key=value ...]
    python harness.py --config ...          # the same, one process

Each level: prune -> reset (per prune.training_type) -> train -> evaluate every epoch -> log;
all ranks compute, rank 0 writes.  The training epoch and evaluation: utils/training/step.py; what
a checkpoint holds: utils/runs/checkpointing.py; stopping on request: utils/runs/run_control.py; set-up,
persistence and the features' callbacks: harness_setup.py.  Per-step, per-epoch and per-level
work is a callback (utils/core/callbacks.py), never an edit of the loop below.  After every
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
from harness_setup import ExperimentBase
from utils.core import distributed as du
from utils.core.errors import MaskSyncError
from utils.models import mask_layers
from utils.runs import checkpointing, trackers
from utils.runs.run_control import Preempted, StopFlag
from utils.training import selection
from utils.training import step as training
from utils.training.tta import FlipTTA

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the run stopped on request; its checkpoint is intact
EXIT_USER_ERROR = 2   # bad input, refused before anything is written (harness_params uses the same)
EXIT_MASK_SYNC = 3
EXIT_FAILED = 1
EXIT_WRITE_FAILED = 4  # a file could not be written (disk full, quota, read-only); the last checkpoint is intact


class Experiment(ExperimentBase):
    """The level loop (set-up and persistence: harness_setup.ExperimentBase)."""

    # ---------------------------------------------------------------------- pruning
    def prune_to(self, level: int) -> None:
        masks = du.broadcast_object(self.level_masks(level))  # rank 0's masks are the masks (scores can differ in the last bit)
        self.callbacks.fire("on_masks_agreed", self.level_info(level, extra={"masks": masks}))
        self.check_masks_in_sync(masks)
        mask_layers.set_masks(self.model, masks)

    # ------------------------------------------------------------------ level loop
    def begin_level(self, level: int) -> int:
        """prune -> reset for ``level``; returns the first epoch to train (a WR level rewound
        inside an epoch starts there: ``resume_partial_epoch``)."""
        if self.prunes_at(level):
            self.prune_to(level)
        self.new_optimizer(level)
        start_epoch, start_batch = self.training_type.reset(level, self)  # e.g. IMP: initial weights; WR: rewind state
        if start_batch:  # a level that starts inside an epoch (late resetting) goes on as a resumed epoch does
            self.resume_partial_epoch = {"batches_done": start_batch, "lr_at_start": self.schedule.lr,
                                         "time_s": 0.0, "sums": torch.zeros(3, dtype=torch.float64)}
        mask_layers.apply_masks_(self.model)  # the new masks on whatever weights the level starts from
        if self.ctx.is_primary:
            hu.atomic_torch_save(mask_layers.get_masks(self.model), self.files.masks(level))
        self.level_stats = self.new_level_stats()
        self.callbacks.fire("on_level_start", self.level_info(level, extra={"start_epoch": start_epoch,
                                                                            "start_batch": start_batch}))
        return start_epoch

    def run_levels(self, start_level: int, start_epoch: Optional[int]) -> None:
        epochs = self.c["training.epochs"]
        last_level = len(self.plan) - 1
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
        row = {"level": level, "target_density": self.plan[level].target_density, "density": mask_layers.overall_density(masks),
               "final_test_acc": last_row["test_acc"], **selection.level_fields(self.level_stats),
               "train_time_s": self.level_stats["train_time_s"]}
        layers = [{"level": level, **layer} for layer in mask_layers.density_report(masks)]
        self.callbacks.fire("on_level_end", self.level_info(level, row=row, extra={"layers": layers}))
        if self.ctx.is_primary:
            self.files.levels.append(row)
            for layer in layers:
                self.files.layers.append(layer)
        self.callbacks.fire("on_level_logged", self.level_info(level, row=row))
        last = level == len(self.plan) - 1
        self.checkpoint(level=level, next_epoch=self.c["training.epochs"], phase="level_done", finished=last)
        self.say(f"level {level}: density {row['density']:.4f}, "
                 f"test acc {last_row['test_acc']:.2f}% (best {row['best_test_acc']:.2f}% at epoch {row['best_epoch']}, "
                 f"chosen on the {'validation' if row['best_selected_on'] == 'val' else 'test'} set)")

    def stop_if_requested(self) -> None:
        """At an epoch or level boundary, just after a checkpoint: nothing more to save."""
        if self.stop_requests.agreed():
            raise Preempted()

    # ------------------------------------------------------------------ train / eval
    def train_and_evaluate(self, level: int, epoch: int, partial: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Train one epoch and evaluate; -> its epochs.csv row.  ``partial``: resume the epoch
        after ``partial['batches_done']`` batches, with this rank's partial sums, the LR the
        epoch began with and the time spent so far (what a mid-epoch checkpoint holds)."""
        self.prepare_epoch(epoch)
        state = training.EpochState(epoch=epoch, total_batches=len(self.train_loader), lr_at_start=self.schedule.lr,
                                    level=level, sums=torch.zeros(3, device=self.ctx.device, dtype=torch.float64))
        if partial is not None:
            state.batches_done, state.lr_at_start, state.time_before = (
                partial["batches_done"], partial["lr_at_start"], partial["time_s"])
            state.sums.copy_(partial["sums"])
        training.train_epoch(self.training_step(self.callbacks), self.train_loader.batches(epoch, start_batch=state.batches_done), state,
                             self.callbacks)
        if state.stopped:
            self.checkpoint_mid_epoch(state)
            raise Preempted()
        epoch_time = state.elapsed
        du.all_reduce_sum(state.sums)
        loss_sum, correct, count = state.sums.tolist()  # note: a CPU-GPU sync point, once per epoch
        test_loss, test_acc = self.evaluate()
        self.level_stats["train_time_s"] += epoch_time
        row = {"level": level, "epoch": epoch, "lr": state.lr_at_start, "train_loss": loss_sum / count,
               "train_acc": 100.0 * correct / count, "test_loss": test_loss, "test_acc": test_acc,
               "epoch_time_s": epoch_time, "images_per_s": state.steady_images_per_s(count) or count / epoch_time}
        if self.val_loader is not None:
            row["val_loss"], row["val_acc"] = self.evaluate(self.val_loader)
        selection.record_epoch(self.level_stats, row, len(self.train_loader))  # the best epoch: on val, else test
        return row

    def evaluate(self, loader=None) -> tuple:
        """Loss and accuracy over the whole test set (or ``loader``'s data: validation), each example
        counted once across ranks.  The bare model (ranks may hold different numbers of test batches)
        with rank 0's BatchNorm statistics (the checkpointed ones) on every rank."""
        model, loader = self.model, loader if loader is not None else self.test_loader
        du.broadcast_buffers_(model, exclude=mask_layers.mask_buffer_names(model))
        evaluated = FlipTTA(model) if self.c["training.flip_tta"] else model
        loss_sum, correct, count = training.evaluate(evaluated, loader.batches(0), device=self.ctx.device,
                                                     autocast_dtype=self.autocast_dtype, reduce=du.all_reduce_sum)
        if count != loader.num_samples:
            raise RuntimeError(f"evaluation saw {int(count)} examples, the data set has {loader.num_samples}")
        return loss_sum / count, 100.0 * correct / count

    def run(self) -> int:
        du.agreed(self.check_inputs)
        decision = self.decide_directory()
        self.files = hu.ExperimentFiles(decision.root, **hu.extra_columns(self.c, self.structure))
        if decision.action == "finished":
            self.say(f"{decision.root} is finished ({len(self.plan)} levels); nothing to do")
            return 0
        self.build_training_objects()
        self.level_stats = self.new_level_stats()
        self.new_optimizer(0)
        self.callbacks += trackers.make_trackers(trackers.TrackerSettings.from_config(self.c), self.files.root,
                                                 self.ctx.is_primary)
        self.stop_requests.flag = StopFlag()
        try:
            if decision.action == "resume":
                start_level, start_epoch = self.resume()
            else:
                self.say(f"writing results to {decision.root}")
                start_level, start_epoch = self.start_fresh(), None
            if start_level < len(self.plan):  # else a control took its only level from its source: done
                self.callbacks.fire("on_run_start", self.level_info(start_level))
                self.run_levels(start_level, start_epoch)
        except Preempted:
            self.say("stopped on request (SIGTERM/SIGINT); the checkpoint is intact: run the same command to resume")
            return EXIT_PREEMPTED
        finally:
            self.stop_requests.flag.restore()
            for callback in self.callbacks:
                callback.close()
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
