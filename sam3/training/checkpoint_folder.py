"""A run's checkpoint folder, shared by the image trainer (`sam3.training.resume.RunCheckpoints`) and the video
trainer (`sam3.video.train.VosCheckpoints`): save (rank 0 only, in the background), find the newest intact file,
load it into the run's model, optimiser and scaler.

Each checkpoint holds the train state (with the divergence guard's state and the run's total), the run's params,
and of the model only what trains (`sam3.checkpoint`); the frozen part's record is hashed once per run
(`sam3.checkpoint_frozen`).

A save copies the state to CPU memory in the calling thread (into buffers kept for the run: one checkpoint's worth
of host memory; `background=False` writes in the calling thread instead, without them) and returns; the file is
written by one worker thread (`sam3.checkpoint_writer`), in the order of the saves, one at a time: a save that comes
while the previous write runs waits for it first. Whatever reads the folder waits for the writes: `latest` and
`load` flush; another rank reads only after rank 0's `flush` and a barrier (`sam3.training.resume.roll_back`).
`close()` (the trainer's finally) lets the write in flight finish.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from sam3.checkpoint import (
    TrainState,
    checkpoint_file_name,
    checkpoint_payload,
    latest_checkpoint,
    load_checkpoint,
    write_checkpoint,
)
from sam3.checkpoint_frozen import FrozenPart
from sam3.checkpoint_writer import BackgroundWriter, SnapshotBuffers, cpu_snapshot
from sam3.distributed import DistInfo
from sam3.guard import DivergenceGuard

logger = logging.getLogger(__name__)


class SavedParts(Protocol):
    """What a checkpoint takes of a run besides its model (the image trainer's `RunParts`, the video trainer's
    `VosParts`)."""

    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler or None
    guard: DivergenceGuard
    total_steps: int


class CheckpointFolder:
    """The checkpoint folder of one run (module docstring). `params`: what the run was made with, stored in every
    file (resume compares it); `keep_last`: step checkpoints kept; `background`: write in the worker thread."""

    def __init__(
        self,
        folder: Path,
        model: nn.Module,
        parts: SavedParts,
        params: dict[str, Any] | None,
        keep_last: int,
        background: bool,
        dist_info: DistInfo,
    ):
        self.folder, self.model, self.parts, self.params = folder, model, parts, params
        self.keep_last, self.background, self.dist_info = keep_last, background, dist_info
        self.frozen = FrozenPart(model)
        self.writer = BackgroundWriter() if dist_info.is_main else None  # rank 0 is the folder's one writer
        self.buffers = SnapshotBuffers()  # the CPU copies of every save, reused (sam3.checkpoint_writer)

    def save(self, state: TrainState, name: str | None = None) -> None:
        """Checkpoint `state` as step_<step>.pt (keeping `keep_last` of those), or as `name`, kept for good."""
        self._save(state, name, with_optimizer=True)

    def _save(self, state: TrainState, name: str | None, with_optimizer: bool) -> None:
        optimizer = self.parts.optimizer
        if with_optimizer and isinstance(optimizer, ZeroRedundancyOptimizer):
            # ddp.strategy zero: each rank holds a shard of the moments; gathered on rank 0 (a collective: every
            # rank calls save) before rank 0 reads state_dict()
            optimizer.consolidate_state_dict(to=0)
        if self.writer is None:
            return
        parts, keep_last, folder = self.parts, self.keep_last, self.folder
        state.guard = parts.guard.state_dict()
        state.total_steps = parts.total_steps
        file_name = checkpoint_file_name(state.step, state, name, keep_last)
        # the write in flight reads the buffers this copy goes into: one write in flight, the next one waits here
        self.writer.wait_turn(str(folder / file_name))
        payload = checkpoint_payload(
            self.model,
            optimizer if with_optimizer else None,
            None,
            parts.scaler,
            state,
            self.params,
            frozen=self.frozen,
        )
        if not self.background:  # written here and now: no copy kept for the run
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
        if self.writer is None:
            return
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
        """Restore the model, optimiser, scaler and RNG states from `path`; its train state."""
        self.flush()
        parts = self.parts
        state, _, _ = load_checkpoint(path, self.model, parts.optimizer, parts.scaler, frozen=self.frozen)
        return state
