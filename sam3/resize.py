"""Resize geometry: fit an image into SIZE x SIZE and move its annotations (and predictions) between scales.

The preprocess stage shrinks images with `fit_size` and transforms their COCO annotations with
`scale_annotation`; it records the ORIGINAL size in each image record as `orig_width` / `orig_height`. The
evaluator maps predictions made on a preprocessed image back to the original image with `to_original_scale`,
`boxes_to_original` and `mask_to_original`. All functions are pure (no files).

Conventions: an image of `width` x `height` pixels is resized to exactly `new_w` x `new_h` pixels, so a point
(x, y) in pixel coordinates maps to (x * sx, y * sy) with sx = new_w / width and sy = new_h / height (the two
factors differ slightly because sizes are rounded to whole pixels). Boxes are COCO [x, y, w, h].
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from sam3.coco import annotation_mask, encode_mask
from sam3.errors import DataError

# Keys of a COCO image record that hold the size of the image before any preprocessing.
ORIG_WIDTH = "orig_width"
ORIG_HEIGHT = "orig_height"

# A resampled 0/1 mask is a coverage fraction per pixel; a pixel belongs to the mask when at least half covered.
MASK_THRESHOLD = 0.5


def fit_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The size of a `width` x `height` image shrunk to fit in `size` x `size`, aspect ratio kept, never enlarged.

        scale = min(1, size / max(width, height))
        new_w = max(1, round(width * scale)),  new_h = max(1, round(height * scale))

    Returns (new_w, new_h). Raises ValueError for a non-positive argument.
    """
    if width < 1 or height < 1 or size < 1:
        raise ValueError(f"fit_size needs positive sizes, got width={width}, height={height}, size={size}")
    scale = min(1.0, size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resample a bool mask [h, w] to bool [height, width].

    The mask is resampled as float 0/1 with bilinear interpolation (Pillow widens the filter when shrinking, i.e.
    it is antialiased: each output pixel gets the covered fraction of its footprint), then thresholded at
    MASK_THRESHOLD. Compared with nearest-neighbour sampling, parts thinner than one output pixel survive when
    they cover most of it, and the result does not depend on which input pixel a sample happens to hit.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == (height, width):
        return mask.copy()
    # Pillow rather than torch: the preprocess workers stay light (no torch import) and Pillow's float ("F")
    # resampling is the reference that torch's antialias=True reproduces.
    resized = Image.fromarray(mask.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized) >= MASK_THRESHOLD


def _scaled_polygons(polygons: list, sx: float, sy: float, ann_id: Any) -> list[list[float]]:
    """Each polygon [x0, y0, x1, y1, ...] with x multiplied by sx and y by sy."""
    scaled = []
    for k, polygon in enumerate(polygons):
        if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
            raise DataError(
                f"annotation {ann_id}: polygon {k} must be a flat list [x0, y0, x1, y1, ...] of at least 3 points; "
                "run `python -m pipeline validate` to find and quarantine such annotations"
            )
        scaled.append([float(v) * (sx if i % 2 == 0 else sy) for i, v in enumerate(polygon)])
    return scaled


def polygon_area(polygons: list[list[float]], height: int, width: int) -> float:
    """Pixel area of the union of `polygons` rasterised at `height` x `width` by pycocotools (COCO's definition)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return float(mask_utils.area(rle))


def scale_annotation(ann: Mapping[str, Any], sx: float, sy: float, new_h: int, new_w: int) -> dict[str, Any]:
    """A copy of COCO annotation `ann` moved onto its image resized from w x h to `new_w` x `new_h`.

    sx = new_w / w and sy = new_h / h are the per-axis factors:

    - bbox [x, y, w, h] -> [x * sx, y * sy, w * sx, h * sy]
    - polygons: every x multiplied by sx, every y by sy; area = pycocotools area of the scaled polygons
    - RLE (compressed or not, size [h, w]): decoded, resampled with `resize_mask`, re-encoded as compressed RLE
      of size [new_h, new_w]; area = number of mask pixels
    - no segmentation (or an empty list): area = scaled w * h of the box
    Every other key is kept as it is. Raises DataError for a malformed segmentation.
    """
    out = copy.deepcopy(dict(ann))
    ann_id = ann.get("id")
    if "bbox" in ann:
        bbox = ann["bbox"]
        if not isinstance(bbox, list | tuple) or len(bbox) != 4:
            raise DataError(f"annotation {ann_id}: bbox must be [x, y, width, height], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        out["bbox"] = [x * sx, y * sy, w * sx, h * sy]
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list) and segmentation:
        out["segmentation"] = _scaled_polygons(segmentation, sx, sy, ann_id)
        out["area"] = polygon_area(out["segmentation"], new_h, new_w)
    elif isinstance(segmentation, dict):
        size = segmentation.get("size")
        if not isinstance(size, list | tuple) or len(size) != 2 or "counts" not in segmentation:
            raise DataError(f"annotation {ann_id}: RLE segmentation needs 'size' [height, width] and 'counts'")
        mask = resize_mask(annotation_mask(segmentation, int(size[0]), int(size[1])), new_h, new_w)
        out["segmentation"] = encode_mask(mask)
        out["area"] = float(mask.sum())
    elif segmentation in (None, []):
        if "bbox" in out:
            out["area"] = out["bbox"][2] * out["bbox"][3]
    else:
        raise DataError(
            f"annotation {ann_id}: segmentation must be a list of polygons or an RLE dict, "
            f"got {type(segmentation).__name__}"
        )
    return out


def original_size(image_record: Mapping[str, Any]) -> tuple[int, int]:
    """(width, height) of the image before any preprocessing: `orig_width`/`orig_height` when present, else the
    record's own `width`/`height`. Raises DataError when only one of the two orig keys is present."""
    has_w, has_h = ORIG_WIDTH in image_record, ORIG_HEIGHT in image_record
    if has_w != has_h:
        raise DataError(
            f"image {image_record.get('id')}: has {ORIG_WIDTH if has_w else ORIG_HEIGHT} but not "
            f"{ORIG_HEIGHT if has_w else ORIG_WIDTH}; set both or neither"
        )
    if has_w:
        return int(image_record[ORIG_WIDTH]), int(image_record[ORIG_HEIGHT])
    return int(image_record["width"]), int(image_record["height"])


def to_original_scale(image_record: Mapping[str, Any]) -> tuple[float, float]:
    """Factors (sx, sy) mapping coordinates on this image back to the original image.

        sx = orig_width / width
        sy = orig_height / height
    A record without orig keys was never resized: (1.0, 1.0).
    """
    orig_w, orig_h = original_size(image_record)
    return orig_w / int(image_record["width"]), orig_h / int(image_record["height"])


def boxes_to_original(boxes: Any, image_record: Mapping[str, Any]) -> Any:
    """Boxes [..., 4] on this image (ndarray or Tensor) mapped to the original image: each coordinate times its
    axis factor, [x * sx, y * sy, w * sx, h * sy]. Also right for xyxy boxes (every coordinate is per-axis linear).
    Returns the same type (a Tensor stays on its device with its dtype)."""
    sx, sy = to_original_scale(image_record)
    if isinstance(boxes, np.ndarray):
        return boxes * np.array([sx, sy, sx, sy], dtype=np.result_type(boxes.dtype, np.float32))
    return boxes * boxes.new_tensor([sx, sy, sx, sy])  # a torch.Tensor: no torch import needed here


def mask_to_original(mask: np.ndarray, image_record: Mapping[str, Any]) -> np.ndarray:
    """A bool mask [height, width] on this image resampled to bool [orig_height, orig_width] with `resize_mask`
    (bilinear on 0/1 floats, threshold MASK_THRESHOLD). A CPU Tensor is accepted; the result is an ndarray."""
    mask = np.asarray(mask, dtype=bool)
    height, width = int(image_record["height"]), int(image_record["width"])
    if mask.shape != (height, width):
        raise ValueError(
            f"image {image_record.get('id')}: mask shape {mask.shape} differs from the image size "
            f"({height}, {width}); resize predictions to the image size first"
        )
    orig_w, orig_h = original_size(image_record)
    return resize_mask(mask, orig_h, orig_w)
