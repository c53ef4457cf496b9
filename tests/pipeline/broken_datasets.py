"""Tiny COCO datasets for the validate tests, built in the test: real PNGs written with PIL and a few records.

`clean_split` writes a split that passes every check; a test then breaks exactly what it wants to check.
"""

from __future__ import annotations

import copy
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sam3.coco import ANNOTATIONS_FILE

WIDTH, HEIGHT = 32, 24
CATEGORIES = [
    {"id": 1, "name": "cat", "supercategory": "animals"},
    {"id": 2, "name": "dog", "supercategory": "animals"},
]


def write_png(
    path: Path, width: int = WIDTH, height: int = HEIGHT, color: tuple[int, int, int] = (200, 40, 40)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)
    return path


def clean_split(root: Path, split: str, n_images: int = 2, first_id: int = 1) -> dict[str, Any]:
    """Write `n_images` PNGs under root/split and return a valid COCO dict for them: image i (id first_id + i,
    file img{i}.png) has one annotation, id 100 + first_id + i, category 1 for even i and 2 for odd i, with a box
    [2, 3, 10, 8] and its polygon. Not written yet: call `write_split` after breaking it."""
    images, annotations = [], []
    for i in range(n_images):
        image_id = first_id + i
        # the colour differs by split: the same bytes in two splits is a shared_image_file warning
        write_png(root / split / f"img{i}.png", color=(40 * i % 256, 100, sum(split.encode()) % 256))
        images.append({"id": image_id, "file_name": f"img{i}.png", "width": WIDTH, "height": HEIGHT})
        annotations.append(
            {
                "id": 100 + image_id,
                "image_id": image_id,
                "category_id": 1 + i % 2,
                "bbox": [2, 3, 10, 8],
                "area": 80,
                "iscrowd": 0,
                "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]],
            }
        )
    return {
        "info": {"description": "validate test"},
        "licenses": [{"id": 1, "name": "CC BY 4.0"}],
        "images": images,
        "annotations": annotations,
        "categories": copy.deepcopy(CATEGORIES),
    }


def write_split(root: Path, split: str, coco: dict[str, Any]) -> Path:
    """Write `coco` as root/split/_annotations.coco.json; NaN and Infinity are written as Python's json does."""
    path = root / split / ANNOTATIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco, indent=1), encoding="utf-8")
    return path


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_truncated_png(path: Path, width: int = WIDTH, height: int = HEIGHT) -> Path:
    """A noise PNG (so its pixel data is long) with its last 40 bytes cut: the header reads, the pixels do not."""
    write_noise(path, width, height, "PNG")
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    return path


def write_noise(path: Path, width: int, height: int, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def write_png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims `width` x `height` in its IHDR chunk and has no pixel data: a decompression bomb's header
    (a real one would hold a few kB of zlib data inflating to gigabytes) without the bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # 8-bit RGB, deflate, no filter, no interlace
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path
