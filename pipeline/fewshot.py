"""Deterministic GLIP-style few-shot training files: k instances per category drawn from a full COCO training set.

ODinW13 10-shot trains on `fewshot_train_shot10_seed{3,30,300}.json` (docs/RECIPE.md section 5). GLIP's download ships
them; when a copy lacks them, `make_fewshot` draws an equivalent subset. The rule, exactly:

1. image ids sorted ascending, then permuted by `numpy.random.default_rng(seed).permutation` (so the draw depends
   only on the seed and the set of image ids, never on the order of the input file);
2. walk the images in that order; a category is *open* while it has fewer than k instances taken. From each image
   take every annotation (in annotation-id order) whose category is open when the image is reached, and keep the
   image if anything was taken. Whole images are taken, so a category can end above k (as in GLIP);
3. stop once every category that has any annotation holds >= k instances, or when the images run out (a category
   with fewer than k instances in the whole set keeps all of them: see `shortfall`).

The result keeps every category (ids unchanged, so evaluation files still line up), the taken images and
annotations sorted by id, the other top-level keys as they were, and records k, seed and the rule in `info`.
Generated files will not be byte-identical to GLIP's own draws: same recipe, different random stream.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sam3.errors import ConfigError, DataError

FEWSHOT_FILE_TEMPLATE = "fewshot_train_shot{k}_seed{seed}.json"
FEWSHOT_GLOB = "fewshot_train_shot*_seed*.json"  # the few-shot files of a train folder (carried along)
FEWSHOT_SPLIT = "train"  # the split whose folder holds the few-shot files (subsets of its annotation file)
FEWSHOT_RULE = (
    "image ids sorted then permuted by numpy.random.default_rng(seed); walk images taking every annotation of "
    "categories still below k; stop when all categories reach k or images run out"
)


def fewshot_file_name(k: int, seed: int) -> str:
    """`fewshot_train_shot{k}_seed{seed}.json`, the name GLIP and the SAM 3 ODinW configs use."""
    return FEWSHOT_FILE_TEMPLATE.format(k=k, seed=seed)


def fewshot_files(folder: Path) -> list[Path]:
    """The few-shot files (FEWSHOT_GLOB) directly inside `folder`, sorted by name; [] when the folder is absent."""
    return sorted(p for p in folder.glob(FEWSHOT_GLOB) if p.is_file()) if folder.is_dir() else []


def instance_counts(coco: dict[str, Any]) -> dict[int, int]:
    """{category id: number of annotations}, every category listed (0 when it has none)."""
    counts = {int(c["id"]): 0 for c in coco.get("categories", [])}
    for ann in coco.get("annotations", []):
        counts[int(ann["category_id"])] = counts.get(int(ann["category_id"]), 0) + 1
    return counts


def shortfall(fewshot: dict[str, Any], k: int) -> dict[str, int]:
    """{category name: instances} for the categories of `fewshot` holding fewer than k instances (to report)."""
    counts = instance_counts(fewshot)
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in fewshot.get("categories", [])}
    return {names[cid]: n for cid, n in sorted(counts.items()) if n < k}


def _annotations_by_image(coco: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Annotations grouped by image id, each group in annotation-id order; DataError on a dangling reference."""
    image_ids = {int(img["id"]) for img in coco["images"]}
    category_ids = {int(c["id"]) for c in coco["categories"]}
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in sorted(coco["annotations"], key=lambda a: int(a["id"])):
        if int(ann["image_id"]) not in image_ids:
            raise DataError(f"annotation {ann['id']}: image_id {ann['image_id']} is not in images")
        if int(ann["category_id"]) not in category_ids:
            raise DataError(f"annotation {ann['id']}: category_id {ann['category_id']} is not in categories")
        by_image[int(ann["image_id"])].append(ann)
    return by_image


def make_fewshot(coco: dict[str, Any], k: int, seed: int) -> dict[str, Any]:
    """The k-shot subset of a full COCO training dict by the module's rule (deterministic for (coco, k, seed)).

    Raises ConfigError for k < 1 and DataError when `coco` lacks images/annotations/categories or an annotation
    points at an image or category that does not exist.
    """
    if k < 1:
        raise ConfigError(f"few-shot k must be >= 1, got {k}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"COCO dict has no {key!r} list; cannot draw a few-shot subset")
    by_image = _annotations_by_image(coco)
    images = {int(img["id"]): img for img in coco["images"]}
    order = np.array(sorted(images), dtype=np.int64)[np.random.default_rng(seed).permutation(len(images))]

    # Categories with no annotation at all can never fill; they stay in `categories` but do not hold the walk open.
    taken = {cid: 0 for cid, n in instance_counts(coco).items() if n > 0}
    kept_images: list[int] = []
    kept_annotations: list[dict[str, Any]] = []
    for image_id in order.tolist():
        if all(n >= k for n in taken.values()):
            break
        open_categories = {cid for cid, n in taken.items() if n < k}  # fixed on reaching the image: take it whole
        picked = [a for a in by_image.get(image_id, []) if int(a["category_id"]) in open_categories]
        if not picked:
            continue
        kept_images.append(image_id)
        kept_annotations.extend(picked)
        for ann in picked:
            taken[int(ann["category_id"])] += 1

    info = dict(coco.get("info") or {})
    info["fewshot"] = {"k": k, "seed": seed, "rule": FEWSHOT_RULE}
    return {
        **{key: value for key, value in coco.items() if key not in ("images", "annotations", "info")},
        "info": info,
        "images": [images[i] for i in sorted(kept_images)],
        "annotations": sorted(kept_annotations, key=lambda a: int(a["id"])),
    }
