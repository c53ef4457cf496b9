"""Write small COCO datasets in the Roboflow layout for tests: real PNG files (Pillow) and real RLE masks (pycocotools).

Each instance is drawn as a filled rectangle in a colour of its category, on a mid-grey background, and its mask is
that same rectangle, so the mask, the box and the pixels agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sam3.coco import encode_mask, save_coco, split_annotation_path

BACKGROUND = (128, 128, 128)
COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]

RECTANGLE = "rectangle"  # segmentation = RLE of the annotation's box (the default)


@dataclass
class Ann:
    """One annotation. `bbox` is COCO xywh in pixels; `segmentation` RECTANGLE or a literal COCO segmentation."""

    category_id: int
    bbox: tuple[float, float, float, float]
    segmentation: Any = RECTANGLE
    iscrowd: int = 0


@dataclass
class Img:
    id: int
    width: int
    height: int
    anns: list[Ann] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # extra image fields, e.g. orig_width / orig_height

    @property
    def file_name(self) -> str:
        return f"img_{self.id:03d}.png"


def rectangle_mask(bbox: tuple[float, float, float, float], height: int, width: int) -> np.ndarray:
    """bool [H, W], True on the integer pixels of xywh `bbox`."""
    x, y, w, h = (int(round(v)) for v in bbox)
    mask = np.zeros((height, width), dtype=bool)
    mask[max(y, 0) : max(y + h, 0), max(x, 0) : max(x + w, 0)] = True
    return mask


def write_split(root: Path, split: str, categories: dict[int, str], images: list[Img]) -> Path:
    """Write `root/split/_annotations.coco.json` and one PNG per image; return the annotation file path."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    coco_images, annotations = [], []
    for img in images:
        pixels = np.zeros((img.height, img.width, 3), dtype=np.uint8)
        pixels[:] = BACKGROUND
        for ann in img.anns:
            mask = rectangle_mask(ann.bbox, img.height, img.width)
            pixels[mask] = COLOURS[ann.category_id % len(COLOURS)]
            segmentation = encode_mask(mask) if ann.segmentation == RECTANGLE else ann.segmentation
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": img.id,
                    "category_id": ann.category_id,
                    "bbox": list(ann.bbox),
                    "area": float(ann.bbox[2] * ann.bbox[3]),
                    "segmentation": segmentation,
                    "iscrowd": ann.iscrowd,
                }
            )
        Image.fromarray(pixels).save(folder / img.file_name)
        coco_images.append(
            {"id": img.id, "file_name": img.file_name, "width": img.width, "height": img.height, **img.extra}
        )
    coco = {
        "images": coco_images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": "none"} for i, name in categories.items()],
    }
    path = split_annotation_path(root, split)
    save_coco(path, coco)
    return path


# The standard tiny dataset: 3 categories, 3 images with different category mixes.
CATEGORIES = {1: "cat", 2: "dog", 3: "bird"}
IMAGES = [
    Img(0, 96, 64, [Ann(1, (8, 16, 24, 32)), Ann(1, (40, 8, 16, 16)), Ann(2, (64, 32, 24, 24))]),
    Img(1, 64, 96, [Ann(3, (10, 20, 30, 40))]),
    Img(2, 80, 80, [], extra={"orig_width": 800, "orig_height": 600}),
]


def write_standard(root: Path, splits: tuple[str, ...] = ("train", "valid")) -> Path:
    """The standard dataset (CATEGORIES, IMAGES) in each of `splits`; returns `root`."""
    for split in splits:
        write_split(root, split, CATEGORIES, IMAGES)
    return root
