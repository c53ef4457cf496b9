"""VOS fine-tuning of SAM 2.1's / SAM 3's tracker: `train_vos(job)`, from setup to the exported model folder.

Features and the `VosJob` fields (sam3.video.config) that turn them on:
- model source (tiny-sam2.1 | tiny-sam3 | a transformers folder) and input size: model_source, image_size
- epochs x steps per epoch, or a fixed number of optimiser steps: loop.epochs, loop.max_steps
- clips per optimiser step and process: loop.accumulation (the recipe: 1 clip per GPU)
- the recipe's AdamW, layer decay over the image encoder's trunk, cosine schedule, gradient clipping: optim
  (sam3.video.optim)
- freezing the image encoder: loop.freeze image_encoder (no optimiser state, left out of the checkpoints)
- drop-path in the image encoder's trunk: loop.drop_path (SAM 3's ViT only; transformers' Hiera has none)
- bf16 / fp16 autocast on CUDA, fp32 on CPU: loop.amp_dtype
- distributed data parallel from torchrun's environment (NCCL on GPU, gloo on CPU), one clip list per rank
- checkpoints every loop.checkpoint_every steps and at the end (keep_last kept), written in the background, holding
  only what trains (sam3.checkpoint); resumed exactly from the newest one; other run-defining params -> a new run
- divergence guard (sam3.guard: 3 rollbacks, lr x 0.5, spike test at VOS_SPIKE_FACTOR): roll back, lower the lr
- one trainer per run folder (sam3.run_lock via sam3.training.ddp.main_rank_lock)
- logs: TensorBoard and run_dir/train_stats.jsonl every loop.log_every steps (sam3.training.logs); a tqdm bar on a
  terminal, else a plain progress line (sam3.training.progress)
At the end rank 0 exports the model to run_dir/model (sam3.video.export).

One optimiser step on rank r of W, with A = loop.accumulation clips c = 0..A-1 (`vos_step`):

    N = (sum over ranks and clips of the clips' objects) / W     one all_reduce; DDP averages gradients over ranks,
                                                                 so sum_r grad(S_r / N) / W = grad(sum S / sum O)
    for each clip c:  torch seed and the prompt generator from (seed, step, r A + c)
                      loss_c = vos_loss(tracker(clip c), N)      autocast on CUDA; DDP syncs on the last clip only
                      backward(loss_c)
    read sum_c loss_c averaged over ranks and whether it is finite on every rank: ONE all_reduce, ONE host copy
    finite: clip the global gradient L2 norm to optim.grad_clip, step; else drop the gradients (the guard decides)

Every random draw of a step comes from (seed, step, global clip index) and every clip from (seed, epoch, index)
(sam3.video.data), so a resumed run is bitwise the uninterrupted one, and W processes x A clips give the same
update as 1 process x W A clips (round-off apart).

Run length, with I_r the clips per epoch of rank r (ResumableSampler: ceil(videos x multiplier / W)):

    steps_per_epoch = max(1, I_r // A)        total_steps = loop.max_steps or steps_per_epoch x loop.epochs

The run's length is not run-defining: a longer or shorter total resumes with the cosine recomputed for the new
total (a total below the checkpoint's step is a ConfigError), as sam3.training.resume does for images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from sam3.checkpoint import TrainState
from sam3.config import GuardConfig
from sam3.data.sampler import EpochKeyed, ResumableSampler
from sam3.distributed import DistInfo, barrier, init_distributed
from sam3.drop_path import attach_drop_path, vit_layers
from sam3.engine import StepResult, autocast, grad_norm_of, read_on_every_rank
from sam3.errors import ConfigError
from sam3.freeze import parameter_counts
from sam3.guard import DivergenceGuard
from sam3.training.checkpoint_folder import CheckpointFolder
from sam3.training.ddp import global_means, main_rank_lock
from sam3.training.logs import TrainLogs
from sam3.training.progress import Progress
from sam3.training.resume import roll_back, set_aside
from sam3.training.setup import AMP_DTYPES, seed_everything
from sam3.video.config import VOS_FREEZE_MODES, VosJob
from sam3.video.data import ClipDataset, VosIndex, first_clip
from sam3.video.export import export_tracker
from sam3.video.losses import vos_loss
from sam3.video.optim import VISION_PREFIX, build_optimizer, schedule_factor, set_lr
from sam3.video.tracker import TrackerForward, build_tracker, model_image_size, tracker_kind
from sam3.video.types import VideoClip

logger = logging.getLogger(__name__)

EXPORT_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
# VosLoopConfig fields that do not change what a run computes: a checkpoint made with other values is resumed
# A clip's loss sums its decoder passes: 1 per frame, plus correction_clicks on each corrected frame (1 to 2 of them)
# and 3 masks' IoU on the first click, so with the recipe's prompts it legitimately varies about 20x from clip to clip
# (measured on the generated shapes: 1.2 to 29 within 50 steps). The image trainer's 10x spike test would roll good
# steps back; 50x still catches a real blow-up (and a non-finite loss is caught from the first step).
VOS_SPIKE_FACTOR = 50.0
RESUME_IGNORED = ("log_every", "checkpoint_every", "keep_last", "threads", "num_workers", "max_steps", "epochs")


def train_vos(job: VosJob) -> Path:
    """Fine-tune the tracker as `job` says (module docstring); the exported model folder, run_dir/model."""
    check_job(job)
    if job.loop.threads is not None:
        torch.set_num_threads(job.loop.threads)
    dist_info = init_distributed()
    with main_rank_lock(Path(job.run_dir), dist_info):  # RunLocked when another trainer holds the folder
        return _run(job, dist_info)


def check_job(job: VosJob) -> None:
    """ConfigError for loop and optim values no run can use, before the run folder is touched."""
    loop, optim = job.loop, job.optim
    positive = {
        "loop.accumulation": loop.accumulation,
        "loop.checkpoint_every": loop.checkpoint_every,
        "loop.keep_last": loop.keep_last,
        "loop.log_every": loop.log_every,
        "loop.epochs": loop.epochs if loop.max_steps is None else 1,
        "loop.max_steps": 1 if loop.max_steps is None else loop.max_steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"vos.{key} must be at least 1, got {value}")
    if loop.freeze not in VOS_FREEZE_MODES:
        raise ConfigError(f"vos.loop.freeze must be one of {', '.join(VOS_FREEZE_MODES)}, got {loop.freeze!r}")
    if loop.amp_dtype not in AMP_DTYPES:
        raise ConfigError(f"vos.loop.amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {loop.amp_dtype!r}")
    if not 0.0 <= optim.final_factor <= 1.0 or optim.warmup < 0 or not 0.0 < optim.layer_decay <= 1.0:
        raise ConfigError(
            f"vos.optim: final_factor must be in [0, 1] (got {optim.final_factor}), warmup >= 0 (got {optim.warmup}) "
            f"and layer_decay in (0, 1] (got {optim.layer_decay})"
        )


@dataclass
class VosParts:
    """What one run trains with (`build_parts`)."""

    model: nn.Module  # the bare tracker, frozen as loop.freeze says, on the run's device, in train mode
    forward: nn.Module  # TrackerForward over it, wrapped in DistributedDataParallel under torchrun
    loader: DataLoader  # (epoch, index) keys of this rank's clips, one clip per batch
    sampler: ResumableSampler
    steps_per_epoch: int
    total_steps: int
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 on CUDA only
    amp_dtype: torch.dtype | None  # None: fp32
    guard: DivergenceGuard


def build_parts(job: VosJob, dist_info: DistInfo) -> VosParts:
    """Seed, then the model (frozen, drop-path), the clips and their sampler, the optimiser, the guard."""
    loop, device = job.loop, dist_info.device
    seed_everything(loop.seed + dist_info.rank)  # before the model: a tiny model's random init draws from it
    model = build_tracker(job.model_source, job.image_size)
    freeze_image_encoder(model, loop.freeze == "image_encoder")
    attach_trunk_drop_path(model, loop.drop_path, trains_vision=loop.freeze != "image_encoder")
    model = model.train().to(device)
    index = VosIndex.read(Path(job.dataset_dir) / "train", job.train_list)
    clips = ClipDataset(
        index, job.clip, model_image_size(model), seed=loop.seed, train=True, tracker=tracker_kind(model)
    )
    sampler = ResumableSampler(len(clips), loop.seed, True, dist_info.rank, dist_info.world_size, with_epoch=True)
    steps_per_epoch = max(1, sampler.per_rank // loop.accumulation)
    total_steps = loop.max_steps or steps_per_epoch * loop.epochs
    logger.info(
        "%d training clips (%d videos x %d, %d per process), %d steps per epoch, %d steps in all",
        len(clips),
        len(index.videos),
        job.clip.multiplier,
        sampler.per_rank,
        steps_per_epoch,
        total_steps,
    )
    loader = DataLoader(
        EpochKeyed(clips),  # (epoch, index) keys: persistent workers still draw each epoch's augmentation
        batch_size=1,
        sampler=sampler,
        collate_fn=first_clip,
        num_workers=loop.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=loop.num_workers > 0,
    )
    amp_dtype = AMP_DTYPES[loop.amp_dtype] if device.type == "cuda" else None
    return VosParts(
        model=model,
        forward=wrap_ddp(TrackerForward(model, job.prompts), dist_info),
        loader=loader,
        sampler=sampler,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        optimizer=build_optimizer(model, job.optim),
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        amp_dtype=amp_dtype,
        # the image trainer's guard (3 rollbacks, lr x 0.5) with a wider spike test (VOS_SPIKE_FACTOR)
        guard=DivergenceGuard(GuardConfig(spike_factor=VOS_SPIKE_FACTOR)),
    )


def freeze_image_encoder(model: nn.Module, frozen: bool) -> None:
    """requires_grad False on every `vision_encoder.*` parameter when `frozen`, True on all others; log the counts."""
    for name, param in model.named_parameters():
        param.requires_grad_(not (frozen and name.startswith(VISION_PREFIX)))
    counts = parameter_counts(model)
    logger.info(
        "parameters: %s trainable, %s frozen (freeze=%s)",
        f"{counts['trainable']:,}",
        f"{counts['frozen']:,}",
        "image_encoder" if frozen else "none",
    )


def attach_trunk_drop_path(model: nn.Module, rate: float, trains_vision: bool) -> None:
    """Drop-path over SAM 3's ViT blocks (sam3.drop_path), where the image encoder trains; Hiera has none."""
    if rate <= 0 or not trains_vision:  # in a frozen encoder it would only add noise to its features
        return
    if not vit_layers(model):
        logger.info("loop.drop_path %.3g: transformers' Hiera trunk has no drop-path; trained without it", rate)
        return
    rates = attach_drop_path(model, rate).rates
    logger.info("drop-path on %d ViT blocks, %.3g .. %.3g", len(rates), rates[0], rates[-1])


def wrap_ddp(forward: nn.Module, dist_info: DistInfo) -> nn.Module:
    """DistributedDataParallel around the training forward when there is more than one process.

    find_unused_parameters: a step leaves parameters without gradient (the point embeddings on a mask-prompted
    clip, the multimask tokens after a correction click), as the reference's config also says. Buffers are constants
    built alike on every rank: no broadcast before each forward."""
    if not dist_info.enabled:
        return forward
    return nn.parallel.DistributedDataParallel(
        forward,
        device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None,
        find_unused_parameters=True,
        gradient_as_bucket_view=True,
        broadcast_buffers=False,
    )


def clip_seed(seed: int, step: int, clip: int) -> int:
    """The seed of clip `clip` (rank x accumulation + position) of optimiser step `step`: numpy's SeedSequence of
    (seed, step, clip), independent of where the run (re)started and of how clips are split over ranks."""
    return int(np.random.SeedSequence([seed, step, clip]).generate_state(1, dtype=np.uint64)[0] >> 1)


def vos_step(parts: VosParts, job: VosJob, clips: list[VideoClip], step: int, dist_info: DistInfo) -> StepResult:
    """One optimiser step over this rank's `clips` (module docstring). The scheduled lr is set by the caller."""
    optimizer, device, loop = parts.optimizer, dist_info.device, job.loop
    optimizer.zero_grad(set_to_none=True)
    num_objects = torch.tensor(float(sum(clip.num_objects for clip in clips)), device=device)
    if dist_info.enabled:
        dist.all_reduce(num_objects)
        num_objects = num_objects / dist_info.world_size  # DDP averages the ranks' gradients (module docstring)
    total = torch.zeros((), device=device)
    terms: dict[str, torch.Tensor] = {}
    for position, clip in enumerate(clips):
        seed = clip_seed(loop.seed, step, dist_info.rank * len(clips) + position)
        torch.manual_seed(seed)  # drop-path and anything else on the global generators
        generator = torch.Generator().manual_seed(seed)  # the prompts and correction clicks (sam3.video.prompts)
        clip = clip.to(device)
        last = position == len(clips) - 1
        # DDP: the gradient all-reduce runs after the last clip's backward only
        no_sync = (
            parts.forward.no_sync() if hasattr(parts.forward, "no_sync") and not last else contextlib.nullcontext()
        )
        with no_sync:
            with autocast(device, parts.amp_dtype):
                output = parts.forward(clip, generator)
            losses = vos_loss(output, clip.masks, job.loss, num_objects=num_objects)
            loss = losses["loss"]
            (parts.scaler.scale(loss) if parts.scaler is not None else loss).backward()
        total = total + loss.detach()
        for name, value in losses.items():
            terms[name] = terms.get(name, 0) + value.detach()
    mean_loss, finite = read_on_every_rank(total)  # the step's one host read
    if not finite:  # a NaN must never reach the weights; every rank skips together
        optimizer.zero_grad(set_to_none=True)
        return StepResult(total, terms, None, finite=False, mean_loss=mean_loss)
    if parts.scaler is not None:
        parts.scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    clip_to = job.optim.grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_to) if clip_to > 0 else grad_norm_of(params)
    if parts.scaler is not None:
        parts.scaler.step(optimizer)
        parts.scaler.update()
    else:
        optimizer.step()
    return StepResult(total, terms, grad_norm.detach(), finite=True, mean_loss=mean_loss)


def run_params(job: VosJob) -> dict[str, Any]:
    """What a checkpoint records of the run: the job's sections as plain values (its run folder left out: a moved
    run folder is the same run) and the params as given."""
    fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.name not in ("run_dir", "params")}
    sections = {name: asdict(value) if dataclasses.is_dataclass(value) else value for name, value in fields.items()}
    return {"job": sections, "params": job.params}


def changed_params(stored: dict, current: dict) -> list[str]:
    """The run-defining values that differ, as 'key: old -> new' (dotted keys; the loop fields of RESUME_IGNORED
    left out, in the job (`loop.*`) and in the params as given (params.yaml's `vos.train.*`))."""
    old, new = _flatten(stored), _flatten(current)
    changes = []
    for key in sorted(set(old) | set(new)):
        if any(key.endswith((f"loop.{name}", f"vos.train.{name}")) for name in RESUME_IGNORED):
            continue
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


class VosCheckpoints(CheckpointFolder):
    """The video run's checkpoint folder (`sam3.training.checkpoint_folder`: rank 0 saves in the background, every
    rank loads). A file holds the trainable weights and every buffer (frozen weights are rebuilt from the model
    source and checked by their fingerprint, `sam3.checkpoint_frozen`), AdamW's state, the RNG states, the train
    state with the guard's, and `run_params`."""

    def __init__(self, folder: Path, parts: VosParts, job: VosJob, dist_info: DistInfo):
        super().__init__(folder, parts.model, parts, run_params(job), job.loop.keep_last, True, dist_info)
        self.parts, self.job = parts, job


def resume_or_start(checkpoints: VosCheckpoints) -> TrainState:
    """The newest checkpoint's state when it was made with the same run-defining params; otherwise step 0, saved
    (an earlier run's newest checkpoint kept as superseded.pt, as sam3.training.resume does). ConfigError when
    the run's total is below the checkpoint's step."""
    path = checkpoints.latest()
    if path is not None:
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        changes = changed_params(stored.get("params") or {}, checkpoints.params)
        if changes:
            logger.warning("%s was made with other params (%s); starting a new run", path, "; ".join(changes))
            if checkpoints.dist_info.is_main:
                set_aside(checkpoints.folder, path)
            barrier()
            path = None
        else:
            _refuse_shortening(path, stored["train_state"]["step"], checkpoints)
    if path is None:
        state = TrainState()
        checkpoints.save(state)  # the first "last good" state the guard can roll back to
    else:
        state = checkpoints.load(path)
        checkpoints.parts.guard.load_state_dict(state.guard)
        logger.info("resumed from %s at step %d", path, state.step)
        old, new = state.total_steps, checkpoints.parts.total_steps
        if old is not None and old != new:
            optim = checkpoints.job.optim
            logger.info(
                "the run's length changed from %d to %d steps: the cosine is recomputed (lr x %.4g at step %d)",
                old,
                new,
                schedule_factor(state.step, new, optim.warmup, optim.final_factor),
                state.step,
            )
    barrier()
    return state


def _refuse_shortening(path: Path, step: int, checkpoints: VosCheckpoints) -> None:
    total, loop = checkpoints.parts.total_steps, checkpoints.job.loop
    if step <= total:
        return
    given = f"vos.loop.max_steps = {loop.max_steps}" if loop.max_steps else f"vos.loop.epochs = {loop.epochs}"
    raise ConfigError(
        f"{given} ({total} steps) is below step {step} of the run's newest checkpoint {path}: a run is not "
        f"shortened after the fact; set at least {step} steps to go on, or move {path.parent} away to train anew"
    )


class VosFit:
    """The optimiser steps from a state to the run's last (module docstring); `run(state)`."""

    def __init__(self, job: VosJob, parts: VosParts, checkpoints: VosCheckpoints, logs: TrainLogs, dist_info: DistInfo):
        self.job, self.loop, self.parts = job, job.loop, parts
        self.checkpoints, self.logs, self.dist_info = checkpoints, logs, dist_info
        self.progress: Progress | None = None
        self.started, self.frames_seen = 0.0, 0

    def run(self, state: TrainState) -> TrainState:
        parts = self.parts
        self.progress = Progress(parts.total_steps, state.step, self.loop.log_every, self.dist_info.is_main)
        self.started, self.frames_seen = time.perf_counter(), 0
        try:  # close the bar and the logs on any exit, so an error message starts on a line of its own
            while state.step < parts.total_steps:
                state = self._epoch(state)
        finally:
            self.progress.close()
            self.logs.close()
        return state

    def _epoch(self, state: TrainState) -> TrainState:
        """Steps from `state` to the end of its epoch or of the run; after a rollback, the checkpoint's state."""
        parts, accumulation = self.parts, self.loop.accumulation
        epoch, done = divmod(state.step, parts.steps_per_epoch)
        parts.sampler.set_epoch(epoch, start=done * accumulation)  # a mid-epoch resume skips the clips trained
        clips: list[VideoClip] = []
        for clip in parts.loader:
            clips.append(clip)
            if len(clips) < accumulation:
                continue
            set_lr(parts.optimizer, state.step, parts.total_steps, self.job.optim, scale=parts.guard.lr_multiplier)
            result = vos_step(parts, self.job, clips, state.step, self.dist_info)
            self.frames_seen += sum(c.num_frames for c in clips) * self.dist_info.world_size
            clips = []
            reason = parts.guard.check(result.mean_loss, step=state.step)
            if reason is not None:
                return roll_back(self.checkpoints, parts.guard, self.logs, self.progress, state.step, reason)
            state = self._after_step(state, result)
            if state.step >= parts.total_steps or state.epoch != epoch:
                return state
        return state

    def _after_step(self, state: TrainState, result: StepResult) -> TrainState:
        """The state after a good step; progress, logs and checkpoint when their turn has come."""
        parts, loop = self.parts, self.loop
        step = state.step + 1
        epoch, epoch_step = divmod(step, parts.steps_per_epoch)
        state = replace(state, step=step, epoch=epoch, epoch_step=epoch_step)
        last = step == parts.total_steps
        frames_per_s = self.frames_seen / max(1e-9, time.perf_counter() - self.started)
        lr = max(group["lr"] for group in parts.optimizer.param_groups)
        self.progress.step(step, result.mean_loss, lr, frames_per_s)
        if step % loop.log_every == 0 or last:
            # every rank joins the all_reduce of the terms; rank 0 writes them
            result = replace(result, terms=global_means(result.terms, self.dist_info))
            self.logs.step(step, result, parts.optimizer, frames_per_s, self.dist_info.device)
        if step % loop.checkpoint_every == 0 or last:
            self.checkpoints.save(state)
        return state


def _run(job: VosJob, dist_info: DistInfo) -> Path:
    """Inside the run lock: setup, resume or start, fit, export."""
    run_dir = Path(job.run_dir)
    if dist_info.is_main:
        (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    parts = build_parts(job, dist_info)
    checkpoints = VosCheckpoints(run_dir / CHECKPOINT_DIR, parts, job, dist_info)
    completed = False
    try:
        state = resume_or_start(checkpoints)
        logs = TrainLogs(run_dir, dist_info, None, checkpoints.params, fresh=state.step == 0)
        state = VosFit(job, parts, checkpoints, logs, dist_info).run(state)  # closes the logs
        checkpoints.flush()  # the last checkpoint is on disk before the export; a failed write raises
        export_dir = run_dir / EXPORT_DIR
        if dist_info.is_main:
            card = {
                "dataset": f"{job.dataset_dir} (train{', ' + job.train_list if job.train_list else ''})",
                "base_model": job.model_source,
                "params": job.params or checkpoints.params["job"],
                "steps": state.step,
            }
            export_tracker(parts.model, export_dir, card)
        barrier()
        completed = True
    finally:
        # the write in flight completes on every exit; after an error, that error is the one raised
        checkpoints.close(raise_error=completed)
    return export_dir
