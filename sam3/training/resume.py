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

from sam3.checkpoint import BEST_CHECKPOINT, TrainState, load_checkpoint
from sam3.config import TrainJob
from sam3.distributed import DistInfo, barrier
from sam3.errors import ConfigError
from sam3.guard import DivergenceGuard
from sam3.optim import schedule_factor
from sam3.training.checkpoint_folder import CheckpointFolder
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


class RunCheckpoints(CheckpointFolder):
    """The image run's checkpoint folder (`sam3.training.checkpoint_folder`: background saves by rank 0, the newest
    intact file, loading), plus best.pt: the weights at the best validation, exported when train.export says so."""

    def __init__(self, folder: Path, parts: RunParts, job: TrainJob, dist_info: DistInfo):
        loop = job.loop
        super().__init__(
            folder, parts.detector.model, parts, job.params, loop.keep_last, loop.checkpoint_background, dist_info
        )
        self.parts, self.job = parts, job

    @property
    def best_path(self) -> Path:
        return self.folder / BEST_CHECKPOINT

    def save_best(self, state: TrainState) -> None:
        """The model's weights as best.pt (no optimiser state: it is exported, never resumed); never rotated."""
        self._save(state, BEST_CHECKPOINT, with_optimizer=False)

    def load_weights(self, path: Path) -> TrainState:
        """Only the model's weights from `path` (the RNGs left alone); its train state."""
        self.flush()
        state, _, _ = load_checkpoint(path, self.model, restore_rng=False, frozen=self.frozen)
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
