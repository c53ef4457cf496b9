"""The fine-tuning loop: one readable function over the engine step.

Features and the `TrainJob` fields (sam3.config) that turn them on:
- model source (tiny | full | transformers folder) and input size: model_source, image_size
- detection or detection + segmentation: with_masks
- epochs or a fixed number of optimiser steps: loop.epochs, loop.max_steps
- batch size per process and gradient accumulation: loop.batch_size, loop.accumulation
- a seeded subset of N training images (RF100-VL "100 images"): loop.subset_images
- another annotation file of the train split, e.g. an ODinW few-shot file: train_annotations
- the recipe's optimiser, layer decay and schedule: optim
- the recipe's loss weights, or focal classification for training from scratch: loss
- freezing: loop.freeze (sam3.freeze modes)
- training from a feature cache of the frozen encoders instead of pixels (sam3.features): cache, feature_cache_dir
- bf16 / fp16 autocast on CUDA, fp32 on CPU: loop.amp_dtype; TF32 / cudnn: loop.tf32, loop.cudnn_benchmark
- memory and speed: loop.activation_checkpointing (sam3.memory), loop.compile (sam3.compiling)
- distributed data parallel from torchrun's environment (NCCL on GPU, gloo on CPU): ddp
- checkpoints every N steps, at each epoch end and at the end, atomic, resumed automatically:
  loop.checkpoint_every, loop.keep_last, loop.checkpoint_epochs; other params -> a new run
- divergence guard (roll back, lower lr, go on, up to a limit): guard
- logs: tqdm, TensorBoard, train_stats.jsonl, every loop.log_every steps
At the end the model is exported in transformers format to run_dir/model (`Sam3Model.from_pretrained` loads it).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from sam3.checkpoint import TrainState, epoch_checkpoint_name, latest_checkpoint, load_checkpoint, save_checkpoint
from sam3.coco import load_coco, split_annotation_path
from sam3.compiling import compile_vit_blocks
from sam3.config import DDPConfig, TrainJob
from sam3.data.collate import collate_prompts
from sam3.data.dataset import CocoPromptDataset
from sam3.data.sampler import EpochKeyed, ResumableSampler
from sam3.distributed import DistInfo, barrier, init_distributed
from sam3.engine import train_step
from sam3.errors import ConfigError
from sam3.features import CachedDetector, open_training_cache
from sam3.freeze import apply_freeze
from sam3.guard import DivergenceGuard
from sam3.losses import Criterion
from sam3.matcher import HungarianMatcher
from sam3.memory import enable_activation_checkpointing
from sam3.model import load_model, parameters_without_text_gradients
from sam3.optim import build_optimizer, set_lr

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The global torch seed of optimiser step `step` on `rank`: (seed, rank, step) hashed by numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0])


def train(job: TrainJob) -> Path:
    """Fine-tune as `job` says; return the exported model folder (transformers format)."""
    loop = job.loop
    dist_info = init_distributed(timeout_s=job.ddp.timeout_s)
    device = dist_info.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = loop.tf32
        torch.backends.cudnn.allow_tf32 = loop.tf32
        torch.backends.cudnn.benchmark = loop.cudnn_benchmark
    run_dir = Path(job.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if dist_info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(loop.seed + dist_info.rank)

    detector = load_model(job.model_source, image_size=job.image_size)
    detector.train()
    image_size = detector.config.vision_config.backbone_config.image_size
    unused = parameters_without_text_gradients(detector, with_masks=job.with_masks)
    counts = apply_freeze(detector.model, loop.freeze, also_freeze=unused)
    logger.info(
        "parameters: %s trainable, %s frozen (freeze=%s, %d tensors never get a gradient from text prompts)",
        f"{counts['trainable']:,}",
        f"{counts['frozen']:,}",
        loop.freeze,
        len(unused),
    )
    if loop.activation_checkpointing:
        logger.info(enable_activation_checkpointing(detector.model).summary())
    if loop.compile:
        logger.info("torch.compile: %d ViT blocks (compiled on their first step)", compile_vit_blocks(detector.model))
    detector.to(device)

    dataset = CocoPromptDataset(
        job.dataset_dir,
        "train",
        image_size=image_size,
        train=True,
        with_masks=job.with_masks,
        negatives=job.negatives,
        seed=loop.seed,
        num_negatives=loop.num_negatives,
        annotations_file=job.train_annotations,
    )
    collate = collate_prompts
    if job.cache.enabled:  # cached features in place of pixels: the same samples, the vision encoder skipped
        dataset = open_training_cache(
            job.feature_cache_dir,
            dataset,
            detector,
            job.cache,
            loop.freeze,
            model_source=job.model_source,
            negatives=job.negatives,
        )
        collate = dataset.collate
    indices = _subset(len(dataset), loop.subset_images, loop.seed)
    # (epoch, index) keys: one DataLoader for the whole run whose workers start once, not once per epoch (a
    # 40-image few-shot set on 2 CPU workers: 8.6 -> 59 images/s), and still draw each epoch's augmentation
    train_set = EpochKeyed(dataset, indices)
    sampler = ResumableSampler(len(train_set), loop.seed, True, dist_info.rank, dist_info.world_size, with_epoch=True)
    micro_per_epoch = math.ceil(sampler.per_rank / loop.batch_size)
    steps_per_epoch = max(1, micro_per_epoch // loop.accumulation)
    total_steps = loop.max_steps or steps_per_epoch * loop.epochs
    logger.info(
        "%d training images (%d per process), %d steps per epoch, %d steps in all",
        len(train_set),
        sampler.per_rank,
        steps_per_epoch,
        total_steps,
    )

    num_blocks = detector.config.vision_config.backbone_config.num_hidden_layers
    optimizer = build_optimizer(detector.model, job.optim, num_blocks)
    amp_dtype = AMP_DTYPES[loop.amp_dtype] if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    criterion = Criterion(matcher=HungarianMatcher(), with_masks=job.with_masks, **asdict(job.loss))
    guard = DivergenceGuard(**asdict(job.guard))

    state = TrainState()
    resume_from = latest_checkpoint(ckpt_dir)
    if resume_from is not None and _params_changed(resume_from, job.params):
        # a run folder holds one run: checkpoints of other params are set aside, never resumed (a DVC re-run
        # after a param change must train anew)
        if dist_info.is_main:
            _set_aside(ckpt_dir, resume_from)
        barrier()
        resume_from = None
    if resume_from is not None:
        state, _, _ = load_checkpoint(resume_from, detector.model, optimizer, scaler)
        guard.load_state_dict(state.guard)
        logger.info("resumed from %s at step %d", resume_from, state.step)
    else:
        # step 0 is the first "last good" checkpoint the divergence guard can roll back to
        _save(ckpt_dir, state, detector, optimizer, scaler, guard, job, dist_info)
    barrier()

    logs = _Logs(run_dir, dist_info, loop.wandb_project, job.params)
    if loop.mode == "val":  # the reference's "val" mode: evaluate the (resumed) model, train nothing
        metrics = _validate(detector, job, device, dist_info)
        logs.close()
        if metrics is not None and dist_info.is_main:
            (run_dir / "val_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
            logger.info("validation metrics written to %s", run_dir / "val_metrics.json")
        barrier()
        return run_dir / "val_metrics.json"
    validate_every = loop.val_every_epochs if loop.mode == "train" else 0

    model = _wrap_ddp(CachedDetector(detector) if job.cache.enabled else detector, job.ddp, dist_info)
    loader = DataLoader(
        train_set,
        batch_size=loop.batch_size,
        sampler=sampler,  # iterated anew each epoch after set_epoch
        collate_fn=collate,
        num_workers=loop.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=loop.num_workers > 0,
    )
    progress = _progress(total_steps, state.step, dist_info)
    started, images_seen = time.perf_counter(), 0
    try:  # close the bar and the logs on any exit, so an error message starts on a line of its own
        while state.step < total_steps:
            epoch, step_in_epoch = divmod(state.step, steps_per_epoch)
            sampler.set_epoch(epoch, start=step_in_epoch * loop.accumulation * loop.batch_size)
            micro: list = []
            rolled_back = False
            for batch in loader:
                micro.append(batch)
                if len(micro) < loop.accumulation:
                    continue
                set_lr(optimizer, state.step, total_steps, job.optim, scale=guard.lr_multiplier)
                # Dropout draws from the global RNG, which a new DataLoader iterator also consumes (its base seed): a
                # run resumed mid-epoch would draw other masks. Seeding it per (seed, rank, step) makes every step's
                # masks independent of where the run (re)started, on every rank.
                torch.manual_seed(step_seed(loop.seed, dist_info.rank, state.step))
                result = train_step(
                    model,
                    criterion,
                    optimizer,
                    micro,
                    device=device,
                    with_masks=job.with_masks,
                    amp_dtype=amp_dtype,
                    grad_clip=loop.grad_clip,
                    scaler=scaler,
                )
                images_seen += sum(len(b.image_ids) for b in micro) * dist_info.world_size
                micro = []
                reason = guard.check(_global_mean(result.loss, dist_info), step=state.step)
                if reason is not None:
                    multiplier = guard.register_rollback()  # raises DivergenceError past the limit
                    back = latest_checkpoint(ckpt_dir)
                    logger.warning(
                        "step %d: %s; rolling back to %s, lr x %.3g", state.step, reason, back.name, multiplier
                    )
                    logs.event({"step": state.step, "event": "rollback", "reason": reason, "lr_multiplier": multiplier})
                    # the guard's own state (rollback count) is NOT restored from the checkpoint
                    state, _, _ = load_checkpoint(back, detector.model, optimizer, scaler)
                    progress.n = state.step  # the bar goes back with the run
                    progress.refresh()
                    rolled_back = True
                    break
                epoch_step = state.step + 1 - epoch * steps_per_epoch
                state = TrainState(
                    step=state.step + 1, epoch=epoch, epoch_step=epoch_step, best_metric=state.best_metric
                )
                progress.update(1)
                if state.step % loop.log_every == 0 or state.step == total_steps:
                    # every rank joins the all_reduce of the terms; rank 0 writes them
                    result = replace(result, terms=_global_means(result.terms, dist_info))
                    logs.step(state.step, result, optimizer, images_seen / (time.perf_counter() - started), device)
                end_of_epoch = epoch_step == steps_per_epoch
                if state.step % loop.checkpoint_every == 0 or state.step == total_steps or end_of_epoch:
                    _save(ckpt_dir, state, detector, optimizer, scaler, guard, job, dist_info)
                    if end_of_epoch and epoch + 1 in loop.checkpoint_epochs:
                        _save(
                            ckpt_dir,
                            state,
                            detector,
                            optimizer,
                            scaler,
                            guard,
                            job,
                            dist_info,
                            epoch_checkpoint_name(epoch + 1),
                        )
                    barrier()  # a rollback on any rank must find this file complete
                if end_of_epoch and validate_every and (epoch + 1) % validate_every == 0:
                    metrics = _validate(detector, job, device, dist_info)
                    if metrics is not None:
                        key = "segm_AP" if job.with_masks else "bbox_AP"
                        logs.scalars(state.step, {f"val/{k}": metrics[k] for k in (key, "cgF1") if k in metrics})
                        if metrics.get(key) is not None:
                            best = state.best_metric
                            state.best_metric = metrics[key] if best is None else max(best, metrics[key])
                if state.step >= total_steps or end_of_epoch:
                    break
            if not rolled_back and micro:
                logger.info("epoch %d: %d trailing micro-batches left out of the last step", epoch, len(micro))
    finally:
        progress.close()
        logs.close()
    export_dir = run_dir / "model"
    if dist_info.is_main:
        detector.save_pretrained(export_dir)
        logger.info("exported the fine-tuned model to %s", export_dir)
    barrier()
    return export_dir


def _validate(detector, job: TrainJob, device: torch.device, dist_info: DistInfo) -> dict | None:
    """Metrics of the model on the dataset's valid split (rank 0 computes them; the others wait)."""
    from sam3.evaluation.ground_truth import scale_to_original, score_predictions
    from sam3.inference import predict_dataset

    gt_path = split_annotation_path(job.dataset_dir, "valid")
    if not gt_path.is_file():
        logger.warning("%s not found: no validation pass", gt_path)
        return None
    metrics = None
    if dist_info.is_main:
        detector.eval()
        predictions = predict_dataset(detector, job.dataset_dir, "valid", with_masks=job.with_masks, device=device)
        detector.train()
        metrics = score_predictions(scale_to_original(load_coco(gt_path)), predictions, job.with_masks)
        logger.info(
            "validation: bbox_AP %.4f%s",
            metrics["bbox_AP"],
            f", segm_AP {metrics['segm_AP']:.4f}" if "segm_AP" in metrics else "",
        )
    barrier()
    return metrics


def _wrap_ddp(detector: torch.nn.Module, ddp: DDPConfig, dist_info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel around the detector when there is more than one process."""
    if not dist_info.enabled:
        return detector
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    model = torch.nn.parallel.DistributedDataParallel(
        detector,
        device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None,
        find_unused_parameters=ddp.find_unused_parameters,
        static_graph=ddp.static_graph,
    )
    if ddp.gradient_compression == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif ddp.gradient_compression == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return model


# params that do not change what a run computes: a checkpoint made with other values of these is still resumed
_RESUME_SECTIONS = ("model", "train", "optim", "loss", "cache")
_RESUME_IGNORED = {
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_last",
    "train.checkpoint_epochs",
    "train.activation_checkpointing",  # same values, less memory
    "train.compile",  # same values, other kernels
}


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


def _global_mean(value: torch.Tensor, dist_info: DistInfo) -> float:
    """The loss averaged over ranks, so every rank takes the same divergence decision."""
    if dist_info.enabled:
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        value /= dist_info.world_size
    return float(value)


def _global_means(terms: dict[str, torch.Tensor], dist_info: DistInfo) -> dict[str, torch.Tensor]:
    """Each loss term averaged over ranks (one all_reduce), i.e. the term of the whole global batch.

    A rank's term is its share S_r / N of the global sum (N: the normaliser averaged over ranks, `sam3.losses`), so
    the global batch's term S / (W N) is the mean of the ranks' terms; rank 0's own term is not it.
    """
    if not dist_info.enabled:
        return terms
    stacked = torch.stack([value.detach().float() for value in terms.values()])
    torch.distributed.all_reduce(stacked)
    return dict(zip(terms, stacked / dist_info.world_size, strict=True))


def _subset(size: int, subset_images: int | None, seed: int) -> list[int] | None:
    """Seeded random subset of the training images (sorted), or None for all of them."""
    if subset_images is None or subset_images >= size:
        return None
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:subset_images].tolist())


def _save(ckpt_dir, state, detector, optimizer, scaler, guard, job: TrainJob, dist_info: DistInfo, name=None) -> None:
    if not dist_info.is_main:
        return
    state.guard = guard.state_dict()
    save_checkpoint(
        ckpt_dir,
        state.step,
        detector.model,
        optimizer,
        None,
        scaler,
        state,
        job.params,
        keep_last=job.loop.keep_last,
        name=name,
    )


def _progress(total: int, done: int, dist_info: DistInfo):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", disable=not dist_info.is_main)


class _Logs:
    """TensorBoard scalars, train_stats.jsonl and optionally Weights & Biases, written by rank 0 only."""

    def __init__(
        self, run_dir: Path, dist_info: DistInfo, wandb_project: str | None = None, params: dict | None = None
    ):
        self.enabled = dist_info.is_main
        self.wandb = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.jsonl = (run_dir / "train_stats.jsonl").open("a", encoding="utf-8")
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    "train.wandb_project is set but the wandb package is not installed: pip install wandb"
                ) from None
            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=params or {}, resume="allow")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if v is not None}, step=step)
        self.event({"step": step, **values})

    def step(self, step, result, optimizer, images_per_s, device) -> None:
        if not self.enabled:
            return
        # .item() here only: these are the host syncs of a log step
        record = {"step": step, **{k: float(v) for k, v in result.terms.items()}}
        record["grad_norm"] = float(result.grad_norm) if result.grad_norm is not None else None
        for group in optimizer.param_groups:
            record.setdefault(f"lr/{group['component']}", group["lr"])
        record["images_per_s"] = images_per_s
        if device.type == "cuda":
            record["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        self.scalars(step, {key: value for key, value in record.items() if key != "step"})

    def event(self, record: dict) -> None:
        if self.enabled:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
            if self.wandb is not None:
                self.wandb.finish()
