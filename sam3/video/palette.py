"""Indexed (palette) PNG label maps, the annotation format of DAVIS, MOSE and our predictions.

A label map is an (H, W) uint8 array: 0 background, k > 0 object k (255 in DAVIS marks "void", ignored by neither
the reference loaders nor us: it is an object id like any other unless a dataset says otherwise). The palette only
colours the file for people; the index values are the data, so a PNG that is not in palette mode ("P") is refused
rather than guessed from its colours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sam3.errors import DataError


def davis_palette() -> list[int]:
    """The DAVIS colour map (256 RGB triples, flattened): index i gets the colour whose bits are spread from i's bits,
    the PASCAL VOC scheme DAVIS and MOSE annotations use, so our PNGs colour objects as theirs do."""
    palette = []
    for index in range(256):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette.extend((r, g, b))
    return palette


PALETTE = davis_palette()


def read_label_map(path: str | Path) -> np.ndarray:
    """The (H, W) uint8 object ids of an indexed PNG. DataError if it cannot be read or is not palette-indexed."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            array = np.array(image)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the annotation PNG ({err})") from err
    if mode != "P":
        raise DataError(
            f"{path}: annotation PNG is in mode {mode!r}, not an indexed (palette) PNG: DAVIS/MOSE masks store the "
            "object id as the pixel's palette index (0 background, k object k)"
        )
    return array.astype(np.uint8, copy=False)


def write_label_map(path: str | Path, label_map: np.ndarray) -> None:
    """Write an (H, W) array of object ids (0..255) as an indexed PNG with the DAVIS palette."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"a label map is (H, W), got shape {label_map.shape}")
    if label_map.size and (label_map.min() < 0 or label_map.max() > 255):
        raise ValueError("object ids must be within 0..255")
    height, width = label_map.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(label_map, dtype=np.uint8).tobytes())
    image.putpalette(PALETTE)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
