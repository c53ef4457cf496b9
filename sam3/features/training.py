"""Training from a feature cache: a dataset that yields cached features instead of pixels, its batches, and the
detector forward that decodes them.

    CachedPromptDataset[i] at epoch e    generator g = sample_generator(train.seed, e, i), as the pixel dataset's
        view    v = randint(V) from g (V = 1: always view 0, the plain warp; no draw)
        levels  the stored FPN levels of (image i, view v)                    float16|32 [C, H_j, W_j]
        queries the pixel dataset's own `draw_queries` on the view's stored targets, negatives drawn from g
    FeatureCollate -> FeatureBatch: `collate_prompts` of the same queries (pixel_values empty [B, 0]) plus
        levels         tuple of [B, C, H_j, W_j]
        prompt_tokens  [P, L, D] the batch's prompts' cached embeddings, when the text encoder is frozen, else None
    CachedDetector(batch) = detector.decode(image_features(levels), prompts, ...): Sam3Detector.forward without the
        vision encoder (and without the text encoder when prompt_tokens are given); same outputs, same losses.

A view depends on (seed, epoch, index) only, so a run resumed mid-epoch sees the views it would have seen. The cache
must serve the run (sam3.features.key.training_mismatches), else ConfigError naming each field and the command that
rebuilds it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from sam3.batch import PromptBatch
from sam3.coco import ANNOTATIONS_FILE
from sam3.config import AdapterConfig, CacheConfig, adapter_cache_problem, adapts_text
from sam3.data.collate import collate_prompts
from sam3.data.dataset import CocoPromptDataset, PromptQuery, PromptSample, sample_generator
from sam3.data.sampler import EpochDataset
from sam3.errors import ConfigError
from sam3.features.build import dataset_prompts
from sam3.features.key import cache_key, stored_levels, training_mismatches
from sam3.features.manifest import read_manifest
from sam3.features.store import FeatureStore
from sam3.freeze import cache_freeze_problem, freezes_text
from sam3.model import PromptFeatures, Sam3Detector
from sam3.tokenizer import clean_text

logger = logging.getLogger(__name__)

_NO_PIXELS = torch.empty(0)  # PromptSample.image of a cached sample: collated to pixel_values [B, 0]


@dataclass
class FeatureSample:
    """One cached training sample: the chosen view's levels and the sample's queries (boxes in that view)."""

    levels: tuple[torch.Tensor, ...]
    image_id: int
    orig_size: tuple[int, int]
    queries: list[PromptQuery]
    view: int


@dataclass
class FeatureBatch(PromptBatch):
    """A PromptBatch whose images come as cached encoder outputs (shapes in the module docstring);
    pixel_values is empty [B, 0]."""

    levels: tuple[torch.Tensor, ...] = ()
    prompt_tokens: torch.Tensor | None = None

    def map_tensors(self, fn) -> "FeatureBatch":
        mapped = super().map_tensors(fn)
        tokens = fn(self.prompt_tokens) if self.prompt_tokens is not None else None
        return replace(mapped, levels=tuple(fn(level) for level in self.levels), prompt_tokens=tokens)


class FeatureCollate:
    """Collate FeatureSamples: `collate_prompts` for the queries, stacked levels, the prompts' cached embeddings."""

    def __init__(self, prompt_rows: dict[str, int] | None = None, tokens: torch.Tensor | None = None) -> None:
        self.prompt_rows, self.tokens = prompt_rows, tokens

    def __call__(self, samples: list[FeatureSample]) -> FeatureBatch:
        batch = collate_prompts([PromptSample(_NO_PIXELS, s.image_id, s.orig_size, s.queries) for s in samples])
        levels = tuple(torch.stack(level) for level in zip(*(s.levels for s in samples), strict=True))
        prompt_tokens = None
        if self.tokens is not None:
            rows = [self.prompt_rows[clean_text(prompt)] for prompt in batch.prompts]
            prompt_tokens = self.tokens[rows]
        plain = {f.name: getattr(batch, f.name) for f in fields(PromptBatch)}
        return FeatureBatch(**plain, levels=levels, prompt_tokens=prompt_tokens)


class CachedPromptDataset(EpochDataset):
    """`dataset`'s samples with cached features in place of pixels (see the module docstring).

    `dataset` supplies the queries (its seed, negatives and num_negatives); `store` the features and targets;
    `views` must be the cache's V; `with_text` collates the cached prompt embeddings.
    """

    def __init__(
        self, dataset: CocoPromptDataset, store: FeatureStore, views: int, levels: list[int], with_text: bool
    ) -> None:
        self.dataset, self.store, self.views, self.levels = dataset, store, views, levels
        tokens = store.text_tokens() if with_text else None
        self.collate = FeatureCollate({p: row for row, p in enumerate(store.prompts)}, tokens)

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int, epoch: int) -> FeatureSample:
        """Sample `index` as drawn in `epoch` (see `CocoPromptDataset.sample`)."""
        record = self.dataset.records[index]
        generator = sample_generator(self.dataset.seed, epoch, index)
        view = int(torch.randint(self.views, (1,), generator=generator)) if self.views > 1 else 0
        levels, boxes, masks = self.store.read(
            self.dataset.split, record.image_id, view, self.levels, self.dataset.with_masks
        )
        queries = self.dataset.draw_queries(index, boxes, masks, generator)
        return FeatureSample(levels, record.image_id, record.orig_size, queries, view)


class CachedDetector(nn.Module):
    """`Sam3Detector.forward` for FeatureBatches: decode on the cached levels (and cached prompt embeddings)."""

    def __init__(self, detector: Sam3Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, batch: FeatureBatch, with_masks: bool = False) -> dict:
        if with_masks and len(batch.levels) < self.detector.num_levels:
            raise ConfigError("masks need every FPN level, but the batch carries the 1x level only (detection cache)")
        # training keeps fp32 weights (sam3.model); fp16 storage is widened here, on the device
        images = self.detector.image_features(tuple(level.float() for level in batch.levels))
        if batch.prompt_tokens is not None:
            prompts = PromptFeatures(tokens=batch.prompt_tokens.float(), mask=batch.attention_mask.bool())
        else:
            prompts = self.detector.encode_prompts(batch.input_ids, batch.attention_mask)
        return self.detector.decode(images, prompts, batch.query_image, batch.query_prompt, with_masks=with_masks)


def rebuild_command(
    dataset: CocoPromptDataset, folder: Path, model_source: str, cache: CacheConfig, with_masks: bool, negatives
) -> str:
    """The command line that builds the cache this run needs."""
    parts = [
        f"python -m pipeline cache-features {dataset.dataset_dir} --out {folder} --model {model_source}",
        f"--image-size {dataset.image_size} --mode {'segmentation' if with_masks else 'detection'}",
        f"--views {cache.views} --dtype {cache.dtype} --seed {cache.seed}",
    ]
    if negatives:
        parts.append(f"--negatives {negatives}")
    if dataset.annotation_file.name != ANNOTATIONS_FILE:
        parts.append(f"--train-annotations {dataset.annotation_file.name}")
    return " ".join(parts) + " (or `dvc repro` of the cache_features stage, with cache.enabled true)"


def open_training_cache(
    folder: str | Path | None,
    dataset: CocoPromptDataset,
    detector: Sam3Detector,
    cache: CacheConfig,
    freeze: str,
    *,
    adapter: AdapterConfig | None = None,
    model_source: str,
    negatives: str | Path | None = None,
) -> CachedPromptDataset:
    """The cached version of the training `dataset`, after checking that the cache serves this run.

    ConfigError when `freeze` trains the vision encoder (its features change at every step: a cache would be
    stale), when the folder holds no enabled cache, when its key does not serve the run (each differing field
    named) or when a prompt of the run has no cached embedding while the text encoder is frozen.
    """
    problem = cache_freeze_problem(freeze) or (adapter_cache_problem(adapter) if adapter else None)
    if problem:
        raise ConfigError(problem)
    if folder is None:
        raise ConfigError("cache.enabled is true but no feature cache folder was given (train --feature-cache DIR)")
    folder = Path(folder)
    with_masks = dataset.with_masks
    command = rebuild_command(dataset, folder, model_source, cache, with_masks, negatives)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ConfigError(f"{folder}: no feature cache (no manifest.json: not built, or interrupted); build: {command}")
    if not manifest.get("enabled"):
        raise ConfigError(f"{folder}: this feature cache was written with cache.enabled false; build it: {command}")
    # an adapter in the text encoder changes the prompt embeddings at every step: computed, not read
    with_text = freezes_text(freeze) and not (adapter is not None and adapts_text(adapter))
    run_prompts = dataset_prompts([dataset])
    expected = cache_key(detector, {dataset.split: dataset.annotation_file}, run_prompts, cache, with_masks)
    problems = training_mismatches(manifest["key"], expected, with_text)
    if problems:
        differences = "; ".join(problems)
        raise ConfigError(f"{folder}: the feature cache does not match this run ({differences}); rebuild: {command}")
    store = FeatureStore(folder, manifest)
    if with_text:
        missing = sorted(set(run_prompts) - set(store.prompts))
        if missing:
            raise ConfigError(
                f"{folder}: {len(missing)} prompts of this run have no cached embedding (first: {missing[0]!r}; the "
                f"negatives file differs from the cache's?); rebuild: {command}"
            )
    levels = stored_levels(detector, with_masks)
    logger.info(
        "training from the feature cache %s: %d views per image, levels %s, %s prompt embeddings",
        folder,
        cache.views,
        levels,
        "cached" if with_text else "computed (text encoder trains)",
    )
    return CachedPromptDataset(dataset, store, cache.views, levels, with_text)
