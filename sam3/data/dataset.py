"""COCO images as SAM 3 training samples: one image with one text query per dataset category (docs/RECIPE.md section 2).

For one image of a split in the Roboflow layout (`<dataset>/<split>/_annotations.coco.json` + images):
- every category present in the image is a positive query: prompt = the category name verbatim, targets = its
  non-crowd instances;
- every absent category is a negative query (no targets);
- the image's extra phrases from the negatives file are appended as negative queries with category_id -1.

What is dropped or changed is counted in `stats` and logged once at INFO when the dataset is built, never silently:
- crowd annotations (iscrowd 1) are dropped; a category whose only instances in an image are crowd (or degenerate)
  becomes a negative query there, as in the reference (it removes those objects, not their query);
- boxes reaching outside the image are clipped to it; boxes empty after clipping are dropped;
- a query with more than `max_targets` targets is dropped (the reference drops them: too many to match);
- in segmentation mode, an instance whose mask is empty is given its filled box as mask;
- an extra phrase equal to a category present in the image is skipped (it would contradict the targets), and one
  equal to a category query or an earlier phrase of the same image is skipped as a duplicate. Phrases are compared
  after the tokenizer's cleanup (`sam3.tokenizer.clean_text`: lower case, whitespace collapsed), as the model sees them.

The split is read and checked once (`sam3.coco_split.CocoSplit`) and these rules applied to it once, when the dataset
is built (`sam3.data.index`); a sample then reads its image, upright (EXIF orientation applied, `sam3.images`: the
record's width/height are the upright image's), and its masks.

A sample that cannot be loaded (missing or corrupt image, mask that does not decode) raises DataError naming the file
and the image id. It is never replaced by another sample.

The prompt budget (`max_prompts_per_image` = B, train.max_prompts_per_image): the DETR encoder and decoder run once
per (image, prompt), so memory and time grow with the prompts of an image. With a budget, a sample keeps every
positive query P (they carry the supervision, even past B) and max(0, B - P) of its negatives (the absent categories,
after `num_negatives`, and the negatives file's phrases), drawn without replacement, kept in their usual order.
None keeps every prompt (the reference). The counts before and after the budget are logged when the dataset is built.

Randomness (the training warp, then the choice of negatives when `num_negatives` is set, then the budget's draw) comes
from a torch.Generator seeded from (seed, epoch, index), so a sample depends on nothing else: not the worker count,
not the order of access, not where a run resumed.
Call `set_epoch(epoch)` before each epoch, or wrap the dataset in `sam3.data.sampler.EpochKeyed` and index it
with (epoch, index) keys (`ResumableSampler(with_epoch=True)`): DataLoader(persistent_workers=True) workers keep
the dataset copy, and so the epoch, they were started with, while a key carries its epoch with it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from sam3.coco import ANNOTATIONS_FILE, annotation_mask
from sam3.coco_split import CocoSplit
from sam3.config import MAX_TARGETS
from sam3.data.index import CategoryQuery, ImageRecord, Target, build_index
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
from sam3.images import read_record_image

logger = logging.getLogger(__name__)

EXTRA_NEGATIVE_CATEGORY_ID = -1  # category_id of a query built from the negatives file


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
            docs/RECIPE.md section 1). Extra negatives from the file are always kept.
        annotations_file: the annotation file of the split folder to read: `_annotations.coco.json` (the split), or
            another file over the same images, e.g. an ODinW few-shot file `fewshot_train_shot10_seed3.json`.
        max_prompts_per_image: the prompt budget (module docstring); None: every prompt.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str,
        image_size: int = REFERENCE_IMAGE_SIZE,
        train: bool = True,
        with_masks: bool = False,
        negatives: str | Path | Mapping[int, Sequence[str]] | None = None,
        max_targets: int = MAX_TARGETS,
        seed: int = 0,
        num_negatives: int | None = None,
        annotations_file: str = ANNOTATIONS_FILE,
        max_prompts_per_image: int | None = None,
    ) -> None:
        annotation_file = CocoSplit.locate(dataset_dir, split, annotations_file)
        if num_negatives is not None and num_negatives < 0:
            raise ValueError(f"num_negatives must be None or >= 0, got {num_negatives}")
        if max_prompts_per_image is not None and max_prompts_per_image < 1:
            raise ValueError(f"max_prompts_per_image must be None or >= 1, got {max_prompts_per_image}")
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
        self.max_prompts_per_image = max_prompts_per_image
        self.annotation_file = annotation_file
        if negatives is None or isinstance(negatives, Mapping):
            negatives_map = negatives or {}
        else:
            negatives_map = load_negatives(negatives)
        self.categories, self.records, self.stats = build_index(
            CocoSplit.load(annotation_file), negatives_map, max_targets, with_masks
        )
        logger.info(
            "%s: %s",
            self.annotation_file,
            ", ".join(f"{key} {value}" for key, value in self.stats.items()),
        )
        if self.records:
            counts = self.prompt_counts()
            logger.info(
                "%s: prompts per image %s (mean %.1f, max %d) -> %s (mean %.1f, max %d); %d of %d images over it",
                self.annotation_file,
                "with every prompt" if max_prompts_per_image is None else "before the budget",
                counts["before"].mean(),
                counts["before"].max(),
                "kept, no budget" if max_prompts_per_image is None else f"budget {max_prompts_per_image}",
                counts["after"].mean(),
                counts["after"].max(),
                int((counts["after"] < counts["before"]).sum()),
                len(self.records),
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
        return self._within_budget(prompt_queries, generator)

    def _within_budget(self, queries: list[PromptQuery], generator: torch.Generator) -> list[PromptQuery]:
        """Every positive of `queries` and a random max(0, B - positives) of its negatives, in their order."""
        budget = self.max_prompts_per_image
        if budget is None or len(queries) <= budget:
            return queries  # no draw: the generator's later use (none today) would not depend on the budget
        negatives = [i for i, query in enumerate(queries) if len(query.boxes) == 0]
        room = max(0, budget - (len(queries) - len(negatives)))
        drawn = torch.randperm(len(negatives), generator=generator)[:room]
        dropped = set(negatives) - {negatives[int(i)] for i in drawn}
        return [query for i, query in enumerate(queries) if i not in dropped]

    def prompt_counts(self) -> dict[str, np.ndarray]:
        """Prompts per image before and after the budget ("before", "after": [images] int arrays): what a sample
        holds, counted without reading an image (the budget keeps every positive, so "after" can exceed it)."""
        before, after = [], []
        for record in self.records:
            absent = sum(1 for c in self.categories if c not in record.positives and c not in record.without_query)
            if self.num_negatives is not None:
                absent = min(absent, self.num_negatives)
            positives, negatives = len(record.positives), absent + len(record.extra_negatives)
            before.append(positives + negatives)
            budget = self.max_prompts_per_image
            after.append(positives + (negatives if budget is None else min(negatives, max(0, budget - positives))))
        return {"before": np.array(before), "after": np.array(after)}

    def _choose_queries(self, record: ImageRecord, generator: torch.Generator) -> list[CategoryQuery]:
        """The positives and all absent categories (or a random `num_negatives` of them), in category id order."""
        absent = [c for c in self.categories if c not in record.positives and c not in record.without_query]
        if self.num_negatives is not None:
            keep = torch.randperm(len(absent), generator=generator)[: self.num_negatives]
            absent = [absent[int(i)] for i in keep]
        negatives = {c: CategoryQuery(self.categories[c], c, ()) for c in absent}
        return [
            record.positives.get(c) or negatives[c] for c in self.categories if c in record.positives or c in negatives
        ]

    def _read_image(self, record: ImageRecord) -> torch.Tensor:
        """uint8 [3, H, W]; DataError when the file is missing, corrupt, or not the size the annotations say."""
        # upright: EXIF orientation applied, as the annotations were drawn
        rgb = read_record_image(record.path, record.image_id, self.annotation_file)
        if rgb.size != (record.width, record.height):
            raise DataError(
                f"{record.path}: image id {record.image_id} is {rgb.size[0]}x{rgb.size[1]} pixels but "
                f"{self.annotation_file} says {record.width}x{record.height}; fix the width/height fields "
                "(sizes are of the upright image, EXIF orientation applied)"
            )
        return F.pil_to_tensor(rgb)

    def _read_masks(self, record: ImageRecord, targets: list[Target]) -> torch.Tensor:
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
