"""A run's checkpoints, and where a run starts: resumed from its newest checkpoint, or anew.

A run folder holds one run. `resume_or_start` resumes from the newest checkpoint when it was made with the same
run-defining params (`changed_params`); a checkpoint of other params is set aside as superseded.pt (and an earlier
run's best.pt as superseded_best.pt), never resumed (a DVC re-run after a param change must train anew). A fresh run
saves step 0 first: the first "last good" state the divergence guard can roll back to.

The run's length (train.max_steps, or train.epochs x steps per epoch) is not run-defining: the steps already done
are the same whatever the total, except for the schedule's cool-down, which reads the total (`sam3.optim`). So a
longer (or shorter) total than the checkpoint's resumes it and the lr schedule of every further step is computed
for the new total (said in the log); the cool-down of the steps already done stays what it was, so an extended run
is not bitwise the run that had the longer total from the start when optim.cooldown > 0. A total below the
checkpoint's step is refused with a ConfigError before any training (a run is not shortened after the fact): set
the total to at least that step to go on (exactly that step: the checkpoint is exported as it is), or move the
checkpoints folder away to train the shorter run anew.

`roll_back` is the divergence guard's way back, shared by the image and the video trainers: the newest intact
checkpoint, with the guard's window of losses rewound to the one saved in it (its rollback count is kept).

Only intact checkpoints are resumed (or rolled back to): `latest()` verifies the CRC-32 of every record of the
newest file (`sam3.checkpoint_integrity`), and rank 0 moves a damaged, truncated or unreadable one to
checkpoints/corrupt/ with a warning naming it and why, then tries the next older one. The other ranks skip the
same files without moving them: the verdict depends only on the file's bytes, so every rank picks the same one.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from sam3.checkpoint import (
    BEST_CHECKPOINT,
    TrainState,
    checkpoint_file_name,
    checkpoint_payload,
    latest_checkpoint,
    load_checkpoint,
    write_checkpoint,
)
from sam3.checkpoint_frozen import FrozenPart
from sam3.checkpoint_writer import BackgroundWriter, SnapshotBuffers, cpu_snapshot
from sam3.config import TrainJob
from sam3.distributed import DistInfo, barrier
from sam3.errors import ConfigError
from sam3.guard import DivergenceGuard
from sam3.optim import schedule_factor
from sam3.training.setup import RunParts

logger = logging.getLogger(__name__)

# the sections that define a run; "code": the fingerprint of the code that trains (set by the pipeline, absent when
# the library is called directly), so a checkpoint written by other code is set aside, not resumed
_RESUME_SECTIONS = ("model", "train", "optim", "loss", "cache", "code")
# params that do not change what a run computes: a checkpoint made with other values of these is still resumed
_RESUME_IGNORED = {
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_last",
    "train.checkpoint_epochs",
    "train.activation_checkpointing",  # same values, less memory
    "train.compile",  # same values, other kernels
    "train.patience",  # when to stop, read anew on resume (sam3.training.best): a stopped run goes on if raised
    "train.export",  # which weights the export takes, read at the end
    "train.threads",  # how the same steps are computed on the CPU (round-off differs, the run does not)
    "train.num_workers",  # how the samples are loaded; each sample depends on (seed, epoch, index) only
    "train.keep_best",  # whether best.pt is kept
    "train.checkpoint_background",  # how a checkpoint is written, not what it holds
    # the run's length: resumed with the schedule recomputed for the new total (module docstring)
    "train.max_steps",
    "train.epochs",
}


class RunCheckpoints:
    """The checkpoint folder of a run: save (rank 0 only, in the background), find the newest, load into the run's
    model, optimiser and scaler. Each checkpoint holds the train state (with the guard's state) and the run's params,
    and of the model only what trains (`sam3.checkpoint`); the frozen part's record is hashed once per run.

    A save copies the state to CPU memory in the calling thread (into buffers kept for the run: one checkpoint's
    worth of host memory; train.checkpoint_background false writes in the calling thread instead, without them) and
    returns; the file is written by one worker thread (`sam3.checkpoint_writer`), in the
    order of the saves, one at a time: a save that comes while the previous write runs waits for it first. Whatever
    reads the folder waits for the writes: `latest`, `load`, `load_weights` flush; another rank reads only after
    rank 0's `flush` and a barrier (`sam3.training.fit`, rollback). `close()` (the trainer's finally) lets the write
    in flight finish.
    """

    def __init__(self, folder: Path, parts: RunParts, job: TrainJob, dist_info: DistInfo):
        self.folder, self.parts, self.job, self.dist_info = folder, parts, job, dist_info
        self.frozen = FrozenPart(parts.detector.model)
        self.writer = BackgroundWriter() if dist_info.is_main else None  # rank 0 is the folder's one writer
        self.buffers = SnapshotBuffers()  # the CPU copies of every save, reused (sam3.checkpoint_writer)

    @property
    def best_path(self) -> Path:
        return self.folder / BEST_CHECKPOINT

    def save(self, state: TrainState, name: str | None = None) -> None:
        """Checkpoint `state` as step_<step>.pt (keeping train.keep_last of those), or as `name`, kept for good."""
        self._save(state, name, with_optimizer=True)

    def save_best(self, state: TrainState) -> None:
        """The model's weights as best.pt (no optimiser state: it is exported, never resumed); never rotated."""
        self._save(state, BEST_CHECKPOINT, with_optimizer=False)

    def _save(self, state: TrainState, name: str | None, with_optimizer: bool) -> None:
        optimizer = self.parts.optimizer
        if with_optimizer and isinstance(optimizer, ZeroRedundancyOptimizer):
            # ddp.strategy zero: each rank holds a shard of the moments; gathered on rank 0 (a collective: every
            # rank calls save, as for the other checkpoints) before rank 0 reads state_dict()
            optimizer.consolidate_state_dict(to=0)
        if self.writer is None:
            return
        parts, keep_last = self.parts, self.job.loop.keep_last
        state.guard = parts.guard.state_dict()
        state.total_steps = parts.total_steps
        file_name = checkpoint_file_name(state.step, state, name, keep_last)
        folder = self.folder
        # the write in flight reads the buffers this copy goes into: one write in flight, the next one waits here
        self.writer.wait_turn(str(folder / file_name))
        payload = checkpoint_payload(
            parts.detector.model,
            parts.optimizer if with_optimizer else None,
            None,
            parts.scaler,
            state,
            self.job.params,
            frozen=self.frozen,
        )
        if not self.job.loop.checkpoint_background:  # written here and now: no copy kept for the run
            write_checkpoint(payload, folder, file_name, keep_last=keep_last)
            return
        # copied: training changes the weights and moments in place from the next step on
        payload = cpu_snapshot(payload, self.buffers)
        self.writer.submit(
            str(folder / file_name), lambda: write_checkpoint(payload, folder, file_name, keep_last=keep_last)
        )

    def flush(self) -> None:
        """Wait until this rank's writes are on disk (nothing to wait for on other ranks); CheckpointError when one
        failed."""
        if self.writer is not None:
            self.writer.flush()

    def close(self, raise_error: bool = True) -> None:
        """Let the write in flight finish, stop the writer (`BackgroundWriter.close`) and free the copies' memory."""
        if self.writer is not None:
            try:
                self.writer.close(raise_error=raise_error)
            finally:
                self.buffers = SnapshotBuffers()
            if self.writer.submits:
                logger.debug(
                    "checkpoint writer: %d writes, %.1f s writing, %d saves waited %.1f s for the previous write",
                    self.writer.submits,
                    sum(self.writer.write_s),
                    self.writer.waits,
                    self.writer.wait_s,
                )

    def latest(self) -> Path | None:
        """The newest intact checkpoint; damaged ones are set aside by rank 0 (the folder's one writer)."""
        self.flush()
        return latest_checkpoint(self.folder, set_aside_damaged=self.dist_info.is_main)

    def load(self, path: Path) -> TrainState:
        """Restore the model, optimiser and scaler from `path`; its train state."""
        self.flush()
        model, optimizer, scaler = self.parts.detector.model, self.parts.optimizer, self.parts.scaler
        state, _, _ = load_checkpoint(path, model, optimizer, scaler, frozen=self.frozen)
        return state

    def load_weights(self, path: Path) -> TrainState:
        """Only the model's weights from `path` (the RNGs left alone); its train state."""
        self.flush()
        state, _, _ = load_checkpoint(path, self.parts.detector.model, restore_rng=False, frozen=self.frozen)
        return state


def resume_or_start(checkpoints: RunCheckpoints) -> TrainState:
    """The state the run goes on from: the newest checkpoint's (guard state and validation counters included), or
    step 0, saved. ConfigError, before anything is trained or written, when the run's total is below the newest
    checkpoint's step (module docstring)."""
    resume_from = checkpoints.latest()
    if resume_from is not None:
        stored = torch.load(resume_from, map_location="cpu", weights_only=True, mmap=True)
        if _params_changed(resume_from, stored.get("params") or {}, checkpoints.job.params):
            if checkpoints.dist_info.is_main:
                set_aside(checkpoints.folder, resume_from)
            barrier()
            resume_from = None
        else:
            _refuse_shortening(resume_from, stored["train_state"]["step"], checkpoints)
    if resume_from is not None:
        state = checkpoints.load(resume_from)
        checkpoints.parts.guard.load_state_dict(state.guard)
        logger.info("resumed from %s at step %d", resume_from, state.step)
        _say_length_change(state, checkpoints)
    else:
        if checkpoints.dist_info.is_main and checkpoints.best_path.is_file():
            _set_aside_best(checkpoints.best_path)  # an earlier run's best must not be exported as this run's
        state = TrainState()
        checkpoints.save(state)
    barrier()
    return state


def changed_params(stored: dict, current: dict) -> list[str]:
    """Keys of the sections that define a run whose values differ, as 'section.key: old -> new'."""
    changes = []
    for section in _RESUME_SECTIONS:
        old, new = stored.get(section) or {}, current.get(section) or {}
        for key in sorted(set(old) | set(new)):
            name = f"{section}.{key}"
            if name not in _RESUME_IGNORED and old.get(key) != new.get(key):
                changes.append(f"{name}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def _refuse_shortening(path: Path, step: int, checkpoints: RunCheckpoints) -> None:
    """ConfigError when the run's total is below `step`, the step of its newest checkpoint `path`."""
    total, loop = checkpoints.parts.total_steps, checkpoints.job.loop
    if step <= total:
        return
    if loop.max_steps:
        given, enough = f"train.max_steps = {loop.max_steps}", f"train.max_steps >= {step}"
    else:
        given = f"train.epochs = {loop.epochs} ({total} steps)"
        enough = f"train.epochs >= {math.ceil(step / checkpoints.parts.steps_per_epoch)}"
    raise ConfigError(
        f"{given} is below step {step} of the run's newest checkpoint {path}: a run is not shortened after the "
        f"fact; set {enough} to go on (step {step} exactly: export that checkpoint as it is), or move {path.parent} "
        f"away to train a new run of {total} steps"
    )


def _say_length_change(state: TrainState, checkpoints: RunCheckpoints) -> None:
    """Log that the run's total changed since `state` was saved, and the schedule factor it now gets."""
    old, new = state.total_steps, checkpoints.parts.total_steps
    if old is None or old == new:  # None: a checkpoint from before the field, its total unknown
        return
    optim = checkpoints.job.optim
    logger.info(
        "the run's length changed from %d to %d steps (train.max_steps / train.epochs): resuming at step %d with "
        "the lr schedule recomputed for %d steps (lr x %.4g of the base rates at step %d; x %.4g under the old %d)",
        old,
        new,
        state.step,
        new,
        schedule_factor(state.step, new, optim),
        state.step,
        schedule_factor(state.step, old, optim),
        old,
    )


def _params_changed(checkpoint: Path, stored: dict, params: dict) -> bool:
    if not stored or not params:
        return False
    changes = changed_params(stored, params)
    if changes:
        logger.warning(
            "%s was made with other params (%s); starting a new run instead of resuming",
            checkpoint,
            "; ".join(changes),
        )
    return bool(changes)


def set_aside(ckpt_dir: Path, newest: Path) -> None:
    """Keep the newest checkpoint of the previous run as superseded.pt; remove its other step files."""
    newest.replace(ckpt_dir / "superseded.pt")
    for old in ckpt_dir.glob("step_*.pt"):
        old.unlink()
    logger.warning("previous run's newest checkpoint kept as %s", ckpt_dir / "superseded.pt")


def _set_aside_best(best: Path) -> None:
    """Keep an earlier run's best.pt as superseded_best.pt, out of the way of this run's."""
    kept = best.with_name("superseded_best.pt")
    best.replace(kept)
    logger.warning("an earlier run's best checkpoint %s kept as %s", best, kept)


class _Checkpoints(Protocol):
    """What `roll_back` needs of a run's checkpoint folder (`RunCheckpoints`, the video trainer's
    `VosCheckpoints`)."""

    def flush(self) -> None: ...
    def latest(self) -> Path: ...
    def load(self, path: Path) -> TrainState: ...


class _Events(Protocol):
    def event(self, record: dict[str, Any]) -> None: ...


class _Rewinds(Protocol):
    def back_to(self, step: int) -> None: ...


def roll_back(
    checkpoints: _Checkpoints, guard: DivergenceGuard, logs: _Events, progress: _Rewinds, step: int, reason: str
) -> TrainState:
    """The state to go on from after the guard flagged `step` for `reason`: the newest intact checkpoint's, with a
    lower lr (`guard.register_rollback`, which raises DivergenceError past its limit).

    Every rank calls this at the same step (the guard reads the loss averaged over ranks). Checkpoints are written
    in the background by rank 0, so rank 0 finishes its write in flight, then the barrier, and only then does any
    rank look for the newest file, which is complete on disk by then. The guard keeps its rollback count but takes
    the checkpoint's window of losses (`DivergenceGuard.rewind`): the restored weights' losses are judged against
    the losses they had, not the later ones of the steps undone (rolled back to an early checkpoint, the model's
    higher losses would otherwise read as spikes)."""
    multiplier = guard.register_rollback()
    checkpoints.flush()
    barrier()
    back = checkpoints.latest()
    logger.warning("step %d: %s; rolling back to %s, lr x %.3g", step, reason, back.name, multiplier)
    logs.event({"step": step, "event": "rollback", "reason": reason, "lr_multiplier": multiplier})
    state = checkpoints.load(back)
    guard.rewind(state.guard)
    progress.back_to(state.step)
    return state
