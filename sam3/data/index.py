"""A split's queries, worked out once when the dataset is built: per image, the targets of each category present, the
categories left without a query, and the extra negative phrases kept (the rules: `sam3.data.dataset`).

    build_index(split, negatives, max_targets, with_masks) -> (categories, records, stats)

`split` is the checked `sam3.coco_split.CocoSplit`; each record holds only what `CocoPromptDataset.__getitem__`
needs (file, sizes, boxes and where each mask comes from), so a sample reads its image and masks and nothing else.
Every target dropped or changed is counted in `stats`, which the dataset logs once.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sam3.coco import ANNOTATIONS_FILE, annotation_rle
from sam3.coco_split import CocoSplit
from sam3.errors import DataError
from sam3.tokenizer import clean_text as prompt_key  # equal after cleaning = the same tokens

logger = logging.getLogger(__name__)

# What the index drops or changes, each counted (zero included, so the log line always has the same keys).
STAT_KEYS: tuple[str, ...] = (
    "crowd_annotations_dropped",
    "boxes_clipped",
    "degenerate_boxes_dropped",
    "empty_masks_filled",
    "queries_over_max_targets_dropped",
    "queries_without_valid_targets_negative",
    "extra_negatives_skipped_present",
    "extra_negatives_skipped_duplicate",
    "extra_negatives_unknown_image",
)


@dataclass(frozen=True)
class Target:
    """One kept instance: its box (pixels, clipped to the image) and where its mask comes from."""

    box_xyxy: tuple[float, float, float, float]
    annotation_id: Any
    segmentation: Any  # None: the mask is empty or missing, use the filled box instead


@dataclass(frozen=True)
class CategoryQuery:
    prompt: str
    category_id: int
    targets: tuple[Target, ...]  # empty: the category is absent from the image


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: Path
    width: int
    height: int
    orig_size: tuple[int, int]
    positives: dict[int, CategoryQuery]  # category id -> its query; the other categories are absent...
    without_query: frozenset[int]  # ...except these: present with more targets than a query may hold
    extra_negatives: tuple[str, ...]


def build_index(
    split: CocoSplit,
    negatives: Mapping[int, Sequence[str]],
    max_targets: int,
    with_masks: bool,
) -> tuple[dict[int, str], list[ImageRecord], dict[str, int]]:
    """Categories (id -> name, sorted by id), one record per image (file order), and the counts: a summary
    (images, categories, positive/negative/extra-negative queries, targets) followed by STAT_KEYS."""
    check_distinct_prompts(split)
    stats = Counter(dict.fromkeys(STAT_KEYS, 0))
    stats["extra_negatives_unknown_image"] = _unknown_negative_images(split, negatives)
    category_keys = {cat_id: prompt_key(name) for cat_id, name in split.categories.items()}
    records = [
        _image_record(split, image, category_keys, negatives, max_targets, with_masks, stats)
        for image in tqdm(split.images.values(), desc=f"index {split.folder.name}", unit="img")
    ]
    return split.categories, records, {**_summary(split.categories, records), **stats}


def check_distinct_prompts(split: CocoSplit) -> None:
    """DataError when two categories have the same prompt once cleaned (the model could not tell them apart)."""
    seen: dict[str, int] = {}
    for cat_id, name in split.categories.items():
        if prompt_key(name) in seen:
            raise DataError(
                f"{split.annotation_file}: categories {seen[prompt_key(name)]} and {cat_id} have the same prompt "
                f"{name!r}; merge or rename them"
            )
        seen[prompt_key(name)] = cat_id


def _unknown_negative_images(split: CocoSplit, negatives: Mapping[int, Sequence[str]]) -> int:
    """How many image ids of the negatives file the split does not have; logged (they are not used)."""
    unknown = sorted(set(negatives) - set(split.images))
    if unknown:
        # a few-shot file holds a subset of the split's images, so a negatives file made for the split covers more
        subset = split.annotation_file.name != ANNOTATIONS_FILE
        logger.log(
            logging.INFO if subset else logging.WARNING,
            "%s: negatives given for %d image ids not in this file (first: %s); they are not used%s",
            split.annotation_file,
            len(unknown),
            unknown[:5],
            " (expected: the file holds a subset of the split)" if subset else "",
        )
    return len(unknown)


def _summary(categories: dict[int, str], records: list[ImageRecord]) -> dict[str, int]:
    positives = [q for r in records for q in r.positives.values()]
    return {
        "images": len(records),
        "categories": len(categories),
        "positive_queries": len(positives),
        "negative_queries": sum(len(categories) - len(r.positives) - len(r.without_query) for r in records),
        "extra_negative_queries": sum(len(r.extra_negatives) for r in records),
        "targets": sum(len(q.targets) for q in positives),
    }


def _image_record(
    split: CocoSplit,
    image: dict,
    category_keys: dict[int, str],
    negatives: Mapping[int, Sequence[str]],
    max_targets: int,
    with_masks: bool,
    stats: Counter,
) -> ImageRecord:
    image_id = image["id"]
    try:
        width, height = int(image["width"]), int(image["height"])
        file_name = str(image["file_name"])
        orig_size = (int(image.get("orig_height", height)), int(image.get("orig_width", width)))
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(
            f"{split.annotation_file}: image id {image_id} needs file_name, width and height ({err!r}); "
            "run the validate stage"
        ) from None
    annotations = split.annotations[image_id]
    targets = _targets(split.annotation_file, image_id, annotations, width, height, with_masks, stats)
    mentioned = {ann["category_id"] for ann in annotations}  # crowd and degenerate ones included
    positives: dict[int, CategoryQuery] = {}
    without_query = set()
    for cat_id in sorted(mentioned):
        if not targets[cat_id]:
            # only crowd or degenerate instances: nothing to match, so a negative query, as in the reference (its
            # FilterCrowds / FilterEmptyTargets remove the objects, not the query)
            stats["queries_without_valid_targets_negative"] += 1
        elif len(targets[cat_id]) > max_targets:
            stats["queries_over_max_targets_dropped"] += 1
            without_query.add(cat_id)
        else:
            positives[cat_id] = CategoryQuery(split.categories[cat_id], cat_id, tuple(targets[cat_id]))
    present_keys = {category_keys[cat_id] for cat_id in mentioned}
    return ImageRecord(
        image_id=image_id,
        path=split.folder / file_name,
        width=width,
        height=height,
        orig_size=orig_size,
        positives=positives,
        without_query=frozenset(without_query),
        extra_negatives=_extra_negatives(negatives.get(image_id, ()), present_keys, category_keys, stats),
    )


def _targets(
    annotation_file: Path,
    image_id: int,
    annotations: list[dict],
    width: int,
    height: int,
    with_masks: bool,
    stats: Counter,
) -> defaultdict[int, list[Target]]:
    """Category id -> the image's usable instances of it: crowd annotations and boxes empty after clipping are
    dropped; in segmentation mode an empty mask is replaced by the filled box (segmentation None)."""
    targets: defaultdict[int, list[Target]] = defaultdict(list)
    for ann in annotations:
        if ann.get("iscrowd", 0):
            stats["crowd_annotations_dropped"] += 1
            continue
        box = _clipped_box(annotation_file, image_id, ann, width, height, stats)
        if box is None:
            continue
        segmentation = ann.get("segmentation") if with_masks else None
        if with_masks and _mask_area(annotation_file, image_id, ann, height, width) == 0:
            stats["empty_masks_filled"] += 1
            segmentation = None
        targets[ann["category_id"]].append(Target(box, ann.get("id"), segmentation))
    return targets


def _extra_negatives(
    phrases: Sequence[str], present_keys: set[str], category_keys: dict[int, str], stats: Counter
) -> tuple[str, ...]:
    """The image's phrases from the negatives file minus those equal (after cleaning) to a present category, to a
    category query, or to an earlier phrase; each skip counted."""
    used_keys = set(category_keys.values())
    extra = []
    for phrase in phrases:
        if prompt_key(phrase) in present_keys:
            stats["extra_negatives_skipped_present"] += 1
        elif prompt_key(phrase) in used_keys:
            stats["extra_negatives_skipped_duplicate"] += 1
        else:
            used_keys.add(prompt_key(phrase))
            extra.append(phrase)
    return tuple(extra)


def _clipped_box(
    annotation_file: Path, image_id: int, ann: dict, width: int, height: int, stats: Counter
) -> tuple[float, float, float, float] | None:
    """The COCO xywh box as xyxy clipped to the image; None (counted) when nothing of it is left."""
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, int | float) for v in bbox):
        raise DataError(
            f"{annotation_file}: annotation {ann.get('id')} (image id {image_id}) has bbox {bbox!r}; "
            "expected [x, y, width, height]"
        )
    x, y, w, h = (float(v) for v in bbox)
    box = (x, y, x + w, y + h)
    clipped = (min(max(box[0], 0.0), width), min(max(box[1], 0.0), height), min(box[2], width), min(box[3], height))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        stats["degenerate_boxes_dropped"] += 1
        return None
    if clipped != box:
        stats["boxes_clipped"] += 1
    return clipped


def _mask_area(annotation_file: Path, image_id: int, ann: dict, height: int, width: int) -> int:
    """Pixel count of an annotation's mask, from its run-length encoding (cheap: no full decode).

    pycocotools converts polygons and uncompressed RLE to compressed RLE, whose area is a sum of runs.
    """
    from pycocotools import mask as mask_utils

    segmentation = ann.get("segmentation")
    try:
        if not segmentation:
            return 0
        rle = annotation_rle(segmentation, height, width)
        if [int(v) for v in rle["size"]] != [height, width]:
            raise ValueError(f"RLE size {rle['size']} is not the image's [height, width] [{height}, {width}]")
        return int(mask_utils.area(rle))
    except Exception as err:  # pycocotools raises assorted types on malformed input
        raise DataError(
            f"{annotation_file}: mask of annotation {ann.get('id')} (image id {image_id}) does not decode: {err!r}; "
            "fix or remove its segmentation"
        ) from None
