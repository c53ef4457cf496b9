"""params.yaml's `vos:` section: video object segmentation fine-tuning, typed.

    vos:
      dataset:   name, raw (a MOSE-style root: train/ and valid/, each JPEGImages/ + Annotations/)
      preprocess: size (longer side of the frames; the model's input side: 1024 SAM 2.1, 1008 SAM 3)
      model:     source (tiny-sam2.1 | tiny-sam3 | a transformers folder), image_size
      clip, prompts, loss, optim, train: sam3.video.config's sections (the recipe's defaults)
      evaluate:  split, baseline (the starting model's J&F beside the fine-tuned one's), strips

Loaded with the rest of params.yaml by `pipeline.params.load_params` (the same unknown-key and type checks);
`vos_job` turns it into the plain-valued `sam3.video.config.VosJob` the library trains from. Keys are three deep
(`vos.train.max_steps`), and `--set vos.train.max_steps=50` overrides them like any other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from sam3.video.config import (
    TINY_SOURCES,
    ClipConfig,
    PromptConfig,
    VosJob,
    VosLoopConfig,
    VosLossConfig,
    VosOptimConfig,
)


@dataclass
class VosDatasetParams:
    name: str = "vos_shapes"
    raw: str = "data/raw/vos_shapes"  # MOSE-style root: train/ and valid/ (JPEGImages/, Annotations/)


@dataclass
class VosPreprocessParams:
    size: int = 1024  # frames resized so their longer side is this (SAM 2.1: 1024, SAM 3: 1008)


@dataclass
class VosModelParams:
    source: str = "tiny-sam2.1"  # tiny-sam2.1 | tiny-sam3 | a transformers folder (Sam2Video / Sam3TrackerVideo)
    image_size: int | None = None  # None: the model's own


@dataclass
class VosEvaluateParams:
    split: str = "valid"  # the split scored (every frame annotated: our own held-out J&F)
    baseline: bool = True  # also score the starting model (vos.model.source) for the before / after table
    strips: int = 3  # videos drawn as frame strips (prediction beside ground truth)
    threads: int | None = None  # CPU threads of torch's kernels (None: one per core)


@dataclass
class VosParams:
    dataset: VosDatasetParams = field(default_factory=VosDatasetParams)
    preprocess: VosPreprocessParams = field(default_factory=VosPreprocessParams)
    model: VosModelParams = field(default_factory=VosModelParams)
    clip: ClipConfig = field(default_factory=ClipConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    loss: VosLossConfig = field(default_factory=VosLossConfig)
    optim: VosOptimConfig = field(default_factory=VosOptimConfig)
    train: VosLoopConfig = field(default_factory=VosLoopConfig)
    evaluate: VosEvaluateParams = field(default_factory=VosEvaluateParams)


def vos_problems(vos: VosParams) -> list[str]:
    """What types cannot say about the `vos:` section, each a message naming the key (empty: all good)."""
    clip, prompts, train, optim = vos.clip, vos.prompts, vos.train, vos.optim
    checks = [
        (clip.num_frames >= 1, "vos.clip.num_frames must be >= 1"),
        (clip.max_objects >= 1, "vos.clip.max_objects must be >= 1"),
        (clip.multiplier >= 1, "vos.clip.multiplier must be >= 1"),
        (vos.preprocess.size >= 16, "vos.preprocess.size must be >= 16 pixels"),
        (train.epochs >= 1 or train.max_steps, "vos.train.epochs must be >= 1 (or set vos.train.max_steps)"),
        (train.max_steps is None or train.max_steps >= 1, "vos.train.max_steps must be >= 1 (null: epochs decide)"),
        (train.accumulation >= 1, "vos.train.accumulation must be >= 1"),
        (train.checkpoint_every >= 1, "vos.train.checkpoint_every must be >= 1"),
        (train.keep_last >= 1, "vos.train.keep_last must be >= 1"),
        (train.log_every >= 1, "vos.train.log_every must be >= 1"),
        (train.threads is None or train.threads >= 1, "vos.train.threads must be >= 1 (null: one per core)"),
        (0 <= train.drop_path < 1, "vos.train.drop_path must be in [0, 1)"),
        (prompts.max_init_cond_frames >= 1, "vos.prompts.max_init_cond_frames must be >= 1 (the first frame)"),
        (prompts.max_correction_frames >= 0, "vos.prompts.max_correction_frames must be >= 0"),
        (prompts.correction_clicks >= 0, "vos.prompts.correction_clicks must be >= 0"),
        (optim.lr > 0 and optim.lr_vision >= 0, "vos.optim.lr must be > 0 and vos.optim.lr_vision >= 0"),
        (0 < optim.layer_decay <= 1, "vos.optim.layer_decay must be in (0, 1]"),
        (0 <= optim.final_factor <= 1, "vos.optim.final_factor must be in [0, 1]"),
        (optim.grad_clip > 0, "vos.optim.grad_clip must be > 0"),
        (vos.evaluate.strips >= 0, "vos.evaluate.strips must be >= 0"),
    ]
    for name in ("prob_points", "prob_box", "prob_click_from_gt"):
        value = getattr(prompts, name)
        checks.append((0 <= value <= 1, f"vos.prompts.{name} must be a probability in [0, 1], got {value}"))
    for name in ("hflip", "grayscale"):
        value = getattr(clip, name)
        checks.append((0 <= value <= 1, f"vos.clip.{name} must be a probability in [0, 1], got {value}"))
    return [message for ok, message in checks if not ok]


def is_tiny(source: str) -> bool:
    return source in TINY_SOURCES


def vos_job(vos: VosParams, dataset_dir: str | Path, run_dir: str | Path, params: dict) -> VosJob:
    """The plain-valued job `sam3.video.train.train_vos` runs; `params` (the `vos:` section as a dict, plus the code
    fingerprint) goes into checkpoints and the model card."""
    return VosJob(
        dataset_dir=str(dataset_dir),
        run_dir=str(run_dir),
        model_source=vos.model.source,
        image_size=vos.model.image_size,
        clip=vos.clip,
        prompts=vos.prompts,
        loss=vos.loss,
        optim=vos.optim,
        loop=vos.train,
        params=params,
    )


def vos_dict(vos: VosParams) -> dict:
    return dataclasses.asdict(vos)
