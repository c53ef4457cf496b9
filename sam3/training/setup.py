"""Everything a run trains with, built in a fixed order: `build_run(job, dist_info) -> RunParts`.

The order matters: the global RNG is seeded with (train.seed + rank) first, then the model's random init draws
from it, so two runs of the same job build the same model. The training data are a `CocoPromptDataset` (or the
feature cache standing in for its pixels), optionally a seeded subset, keyed by (epoch, index) so one DataLoader
serves the whole run. Steps per epoch, with B = train.batch_size, A = train.accumulation and I_r the images of
this rank:

    steps_per_epoch = max(1, ceil(I_r / B) // A)        total_steps = train.max_steps or steps_per_epoch * epochs
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sam3.adapters import adapter_summary, attach_adapter, set_adapter_trainable
from sam3.compiling import compile_vit_blocks
from sam3.config import AmpDtype, TrainJob, adapts_vision
from sam3.data.collate import collate_prompts
from sam3.data.dataset import CocoPromptDataset
from sam3.data.sampler import EpochKeyed, ResumableSampler
from sam3.distributed import DistInfo
from sam3.drop_path import attach_drop_path
from sam3.errors import ConfigError
from sam3.features import open_training_cache
from sam3.freeze import apply_freeze, freezes_vision, parameter_counts
from sam3.guard import DivergenceGuard
from sam3.losses import Criterion
from sam3.memory import enable_activation_checkpointing
from sam3.model import Sam3Detector, load_model, parameters_without_text_gradients
from sam3.optim import build_optimizer
from sam3.retain import RetainCriterion

logger = logging.getLogger(__name__)

# train.amp_dtype -> the autocast dtype of a CUDA run (a CPU run is fp32 whatever it says)
AMP_DTYPES: dict[AmpDtype, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


@dataclass
class RunParts:
    """What one run trains with (built by `build_run`)."""

    detector: Sam3Detector  # frozen as train.freeze says, on the run's device, in train mode
    train_set: EpochKeyed  # (epoch, index) keys over the training samples (or their cached features)
    collate: Callable  # of the training samples: collate_prompts, or the feature cache's own
    sampler: ResumableSampler  # this rank's share of each epoch, resumable mid-epoch
    steps_per_epoch: int
    total_steps: int
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 on CUDA only
    amp_dtype: torch.dtype | None  # None: fp32
    criterion: Criterion | RetainCriterion
    guard: DivergenceGuard
    # train.retain without an adapter: the starting model, frozen, the teacher of sam3.retain (None otherwise)
    retain_reference: Sam3Detector | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_run(job: TrainJob, dist_info: DistInfo) -> RunParts:
    """Seed, then build the model, the training data and sampler, the optimiser, the criterion and the guard."""
    loop, device = job.loop, dist_info.device
    seed_everything(loop.seed + dist_info.rank)
    detector = build_detector(job, device)
    train_set, collate = build_train_set(job, detector)
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
    criterion = Criterion(job.loss, with_masks=job.with_masks)
    reference = None
    if loop.retain:
        if job.cache.enabled:
            raise ConfigError("train.retain with cache.enabled: the regulariser needs the images; set one of them off")
        criterion = RetainCriterion(criterion, job.loss.retain_weight)
        reference = None if job.adapter.kind != "none" else build_reference(job, device)
    amp_dtype = AMP_DTYPES[loop.amp_dtype] if device.type == "cuda" else None
    return RunParts(
        detector=detector,
        train_set=train_set,
        collate=collate,
        sampler=sampler,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        optimizer=build_optimizer(
            detector.model,
            job.optim,
            num_blocks,
            shard=shards_optimizer(job, dist_info),
            adapter_lr=job.adapter.lr if job.adapter.kind != "none" else None,
        ),
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        amp_dtype=amp_dtype,
        criterion=criterion,
        guard=DivergenceGuard(job.guard),
        retain_reference=reference,
    )


def build_reference(job: TrainJob, device: torch.device) -> Sam3Detector:
    """The starting model of a full fine-tune, frozen in eval mode: the teacher of train.retain (sam3.retain).
    Loaded as `build_detector` loads it (same source, size and seed: the same weights), without training options."""
    reference = load_model(
        job.model_source, image_size=job.image_size, text_geometry_token=job.model.text_geometry_token
    )
    logger.info("train.retain: a frozen copy of the starting model is the teacher (the model's size again in memory)")
    return reference.requires_grad_(False).eval().to(device)


def shards_optimizer(job: TrainJob, dist_info: DistInfo) -> bool:
    """Whether the optimiser state is sharded (ddp.strategy zero over more than one process)."""
    if job.ddp.strategy != "zero":
        return False
    if not dist_info.enabled:
        logger.info("ddp.strategy zero in a single process: nothing to shard, a plain AdamW")
        return False
    world = dist_info.world_size
    logger.info("ddp.strategy zero: each of the %d processes keeps 1/%d of AdamW's moments", world, world)
    return True


def build_detector(job: TrainJob, device: torch.device) -> Sam3Detector:
    """The model of `job.model_source`, in train mode, with the adapter of `job.adapter` (sam3.adapters), frozen as
    train.freeze says (plus the parameters text prompts never reach; an adapted layer's own weight always), with
    activation checkpointing and compiled ViT blocks when asked, on `device`."""
    loop, options = job.loop, job.model
    detector = load_model(
        job.model_source,
        image_size=job.image_size,
        one_to_many=options.one_to_many,
        text_geometry_token=options.text_geometry_token,
    )
    detector.train()
    if job.adapter.kind != "none":  # before freezing: the adapted names (base_layer, lora_A, ...) exist from here on
        attach_adapter(detector, job.adapter)
    unused = parameters_without_text_gradients(detector, with_masks=job.with_masks)
    counts = apply_freeze(detector.model, loop.freeze, also_freeze=unused)
    if job.adapter.kind != "none":
        set_adapter_trainable(detector.model, keep_frozen=unused)
        counts = parameter_counts(detector.model)
        logger.info(adapter_summary(detector.model))
    logger.info(
        "parameters: %s trainable, %s frozen (freeze=%s, adapter=%s, %d tensors never get a gradient from text "
        "prompts)",
        f"{counts['trainable']:,}",
        f"{counts['frozen']:,}",
        loop.freeze,
        job.adapter.kind,
        len(unused),
    )
    vit_trains = not freezes_vision(loop.freeze) or adapts_vision(job.adapter)
    if options.drop_path > 0 and vit_trains:
        # stochastic depth only where the ViT trains: in a frozen encoder it would only add noise to its features
        rates = attach_drop_path(detector.model, options.drop_path).rates
        logger.info("drop-path on %d ViT blocks, %.3g .. %.3g", len(rates), rates[0], rates[-1])
    if loop.activation_checkpointing:
        logger.info(enable_activation_checkpointing(detector.model).summary())
    if loop.compile:
        logger.info("torch.compile: %d ViT blocks (compiled on their first step)", compile_vit_blocks(detector.model))
    return detector.to(device)


def build_train_set(job: TrainJob, detector: Sam3Detector) -> tuple[EpochKeyed, Callable]:
    """The training samples keyed by (epoch, index), and their collate function."""
    loop = job.loop
    dataset = CocoPromptDataset(
        job.dataset_dir,
        "train",
        image_size=detector.config.vision_config.backbone_config.image_size,
        train=True,
        with_masks=job.with_masks,
        negatives=job.negatives,
        seed=loop.seed,
        num_negatives=loop.num_negatives,
        annotations_file=job.train_annotations,
        max_prompts_per_image=loop.max_prompts_per_image,
    )
    collate = collate_prompts
    if job.cache.enabled:  # cached features in place of pixels: the same samples, the vision encoder skipped
        dataset = open_training_cache(
            job.feature_cache_dir,
            dataset,
            detector,
            job.cache,
            loop.freeze,
            adapter=job.adapter,
            model_source=job.model_source,
            negatives=job.negatives,
        )
        collate = dataset.collate
    indices = subset_indices(len(dataset), loop.subset_images, loop.seed)
    # (epoch, index) keys: one DataLoader for the whole run whose workers start once, not once per epoch (a
    # 40-image few-shot set on 2 CPU workers: 8.6 -> 59 images/s), and still draw each epoch's augmentation
    return EpochKeyed(dataset, indices), collate


def subset_indices(size: int, subset_images: int | None, seed: int) -> list[int] | None:
    """Seeded random subset of the training images (sorted), or None for all of them."""
    if subset_images is None or subset_images >= size:
        return None
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:subset_images].tolist())
