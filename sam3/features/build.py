"""Build a feature cache: run the frozen encoders once and store what training reads (layout: sam3.features.store).

For every image of the cached splits and every view v of V:
    geometry  view 0: the validation warp (S x S, no padding); view v >= 1: a training warp-pad (random square side,
              random offset, sam3.data.transforms) drawn from (seed, image index, v) alone
    pixels    the dataset's own `warp` of the image through that geometry, its targets (boxes, masks) with it
    features  `Sam3Detector.encode_images` in fp32, eval mode, no autocast, in batches; the key's levels kept,
              rounded to the storage dtype (fp16 by default: relative error at most 2^-11 per value). Eval mode
              equals what a training step computes: SAM 3's ViT has no dropout (hidden_dropout and
              attention_dropout 0), and the frozen encoder's output does not depend on train/eval otherwise.
Then every prompt of the splits (category names and the negatives file's phrases, by tokenizer key) once through
`encode_prompts`. The manifest is written last. A folder whose manifest holds the same key is left as it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from sam3.coco import ANNOTATIONS_FILE
from sam3.config import CacheConfig
from sam3.data.dataset import CocoPromptDataset
from sam3.data.index import ImageRecord
from sam3.data.transforms import WarpPad, sample_train_warp_pad
from sam3.errors import ConfigError
from sam3.features.key import cache_key, stored_levels
from sam3.features.manifest import FORMAT, our_files, read_manifest, write_manifest
from sam3.features.store import STORAGE_DTYPES, TEXT_FILE, ShardWriter, entry_name, pack_masks
from sam3.model import Sam3Detector
from sam3.tokenizer import attention_mask, clean_text, tokenize

logger = logging.getLogger(__name__)

_VIEW_STREAM = 7  # first entropy word of the views' seeds, so they never coincide with the dataset's per-epoch draws
DEFAULT_SHARD_BYTES = 1 << 30
TEXT_PROMPT_CHUNK = 64  # prompts per text-encoder call (the text encoder alone: larger than inference's chunk)


@dataclass
class BuildResult:
    folder: Path
    built: bool  # False: an up-to-date cache was already there
    images: int = 0
    views: int = 0
    bytes: int = 0


def view_geometry(seed: int, index: int, view: int, image_size: int) -> WarpPad | None:
    """The geometry of view `view` of image `index`: None (the validation warp) for view 0, else a training warp-pad
    drawn from a generator seeded by (seed, index, view) alone."""
    if view == 0:
        return None
    state = np.random.SeedSequence([_VIEW_STREAM, seed, index, view]).generate_state(1, dtype=np.uint64)[0]
    return sample_train_warp_pad(image_size, torch.Generator().manual_seed(int(state)))


def dataset_prompts(datasets: list[CocoPromptDataset]) -> dict[str, str]:
    """Prompt key (sam3.tokenizer.clean_text) -> the first prompt text with that key: categories and extra phrases."""
    prompts: dict[str, str] = {}
    for dataset in datasets:
        texts = list(dataset.categories.values()) + [p for r in dataset.records for p in r.extra_negatives]
        for text in texts:
            prompts.setdefault(clean_text(text), text)
    return dict(sorted(prompts.items()))


def build_cache(
    dataset_dir: str | Path,
    folder: str | Path,
    detector: Sam3Detector,
    cache: CacheConfig,
    *,
    with_masks: bool = False,
    splits: tuple[str, ...] = ("train",),
    negatives: str | Path | None = None,
    train_annotations: str = ANNOTATIONS_FILE,
    source: str = "",
    device: torch.device | str = "cpu",
    batch_size: int = 8,  # images (views) per vision-encoder call
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> BuildResult:
    """Cache `detector`'s vision features (V views per image) and prompt embeddings for `splits` of a dataset.

    `train_annotations` is the train split's annotation file (another file of the train folder, e.g. a few-shot
    file, as the run reads it). `source` names the model for people (manifest "source"); the key identifies it by
    its weights.
    """
    if cache.views < 1:
        raise ConfigError(f"cache.views must be >= 1, got {cache.views}")
    if cache.dtype not in STORAGE_DTYPES:
        raise ConfigError(f"cache.dtype must be one of {', '.join(STORAGE_DTYPES)}, got {cache.dtype!r}")
    folder = Path(folder)
    image_size = detector.config.vision_config.backbone_config.image_size
    datasets = _open_splits(dataset_dir, splits, image_size, with_masks, negatives, train_annotations)
    prompts = dataset_prompts(list(datasets.values()))
    annotation_files = {split: dataset.annotation_file for split, dataset in datasets.items()}
    key = cache_key(detector, annotation_files, prompts, cache, with_masks)
    existing = read_manifest(folder)
    if existing is not None and existing.get("enabled") and existing.get("key") == key:
        logger.info("%s: feature cache up to date (same key); nothing to do", folder)
        return BuildResult(folder, built=False)

    folder.mkdir(parents=True, exist_ok=True)
    for path in our_files(folder):  # the manifest first among them: an interrupted rebuild is never taken as done
        path.unlink()
    detector.eval().to(device)
    dtype = STORAGE_DTYPES[cache.dtype]
    with torch.inference_mode():
        encoder = _SplitEncoder(folder, detector, cache, stored_levels(detector, with_masks), dtype, device)
        manifest_splits, total_bytes = encoder.write_all(datasets, batch_size, shard_bytes)
        tokens = _encode_prompts(detector, list(prompts.values()), dtype, device)
    save_file({"tokens": tokens}, str(folder / TEXT_FILE))
    manifest = {
        "format": FORMAT,
        "enabled": True,
        "key": key,
        "source": {"model": source, "dataset": str(dataset_dir), "negatives": str(negatives) if negatives else None},
        "splits": manifest_splits,
        "prompts": list(prompts),
    }
    write_manifest(folder, manifest)  # last: its presence says the cache is complete
    images = sum(len(d) for d in datasets.values())
    logger.info("%s: cached %d images x %d views (%.1f MB)", folder, images, cache.views, total_bytes / 2**20)
    return BuildResult(folder, built=True, images=images, views=cache.views, bytes=total_bytes)


def _open_splits(
    dataset_dir: str | Path,
    splits: tuple[str, ...],
    image_size: int,
    with_masks: bool,
    negatives: str | Path | None,
    train_annotations: str,
) -> dict[str, CocoPromptDataset]:
    """Each split's samples without augmentation (the views' geometries are drawn by `view_geometry` instead)."""
    return {
        split: CocoPromptDataset(
            dataset_dir,
            split,
            image_size=image_size,
            train=False,
            with_masks=with_masks,
            negatives=negatives,
            annotations_file=train_annotations if split == "train" else ANNOTATIONS_FILE,
        )
        for split in splits
    }


@dataclass
class _SplitEncoder:
    """Writes the splits' shards: every image's views through the vision encoder, a few images per call."""

    folder: Path
    detector: Sam3Detector
    cache: CacheConfig
    levels: list[int]  # the FPN levels stored (sam3.features.key.stored_levels)
    dtype: torch.dtype  # storage dtype
    device: torch.device | str

    def write_all(
        self, datasets: dict[str, CocoPromptDataset], batch_size: int, shard_bytes: int
    ) -> tuple[dict[str, list[dict]], int]:
        """The manifest's entries of each split (image id, file name, shard, target count), and the bytes stored."""
        views = self.cache.views
        images_per_call = max(1, batch_size // views)
        manifest_splits, total_bytes = {}, 0
        total = sum(len(d) for d in datasets.values()) * views
        with tqdm(total=total, desc="cache features", unit="view") as progress:
            for split, dataset in datasets.items():
                writer = ShardWriter(self.folder, split, shard_bytes)
                entries = []
                for start in range(0, len(dataset), images_per_call):
                    indices = range(start, min(start + images_per_call, len(dataset)))
                    per_image = _encode_images(
                        dataset, indices, self.detector, self.cache, self.levels, self.dtype, self.device, batch_size
                    )
                    for index, tensors in zip(indices, per_image, strict=True):
                        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
                        entries.append(_entry(dataset.records[index], writer.add(tensors)))
                    progress.update(len(indices) * views)
                writer.flush()
                manifest_splits[split] = entries
        return manifest_splits, total_bytes


def _entry(record: ImageRecord, shard: str) -> dict:
    """The manifest entry of one image stored in `shard`."""
    return {
        "image_id": record.image_id,
        "file_name": record.path.name,
        "shard": shard,
        "targets": sum(len(q.targets) for q in record.positives.values()),
    }


def _encode_images(
    dataset: CocoPromptDataset,
    indices: range,
    detector: Sam3Detector,
    cache: CacheConfig,
    levels: list[int],
    dtype: torch.dtype,
    device: torch.device | str,
    batch_size: int,
) -> list[dict[str, torch.Tensor]]:
    """Each image's tensors (every view: levels, boxes, packed masks), named as the shards store them."""
    warped = {
        (index, view): dataset.warp(index, view_geometry(cache.seed, index, view, dataset.image_size))
        for index in indices
        for view in range(cache.views)
    }
    keys = list(warped)
    features: dict[tuple[int, int], list[torch.Tensor]] = {}
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        out = detector.encode_images(torch.stack([warped[k].image for k in chunk]).to(device)).levels
        for row, k in enumerate(chunk):
            # .to(dtype) copies for fp16; clone() so no stored tensor shares the batch's memory (safetensors refuses)
            features[k] = [out[j][row].to(dtype).cpu().clone() for j in levels]
    per_image = []
    for index in indices:
        record = dataset.records[index]
        tensors = {}
        for view in range(cache.views):
            for j, stored in zip(levels, features[index, view], strict=True):
                if not torch.isfinite(stored).all():
                    raise ConfigError(
                        f"{record.path}: image id {record.image_id}, view {view}: FPN level {j} holds values beyond "
                        f"{cache.dtype}'s range; build the cache with --dtype fp32"
                    )
                tensors[entry_name(record.image_id, view, f"level{j}")] = stored
            tensors[entry_name(record.image_id, view, "boxes")] = warped[index, view].boxes.float().clone()
            if dataset.with_masks:
                tensors[entry_name(record.image_id, view, "masks")] = pack_masks(warped[index, view].masks)
        per_image.append(tensors)
    return per_image


def _encode_prompts(detector: Sam3Detector, texts: list[str], dtype: torch.dtype, device) -> torch.Tensor:
    """float [P, L, D]: every prompt's projected token embeddings, in chunks of TEXT_PROMPT_CHUNK prompts."""
    parts = []
    for start in range(0, len(texts), TEXT_PROMPT_CHUNK):
        ids = tokenize(texts[start : start + TEXT_PROMPT_CHUNK]).to(device)
        parts.append(detector.encode_prompts(ids, attention_mask(ids)).tokens.to(dtype).cpu())
    if not parts:
        raise ConfigError("no prompts to cache: the dataset has no categories")
    return torch.cat(parts).contiguous()
