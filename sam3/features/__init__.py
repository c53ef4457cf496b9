"""Feature cache for frozen encoders: run the vision encoder once per image (and the text encoder once per prompt),
store the outputs, and train from them instead of pixels. Same losses, same metrics, far faster epochs.

When it applies: `train.freeze` vision, vision_text or heads (the vision encoder gets no gradient, so its output for
a given input never changes). The text encoder's prompt embeddings are read from the cache too when it is frozen as
well (vision_text, heads); under `vision` the text encoder trains and runs as usual.

What is stored (sam3.features.store): per image and view, the FPN levels the run reads (detection: the 1x level the
DETR parts read; segmentation: also the 4x and 2x levels the mask decoder reads), in fp16 (default) or fp32, plus the
view's transformed targets; per unique prompt, its projected token embeddings. The sine position encoding is
recomputed (it depends on the feature map's shape only). A manifest holds the KEY (sam3.features.key: the encoders'
weights and configs, image size, levels, views, seed, dtype, normalisation, annotation files, library versions);
training with a cache that does not serve the run is a ConfigError naming each differing field and the rebuild
command.

Augmentation (`cache.views` = V, the one choice): the pixel path warps every image to a new random square and offset
each epoch; a cache can only hold fixed geometries. View 0 is the plain validation warp; views 1..V-1 are training
warp-pads drawn once from (cache.seed, image index, view). Each epoch a sample picks one of its V views, seeded by
(train.seed, epoch, index) like the pixel dataset's own draws, so resuming mid-epoch is exact. V = 1 means no pixel
augmentation; larger V approaches the pixel path's variety at V times the storage and build time.

Size per image and view at 1008 px (full model, 256 channels, fp16): detection 72 x 72 x 256 x 2 B = 2.7 MB;
segmentation adds 288^2 and 144^2 maps: 56 MB.

    build:  python -m pipeline cache-features DATASET --out DIR --model SOURCE --views V --mode detection|segmentation
    train:  cache.enabled: true in params.yaml (and train.freeze vision | vision_text | heads)
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module defining it. Imported on first use (PEP 562), so that `sam3.features.manifest` (the "off"
# manifest, the checks before a SLURM submission) loads without torch and transformers.
_EXPORTS = {
    "BuildResult": "sam3.features.build",
    "build_cache": "sam3.features.build",
    "view_geometry": "sam3.features.build",
    "cache_key": "sam3.features.key",
    "stored_levels": "sam3.features.key",
    "training_mismatches": "sam3.features.key",
    "read_manifest": "sam3.features.manifest",
    "write_disabled": "sam3.features.manifest",
    "FeatureStore": "sam3.features.store",
    "CachedDetector": "sam3.features.training",
    "CachedPromptDataset": "sam3.features.training",
    "FeatureBatch": "sam3.features.training",
    "FeatureCollate": "sam3.features.training",
    "FeatureSample": "sam3.features.training",
    "open_training_cache": "sam3.features.training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """The exported `name`, imported from its module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
