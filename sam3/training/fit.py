"""The fit loop: optimiser steps from the resumed state to the last one, one epoch at a time.

while step < total_steps:                              # `FitLoop.run`
    sampler.set_epoch(epoch, start=the batches of the steps already done in it)
    for each A micro-batches (A = train.accumulation):  # `FitLoop._epoch`
        lr of the schedule x guard's multiplier; torch seed of (seed, rank, step)
        train_step(...)                                # sam3.engine: forward, loss, backward, clip, step
        the guard reads the loss averaged over ranks: on a non-finite loss or a spike, roll back to the newest
            checkpoint (lower lr) and start the epoch loop again from its step
        step += 1; the progress bar or line (sam3.training.progress); every log_every steps: log
        at every val_every_epochs-th epoch's end and at the last step: validate, count it for the best checkpoint
            and early stopping, write best.pt on a new best unless train.keep_best is false (sam3.training.best)
        every checkpoint_every steps, at an epoch's end, at the end and when stopping early: checkpoint (after the
            validation of the same step, so the checkpoint carries its counters)
    until the epoch's or the run's last step, or early stopping (train.patience)
A checkpoint costs the step a copy of the trainable state to CPU memory; rank 0 writes the file in the background
(sam3.training.resume, sam3.checkpoint_writer), and a rollback waits for that write on every rank before reading.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from sam3.checkpoint import TrainState, epoch_checkpoint_name
from sam3.coco import split_annotation_path
from sam3.config import TrainJob
from sam3.distributed import DistInfo
from sam3.engine import StepResult, train_step
from sam3.features import CachedDetector
from sam3.optim import set_lr
from sam3.retain import RetainedDetector
from sam3.training.best import metric_name, record_validation, stop_reason
from sam3.training.ddp import from_main_rank, global_means, wrap_ddp
from sam3.training.loader import resolve_num_workers
from sam3.training.logs import TrainLogs
from sam3.training.progress import Progress
from sam3.training.resume import RunCheckpoints, roll_back
from sam3.training.setup import RunParts
from sam3.training.validation import validate

# the validation metrics logged (those the pass computes): box AP, mask AP in segmentation mode, SA-Co cgF1
LOGGED_METRICS = ("bbox_AP", "segm_AP", "cgF1")

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
        self.metric = metric_name(self.loop, job.with_masks)
        valid = split_annotation_path(job.dataset_dir, "valid")
        if self.validate_every and not valid.is_file():  # the same verdict on every rank: the same file system
            logger.warning("%s not found: no validation in this run", valid)
            self.validate_every = 0
        detector = parts.detector
        model = CachedDetector(detector) if job.cache.enabled else detector
        if self.loop.retain:  # retention phrases join each batch; the teacher answers them too (sam3.retain)
            model = RetainedDetector(detector, job.retain_phrases, self.loop.retain_prompts, parts.retain_reference)
        self.model = wrap_ddp(model, job.ddp, dist_info)
        workers = resolve_num_workers(self.loop.num_workers, self.device)
        if self.loop.num_workers == "auto":
            logger.info("train.num_workers auto: %d loader processes on %s", workers, self.device.type)
        self.loader = DataLoader(
            parts.train_set,
            batch_size=self.loop.batch_size,
            sampler=parts.sampler,  # iterated anew each epoch after set_epoch
            collate_fn=parts.collate,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
        )
        self.progress: Progress | None = None
        self.started, self.images_seen = 0.0, 0

    def run(self, state: TrainState) -> TrainState:
        """Train from `state` to parts.total_steps, or until early stopping; the state after the last step."""
        reason = self._stop_reason(state)
        if reason is not None:  # a resumed run that had stopped early stays stopped
            logger.info(
                "the run stopped early at step %d: %s; nothing to train (raise train.patience, or set it 0, to go on)",
                state.step,
                reason,
            )
        self.progress = Progress(self.parts.total_steps, state.step, self.loop.log_every, self.dist_info.is_main)
        self.started, self.images_seen = time.perf_counter(), 0
        try:  # close the bar and the logs on any exit, so an error message starts on a line of its own
            while state.step < self.parts.total_steps and self._stop_reason(state) is None:
                state = self._epoch(state)
        finally:
            self.progress.close()
            self.logs.close()
        return state

    def _stop_reason(self, state: TrainState) -> str | None:
        return stop_reason(state, self.loop.patience, self.metric)

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
            loss = result.mean_loss  # averaged over ranks and read by the step itself: no sync of its own
            reason = parts.guard.check(loss, step=state.step)
            if reason is not None:
                return roll_back(self.checkpoints, parts.guard, self.logs, self.progress, state.step, reason)
            state = self._after_step(state, epoch, result, loss)
            if state.step >= parts.total_steps or state.epoch_step == parts.steps_per_epoch:
                return state
            if self._stop_reason(state) is not None:
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

    def _after_step(self, state: TrainState, epoch: int, result: StepResult, loss: float) -> TrainState:
        """The state after a good step of `epoch` with this `loss`; log, validate and checkpoint when their turn has
        come."""
        loop, parts = self.loop, self.parts
        step = state.step + 1
        epoch_step = step - epoch * parts.steps_per_epoch
        state = replace(state, step=step, epoch=epoch, epoch_step=epoch_step)
        last, end_of_epoch = step == parts.total_steps, epoch_step == parts.steps_per_epoch
        images_per_s = self.images_seen / (time.perf_counter() - self.started)
        self.progress.step(step, loss, max(group["lr"] for group in parts.optimizer.param_groups), images_per_s)
        if step % loop.log_every == 0 or last:
            # every rank joins the all_reduce of the terms; rank 0 writes them
            result = replace(result, terms=global_means(result.terms, self.dist_info))
            self.logs.step(step, result, parts.optimizer, images_per_s, self.device)
        if self.validate_every and (last or (end_of_epoch and (epoch + 1) % self.validate_every == 0)):
            self._validate(state)
        stopping = self._stop_reason(state) is not None
        if step % loop.checkpoint_every == 0 or last or end_of_epoch or stopping:
            self.checkpoints.save(state)
            if end_of_epoch and epoch + 1 in loop.checkpoint_epochs:
                self.checkpoints.save(state, epoch_checkpoint_name(epoch + 1))
            # no barrier: the file is still being written in the background; a rollback flushes and waits for
            # rank 0 itself before any rank reads (`sam3.training.resume.roll_back`)
        return state

    def _validate(self, state: TrainState) -> None:
        """Validate at `state.step`: log the metrics, count the validation into `state`'s best and patience counters
        (sam3.training.best), write best.pt on a new best, and say when the run stops early."""
        metrics = validate(self.parts.detector, self.job, self.device, self.dist_info)  # rank 0's; None elsewhere
        value = from_main_rank(metrics.get(self.metric) if metrics else None, self.dist_info)
        if record_validation(state, value, self.metric) and self.loop.keep_best:  # counted either way
            self.checkpoints.save_best(state)
        if metrics is not None:
            logged = {f"val/{key}": metrics[key] for key in LOGGED_METRICS if key in metrics}
            self.logs.scalars(
                state.step, {**logged, "val/best": state.best_metric, "val/since_best": state.validations_since_best}
            )
        reason = self._stop_reason(state)
        if reason is not None and state.step < self.parts.total_steps:
            logger.info("early stopping at step %d of %d: %s", state.step, self.parts.total_steps, reason)
            self.logs.event({"step": state.step, "event": "early_stop", "reason": reason})
