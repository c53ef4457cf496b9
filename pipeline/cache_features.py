"""`python -m pipeline cache-features DATASET --out DIR [--params FILE] [--set section.key=value ...] [--negatives F]
[--train-annotations NAME] [--splits S ...]`.

Runs the frozen encoders once and stores their outputs (sam3.features): the vision encoder on every image of the
cached splits, in V views (view 0 the plain warp, views 1..V-1 seeded random warp-pads), and the text encoder on
every prompt (category names and the negatives file's phrases). Training reads them with `cache.enabled: true`.

Settings: model.source, model.image_size, model.mode and the `cache` section of the params (`--params`, else
params.yaml here when present, else the defaults), with `--set` overrides over them as train takes them (the DVC
suites pass their train_flags, the Prefect suite path its overrides, so the cache is built for the run's own
settings); `--model`, `--image-size`, `--mode`, `--views`, `--dtype`, `--seed` are short for the matching `--set`.
Idempotent: a folder whose manifest holds the same key (model weights, sizes,
views, seed, dtype, data, prompts, library versions) is left as it is.

With `--params` and cache.enabled false (the DVC stage while the cache is off) it writes only a manifest saying so:
no model is loaded, nothing is computed and neither torch nor transformers is imported, so the stage costs about a
second and the train stage's input stays the same. With cache.enabled true, a `train.freeze` that trains the vision
encoder is refused by the params loader before anything is built (the run could not read the cache).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.stage_args import Shorthand, add_params_arguments, stage_params
from sam3.coco import ANNOTATIONS_FILE
from sam3.config import CACHE_DTYPES, DEVICE_CHOICES, CacheConfig

log = logging.getLogger(__name__)


@dataclass
class CacheSettings:
    """What to build, resolved from the options, the params file and the defaults."""

    model: str
    image_size: int | None
    mode: str
    cache: CacheConfig


SHORTHANDS = (
    Shorthand("--model", "model.source", help="tiny | full | a transformers model folder"),
    Shorthand("--image-size", "model.image_size", int, help="model input side (default: the model's own)"),
    Shorthand("--mode", "model.mode", help="detection caches the 1x FPN level; segmentation all three"),
    Shorthand("--views", "cache.views", int, help="views per image: 0 the plain warp, 1.. random warp-pads"),
    Shorthand("--dtype", "cache.dtype", help=f"storage precision: {' | '.join(CACHE_DTYPES)}"),
    Shorthand("--seed", "cache.seed", int, help="seed of the views' warp-pads"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="dataset folder: {train,valid,test}/_annotations.coco.json + images")
    parser.add_argument("--out", required=True, type=Path, help="cache folder (manifest.json + safetensors shards)")
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
    add_params_arguments(parser, SHORTHANDS)


def resolve_settings(args: argparse.Namespace) -> tuple[CacheSettings, bool]:
    """The settings to build with, and whether the cache is on. An explicit `--params` decides with its
    cache.enabled (what the pipeline's stage passes); without it the command was asked by hand, and builds."""
    params = stage_params(args, SHORTHANDS)
    settings = CacheSettings(
        model=params.model.source,
        image_size=params.model.image_size,
        mode=params.model.mode,
        cache=params.cache,
    )
    return settings, bool(params.cache.enabled) if args.params else True


def run(args: argparse.Namespace) -> int:
    from sam3.errors import ConfigError
    from sam3.features.manifest import write_disabled
    from sam3.run_lock import run_lock

    settings, enabled = resolve_settings(args)
    if not enabled:
        with run_lock(args.out, "feature cache build"):
            write_disabled(args.out)
        print(f"feature cache off (cache.enabled false in {args.params}): {args.out} holds only its manifest")
        return 0
    if args.batch_size < 1 or args.shard_mb < 1:
        raise ConfigError("--batch-size and --shard-mb must be >= 1")

    from sam3.features import build_cache
    from sam3.inference import resolve_device
    from sam3.model import load_model

    # two builds into one folder would delete and mix each other's shards: one at a time
    with run_lock(args.out, "feature cache build"):
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
