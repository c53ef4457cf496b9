"""The key of a feature cache: what the cached numbers depend on, stored in its manifest and compared before use.

Fields (manifest.json, "key"):
    vision      sha256 of the vision config (bookkeeping entries left out) and of every vision-encoder tensor
    text        the same over the text config, the text encoder and the top-level text projection
    image_size  S, the model input side
    levels      which of `Sam3Detector`'s FPN levels are stored (0: 4x, 1: 2x, 2: 1x of the patch grid): [2] for
                detection (the DETR parts read the 1x level only), [0, 1, 2] for segmentation (the mask decoder
                reads all three)
    views       V, cached geometries per image (sam3.features.build.view_geometry)
    seed        the seed the views' warp-pads are drawn from
    dtype       storage precision, fp16 or fp32
    transform   what the pixels went through: normalisation mean and std, the training warp's square sides
    data        split -> sha256 of its annotation file (the image files are versioned by DVC, not hashed here)
    prompts     sha256 of the sorted prompt keys whose embeddings are stored
    versions    torch and transformers versions (their kernels and model code change the numbers)

The model is identified by its weights, not its name: "tiny" and a folder holding the same weights share a key, a
folder whose weights changed does not. Building skips when the whole key is equal. Training (`training_mismatches`)
needs every field equal except: levels and data may hold more than the run needs, text counts only when the run
reads cached prompt embeddings, and prompts are checked by coverage (every prompt of the run stored), not hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers

from sam3.config import CacheConfig
from sam3.data.transforms import PIXEL_MEAN, PIXEL_STD, train_sides
from sam3.model import Sam3Detector

# Config entries that describe how a config was saved or initialised, not what the module computes from its weights.
_BOOKKEEPING = {
    "architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "id2label",
    "label2id",
    "problem_type",
    "initializer_range",
}
_HASH_CHUNK = 1 << 26  # bytes fed to sha256 per update: a 4 GB tensor is never copied whole


def stored_levels(detector: Sam3Detector, with_masks: bool) -> list[int]:
    """Indices of the FPN levels a run reads: all `num_levels` for masks, the last (1x) one for detection."""
    last = detector.num_levels - 1
    return list(range(detector.num_levels)) if with_masks else [last]


def module_digest(config: Mapping[str, Any], tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over a config (bookkeeping entries left out) and named tensors (name, dtype, shape, bytes), by name."""
    digest = hashlib.sha256(json.dumps(_numerical(config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        raw = flat.view(torch.uint8).numpy()
        for start in range(0, raw.size, _HASH_CHUNK):
            digest.update(raw[start : start + _HASH_CHUNK])
    return digest.hexdigest()


def vision_digest(detector: Sam3Detector) -> str:
    model = detector.model
    return module_digest(model.config.vision_config.to_dict(), model.vision_encoder.state_dict().items())


def text_digest(detector: Sam3Detector) -> str:
    model = detector.model
    tensors = [(f"text_encoder.{n}", t) for n, t in model.text_encoder.state_dict().items()]
    tensors += [(f"text_projection.{n}", t) for n, t in model.text_projection.state_dict().items()]
    return module_digest(model.config.text_config.to_dict(), tensors)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(
    detector: Sam3Detector,
    annotation_files: Mapping[str, Path],
    prompt_keys: Iterable[str],
    cache: CacheConfig,
    with_masks: bool,
) -> dict[str, Any]:
    """The key (see the module docstring) of a cache of `detector`'s outputs on these splits and prompts."""
    image_size = detector.config.vision_config.backbone_config.image_size
    return {
        "vision": vision_digest(detector),
        "text": text_digest(detector),
        "image_size": image_size,
        "levels": stored_levels(detector, with_masks),
        "views": cache.views,
        "seed": cache.seed,
        "dtype": cache.dtype,
        "transform": {"mean": list(PIXEL_MEAN), "std": list(PIXEL_STD), "train_sides": list(train_sides(image_size))},
        "data": {split: file_digest(path) for split, path in sorted(annotation_files.items())},
        "prompts": hashlib.sha256("\n".join(sorted(prompt_keys)).encode()).hexdigest(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def training_mismatches(cached: Mapping[str, Any], run: Mapping[str, Any], with_text: bool) -> list[str]:
    """'field: cache X, this run Y' for each field of the cached key that does not serve the run's key."""
    problems = []
    for field in ("vision", "image_size", "views", "seed", "dtype", "transform", "versions"):
        if cached.get(field) != run[field]:
            problems.append(f"{field}: cache {_short(cached.get(field))}, this run {_short(run[field])}")
    if with_text and cached.get("text") != run["text"]:
        problems.append(f"text: cache {_short(cached.get('text'))}, this run {_short(run['text'])}")
    missing_levels = sorted(set(run["levels"]) - set(cached.get("levels") or []))
    if missing_levels:
        problems.append(f"levels: cache {cached.get('levels')}, this run needs {run['levels']}")
    for split, digest in run["data"].items():
        stored = (cached.get("data") or {}).get(split)
        if stored != digest:
            problems.append(f"data.{split}: cache {_short(stored)}, this run {_short(digest)} (annotation file sha256)")
    return problems


def _numerical(config: Any) -> Any:
    """`config` without bookkeeping entries or private ("_...") keys, recursively."""
    if isinstance(config, Mapping):
        return {k: _numerical(v) for k, v in config.items() if k not in _BOOKKEEPING and not str(k).startswith("_")}
    if isinstance(config, list | tuple):
        return [_numerical(v) for v in config]
    return config


def _short(value: Any) -> str:
    """Hashes cut to 12 characters; other values as repr."""
    if isinstance(value, str) and len(value) == 64:
        return value[:12]
    return repr(value)
