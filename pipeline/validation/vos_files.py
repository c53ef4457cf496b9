"""Open one frame image or one annotation PNG and say what it holds, or why it cannot be used (plain Python: what
great-expectations cannot do).

Files are reached through `paths.locate`, as in the image validation: a symbolic link that leads outside the dataset
(`link_outside_dataset`) or nowhere (`broken_link`) is never opened. A frame is checked by `files.inspect_image`
(identified, not over --max-pixels, fully decoded); its size is the stored one (width x height of the pixel data,
no EXIF rotation), the size its label maps are drawn on. An annotation is read by `sam3.video.palette.read_label_map`,
which refuses a PNG that is not palette-indexed (`annotation_not_palette`) or does not decode (`annotation_unreadable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.validation.files import inspect_image
from pipeline.validation.paths import Located, locate
from pipeline.validation.vos_problems import VosCheck
from sam3.errors import DataError
from sam3.video.palette import read_label_map


@dataclass(frozen=True)
class ObjectFacts:
    """One object id of a label map: its pixel count and bounding box (x, y, width, height in pixels)."""

    object_id: int
    area: int
    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class FileFacts:
    """What one frame or annotation file holds: its real path (None when it may not be read), stored size and mode,
    the objects of a label map, or the check and reason that rule it out."""

    path: Path | None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    objects: list[ObjectFacts] = field(default_factory=list)
    check: VosCheck | None = None
    reason: str | None = None

    @property
    def readable(self) -> bool:
        return self.check is None


def _located(root: Path, relative: str) -> Located:
    return locate(root, "", relative)


def _link_problem(located: Located) -> FileFacts:
    # locate's link checks keep their names (same meaning here); the names we list cannot be unsafe
    check = VosCheck(str(located.check)) if str(located.check) in set(VosCheck) else VosCheck.FRAME_UNREADABLE
    return FileFacts(None, check=check, reason=located.reason)


def inspect_frame(root: Path, relative: str, max_pixels: int) -> FileFacts:
    """The frame image `relative` (to `root`): its size, or frame_unreadable with inspect_image's reason."""
    located = _located(root, relative)
    if located.path is None:
        return _link_problem(located)
    found = inspect_image(located.path, None, None, max_pixels)
    if found is not None:
        return FileFacts(located.path, check=VosCheck.FRAME_UNREADABLE, reason=found[1])
    with Image.open(located.path) as image:  # decoded fully by inspect_image; the header gives the size
        width, height = image.size
        mode = image.mode
    return FileFacts(located.path, width, height, mode)


def inspect_annotation(root: Path, relative: str) -> FileFacts:
    """The label map `relative` (to `root`): size, mode and objects, or why read_label_map refuses it."""
    located = _located(root, relative)
    if located.path is None:
        return _link_problem(located)
    try:
        label_map = read_label_map(located.path)
    except DataError as err:
        mode = _mode(located.path)
        check = VosCheck.ANNOTATION_UNREADABLE if mode in (None, "P") else VosCheck.ANNOTATION_NOT_PALETTE
        # read_label_map names the path and says what a VOS annotation must be; the file is named by the problem
        reason = str(err).removeprefix(f"{located.path}: ")
        return FileFacts(located.path, mode=mode, check=check, reason=reason)
    height, width = label_map.shape
    return FileFacts(located.path, width, height, "P", label_objects(label_map))


def _mode(path: Path) -> str | None:
    """The PIL mode from the header, None when not even the header can be read."""
    try:
        with Image.open(path) as image:
            return image.mode
    except (OSError, ValueError):
        return None


def label_objects(label_map: np.ndarray) -> list[ObjectFacts]:
    """Every non-zero id of `label_map` with its area and bounding box, by id."""
    ids, areas = np.unique(label_map, return_counts=True)
    objects = []
    for object_id, area in zip(ids.tolist(), areas.tolist(), strict=True):
        if object_id == 0:
            continue  # background
        mask = label_map == object_id
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        x, y = int(cols[0]), int(rows[0])
        objects.append(ObjectFacts(object_id, area, x, y, int(cols[-1]) - x + 1, int(rows[-1]) - y + 1))
    return objects
