"""Typed configuration of a training run, one dataclass per params.yaml section, with no heavy imports.

`pipeline.params` builds these from params.yaml (so `python -m pipeline --help` stays fast) and the library
(`sam3.optim`, `sam3.trainer`) reads them as plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sam3.coco import ANNOTATIONS_FILE

AMP_CHOICES: tuple[str, ...] = ("bf16", "fp16", "none")
CACHE_DTYPES: tuple[str, ...] = ("fp16", "fp32")
TRAIN_MODES: tuple[str, ...] = ("train", "train_only", "val")
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")  # --device of the commands that run a model


@dataclass
class OptimConfig:
    lr_detr: float = 8e-5
    lr_vision: float = 2.5e-5
    lr_text: float = 5e-6
    layer_decay: float = 0.9
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup: int = 20
    cooldown: int = 20
    timescale: int = 20


@dataclass
class LoopConfig:
    """The training loop (`train` section of params.yaml)."""

    epochs: int = 20
    max_steps: int | None = None  # optimiser steps; overrides epochs when set
    batch_size: int = 1  # images per process per micro-batch
    accumulation: int = 1  # micro-batches per optimiser step
    num_workers: int = 0
    subset_images: int | None = None  # a seeded random subset of N training images (RF100-VL "100 images")
    num_negatives: int | None = None  # None: every absent category is a negative query (the reference)
    seed: int = 0
    freeze: str = "none"  # none | vision | vision_text | heads (sam3.freeze)
    grad_clip: float = 0.1
    amp_dtype: str = "bf16"  # bf16 | fp16 | none (CUDA only; CPU runs fp32)
    tf32: bool = True  # TF32 matmuls / convolutions on Ampere+ GPUs
    cudnn_benchmark: bool = False
    activation_checkpointing: bool = False  # recompute trainable encoder blocks in the backward (sam3.memory)
    compile: bool = False  # torch.compile the ViT blocks (sam3.compiling); pays on GPUs for long runs
    checkpoint_every: int = 100  # optimiser steps
    checkpoint_epochs: list[int] = field(default_factory=list)  # extra checkpoints kept for good at these epochs
    keep_last: int = 3
    log_every: int = 10
    mode: str = "train"  # train (validating every val_every_epochs) | train_only | val (evaluate only, no training)
    val_every_epochs: int = 0  # validation box/mask AP on the valid split every K epochs; 0: never
    wandb_project: str | None = None  # also log to Weights & Biases under this project (needs `pip install wandb`)


@dataclass
class LossConfig:
    """Criterion weights (`loss` section); defaults are the recipe's (SAM3_RECIPE section 3)."""

    class_loss: str = "iabce"  # iabce (the recipe) | focal (training from scratch)
    pos_weight: float = 10.0  # 10 for RF100-VL, 5 for ODinW
    weight_bbox: float = 5.0
    weight_giou: float = 2.0
    weight_ce: float = 20.0
    weight_presence: float = 20.0
    weight_mask: float = 200.0
    weight_dice: float = 10.0
    ce_on_negative_prompts: bool = False
    scale_by_sqrt_num_queries: bool = False


@dataclass
class GuardConfig:
    """Divergence guard (`guard` section): roll back on a non-finite loss or a spike over the running median."""

    spike_factor: float = 10.0
    window: int = 50
    min_history: int = 10
    lr_factor: float = 0.5
    max_rollbacks: int = 3


@dataclass
class DDPConfig:
    """DistributedDataParallel options (`ddp` section)."""

    find_unused_parameters: bool = False
    static_graph: bool = False
    gradient_compression: str = "none"  # none | fp16 | bf16: all-reduce gradients in lower precision
    timeout_s: int = 1800


@dataclass
class CacheConfig:
    """The feature cache of frozen encoders (`cache` section; sam3.features): built once by
    `python -m pipeline cache-features`, read by training instead of pixels when enabled."""

    enabled: bool = False  # train from the cache (needs train.freeze vision, vision_text or heads)
    views: int = 1  # cached geometries per image: 0 the plain warp, 1.. seeded random warp-pads (1: no augmentation)
    dtype: str = "fp16"  # fp16 | fp32: how the features are stored
    seed: int = 0  # draws the views' warp-pads


@dataclass
class TrainJob:
    """Everything one training run needs, as plain values."""

    run_dir: str
    dataset_dir: str
    negatives: str | None = None
    train_annotations: str = ANNOTATIONS_FILE  # the train split's annotation file (or a few-shot file beside it)
    model_source: str = "tiny"
    image_size: int | None = None
    with_masks: bool = False
    loop: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    feature_cache_dir: str | None = None  # the cache folder read when cache.enabled
    params: dict = field(default_factory=dict)  # the resolved params, stored in every checkpoint
