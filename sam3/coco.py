"""COCO files in the Roboflow export layout: `<dataset>/{train,valid,test}/_annotations.coco.json` + images.

Small, strict helpers shared by every stage that reads or writes a dataset:
- `load_coco` parses one annotation file and turns a JSON syntax error into a `DataError` naming file, line, column.
- `save_coco` writes one deterministically (sorted keys, fixed indent, trailing newline) so two builds are
  byte-identical and DVC hashes stay stable, and atomically (`sam3.io.write_json`).
- `sam3.coco_split.CocoSplit` indexes one split's file (images, categories, annotations per image) for its readers.
- `annotation_mask` decodes polygons or RLE (compressed or not) into a boolean [H, W] mask with pycocotools.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sam3.errors import DataError
from sam3.io import write_json

SPLITS: tuple[str, ...] = ("train", "valid", "test")
ANNOTATIONS_FILE = "_annotations.coco.json"


def split_annotation_path(dataset_dir: str | Path, split: str) -> Path:
    """Path of one split's annotation file."""
    return Path(dataset_dir) / split / ANNOTATIONS_FILE


def present_splits(dataset_dir: str | Path) -> list[str]:
    """The splits of `dataset_dir` that have an annotation file, in SPLITS order.

    Raises DataError when the folder does not exist or holds no split at all.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    found = [s for s in SPLITS if split_annotation_path(root, s).is_file()]
    if not found:
        raise DataError(
            f"{root}: no split found; expected {', '.join(f'{s}/{ANNOTATIONS_FILE}' for s in SPLITS)} "
            "(the Roboflow COCO export layout)"
        )
    return found


def read_json(path: str | Path, missing: str = "file not found") -> Any:
    """Parse a JSON file; DataError when it is missing (`missing` says what to do), not UTF-8, or not JSON
    (with file, line and column)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: {missing}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None


def load_coco(path: str | Path) -> dict[str, Any]:
    """Parse a COCO annotation file.

    Raises DataError (with file, line and column for a syntax error) when the file is missing, not UTF-8,
    not JSON, or not a JSON object.
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be a JSON object with images, annotations, categories")
    return data


def save_coco(path: str | Path, data: dict[str, Any], allow_nan: bool = False) -> None:
    """Write `data` as JSON deterministically (sorted keys, indent 1, newline at end), creating parent folders.

    NaN / Infinity are refused unless `allow_nan` (only the quarantine writes records back as found).
    """
    write_json(path, data, indent=1, allow_nan=allow_nan)  # atomic: a reader never sees half a file


def annotation_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A COCO `segmentation` (list of polygons, RLE with list counts, or compressed RLE) as one compressed RLE.

    Cheap (no decode): pycocotools' area and merge work on it directly. An empty polygon list gives an empty mask.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not segmentation:
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
        return rle
    raise DataError(f"unsupported segmentation of type {type(segmentation).__name__}")


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO `segmentation` (polygons, RLE with list counts, or compressed RLE) to bool [H, W]."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(annotation_rle(segmentation, height, width)).astype(bool)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Encode a bool [H, W] mask as compressed COCO RLE with `counts` as an ASCII string (JSON-serialisable)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}
