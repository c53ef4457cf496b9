"""Typed configuration of a training run, one dataclass per params.yaml section, with no heavy imports.

`pipeline.params` builds these from params.yaml (so `python -m pipeline --help` stays fast) and the library
(`sam3.optim`, `sam3.trainer`) reads them as plain values. Every set of choices is one `Literal` type here: the
params loader rejects any other value at load time (naming the key and the allowed values), and the tuples of
choices (argparse choices, messages) are derived from it with `typing.get_args`. Constants that several modules
share (the recipe's gradient clip, the inference chunk and top-k, SAM 3's input side) are defined here once too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from sam3.coco import ANNOTATIONS_FILE

FreezeMode = Literal["none", "vision", "vision_text", "heads"]  # what trains (sam3.freeze)
AmpDtype = Literal["bf16", "fp16", "none"]  # autocast dtype of a CUDA run
TrainMode = Literal["train", "train_only", "val"]
# the validation metric that picks the best checkpoint and drives early stopping (sam3.training.best); the higher
# the better. auto: segm_AP in segmentation mode, bbox_AP in detection mode
BestMetric = Literal["auto", "bbox_AP", "segm_AP", "cgF1"]
ExportWeights = Literal["last", "best"]  # which weights run_dir/model holds: the final step's, or best.pt's
ClassLoss = Literal["iabce", "focal"]  # sam3.losses: the recipe's IoU-aware BCE, or focal for training from scratch
GradientCompression = Literal["none", "fp16", "bf16"]  # dtype of DDP's gradient all-reduce
CacheDtype = Literal["fp16", "fp32"]  # storage dtype of the feature cache (sam3.features)
Device = Literal["auto", "cpu", "cuda"]  # --device of the commands that run a model
Auto = Literal["auto"]  # a setting worked out from the machine (train.num_workers)
DDPStrategy = Literal["ddp", "zero"]  # how several processes hold the optimiser state (sam3.training.ddp)
AdapterKind = Literal["none", "lora", "dora"]  # low-rank adapters through peft (sam3.adapters); none: no adapter
# the parts of SAM 3 an adapter can go into; each names the Linear layers it adapts (sam3.adapters.PART_PATTERNS)
AdapterPart = Literal["vision_attention", "vision_mlp", "text", "detr_encoder", "detr_decoder", "mask_decoder"]

FREEZE_MODES: tuple[str, ...] = get_args(FreezeMode)
CLASS_LOSSES: tuple[str, ...] = get_args(ClassLoss)
CACHE_DTYPES: tuple[str, ...] = get_args(CacheDtype)
DEVICE_CHOICES: tuple[str, ...] = get_args(Device)
ADAPTER_KINDS: tuple[str, ...] = get_args(AdapterKind)
ADAPTER_PARTS: tuple[str, ...] = get_args(AdapterPart)
VISION_PARTS = ("vision_attention", "vision_mlp")  # the adapter parts inside the vision encoder

GRAD_CLIP = 0.1  # the recipe's max global gradient L2 norm (docs/RECIPE.md section 4)
DEFAULT_PROMPT_CHUNK = 16  # prompts per decoder call at inference; bounds memory at 1008 px (Q pairs of 200 queries)
DEFAULT_MAX_DETS = 100  # detections kept per image: the reference's top 100, as COCO AP reads at most 100
TRAIN_STATS_FILE = "train_stats.jsonl"  # a run's log, one JSON object per line, in its run folder (sam3.training.logs)
MAX_TARGETS = 200  # instances one (image, prompt) query may hold: the reference drops queries with more
SAM3_IMAGE_SIZE = 1008  # SAM 3's input side (the full model's; the tiny test model's is 224)
META_DROP_PATH = 0.1  # the reference's stochastic depth rate for SAM 3's ViT (its last block; linear from 0)


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
    num_workers: int | Auto = "auto"  # loader processes; auto: from the CPU count (sam3.training.loader)
    subset_images: int | None = None  # a seeded random subset of N training images (RF100-VL "100 images")
    num_negatives: int | None = None  # None: every absent category is a negative query (the reference)
    # the prompt budget: every positive, then negatives drawn per (epoch, image) up to this many prompts in all
    # (sam3.data.dataset); None: every prompt (the reference). Bounds the DETR's memory and time per image.
    max_prompts_per_image: int | None = None
    seed: int = 0
    freeze: FreezeMode = "none"  # what trains (sam3.freeze)
    grad_clip: float = GRAD_CLIP
    amp_dtype: AmpDtype = "bf16"  # CUDA only; CPU runs fp32
    tf32: bool = False  # TF32 matmuls / convolutions on Ampere+ GPUs (the reference: off, full fp32 matmuls)
    cudnn_benchmark: bool = False
    activation_checkpointing: bool = False  # recompute trainable encoder blocks in the backward (sam3.memory)
    compile: bool = False  # torch.compile the ViT blocks (sam3.compiling); pays on GPUs for long runs
    checkpoint_every: int = 100  # optimiser steps
    checkpoint_epochs: list[int] = field(default_factory=list)  # extra checkpoints kept for good at these epochs
    keep_last: int = 3
    # write checkpoints from a CPU copy in a background thread (sam3.checkpoint_writer), the step going on; the copy's
    # buffers stay for the run (one checkpoint's size in host memory). false: write in the training thread
    checkpoint_background: bool = True
    keep_best: bool = True  # also keep checkpoints/best.pt, the weights of the best validation (needs validation)
    log_every: int = 10
    mode: TrainMode = "train"  # train (validating every val_every_epochs) | train_only | val (evaluate, no training)
    val_every_epochs: int = 0  # box/mask AP on the valid split every K epochs and at the last step; 0: never
    best_metric: BestMetric = "auto"  # the validation metric of best.pt and early stopping
    patience: int | None = 0  # stop after N validations without improvement of best_metric; 0 or None: never
    export: ExportWeights = "last"  # run_dir/model holds the last step's weights, or best.pt's (needs validation)
    wandb_project: str | None = None  # also log to Weights & Biases under this project (needs `pip install wandb`)
    # the retention regulariser (sam3.retain): keep the outputs on prompts the data does not teach (phrases of the
    # phrase bank, train.retain_prompts per step) close to the starting model's, weighted by loss.retain_weight
    retain: bool = False
    retain_prompts: int = 8
    # CPU threads of torch's kernels (None: torch's default, one per core). The sum order of a CPU matmul depends on
    # the thread count, so a fixed count gives the same weights on machines with different numbers of cores.
    threads: int | None = None


def loop_problem(loop: LoopConfig, with_masks: bool) -> str | None:
    """What is wrong with the settings of `loop` (None: nothing), as a message naming the key: the ranges of the
    prompt budget and the loader's workers, and the validation-driven settings.

    Best checkpoint, early stopping and exporting the best weights need validations: train.mode train with
    train.val_every_epochs >= 1 (mode val trains and exports nothing, so they do not matter there). segm_AP exists
    in segmentation mode only. Checked by the params loader and again by `sam3.trainer.train`, before anything is
    written.
    """
    validates = loop.mode == "val" or (loop.mode == "train" and loop.val_every_epochs >= 1)
    how = "set train.val_every_epochs >= 1 with train.mode train"
    if loop.patience is not None and loop.patience < 0:
        return f"train.patience = {loop.patience}: must be >= 0 (0 or null: no early stopping)"
    if loop.patience and not validates:
        return f"train.patience = {loop.patience} needs validation: {how}, or set train.patience 0"
    if loop.export == "best" and not validates:
        return f"train.export = 'best' needs validation: {how}, or set train.export last"
    if loop.export == "best" and not loop.keep_best:
        return "train.export = 'best' needs train.keep_best true (best.pt holds those weights)"
    if loop.max_prompts_per_image is not None and loop.max_prompts_per_image < 1:
        return f"train.max_prompts_per_image = {loop.max_prompts_per_image}: must be >= 1, or null (every prompt)"
    if isinstance(loop.num_workers, int) and loop.num_workers < 0:
        return f"train.num_workers = {loop.num_workers}: must be >= 0, or auto"
    if loop.retain and loop.retain_prompts < 1:
        return f"train.retain_prompts = {loop.retain_prompts}: must be >= 1 with train.retain true"
    if loop.best_metric == "segm_AP" and not with_masks:
        return "train.best_metric = 'segm_AP' needs model.mode segmentation (detection mode has no masks)"
    return None


@dataclass
class ModelOptions:
    """How the detector runs in training (`model` section; docs/RECIPE.md section 3). Defaults: the reference's."""

    one_to_many: bool = True  # DAC: the N queries run a second time, matched one-to-many (sam3.decoder_pass)
    text_geometry_token: bool = True  # prompts end with the geometry encoder's CLS token (Sam3Detector)
    drop_path: float = META_DROP_PATH  # stochastic depth of the ViT blocks, 0 .. rate over the blocks (sam3.drop_path)


@dataclass
class LossConfig:
    """Criterion weights (`loss` section); defaults are the recipe's (docs/RECIPE.md section 3)."""

    class_loss: ClassLoss = "iabce"  # iabce (the recipe) | focal (training from scratch)
    pos_weight: float = 10.0  # 10 for RF100-VL, 5 for ODinW
    weight_bbox: float = 5.0
    weight_giou: float = 2.0
    weight_ce: float = 20.0
    weight_presence: float = 20.0
    weight_mask: float = 200.0
    weight_dice: float = 10.0
    ce_on_negative_prompts: bool = False
    scale_by_sqrt_num_queries: bool = True  # the reference's sqrt(queries on the rank) scale of the total
    # the one-to-many (DAC) branch, used when the model runs its o2m queries (model.one_to_many)
    o2m_weight: float = 2.0  # every o2m term is multiplied by it
    o2m_topk: int = 4  # a slot matches a target when its score is above the (1 - topk / N) quantile of the N slots
    o2m_threshold: float = 0.4  # ... and above this (score = o2m_alpha * p + (1 - o2m_alpha) * IoU)
    o2m_alpha: float = 0.3
    o2m_matcher_on_aux: bool = False  # earlier layers' o2m outputs: one-to-many (true) or Hungarian (the recipe)
    # train.retain: weight of the retention term (BCE of the fine-tuned presence and query logits against the
    # starting model's probabilities on the retention prompts, sam3.retain)
    retain_weight: float = 1.0


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
    gradient_compression: GradientCompression = "none"  # all-reduce gradients in lower precision
    strategy: DDPStrategy = "ddp"  # ddp: every rank holds all optimiser state; zero: each holds 1/W of it
    timeout_s: int = 1800


@dataclass
class CacheConfig:
    """The feature cache of frozen encoders (`cache` section; sam3.features): built once by
    `python -m pipeline cache-features`, read by training instead of pixels when enabled."""

    enabled: bool = False  # train from the cache (needs train.freeze vision, vision_text or heads)
    views: int = 1  # cached geometries per image: 0 the plain warp, 1.. seeded random warp-pads (1: no augmentation)
    dtype: CacheDtype = "fp16"  # how the features are stored
    seed: int = 0  # draws the views' warp-pads


@dataclass
class AdapterConfig:
    """Low-rank adapters (`adapter` section; sam3.adapters): peft's LoRA or DoRA in the Linear layers of `parts`.

    An adapted layer's own weight is frozen and only its adapter trains (W x + (alpha / rank) B A x); every other
    parameter trains or not as train.freeze says. Typical: train.freeze heads or vision with an adapter in the ViT
    and the DETR encoder, the decoder heads trained in full.
    """

    kind: AdapterKind = "none"
    rank: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input
    parts: list[AdapterPart] = field(
        default_factory=lambda: ["vision_attention", "vision_mlp", "detr_encoder", "detr_decoder"]
    )
    # base learning rate of every adapter weight, with no layer decay (adapters start from B = 0 and need a larger
    # rate than the weights they adapt); None: the lr of the part they are in, as for the part's own weights
    lr: float | None = 1e-4


def adapter_problem(adapter: AdapterConfig) -> str | None:
    """What is wrong with the `adapter` settings (None: nothing), as a message naming the key."""
    if adapter.kind == "none":
        return None
    if adapter.rank < 1:
        return f"adapter.rank = {adapter.rank}: must be >= 1"
    if adapter.alpha <= 0:
        return f"adapter.alpha = {adapter.alpha}: must be > 0"
    if not 0 <= adapter.dropout < 1:
        return f"adapter.dropout = {adapter.dropout}: must be in [0, 1)"
    if not adapter.parts:
        return f"adapter.parts is empty: name at least one of {', '.join(ADAPTER_PARTS)}, or set adapter.kind none"
    if len(set(adapter.parts)) != len(adapter.parts):
        return f"adapter.parts {adapter.parts} names a part twice"
    if adapter.lr is not None and adapter.lr <= 0:
        return f"adapter.lr = {adapter.lr}: must be > 0, or null (the part's own learning rate)"
    return None


def adapts_vision(config: AdapterConfig) -> bool:
    return config.kind != "none" and any(part in VISION_PARTS for part in config.parts)


def adapts_text(config: AdapterConfig) -> bool:
    return config.kind != "none" and "text" in config.parts


def adapter_cache_problem(config: AdapterConfig) -> str | None:
    """Why the feature cache cannot serve a run with this adapter (None: it can): cached vision features are the
    un-adapted encoder's, and an adapter in the ViT changes them at every step. Adapters elsewhere are fine; one in
    the text encoder only means prompt embeddings are computed, not read from the cache."""
    if not adapts_vision(config):
        return None
    vision = [part for part in config.parts if part in VISION_PARTS]
    return (
        f"cache.enabled with an adapter in the vision encoder (adapter.parts {vision}): the cache holds the "
        "un-adapted encoder's features, which the adapter changes at every step; remove the vision parts from "
        "adapter.parts, or set cache.enabled false"
    )


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
    model: ModelOptions = field(default_factory=lambda: ModelOptions())
    loop: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # train.retain: the phrases the retention regulariser draws its prompts from (the phrase bank without the
    # dataset's categories; the pipeline fills it, the library has no bank of its own)
    retain_phrases: list[str] = field(default_factory=list)
    feature_cache_dir: str | None = None  # the cache folder read when cache.enabled
    params: dict = field(default_factory=dict)  # the resolved params, stored in every checkpoint
