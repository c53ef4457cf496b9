"""A run's checkpoints, and where a run starts: resumed from its newest checkpoint, or anew.

A run folder holds one run. `resume_or_start` resumes from the newest checkpoint when it was made with the same
run-defining params (`changed_params`); a checkpoint of other params is set aside as superseded.pt, never resumed
(a DVC re-run after a param change must train anew). A fresh run saves step 0 first: the first "last good" state
the divergence guard can roll back to.

Only intact checkpoints are resumed (or rolled back to): `latest()` verifies the CRC-32 of every record of the
newest file (`sam3.checkpoint_integrity`), and rank 0 moves a damaged, truncated or unreadable one to
checkpoints/corrupt/ with a warning naming it and why, then tries the next older one. The other ranks skip the
same files without moving them: the verdict depends only on the file's bytes, so every rank picks the same one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sam3.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from sam3.config import TrainJob
from sam3.distributed import DistInfo, barrier
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
}


class RunCheckpoints:
    """The checkpoint folder of a run: save (rank 0 only), find the newest, load into the run's model, optimiser
    and scaler. Each checkpoint holds the train state (with the guard's state) and the run's params."""

    def __init__(self, folder: Path, parts: RunParts, job: TrainJob, dist_info: DistInfo):
        self.folder, self.parts, self.job, self.dist_info = folder, parts, job, dist_info

    def save(self, state: TrainState, name: str | None = None) -> None:
        """Checkpoint `state` as step_<step>.pt (keeping train.keep_last of those), or as `name`, kept for good."""
        if not self.dist_info.is_main:
            return
        parts = self.parts
        state.guard = parts.guard.state_dict()
        save_checkpoint(
            self.folder,
            state.step,
            parts.detector.model,
            parts.optimizer,
            None,
            parts.scaler,
            state,
            self.job.params,
            keep_last=self.job.loop.keep_last,
            name=name,
        )

    def latest(self) -> Path | None:
        """The newest intact checkpoint; damaged ones are set aside by rank 0 (the folder's one writer)."""
        return latest_checkpoint(self.folder, set_aside_damaged=self.dist_info.is_main)

    def load(self, path: Path) -> TrainState:
        """Restore the model, optimiser and scaler from `path`; its train state."""
        state, _, _ = load_checkpoint(path, self.parts.detector.model, self.parts.optimizer, self.parts.scaler)
        return state


def resume_or_start(checkpoints: RunCheckpoints) -> TrainState:
    """The state the run goes on from: the newest checkpoint's (guard state included), or step 0, saved."""
    resume_from = checkpoints.latest()
    if resume_from is not None and _params_changed(resume_from, checkpoints.job.params):
        if checkpoints.dist_info.is_main:
            _set_aside(checkpoints.folder, resume_from)
        barrier()
        resume_from = None
    if resume_from is not None:
        state = checkpoints.load(resume_from)
        checkpoints.parts.guard.load_state_dict(state.guard)
        logger.info("resumed from %s at step %d", resume_from, state.step)
    else:
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


def _params_changed(checkpoint: Path, params: dict) -> bool:
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("params") or {}
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


def _set_aside(ckpt_dir: Path, newest: Path) -> None:
    """Keep the newest checkpoint of the previous run as superseded.pt; remove its other step files."""
    newest.replace(ckpt_dir / "superseded.pt")
    for old in ckpt_dir.glob("step_*.pt"):
        old.unlink()
    logger.warning("previous run's newest checkpoint kept as %s", ckpt_dir / "superseded.pt")
