"""COCO images as SAM 3 training samples: one image with one text query per dataset category (SAM3_RECIPE section 2).

For one image of a split in the Roboflow layout (`<dataset>/<split>/_annotations.coco.json` + images):
- every category present in the image is a positive query: prompt = the category name verbatim, targets = its
  non-crowd instances;
- every absent category is a negative query (no targets);
- the image's extra phrases from the negatives file are appended as negative queries with category_id -1.

What is dropped or changed is counted in `stats` and logged once at INFO when the dataset is built, never silently:
- crowd annotations (iscrowd 1) are dropped; a category whose only instances in an image are crowd (or degenerate)
  gets no query there at all, since it is neither absent nor has a box to learn;
- boxes reaching outside the image are clipped to it; boxes empty after clipping are dropped;
- a query with more than `max_targets` targets is dropped (the reference drops them: too many to match);
- in segmentation mode, an instance whose mask is empty is given its filled box as mask;
- an extra phrase equal to a category present in the image is skipped (it would contradict the targets), and one
  equal to a category query or an earlier phrase of the same image is skipped as a duplicate. Phrases are compared
  after the tokenizer's cleanup (`sam3.tokenizer.clean_text`: lower case, whitespace collapsed), as the model sees them.

A sample that cannot be loaded (missing or corrupt image, mask that does not decode) raises DataError naming the file
and the image id. It is never replaced by another sample.

Randomness (the training warp, then the choice of negatives when `num_negatives` is set) comes from a torch.Generator
seeded from (seed, epoch, index), so a sample depends on nothing else: not the worker count, not the order of access.
Call `set_epoch(epoch)` before each epoch, or wrap the dataset in `sam3.data.sampler.EpochKeyed` and index it
with (epoch, index) keys (`ResumableSampler(with_epoch=True)`): DataLoader(persistent_workers=True) workers keep
the dataset copy, and so the epoch, they were started with, while a key carries its epoch with it.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from sam3.coco import (
    ANNOTATIONS_FILE,
    annotation_mask,
    annotation_rle,
    load_coco,
    present_splits,
    split_annotation_path,
)
from sam3.data.negatives import load_negatives
from sam3.data.sampler import EpochDataset
from sam3.data.transforms import (
    REFERENCE_IMAGE_SIZE,
    Transformed,
    WarpPad,
    sample_train_warp_pad,
    val_transform,
    warp_pad,
)
from sam3.errors import DataError
from sam3.tokenizer import clean_text as prompt_key  # equal after cleaning = the same tokens

logger = logging.getLogger(__name__)

EXTRA_NEGATIVE_CATEGORY_ID = -1  # category_id of a query built from the negatives file
DEFAULT_MAX_TARGETS = 200  # the reference's limit of targets per query


@dataclass
class PromptQuery:
    """One text query of a sample.

    prompt       the text (a category name verbatim, or an extra negative phrase)
    category_id  the dataset category, EXTRA_NEGATIVE_CATEGORY_ID (-1) for an extra negative phrase
    boxes        float [n, 4]  normalised cxcywh in the S x S input; n = 0 for a negative query
    masks        bool [n, S, S] in segmentation mode, else None
    """

    prompt: str
    category_id: int
    boxes: torch.Tensor
    masks: torch.Tensor | None = None


@dataclass
class PromptSample:
    """One image and its queries.

    image      float [3, S, S]  normalised with mean = std = 0.5 (padding is -1)
    image_id   COCO image id
    orig_size  (height, width) of the original image (`orig_height`/`orig_width` when the dataset was preprocessed)
    queries    category queries in category id order, then the extra negatives in file order
    """

    image: torch.Tensor
    image_id: int
    orig_size: tuple[int, int]
    queries: list[PromptQuery]


@dataclass(frozen=True)
class _Target:
    """One kept instance: its box (pixels, clipped to the image) and where its mask comes from."""

    box_xyxy: tuple[float, float, float, float]
    annotation_id: Any
    segmentation: Any  # None: the mask is empty or missing, use the filled box instead


@dataclass(frozen=True)
class _CategoryQuery:
    prompt: str
    category_id: int
    targets: tuple[_Target, ...]  # empty: the category is absent from the image


@dataclass(frozen=True)
class _ImageRecord:
    image_id: int
    path: Path
    width: int
    height: int
    orig_size: tuple[int, int]
    positives: dict[int, _CategoryQuery]  # category id -> its query; the other categories are absent...
    without_query: frozenset[int]  # ...except these: present but with no usable target, or too many
    extra_negatives: tuple[str, ...]


class CocoPromptDataset(EpochDataset):
    """One split of a COCO dataset as `PromptSample`s (see the module docstring for the rules).

    Args:
        dataset_dir: folder holding `{train,valid,test}/_annotations.coco.json` and the images.
        split: which split to read ("train", "valid" or "test").
        image_size: side S of the square model input.
        train: random warp + pad (True) or the deterministic validation warp (False).
        with_masks: decode instance masks (segmentation mode).
        negatives: path of a negatives file, or its loaded mapping image id -> phrases, or None.
        max_targets: queries with more targets than this are dropped.
        seed: base seed of the per-sample generators.
        num_negatives: None keeps every absent category as a negative query (the reference). A number k keeps a
            random k of them per sample (fewer prompts per image helps small models trained from scratch,
            SAM3_RECIPE section 1). Extra negatives from the file are always kept.
        annotations_file: the annotation file of the split folder to read: `_annotations.coco.json` (the split), or
            another file over the same images, e.g. an ODinW few-shot file `fewshot_train_shot10_seed3.json`.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str,
        image_size: int = REFERENCE_IMAGE_SIZE,
        train: bool = True,
        with_masks: bool = False,
        negatives: str | Path | Mapping[int, Sequence[str]] | None = None,
        max_targets: int = DEFAULT_MAX_TARGETS,
        seed: int = 0,
        num_negatives: int | None = None,
        annotations_file: str = ANNOTATIONS_FILE,
    ) -> None:
        splits = present_splits(dataset_dir)
        if split not in splits:
            raise DataError(
                f"{split_annotation_path(dataset_dir, split)}: split {split!r} not found; "
                f"this dataset has {', '.join(splits)}"
            )
        if not (Path(dataset_dir) / split / annotations_file).is_file():
            raise DataError(
                f"{Path(dataset_dir) / split / annotations_file}: annotation file not found in split {split!r}; "
                "give an annotation file of that split folder (a few-shot file is made by the validate stage: "
                "--fewshot-seeds)"
            )
        if num_negatives is not None and num_negatives < 0:
            raise ValueError(f"num_negatives must be None or >= 0, got {num_negatives}")
        if max_targets < 1:
            raise ValueError(f"max_targets must be >= 1, got {max_targets}")
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        self.image_size = image_size
        self.train = train
        self.with_masks = with_masks
        self.max_targets = max_targets
        self.seed = seed
        self.num_negatives = num_negatives
        self.annotation_file = Path(dataset_dir) / split / annotations_file
        if negatives is None or isinstance(negatives, Mapping):
            negatives_map = negatives or {}
        else:
            negatives_map = load_negatives(negatives)
        self.categories, self.records, self.stats = _build_index(
            self.annotation_file, negatives_map, max_targets, with_masks
        )
        logger.info(
            "%s: %s",
            self.annotation_file,
            ", ".join(f"{key} {value}" for key, value in self.stats.items()),
        )

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, index: int, epoch: int) -> PromptSample:
        """Sample `index` as drawn in `epoch` (what `__getitem__` returns after `set_epoch(epoch)`)."""
        # The warp is drawn before the negatives: a cached view (sam3.features) takes the warp draw's place.
        generator = sample_generator(self.seed, epoch, index)
        geometry = sample_train_warp_pad(self.image_size, generator) if self.train else None
        out = self.warp(index, geometry)
        record = self.records[index]
        queries = self.draw_queries(index, out.boxes, out.masks, generator)
        return PromptSample(out.image, record.image_id, record.orig_size, queries)

    def warp(self, index: int, geometry: WarpPad | None = None) -> Transformed:
        """Image `index` and all its targets through one warp-pad (None: the validation warp).

        The targets are those of every positive query in category id order: the same for every sample of the image,
        whatever negatives are drawn, so they can be transformed (and cached) once per geometry.
        """
        record = self.records[index]
        image = self._read_image(record)
        targets = [t for q in record.positives.values() for t in q.targets]
        boxes = torch.tensor([t.box_xyxy for t in targets], dtype=torch.float32).reshape(-1, 4)
        masks = self._read_masks(record, targets) if self.with_masks else None
        if geometry is None:
            return val_transform(image, boxes, masks, self.image_size)
        return warp_pad(image, boxes, masks, geometry, self.image_size)

    def draw_queries(
        self, index: int, boxes: torch.Tensor, masks: torch.Tensor | None, generator: torch.Generator
    ) -> list[PromptQuery]:
        """The queries of sample `index`, the negatives drawn from `generator`, each with its slice of `boxes`
        [n, 4] (and `masks` [n, S, S]): every target of the image, as `warp` gives them."""
        record = self.records[index]
        prompt_queries = []
        start = 0
        for query in self._choose_queries(record, generator):
            stop = start + len(query.targets)
            query_masks = masks[start:stop] if masks is not None else None
            prompt_queries.append(PromptQuery(query.prompt, query.category_id, boxes[start:stop], query_masks))
            start = stop
        for phrase in record.extra_negatives:
            empty_masks = (
                torch.zeros(0, self.image_size, self.image_size, dtype=torch.bool) if self.with_masks else None
            )
            prompt_queries.append(
                PromptQuery(phrase, EXTRA_NEGATIVE_CATEGORY_ID, torch.zeros(0, 4, dtype=torch.float32), empty_masks)
            )
        return prompt_queries

    def _choose_queries(self, record: _ImageRecord, generator: torch.Generator) -> list[_CategoryQuery]:
        """The positives and all absent categories (or a random `num_negatives` of them), in category id order."""
        absent = [c for c in self.categories if c not in record.positives and c not in record.without_query]
        if self.num_negatives is not None:
            keep = torch.randperm(len(absent), generator=generator)[: self.num_negatives]
            absent = [absent[int(i)] for i in keep]
        negatives = {c: _CategoryQuery(self.categories[c], c, ()) for c in absent}
        return [
            record.positives.get(c) or negatives[c] for c in self.categories if c in record.positives or c in negatives
        ]

    def _read_image(self, record: _ImageRecord) -> torch.Tensor:
        """uint8 [3, H, W]; DataError when the file is missing, corrupt, or not the size the annotations say."""
        try:
            with Image.open(record.path) as pil:
                pil.load()  # decode now: a truncated file fails here, inside the try
                rgb = pil.convert("RGB")
        except FileNotFoundError:
            raise DataError(
                f"{record.path}: image file of image id {record.image_id} not found "
                f"(listed in {self.annotation_file}); restore the file or remove the image from the annotations"
            ) from None
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            raise DataError(
                f"{record.path}: cannot decode image id {record.image_id} ({err}); "
                "replace the file or remove the image from the annotations (the validate stage quarantines it)"
            ) from None
        if rgb.size != (record.width, record.height):
            raise DataError(
                f"{record.path}: image id {record.image_id} is {rgb.size[0]}x{rgb.size[1]} pixels but "
                f"{self.annotation_file} says {record.width}x{record.height}; fix the width/height fields "
                "(or re-export without EXIF rotation)"
            )
        return F.pil_to_tensor(rgb)

    def _read_masks(self, record: _ImageRecord, targets: list[_Target]) -> torch.Tensor:
        """bool [n, H, W]: each target's decoded mask, or its filled box when its mask was found empty."""
        from pycocotools import mask as mask_utils

        masks = np.zeros((len(targets), record.height, record.width), dtype=bool)
        for i, target in enumerate(targets):
            if target.segmentation is None:
                x0, y0, x1, y1 = target.box_xyxy
                box = np.array([[x0, y0, x1 - x0, y1 - y0]], dtype=np.float64)
                rle = mask_utils.frPyObjects(box, record.height, record.width)  # an [n, 4] array is read as xywh
                masks[i] = mask_utils.decode(rle)[:, :, 0].astype(bool)
                continue
            try:
                masks[i] = annotation_mask(target.segmentation, record.height, record.width)
            except Exception as err:  # pycocotools raises assorted types on malformed input
                raise DataError(
                    f"{self.annotation_file}: mask of annotation {target.annotation_id} (image id {record.image_id}, "
                    f"{record.path.name}) does not decode: {err}; fix or remove its segmentation"
                ) from None
        return torch.from_numpy(masks)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch.Generator seeded from (seed, epoch, index) alone.

    numpy's SeedSequence hashes the triple into well-mixed state, so nearby triples give unrelated streams.
    """
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _build_index(
    annotation_file: Path,
    negatives: Mapping[int, Sequence[str]],
    max_targets: int,
    with_masks: bool,
) -> tuple[dict[int, str], list[_ImageRecord], dict[str, int]]:
    """Parse the split once: categories (id -> name), one record per image, and the counts of what was changed."""
    coco = load_coco(annotation_file)
    categories = _categories(annotation_file, coco)
    images = coco.get("images")
    if not isinstance(images, list):
        raise DataError(f"{annotation_file}: 'images' must be a list")
    stats = Counter(
        {
            key: 0
            for key in (
                "crowd_annotations_dropped",
                "boxes_clipped",
                "degenerate_boxes_dropped",
                "empty_masks_filled",
                "queries_over_max_targets_dropped",
                "queries_without_valid_targets_dropped",
                "extra_negatives_skipped_present",
                "extra_negatives_skipped_duplicate",
                "extra_negatives_unknown_image",
            )
        }
    )
    image_info: dict[int, dict] = {}
    for image in images:
        image_id = image.get("id") if isinstance(image, dict) else None
        if not isinstance(image_id, int) or image_id in image_info:
            raise DataError(f"{annotation_file}: image entry {str(image)[:80]} has a missing or duplicate integer id")
        image_info[image_id] = image

    by_image: dict[int, list[dict]] = {image_id: [] for image_id in image_info}
    for ann in coco.get("annotations", []):
        if ann.get("image_id") not in by_image:
            raise DataError(
                f"{annotation_file}: annotation {ann.get('id')} refers to image id {ann.get('image_id')}, "
                "which is not in 'images'; run the validate stage"
            )
        if ann.get("category_id") not in categories:
            raise DataError(
                f"{annotation_file}: annotation {ann.get('id')} (image id {ann['image_id']}) has category id "
                f"{ann.get('category_id')}, which is not in 'categories'; run the validate stage"
            )
        by_image[ann["image_id"]].append(ann)

    unknown = sorted(set(negatives) - set(image_info))
    stats["extra_negatives_unknown_image"] = len(unknown)
    if unknown:
        # a few-shot file holds a subset of the split's images, so a negatives file made for the split covers more
        subset = Path(annotation_file).name != ANNOTATIONS_FILE
        logger.log(
            logging.INFO if subset else logging.WARNING,
            "%s: negatives given for %d image ids not in this file (first: %s); they are not used%s",
            annotation_file,
            len(unknown),
            unknown[:5],
            " (expected: the file holds a subset of the split)" if subset else "",
        )

    category_keys = {cat_id: prompt_key(name) for cat_id, name in categories.items()}
    records = []
    for image_id, image in tqdm(image_info.items(), desc=f"index {annotation_file.parent.name}", unit="img"):
        records.append(
            _image_record(
                annotation_file,
                image,
                categories,
                category_keys,
                by_image[image_id],
                negatives,
                max_targets,
                with_masks,
                stats,
            )
        )

    positives = [q for r in records for q in r.positives.values()]
    summary = {
        "images": len(records),
        "categories": len(categories),
        "positive_queries": len(positives),
        "negative_queries": sum(len(categories) - len(r.positives) - len(r.without_query) for r in records),
        "extra_negative_queries": sum(len(r.extra_negatives) for r in records),
        "targets": sum(len(q.targets) for q in positives),
    }
    return categories, records, {**summary, **stats}


def _categories(annotation_file: Path, coco: dict) -> dict[int, str]:
    """Category id -> name, sorted by id; DataError when two categories share a prompt."""
    categories: dict[int, str] = {}
    seen: dict[str, int] = {}
    for cat in coco.get("categories") or []:
        cat_id, name = cat.get("id"), cat.get("name")
        if not isinstance(cat_id, int) or not isinstance(name, str) or not name.strip():
            raise DataError(f"{annotation_file}: category {cat} needs an integer id and a non-empty name")
        if prompt_key(name) in seen:
            raise DataError(
                f"{annotation_file}: categories {seen[prompt_key(name)]} and {cat_id} have the same prompt {name!r}; "
                "merge or rename them"
            )
        seen[prompt_key(name)] = cat_id
        categories[cat_id] = name
    if not categories:
        raise DataError(f"{annotation_file}: no categories; every query is a category name")
    return dict(sorted(categories.items()))


def _image_record(
    annotation_file: Path,
    image: dict,
    categories: dict[int, str],
    category_keys: dict[int, str],
    annotations: list[dict],
    negatives: Mapping[int, Sequence[str]],
    max_targets: int,
    with_masks: bool,
    stats: Counter,
) -> _ImageRecord:
    image_id = image["id"]
    try:
        width, height = int(image["width"]), int(image["height"])
        file_name = str(image["file_name"])
        orig_size = (int(image.get("orig_height", height)), int(image.get("orig_width", width)))
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(
            f"{annotation_file}: image id {image_id} needs file_name, width and height ({err!r}); "
            "run the validate stage"
        ) from None

    targets: dict[int, list[_Target]] = defaultdict(list)
    mentioned: set[int] = set()  # categories with any annotation here, crowd or degenerate included
    for ann in annotations:
        mentioned.add(ann["category_id"])
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
        targets[ann["category_id"]].append(_Target(box, ann.get("id"), segmentation))

    positives: dict[int, _CategoryQuery] = {}
    without_query = set()
    for cat_id in sorted(mentioned):
        if not targets[cat_id]:
            stats["queries_without_valid_targets_dropped"] += 1
            without_query.add(cat_id)
        elif len(targets[cat_id]) > max_targets:
            stats["queries_over_max_targets_dropped"] += 1
            without_query.add(cat_id)
        else:
            positives[cat_id] = _CategoryQuery(categories[cat_id], cat_id, tuple(targets[cat_id]))

    present_keys = {category_keys[cat_id] for cat_id in mentioned}
    used_keys = set(category_keys.values())
    extra = []
    for phrase in negatives.get(image_id, ()):
        if prompt_key(phrase) in present_keys:
            stats["extra_negatives_skipped_present"] += 1
        elif prompt_key(phrase) in used_keys:
            stats["extra_negatives_skipped_duplicate"] += 1
        else:
            used_keys.add(prompt_key(phrase))
            extra.append(phrase)
    return _ImageRecord(
        image_id=image_id,
        path=annotation_file.parent / file_name,
        width=width,
        height=height,
        orig_size=orig_size,
        positives=positives,
        without_query=frozenset(without_query),
        extra_negatives=tuple(extra),
    )


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
