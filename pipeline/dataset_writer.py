"""Writing a generated dataset: images as PNG plus one COCO file per split, with masks as RLE.

Shared by the demo dataset (`pipeline.demo_data`) and the shapes dataset (`pipeline.shapes_data`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sam3.coco import ANNOTATIONS_FILE, annotation_rle, encode_mask, save_coco

log = logging.getLogger(__name__)


@dataclass
class ImageSample:
    """One output image: file name inside its split folder, RGB uint8 [H, W, 3], (category id, bool mask) pairs."""

    file_name: str
    rgb: np.ndarray
    instances: list[tuple[int, np.ndarray]]


def mask_annotation(mask: np.ndarray, annotation_id: int, image_id: int, category_id: int) -> dict[str, Any]:
    """COCO annotation of one non-empty bool [H, W] mask: compressed RLE, bbox [x, y, w, h] and area from the mask.

    bbox follows pycocotools (`toBbox`): w = x_max - x_min + 1 in pixels; area is the mask's pixel count.
    """
    from pycocotools import mask as mask_utils

    segmentation = encode_mask(mask)
    rle = annotation_rle(segmentation, *segmentation["size"])
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": int(mask_utils.area(rle)),
        "iscrowd": 0,
    }


def write_split(
    out: str | Path,
    split: str,
    samples: Iterable[ImageSample],
    categories: list[dict[str, Any]],
    info: dict[str, Any],
    total: int | None = None,
) -> dict[str, int]:
    """Write `samples` as PNGs + `<out>/<split>/_annotations.coco.json`; image and annotation ids count from 1.

    Returns {"images", "annotations", "categories" (those with at least one annotation)} and logs it.
    """
    from PIL import Image
    from tqdm import tqdm

    folder = Path(out) / split
    folder.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, sample in enumerate(tqdm(samples, total=total, desc=f"{split} images", leave=False), start=1):
        height, width = sample.rgb.shape[:2]
        Image.fromarray(sample.rgb).save(folder / sample.file_name, format="PNG")
        images.append({"id": image_id, "file_name": sample.file_name, "width": width, "height": height})
        for category_id, mask in sample.instances:
            annotations.append(mask_annotation(mask, len(annotations) + 1, image_id, category_id))
    save_coco(
        folder / ANNOTATIONS_FILE,
        {"info": info, "images": images, "annotations": annotations, "categories": categories},
    )
    stale = sorted({p.name for p in folder.iterdir()} - {i["file_name"] for i in images} - {ANNOTATIONS_FILE})
    if stale:
        log.warning(
            "%s: %d files not written by this build (e.g. %s); delete the folder and build again",
            folder,
            len(stale),
            stale[0],
        )
    summary = {
        "images": len(images),
        "annotations": len(annotations),
        "categories": len({a["category_id"] for a in annotations}),
    }
    log.info(
        "%s: %d images, %d annotations, %d of %d categories -> %s",
        split,
        summary["images"],
        summary["annotations"],
        summary["categories"],
        len(categories),
        folder,
    )
    return summary
