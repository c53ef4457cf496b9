"""`python -m pipeline cache-features DATASET --out DIR [--model SOURCE] [--views V] [--mode M] [--params FILE] ...`.

Runs the frozen encoders once and stores their outputs (sam3.features): the vision encoder on every image of the
cached splits, in V views (view 0 the plain warp, views 1..V-1 seeded random warp-pads), and the text encoder on
every prompt (category names and the negatives file's phrases). Training reads them with `cache.enabled: true`.

Settings come from the options; options left out come from `--params FILE` when given (model.source,
model.image_size, model.mode and the `cache` section), else from the defaults. Idempotent: a folder whose manifest
holds the same key (model weights, sizes, views, seed, dtype, data, prompts, library versions) is left as it is.

With `--params` and cache.enabled false (the DVC stage while the cache is off) it writes only a manifest saying so:
no model is loaded and nothing is computed, so the stage costs a second and the train stage's input stays the same.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.params import load_params
from sam3.coco import ANNOTATIONS_FILE
from sam3.config import CACHE_DTYPES, CacheConfig

log = logging.getLogger(__name__)

MODES = ("detection", "segmentation")


@dataclass
class CacheSettings:
    """What to build, resolved from the options, the params file and the defaults."""

    model: str
    image_size: int | None
    mode: str
    cache: CacheConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sam3.inference import DEVICE_CHOICES

    parser.add_argument("dataset", type=Path, help="dataset folder: {train,valid,test}/_annotations.coco.json + images")
    parser.add_argument("--out", required=True, type=Path, help="cache folder (manifest.json + safetensors shards)")
    parser.add_argument("--params", help="fill options left out from this params file (model and cache sections)")
    parser.add_argument("--model", help="tiny | full | a transformers model folder (default: tiny)")
    parser.add_argument("--image-size", type=int, help="model input side (default: the model's own)")
    parser.add_argument("--mode", choices=MODES, help="detection caches the 1x FPN level; segmentation all three")
    parser.add_argument("--views", type=int, help="views per image: 0 the plain warp, 1.. random warp-pads (default 1)")
    parser.add_argument("--dtype", choices=CACHE_DTYPES, help="storage precision (default fp16)")
    parser.add_argument("--seed", type=int, help="seed of the views' warp-pads (default 0)")
    parser.add_argument("--splits", nargs="+", default=["train"], help="splits to cache (default: train)")
    parser.add_argument("--negatives", type=Path, help="negatives file: its phrases' embeddings are cached too")
    parser.add_argument(
        "--train-annotations",
        default=ANNOTATIONS_FILE,
        help=f"annotation file of the train folder, as the run reads it (default {ANNOTATIONS_FILE})",
    )
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto (default): CUDA when available")
    parser.add_argument("--batch-size", type=int, default=8, help="images (views) per vision-encoder call")
    parser.add_argument("--shard-mb", type=int, default=1024, help="approximate size of one shard file in MB")


def resolve_settings(args: argparse.Namespace) -> tuple[CacheSettings, bool]:
    """The settings to build with, and whether the cache is on (off only when --params says cache.enabled false)."""
    params = load_params(args.params) if args.params else load_params(None)
    cache = params.cache
    cache = replace(
        cache,
        views=args.views if args.views is not None else cache.views,
        dtype=args.dtype or cache.dtype,
        seed=args.seed if args.seed is not None else cache.seed,
    )
    settings = CacheSettings(
        model=args.model or params.model.source,
        image_size=args.image_size if args.image_size is not None else params.model.image_size,
        mode=args.mode or params.model.mode,
        cache=cache,
    )
    return settings, bool(params.cache.enabled) if args.params else True


def run(args: argparse.Namespace) -> int:
    from sam3.errors import ConfigError
    from sam3.features import build_cache, write_disabled

    settings, enabled = resolve_settings(args)
    if not enabled:
        write_disabled(args.out)
        print(f"feature cache off (cache.enabled false in {args.params}): {args.out} holds only its manifest")
        return 0
    if settings.cache.views < 1:
        raise ConfigError(f"--views must be >= 1, got {settings.cache.views}")
    if args.batch_size < 1 or args.shard_mb < 1:
        raise ConfigError("--batch-size and --shard-mb must be >= 1")

    from sam3.inference import resolve_device
    from sam3.model import load_model

    device = resolve_device(args.device)
    detector = load_model(settings.model, image_size=settings.image_size)
    result = build_cache(
        args.dataset,
        args.out,
        detector,
        settings.cache,
        with_masks=settings.mode == "segmentation",
        splits=tuple(args.splits),
        negatives=args.negatives,
        train_annotations=args.train_annotations,
        source=settings.model,
        device=device,
        batch_size=args.batch_size,
        shard_bytes=args.shard_mb * 2**20,
    )
    if result.built:
        size_mb = result.bytes / 2**20
        print(f"feature cache: {result.images} images x {result.views} views, {size_mb:.1f} MB in {args.out}")
    else:
        print(f"feature cache up to date: {args.out}")
    return 0
