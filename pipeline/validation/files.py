"""Image file checks, the part great-expectations cannot express: is each image's file there, safe, and decodable?

Per image, in this order, stopping at the first failure (one file problem per image):
unsafe_file_name (absolute, `..`) -> link_outside_dataset -> broken_link (links: `paths.locate`; nothing outside
the dataset folder is opened) -> file_missing -> not_an_image (PIL cannot identify it) ->
image_too_large (width * height from the header, BEFORE any decoding: a decompression bomb is never decoded) ->
image_size_mismatch (upright size vs JSON width/height) -> truncated_image (PIL `verify`, then a full `load`) ->
unsupported_pixels (decodes, but `sam3.images.to_8bit` has no 8-bit mapping for it: float pixels, say).

The size compared is the upright image's (EXIF orientation applied, `sam3.images.upright_size`), the size every
reader of the image sees; it is read from the decoded image (a PNG's EXIF may follow its pixel data), so a file
that does not decode is compared by its header size and then reported as truncated. When the EXIF orientation
turns the picture by 90 degrees, a size mismatch says so, and says when the record has the stored (sideways) size:
the usual cause is a tool that ignored the orientation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.validation.paths import locate
from pipeline.validation.problems import Check, Problem, Severity, Table, where
from pipeline.validation.records import RecordTable
from sam3.images import exif_orientation, unsupported_pixels, upright_size

DEFAULT_MAX_PIXELS = 100_000_000  # 100 megapixels; about 300 MB once decoded as RGB


@contextmanager
def _pixel_limit_lifted() -> Iterator[None]:
    """PIL warns above Image.MAX_IMAGE_PIXELS and refuses to open above twice that; we compare the header size with
    --max-pixels ourselves (so the user's limit is the one that counts), hence lift PIL's while checking."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def inspect_image(path: Path, width: int | None, height: int | None, max_pixels: int) -> tuple[Check, str] | None:
    """The first file problem of the image at `path` as (check, reason), or None when it decodes fully.

    `width`/`height` are the JSON's (None when the record has no valid size: then sizes are not compared).
    """
    with _pixel_limit_lifted():
        return _inspect(path, width, height, max_pixels)


def _inspect(path: Path, width: int | None, height: int | None, max_pixels: int) -> tuple[Check, str] | None:
    if not path.is_file():
        reason = "not found" if not path.exists() else "is not a file"
        return Check.FILE_MISSING, f"{reason}; put the image there or fix file_name"
    try:
        with Image.open(path) as image:  # reads the header only
            stored = image.size
    except UnidentifiedImageError:
        return Check.NOT_AN_IMAGE, "is not an image PIL can read; replace it with the real image"
    except OSError as err:
        return Check.NOT_AN_IMAGE, f"cannot be opened ({err}); replace it with the real image"
    if stored[0] * stored[1] > max_pixels:
        return (
            Check.IMAGE_TOO_LARGE,
            f"is {stored[0]}x{stored[1]} = {stored[0] * stored[1]:,} pixels, over the limit of "
            f"{max_pixels:,}; not decoded (downscale it, or raise --max-pixels if it is genuine)",
        )
    decoded = _decode(path, stored)
    if width is not None and height is not None and decoded.size != (width, height):
        real_width, real_height = decoded.size
        return (
            Check.IMAGE_SIZE_MISMATCH,
            f"is {real_width}x{real_height} but the annotation file says width {width}, height {height}"
            f"{_orientation_note(decoded, stored, (width, height))}; fix the record or re-export the image",
        )
    if decoded.error is not None:
        err = decoded.error
        return (
            Check.TRUNCATED_IMAGE,
            f"does not decode (truncated or corrupt: {type(err).__name__}: {err}); re-export the image",
        )
    if decoded.unsupported is not None:
        return Check.UNSUPPORTED_PIXELS, decoded.unsupported
    return None


class _Decoded(NamedTuple):
    size: tuple[int, int]  # upright (the header's when the file does not decode)
    orientation: object  # EXIF Orientation, 1 when none (or when the file does not decode)
    error: Exception | None  # why it does not decode
    unsupported: str | None  # why its pixels have no 8-bit mapping (sam3.images.unsupported_pixels)


def _decode(path: Path, header_size: tuple[int, int]) -> _Decoded:
    """Decode the image in full: its upright size, orientation and pixel mapping, or the error when it does not."""
    try:
        with Image.open(path) as image:
            image.verify()  # container integrity (e.g. PNG chunk checksums); the image is unusable afterwards
        with Image.open(path) as image:
            image.load()  # a full decode catches what verify does not look at (truncated JPEG data)
            return _Decoded(upright_size(image), exif_orientation(image), None, unsupported_pixels(image))
    except Exception as err:  # decoders raise many types on bad bytes (OSError, SyntaxError, ...); all mean corrupt
        return _Decoded(header_size, 1, err, None)


def _orientation_note(decoded: _Decoded, stored: tuple[int, int], record: tuple[int, int]) -> str:
    """What the EXIF orientation has to do with a size mismatch: nothing ("") unless it turns the picture by 90
    degrees (the upright size is the stored one swapped); then it names it, and says so when the record holds the
    stored (sideways) size, the usual cause being a tool that ignored the orientation."""
    if decoded.size == stored:
        return ""
    note = f" (its EXIF Orientation {decoded.orientation} turns the stored {stored[0]}x{stored[1]} pixels by 90 degrees"
    if record == stored:
        return (
            f"{note}, as viewers and annotation tools show it; the record has the stored, sideways size: the tool "
            "that wrote it ignored the orientation, but sizes and boxes must be of the upright picture)"
        )
    return f"{note})"


def _size(value: float) -> int | None:
    return int(value) if not math.isnan(value) and value > 0 else None


def check_image_files(table: RecordTable, dataset_dir: Path, max_pixels: int) -> list[Problem]:
    """File problems of every image record of `table` (a `records.image_table`) whose file_name is a string; its
    files are looked for in the table's split folder of `dataset_dir`, and only inside `dataset_dir`."""
    problems = []
    frame = table.frame
    for index in tqdm(frame.index, desc=f"{table.split} image files", unit="image"):
        row = frame.loc[index]
        file_name = row["file_name"]
        if not isinstance(file_name, str):
            continue  # missing_key / wrong_type already report it
        located = locate(dataset_dir, table.folder, file_name)
        if located.check == Check.UNSAFE_FILE_NAME:
            shown = file_name  # not joined to the split folder: it is not inside it
            found = (located.check, f"{located.reason}; make it a path inside the split folder")
        else:
            shown = f"{table.folder}/{file_name}"
            if located.path is None:
                found = (located.check, located.reason)
            else:
                found = inspect_image(located.path, _size(row["width_int"]), _size(row["height_int"]), max_pixels)
            found = None if found is None else (found[0], f"{shown} {found[1]}")
        if found is None:
            continue
        check, reason = found
        problems.append(
            Problem(
                check,
                Severity.ERROR,
                f"{where(Table.IMAGES, index, row['id'])}: {reason}",
                split=table.split,
                table=Table.IMAGES,
                index=int(index),
                record_id=row["id"],
                file=shown,
            )
        )
    return problems
