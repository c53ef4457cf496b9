"""Typed configuration of VOS fine-tuning, one dataclass per sub-section of params.yaml's `vos:` section.

Defaults are SAM 2.1's MOSE fine-tuning recipe (docs/VOS.md lists each with its meaning). No heavy imports here:
`pipeline.params` builds these and the library reads them as plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

TrackerKind = Literal["sam2.1", "sam3"]  # transformers' Sam2VideoModel / Sam3TrackerVideoModel
VosFreeze = Literal["none", "image_encoder"]  # what stays frozen in VOS training
TRACKER_KINDS: tuple[str, ...] = get_args(TrackerKind)
VOS_FREEZE_MODES: tuple[str, ...] = get_args(VosFreeze)
TINY_SOURCES = {"tiny-sam2.1": "sam2.1", "tiny-sam3": "sam3"}  # model.source values that build a small random model
IMAGE_SIZE = {"sam2.1": 1024, "sam3": 1008}  # each full model's input side


@dataclass
class ClipConfig:
    """How training clips are drawn and augmented (the reference's sampler and transforms)."""

    num_frames: int = 8  # consecutive frames per clip, from a random start
    max_objects: int = 3  # at most this many objects, a random subset of those visible in the clip's first frame
    multiplier: int = 2  # each video is drawn this many times per epoch
    hflip: float = 0.5  # probability of a horizontal flip (the same for every frame of a clip)
    degrees: float = 25.0  # random affine rotation range, +-degrees (the same for every frame)
    shear: float = 20.0  # random affine shear range, +-degrees
    brightness: float = 0.1  # clip-wide colour jitter
    contrast: float = 0.03
    saturation: float = 0.03
    grayscale: float = 0.05  # probability that the clip turns grey
    frame_brightness: float = 0.1  # then per-frame colour jitter
    frame_contrast: float = 0.05
    frame_saturation: float = 0.05


@dataclass
class PromptConfig:
    """The prompts and correction clicks of a training clip (the reference's SAM2Train probabilities)."""

    prob_points: float = 0.5  # a conditioning frame gets clicks with this probability, else the ground-truth mask
    prob_box: float = 0.5  # of the click prompts, this share is a box instead
    max_init_cond_frames: int = 2  # 1..this many conditioning frames, the first frame always one
    max_correction_frames: int = 2  # 1..this many frames get correction clicks, the first included
    correction_clicks: int = 7  # clicks per corrected frame, each from the current error region
    prob_click_from_gt: float = 0.1  # a correction click is drawn from the ground-truth mask instead


@dataclass
class VosLossConfig:
    """Weights and shapes of the multi-step multi-mask loss (sam3.video.losses)."""

    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    object_score_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    object_score_alpha: float = -1.0  # negative: no alpha weighting
    object_score_gamma: float = 0.0  # 0: plain binary cross-entropy
    supervise_all_iou: bool = True  # the IoU head learns on every mask, not only the one trained


@dataclass
class VosOptimConfig:
    """AdamW, cosine from lr to lr * final_factor, layer decay over the image encoder's trunk."""

    lr: float = 5e-6  # everything but the image encoder
    lr_vision: float = 3e-6  # the image encoder
    final_factor: float = 0.1  # cosine ends at a tenth
    layer_decay: float = 0.9  # trunk block j of L: lr x decay^(L - j); the patch embedding x decay^(L + 1)
    weight_decay: float = 0.1  # 0 on biases and norms
    grad_clip: float = 0.1  # max global gradient L2 norm
    warmup: int = 0  # linear warmup steps (the reference has none)


@dataclass
class VosLoopConfig:
    """The run's length, batch, precision, checkpoints and logs."""

    epochs: int = 40
    max_steps: int | None = None  # when set, the run's length in optimiser steps (epochs ignored)
    accumulation: int = 1  # clips per optimiser step and process (the reference: 1 per GPU)
    seed: int = 0
    freeze: VosFreeze = "none"
    amp_dtype: Literal["bf16", "fp16", "none"] = "bf16"  # autocast on CUDA; fp32 on CPU
    drop_path: float = 0.1  # stochastic depth in the image encoder's trunk (where the model has it)
    checkpoint_every: int = 100  # steps; also at the end
    keep_last: int = 2
    log_every: int = 10
    threads: int | None = None  # torch CPU threads (None: torch's default)
    num_workers: int = 0


@dataclass
class VosJob:
    """One VOS training run: where the data and the run live, the model, and every section above."""

    dataset_dir: str  # DAVIS/MOSE layout (JPEGImages/, Annotations/), preprocessed to the model's size
    run_dir: str
    model_source: str = "tiny-sam2.1"  # tiny-sam2.1 | tiny-sam3 | a transformers folder (Sam2Video / Sam3TrackerVideo)
    image_size: int | None = None  # None: the model's own
    train_list: str | None = None  # a file of video names (DAVIS ImageSets style); None: every video
    clip: ClipConfig = field(default_factory=ClipConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    loss: VosLossConfig = field(default_factory=VosLossConfig)
    optim: VosOptimConfig = field(default_factory=VosOptimConfig)
    loop: VosLoopConfig = field(default_factory=VosLoopConfig)
    params: dict = field(default_factory=dict)  # the params as given, stored in checkpoints and the model card
