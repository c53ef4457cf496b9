"""The fit loop: optimiser steps from the resumed state to the last one, one epoch at a time.

while step < total_steps:                              # `FitLoop.run`
    sampler.set_epoch(epoch, start=the batches of the steps already done in it)
    for each A micro-batches (A = train.accumulation):  # `FitLoop._epoch`
        lr of the schedule x guard's multiplier; torch seed of (seed, rank, step)
        train_step(...)                                # sam3.engine: forward, loss, backward, clip, step
        the guard reads the loss averaged over ranks: on a non-finite loss or a spike, roll back to the newest
            checkpoint (lower lr) and start the epoch loop again from its step
        step += 1; every log_every steps: log; every checkpoint_every steps, at an epoch's end and at the
            end: checkpoint; at every val_every_epochs-th epoch's end: validate
    until the epoch's or the run's last step
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from sam3.checkpoint import TrainState, epoch_checkpoint_name
from sam3.config import TrainJob
from sam3.distributed import DistInfo, barrier
from sam3.engine import StepResult, train_step
from sam3.features import CachedDetector
from sam3.optim import set_lr
from sam3.training.ddp import global_mean, global_means, wrap_ddp
from sam3.training.logs import TrainLogs, open_progress
from sam3.training.resume import RunCheckpoints
from sam3.training.setup import RunParts
from sam3.training.validation import validate

logger = logging.getLogger(__name__)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The global torch seed of optimiser step `step` on `rank`: (seed, rank, step) hashed by numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0])


class FitLoop:
    """The optimiser steps of one run (module docstring); `run(state)` trains from `state` to the last step."""

    def __init__(
        self, job: TrainJob, parts: RunParts, checkpoints: RunCheckpoints, logs: TrainLogs, dist_info: DistInfo
    ):
        self.job, self.loop, self.parts = job, job.loop, parts
        self.checkpoints, self.logs, self.dist_info = checkpoints, logs, dist_info
        self.device = dist_info.device
        self.validate_every = self.loop.val_every_epochs if self.loop.mode == "train" else 0
        detector = parts.detector
        self.model = wrap_ddp(CachedDetector(detector) if job.cache.enabled else detector, job.ddp, dist_info)
        self.loader = DataLoader(
            parts.train_set,
            batch_size=self.loop.batch_size,
            sampler=parts.sampler,  # iterated anew each epoch after set_epoch
            collate_fn=parts.collate,
            num_workers=self.loop.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.loop.num_workers > 0,
        )
        self.progress = None
        self.started, self.images_seen = 0.0, 0

    def run(self, state: TrainState) -> TrainState:
        """Train from `state` to parts.total_steps; the state after the last step."""
        self.progress = open_progress(self.parts.total_steps, state.step, self.dist_info)
        self.started, self.images_seen = time.perf_counter(), 0
        try:  # close the bar and the logs on any exit, so an error message starts on a line of its own
            while state.step < self.parts.total_steps:
                state = self._epoch(state)
        finally:
            self.progress.close()
            self.logs.close()
        return state

    def _epoch(self, state: TrainState) -> TrainState:
        """Steps from `state` to the end of its epoch or of the run; after a rollback, the checkpoint's state."""
        loop, parts = self.loop, self.parts
        epoch, step_in_epoch = divmod(state.step, parts.steps_per_epoch)
        parts.sampler.set_epoch(epoch, start=step_in_epoch * loop.accumulation * loop.batch_size)
        micro: list = []
        for batch in self.loader:
            micro.append(batch)
            if len(micro) < loop.accumulation:
                continue
            result = self._step(state.step, micro)
            micro = []
            reason = parts.guard.check(global_mean(result.loss, self.dist_info), step=state.step)
            if reason is not None:
                return self._roll_back(state.step, reason)
            state = self._after_step(state, epoch, result)
            if state.step >= parts.total_steps or state.epoch_step == parts.steps_per_epoch:
                return state
        if micro:
            logger.info("epoch %d: %d trailing micro-batches left out of the last step", epoch, len(micro))
        return state

    def _step(self, step: int, micro: list) -> StepResult:
        """Optimiser step `step` over the micro-batches `micro` (sam3.engine.train_step)."""
        parts = self.parts
        set_lr(parts.optimizer, step, parts.total_steps, self.job.optim, scale=parts.guard.lr_multiplier)
        # Dropout draws from the global RNG, which a new DataLoader iterator also consumes (its base seed): a run
        # resumed mid-epoch would draw other masks. Seeding it per (seed, rank, step) makes every step's masks
        # independent of where the run (re)started, on every rank.
        torch.manual_seed(step_seed(self.loop.seed, self.dist_info.rank, step))
        result = train_step(
            self.model,
            parts.criterion,
            parts.optimizer,
            micro,
            device=self.device,
            with_masks=self.job.with_masks,
            amp_dtype=parts.amp_dtype,
            grad_clip=self.loop.grad_clip,
            scaler=parts.scaler,
        )
        self.images_seen += sum(len(b.image_ids) for b in micro) * self.dist_info.world_size
        return result

    def _roll_back(self, step: int, reason: str) -> TrainState:
        """Back to the newest checkpoint with a lower lr (the guard raises DivergenceError past its limit)."""
        multiplier = self.parts.guard.register_rollback()
        back = self.checkpoints.latest()
        logger.warning("step %d: %s; rolling back to %s, lr x %.3g", step, reason, back.name, multiplier)
        self.logs.event({"step": step, "event": "rollback", "reason": reason, "lr_multiplier": multiplier})
        # the guard's own state (rollback count) is NOT restored from the checkpoint
        state = self.checkpoints.load(back)
        self.progress.n = state.step  # the bar goes back with the run
        self.progress.refresh()
        return state

    def _after_step(self, state: TrainState, epoch: int, result: StepResult) -> TrainState:
        """The state after a good step of `epoch`; log, checkpoint and validate when their turn has come."""
        loop, parts = self.loop, self.parts
        epoch_step = state.step + 1 - epoch * parts.steps_per_epoch
        state = TrainState(step=state.step + 1, epoch=epoch, epoch_step=epoch_step, best_metric=state.best_metric)
        self.progress.update(1)
        if state.step % loop.log_every == 0 or state.step == parts.total_steps:
            # every rank joins the all_reduce of the terms; rank 0 writes them
            result = replace(result, terms=global_means(result.terms, self.dist_info))
            images_per_s = self.images_seen / (time.perf_counter() - self.started)
            self.logs.step(state.step, result, parts.optimizer, images_per_s, self.device)
        end_of_epoch = epoch_step == parts.steps_per_epoch
        if state.step % loop.checkpoint_every == 0 or state.step == parts.total_steps or end_of_epoch:
            self.checkpoints.save(state)
            if end_of_epoch and epoch + 1 in loop.checkpoint_epochs:
                self.checkpoints.save(state, epoch_checkpoint_name(epoch + 1))
            barrier()  # a rollback on any rank must find this file complete
        if end_of_epoch and self.validate_every and (epoch + 1) % self.validate_every == 0:
            self._validate(state)
        return state

    def _validate(self, state: TrainState) -> None:
        """Log the validation AP (and cgF1) at `state.step`; keep the best AP in `state.best_metric`."""
        metrics = validate(self.parts.detector, self.job, self.device, self.dist_info)
        if metrics is None:
            return
        key = "segm_AP" if self.job.with_masks else "bbox_AP"
        self.logs.scalars(state.step, {f"val/{k}": metrics[k] for k in (key, "cgF1") if k in metrics})
        if metrics.get(key) is not None:
            best = state.best_metric
            state.best_metric = metrics[key] if best is None else max(best, metrics[key])
