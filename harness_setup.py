"""Set-up and persistence of an experiment: the half of ``harness.Experiment`` that is not the
level loop.

``ExperimentBase`` checks the inputs, builds loaders, model, optimizer and the optional
features' callbacks from the config, plans the run's levels once (``self.plan``: which levels,
which prune, each level's target; utils/training/level_plan.py), computes a level's masks
through the run's pruning structure (``self.structure``: utils/pruning/structures/; a control
takes its source's), and writes and reads the run's state (checkpoints, the directory's lock,
resume).  ``harness.Experiment`` adds the level
loop.  Only this layer reads the config; the pieces it calls in ``utils/`` take plain
arguments.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

import harness_utils as hu
from utils.core import distributed as du
from utils.core.callbacks import AfterBackward, Callbacks, LevelInfo
from utils.core.errors import MaskSyncError
from utils.lottery import controls, level_zero
from utils.lottery.early_bird import EarlyBird
from utils.lottery.stability import StabilityAnalysis, StabilityRun
from utils.models import mask_layers, pretrained
import harness_params
from utils.pruning import criteria
from utils.pruning.channel_graph import StructureError
from utils.runs import checkpointing, run_lock
from utils.runs.fault_injection import FaultInjection
from utils.runs.run_control import ProgressBar, StopOnRequest, StopRequests
from utils.training import progressive, rewind, selection, slimming, sparse_training
from utils.training import step as training
from utils.training.level_plan import LevelPlan, deepening, plan_of_config
from utils.training.training_types import get_training_type

STABILITY_EPOCH_OFFSET = 2_000_000  # data order of the stability analysis' second copy: epochs of their own


class ExperimentBase:
    def __init__(self, config: Dict[str, Any], ctx: du.DistributedContext, use_ddp: bool = True):
        self.c = config
        self.ctx = ctx
        self.training_type = get_training_type(config["prune.training_type"])  # what happens between levels
        self.use_ddp = use_ddp and ctx.is_distributed
        self.stop_requests = StopRequests(None, ctx)
        fault_injection = FaultInjection.from_env(ctx.rank)
        self.callbacks = Callbacks([cb for cb in (fault_injection,) if cb is not None])
        self.callbacks += [ProgressBar(ctx.is_primary and config["training.progress"]), StopOnRequest(self.stop_requests)]
        self._snip_loader = None
        self.split = self.val_loader = None  # validation data (build_loaders): the split's indices, its loader
        self.lock = None  # rank 0: this directory's run lock, held for the run's life (utils/runs/run_lock.py)
        self.resume_partial_epoch: Optional[Dict[str, Any]] = None
        self.source = self.rewind_at = None
        self.plan: Optional[LevelPlan] = None  # which levels run, which prune, each level's target (check_inputs)
        self.level_start_state: Optional[Dict[str, Any]] = None
        self.mask_updates: Optional[sparse_training.MaskUpdates] = None  # gmp, rigl, set (install_feature_callbacks)
        self._loaders_by_resolution: Dict[int, Any] = {}  # progressive resizing with ffcv: one loader per size

    def say(self, message: str) -> None:
        if self.ctx.is_primary:
            print(message, flush=True)

    # ---------------------------------------------------------------------- set-up
    def check_inputs(self) -> None:
        c = self.c
        inputs = hu.check_inputs(c, self.ctx.world_size, self.ctx.device)
        self.spec, self.model = inputs.spec, inputs.model
        self.train_resolution, self.eval_resolution = inputs.train_resolution, inputs.eval_resolution
        self.split = inputs.split  # dataset.val_fraction: (training, validation) indices of the training file
        for note in inputs.notes:  # e.g. a .beton written by another tool: no record to check it against
            self.say(note)
        self.structure = hu.structure_of(c)  # what a level's masks keep: weights, channels, N:M groups, ...
        try:
            if c["prune.masks_from"]:
                self.plan = self.read_control_source()
            else:
                self.plan = hu.level_plan(c, self.model, self.structure)
            # a control trains its source's masks as they are: no densities of its own to check
            self.structure.attach(self.model, self.input_shape, [] if self.source is not None else self.densities)
        except (controls.ControlError, StructureError, ValueError) as error:
            raise hu.UserError(str(error)) from None
        if self.plan.start_line:
            self.say(self.plan.start_line)
        self.install_feature_callbacks()

    def read_control_source(self) -> LevelPlan:
        """prune.masks_from: the source run, checked (utils/lottery/controls.py); -> the control's plan
        (the source's levels, each taking the source's masks)."""
        c = self.c
        request = controls.ControlRequest.from_config(c, self.structure)
        self.source = controls.read_source(c["prune.masks_from"], request, self.model, harness_params.defaults())
        pretrained.check_control_weights(c["model.weights"], self.source.config.get("model.weights", ""),
                                         c["prune.control"], self.source.root)
        if c["prune.control"] == "reinit" and self.source.config.get("experiment.seed") == c["experiment.seed"]:
            raise hu.UserError(f"prune.control=reinit with experiment.seed={c['experiment.seed']}, the seed of "
                               f"prune.masks_from={self.source.root}: the 'fresh' initialisation would be "
                               f"the ticket's own; give the control another experiment.seed")
        refusal = self.structure.control_refusal(self.source.structure)
        if refusal:
            raise hu.UserError(f"prune.masks_from={self.source.root} {refusal}")
        return self.source.plan.for_control(c["prune.levels"])

    @property
    def densities(self):
        """Target density of every level this run trains (levels.csv ``target_density``)."""
        return self.plan.densities

    @property
    def input_shape(self):
        return (self.spec.channels, self.train_resolution, self.train_resolution)

    def install_feature_callbacks(self) -> None:
        """The callbacks of the optional features the config asks for (before any training)."""
        c = self.c
        self.callbacks += self.structure.callbacks(self.model)  # e.g. dead channels kept at zero, extra columns
        if c["training.bn_l1"] > 0:
            self.callbacks.append(AfterBackward(slimming.bn_l1_hook(c["training.bn_l1"])))
        if c["prune.early_bird"] and len(self.plan) > 1:
            target, scoring = self.plan.target(1), hu.scoring(c, level=1, batches=None, device=self.ctx.device,
                                                              input_shape=self.input_shape)
            self.callbacks.append(EarlyBird(
                lambda m: self.structure.unit_vector(m, target, scoring),
                threshold=c["prune.early_bird_threshold"], window=c["prune.early_bird_window"],
                agree=du.broadcast_object, min_epochs=c["prune.rewind_epoch"] if self.training_type.captures_rewind else 0))
        if c["analysis.stability"]:
            self.callbacks.append(StabilityAnalysis(self.stability_run))
        if self.training_type.updates_masks:
            self.callbacks.append(self.mask_update_callback())

    def mask_update_callback(self) -> sparse_training.MaskUpdates:
        """Sparse training (gmp, rigl, set): the training type's rule run after the steps of the
        prune.update_* schedule (utils/training/sparse_training.py).  Without DDP wrapping the
        model, several processes average RigL's gradients themselves."""
        c = self.c
        rule = self.training_type.mask_rule(select=lambda density: self.scored_masks(0, density),
                                            target_density=self.plan[0].target_density, seed=c["experiment.seed"],
                                            drop_fraction=c["prune.drop_fraction"])
        schedule = sparse_training.UpdateSchedule(every=c["prune.update_every"], start=c["prune.update_start"],
                                                  end=c["prune.update_end"], epochs=c["training.epochs"],
                                                  final_step=rule.final_step)
        world = self.ctx.world_size

        def average(tensor):
            du.all_reduce_sum(tensor).div_(world)

        self.mask_updates = sparse_training.MaskUpdates(
            rule, schedule, self.model, lambda: getattr(self, "optimizer", None), agree=du.broadcast_object,
            average=average if world > 1 and not self.use_ddp else None, is_primary=self.ctx.is_primary)
        return self.mask_updates

    def decide_directory(self) -> hu.DirDecision:
        """Rank 0 decides where the run goes; every rank gets its decision.  A run to resume is
        decided again once its lock is held: one that finished in between is finished (nothing to
        do), one that stopped in between resumes from where it stopped (its checkpoints are read
        under the lock: ``resume``)."""
        def look() -> hu.DirDecision:
            return hu.decide_experiment_dir(self.c, restarted=du.restart_count() > 0, launch_id=du.launch_id(),
                                            planned_levels=self.planned_levels)

        def decide() -> hu.DirDecision:
            decision = look()
            if decision.action != "resume":  # fresh: start_fresh takes the lock; finished: nothing to do
                return decision
            self.hold_run_lock(decision.root)
            again = look()
            if again.root != decision.root or again.action == "fresh":
                self.release_run_lock()
                raise hu.UserError(f"{decision.root} changed while this launch looked at it (another launch?); "
                                   f"run the same command again")
            if again.action == "finished":
                self.release_run_lock()
            return again
        return du.decided_by_primary(decide, self.ctx.is_primary)

    # ------------------------------------------------------------ going deeper
    def plan_of(self, config: Dict[str, Any]) -> LevelPlan:
        """The level plan a run of ``config`` has on this model (a control's: this run's source's)."""
        if self.source is not None:
            return self.source.plan.for_control(config.get("prune.levels"))
        return plan_of_config(config, harness_params.defaults(), mask_layers.layer_shapes(self.model))

    def planned_levels(self, stored: Dict[str, Any], resolved: Dict[str, Any], differing) -> Optional[int]:
        """How many levels this run has when the run of ``stored`` is this one or this one goes
        deeper (the rule: utils/training/level_plan.deepening), else None (rank 0)."""
        return deepening(differing, lambda: (self.plan_of(stored), self.plan))

    def record_deeper_config(self) -> None:
        """Rank 0, resuming a run that this config makes deeper: its ``config.yaml`` takes the keys
        that changed, so its controls, the sweep and the report see its new levels."""
        stored = hu.read_config_yaml(self.files.root)
        differing = hu.semantic_difference(stored, self.c)
        if not differing:
            return
        before = len(self.plan_of(stored))
        hu.atomic_write_bytes(self.files.config, hu.config_yaml({**stored, **{k: self.c[k] for k in differing}}))
        self.say(f"going deeper: {self.files.root} now has {len(self.plan)} levels (it had {before}); "
                 f"the levels done stay as they are")

    def build_loaders(self) -> None:
        c = self.c
        self.autocast_dtype, note = hu.autocast_dtype(c, self.ctx.device)
        if note:
            self.say(note)
        self.train_loader, self.test_loader, self.val_loader = hu.build_loaders(
            c, self.spec, self.ctx, self.train_resolution, self.eval_resolution, self.split)
        if self.training_type.captures_rewind:  # where later levels rewind to: (epoch, batches done in it)
            try:
                point = rewind.rewind_point(c["prune.rewind_iteration"] or c["prune.rewind_epoch"] * len(self.train_loader),
                                            epochs=c["training.epochs"], iterations_per_epoch=len(self.train_loader))
            except rewind.RewindError as error:
                raise hu.UserError(str(error)) from None
            self.rewind_at = point
            if not point.at_epoch_boundary:
                self.callbacks.append(rewind.CaptureAtIteration(point, self.capture_rewind_now))
        if self.mask_updates is not None:  # a window without an update step is refused before anything is written
            refusal = self.mask_updates.schedule.refusal(len(self.train_loader))
            if refusal:
                raise hu.UserError(refusal)

    def build_training_model(self) -> None:
        """Device, memory format, SyncBatchNorm, DDP (its constructor broadcasts rank 0's weights), compile."""
        self.model, self.train_model = hu.training_model(self.model, self.c, self.ctx, self.use_ddp)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.autocast_dtype == torch.float16)

    def build_training_objects(self) -> None:
        du.agreed(self.build_loaders)
        self.build_training_model()

    def new_optimizer(self, level: int = 0) -> None:
        """The optimizer and LR schedule of ``level``, as its training type says (level start and
        resume alike, so a resumed level trains with the same learning rates)."""
        def build(overrides=None):
            return hu.build_optimizer_and_schedule({**self.c, **(overrides or {})}, self.model.parameters(),
                                                   len(self.train_loader))
        self.optimizer, self.schedule = self.training_type.optimizer_and_schedule(level, self.c, build)

    def prepare_epoch(self, epoch: int) -> None:
        """Progressive resizing: give the training loader epoch ``epoch``'s resolution (a function of
        the epoch only, so resumed runs train at the same sizes).  The torch and memory loaders read
        it per batch; an ffcv loader is rebuilt (its crop decoder is compiled for one size)."""
        c = self.c
        if not c["resolution.start_res"]:
            return
        res = progressive.resolution_for_epoch(epoch, start_res=c["resolution.start_res"], end_res=c["resolution.end_res"],
                                               start_epoch=c["resolution.start_epoch"], end_epoch=c["resolution.end_epoch"])
        if res == self.train_loader.output_resolution:
            return
        if c["dataset.loader"] == "ffcv":  # one loader per size, kept: every level ramps again
            cache = self._loaders_by_resolution
            cache.setdefault(self.train_loader.output_resolution, self.train_loader)
            if res not in cache:
                cache[res] = hu.make_data_loader(c, self.spec, self.ctx.device, train=True, resolution=res,
                                                 rank=self.ctx.rank, world_size=self.ctx.world_size, split=self.split)
            self.train_loader = cache[res]
        else:
            self.train_loader.output_resolution = res

    def training_step(self, callbacks) -> training.TrainingStep:
        return training.TrainingStep(
            self.train_model, self.model, self.optimizer, self.schedule, self.scaler, self.autocast_dtype,
            label_smoothing=self.c["optimizer.label_smoothing"], grad_clip=self.c["training.grad_clip"],
            after_backward=[cb.after_backward for cb in callbacks if cb.after_backward is not None])

    def new_level_stats(self) -> Dict[str, Any]:
        """A level's statistics before its first epoch: training time and the best and early-stopping
        epochs, chosen on validation data when the run has some (utils/training/selection.py)."""
        return selection.new_level_stats(hu.has_validation(self.c))

    def level_info(self, level: int, **fields: Any) -> LevelInfo:
        return LevelInfo(level=level, density=self.densities[level], model=self.model, root=self.files.root,
                         is_primary=self.ctx.is_primary, **fields)

    # ---------------------------------------------------------------------- masks
    def prunes_at(self, level: int) -> bool:
        """Whether ``level`` starts by setting new masks (the plan says; a control takes every level's)."""
        return self.plan.prunes_at(level)

    def level_masks(self, level: int) -> Dict[str, torch.Tensor]:
        """Level ``level``'s masks as rank 0 computes them: the control's source's (shuffled within the
        structure for the shuffle control), or the structure's masks of the plan's target, scored by
        the config's criterion."""
        c = self.c
        if self.source is not None:
            controls.wait_for_level(self.source, level, say=self.say)
            return controls.masks_for_level(self.source, level, c["prune.control"], c["experiment.seed"],
                                            shuffle=self.structure.shuffle)
        return self.scored_masks(level, self.plan.target(level))

    def scored_masks(self, level: int, target) -> Dict[str, torch.Tensor]:
        """The structure's masks of ``target`` on the current model, scored as level ``level``'s
        (criterion, its batches, seed, allocation): a level's masks, and every gmp update's."""
        c = self.c
        needs_batches = criteria.get_criterion(c["prune.criterion"]).needs_batches  # its registry entry says
        batches = self.snip_loader().batches(criteria.SCORE_EPOCH_OFFSET + level) if needs_batches else None
        scoring = hu.scoring(c, level=level, batches=batches, device=self.ctx.device, input_shape=self.input_shape)
        return self.structure.masks(self.model, target, scoring)

    def snip_loader(self):
        """Built once per run (an FFCV loader compiles its pipeline when first used).  Every
        rank reads the same GLOBAL batches (world_size=1 order): SNIP's masks and the stability
        analysis' BatchNorm statistics do not depend on the number of processes."""
        if self._snip_loader is None:
            self._snip_loader = hu.make_data_loader(self.c, self.spec, self.ctx.device, train=True,
                                                    resolution=self.train_resolution, rank=0, world_size=1,
                                                    split=self.split)
        return self._snip_loader

    def check_masks_in_sync(self, masks) -> None:
        bad = du.ranks_disagreeing(mask_layers.masks_checksum(masks))
        if bad:
            raise MaskSyncError(f"masks differ between ranks after pruning (ranks {bad} disagree with rank 0); stopping")

    # ------------------------------------------------------------------ rewinding
    def capture_rewind_now(self) -> None:
        self.rewind_state = checkpointing.training_snapshot(self.model, self.optimizer, self.schedule)
        if self.ctx.is_primary:
            checkpointing.save_checkpoint(self.files.rewind_checkpoint, "rewind", config=self.c, snapshot=self.rewind_state)

    def capture_rewind_state(self, level: int, epochs_done: int) -> None:
        """WR: at level 0's rewind point when it is an epoch boundary (inside an epoch:
        rewind.CaptureAtIteration)."""
        point = self.rewind_at
        if point is not None and point.at_epoch_boundary and level == 0 and epochs_done == point.epoch:
            self.capture_rewind_now()

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
                world_size=self.ctx.world_size, iterations_per_epoch=len(self.train_loader), **extra)

    def checkpoint_mid_epoch(self, state: training.EpochState) -> None:
        """Every rank's partial sums go to rank 0 (a collective: all ranks stop at the same
        batch, see StopRequests), which writes them with the rest of the state."""
        every_rank_sums = du.all_gather_object(state.sums.detach().to("cpu", copy=True))
        self.checkpoint(level=state.level, next_epoch=state.epoch, phase="mid_epoch", partial_epoch={
            "batches_done": state.batches_done, "sums": every_rank_sums, "lr_at_start": state.lr_at_start,
            "time_s": state.elapsed})
        self.say(f"stopping on request at level {state.level}, epoch {state.epoch}, "
                 f"batch {state.batches_done}: checkpoint written")

    def hold_run_lock(self, root=None) -> None:
        """Rank 0 (inside du.decided_by_primary): take the directory's lock, or refuse the launch.
        The lock file names this process once nothing can refuse it any more (``announce``)."""
        if self.lock is None:
            self.lock = run_lock.acquire(self.files.root if root is None else root, announce=False)

    def release_run_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def hold_new_run_lock(self) -> None:
        """Rank 0, starting a run: take the lock of the directory decided on (held already when a
        resumed directory had no checkpoint yet); refuse when another launch started a run there
        meanwhile (its config.yaml is there now)."""
        if self.lock is not None:
            self.lock.announce()
            return
        self.hold_run_lock()
        if self.files.config.exists():
            self.release_run_lock()
            raise hu.UserError(f"{self.files.root} was started by another launch while this one was setting up; "
                               f"run the same command again (it resumes that run or says it is finished)")
        self.lock.announce()

    def start_fresh(self) -> int:
        """-> the first level to train: 0, or 1 when a control takes its source's identical level 0."""
        du.decided_by_primary(self.hold_new_run_lock, self.ctx.is_primary)
        if self.source is not None:  # a control starts from its source's initial weights (or its own: reinit)
            checkpointing.restore({"model": controls.initial_state(self.source, self.c["prune.control"], self.model)},
                                  model=self.model)
        self.init_state = checkpointing.training_snapshot(self.model)
        if self.ctx.is_primary:
            hu.create_experiment_dir(self.files, self.c, du.launch_id())
            checkpointing.save_checkpoint(self.files.init_checkpoint, "init", config=self.c, snapshot=self.init_state)
        du.barrier()
        if self.source is None or self.c["prune.control"] == "reinit":
            return 0
        controls.wait_for_level(self.source, 0, say=self.say)  # as level 0's masks would (every rank)
        taken, message = du.decided_by_primary(lambda: level_zero.take_level_zero(
            self.source, controls.ControlRequest.from_config(self.c, self.structure), self.model, self.files.root,
            self.files.logs(), world_size=self.ctx.world_size, device_type=self.ctx.device.type,
            differing=hu.semantic_difference(self.source.config, self.c)), self.ctx.is_primary)
        self.say(message)
        if taken:
            self.checkpoint(level=0, next_epoch=self.c["training.epochs"], phase="level_done",
                            finished=len(self.densities) == 1)
        return int(taken)

    def resume(self) -> tuple:
        """Load rank 0's checkpoints on every rank; -> (start_level, start_epoch or None)."""
        def read_under_lock():  # decide_directory took the lock: nobody else writes the checkpoints now
            checkpoints = hu.read_run_checkpoints(self.files, self.c, self.rewind_at, self.planned_levels)
            if checkpoints is not None:
                self.lock.announce()
                self.record_deeper_config()
            return checkpoints

        state = du.decided_by_primary(read_under_lock, self.ctx.is_primary)
        if self.ctx.is_primary:
            if state is not None and state["note"]:
                self.say(state["note"])
            for stale in hu.remove_stale_temporaries(self.files.root):
                self.say(f"removed {stale}, left by an interrupted write")
        if state is None:  # the directory exists but no epoch finished: start over in it
            self.say(f"no checkpoint in {self.files.root} yet: starting the run from the beginning")
            return self.start_fresh(), None
        last = state["last"]
        if self.ctx.is_primary:
            for name, log in self.files.logs().items():
                log.truncate(last["csv_rows"][name])
        self.init_state = {"model": state["init"]["model"]}
        if "rewind" in state:
            self.rewind_state = {k: state["rewind"][k] for k in ("model", "optimizer", "schedule")}
        self.level_start_state = state.get("level_start")
        self.new_optimizer(last["level"])
        checkpointing.restore(last, model=self.model, optimizer=self.optimizer, schedule=self.schedule,
                              scaler=self.scaler, keep_masks=False, rng=True, callbacks=self.callbacks)
        self.level_stats = {**self.new_level_stats(), **last["level_stats"]}  # (a key an older last.pt lacks)
        self.check_masks_in_sync(mask_layers.get_masks(self.model))
        self.say(hu.resume_message(self.files.root, last))
        if last["phase"] == "level_done":
            return last["level"] + 1, None
        if last["phase"] == "mid_epoch":
            self.resume_partial_epoch = dict(last["partial_epoch"], sums=training.share_of_partial_sums(
                last["partial_epoch"]["sums"], self.ctx.rank, self.ctx.world_size))
        return last["level"], last["next_epoch"]

    # --------------------------------------------------------- stability analysis
    def stability_run(self) -> StabilityRun:
        """What the stability analysis may ask of this run (utils/lottery/stability.py)."""
        c = self.c

        def save_start(state):
            checkpointing.save_checkpoint(self.files.level_start_checkpoint, "rewind", config=c, snapshot=state)

        return StabilityRun(
            model=self.model, snapshot=lambda: checkpointing.training_snapshot(self.model, self.optimizer, self.schedule),
            save_start=save_start, resumed_start=lambda: self.level_start_state, train_copy=self.train_second_copy,
            sync_buffers=lambda: du.broadcast_buffers_(self.model, exclude=mask_layers.mask_buffer_names(self.model)),
            bn_batches=lambda level: self.snip_loader().batches(hu.BN_BATCHES_EPOCH + level),
            test_batches=lambda: self.test_loader.batches(0),
            log_rows=lambda rows: [self.files.stability.append(row) for row in rows], say=self.say,
            device=self.ctx.device, autocast_dtype=self.autocast_dtype, reduce=du.all_reduce_sum,
            points=c["analysis.interpolation_points"], bn_batch_count=c["analysis.bn_batches"],
            reestimate_endpoints=c["analysis.reestimate_endpoints"])

    def train_second_copy(self, start: Dict[str, Any], level: int) -> Dict[str, torch.Tensor]:
        """Train a second copy of a level from its start state ``start`` (snapshot, epoch,
        batches_done) with another data order; -> its final weights.  The first copy's state,
        the RNG states and every rank's model are as they were before."""
        first, rng = checkpointing.training_snapshot(self.model, self.optimizer, self.schedule), hu.rng_state()
        checkpointing.restore(start, model=self.model, optimizer=self.optimizer, schedule=self.schedule,
                              keep_masks=False)
        step = self.training_step(self.callbacks)
        essential = [cb for cb in self.callbacks if cb.in_every_training]
        epoch, done = start["epoch"], start["batches_done"]
        while epoch < self.c["training.epochs"]:
            self.prepare_epoch(epoch)
            state = training.EpochState(epoch=epoch, total_batches=len(self.train_loader), lr_at_start=self.schedule.lr,
                                        level=level, batches_done=done)
            batches = self.train_loader.batches(STABILITY_EPOCH_OFFSET + epoch, start_batch=done)
            training.train_epoch(step, batches, state, essential, device=self.ctx.device)
            epoch, done = epoch + 1, 0
        du.broadcast_buffers_(self.model, exclude=mask_layers.mask_buffer_names(self.model))
        second = checkpointing.model_state(self.model)
        checkpointing.restore(first, model=self.model, optimizer=self.optimizer, schedule=self.schedule,
                              keep_masks=False)
        hu.set_rng_state(rng)
        return second
