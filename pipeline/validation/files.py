"""Image file checks, the part great-expectations cannot express: is each image's file there, safe, and decodable?

Per image, in this order, stopping at the first failure (one file problem per image):
unsafe_file_name (absolute or `..`) -> file_missing -> not_an_image (PIL cannot identify it) ->
image_too_large (width * height from the header, BEFORE any decoding: a decompression bomb is never decoded) ->
image_size_mismatch (upright size vs JSON width/height) -> truncated_image (PIL `verify`, then a full `load`).

The size compared is the upright image's (EXIF orientation applied, `sam3.images.upright_size`), the size every
reader of the image sees; it is read from the decoded image (a PNG's EXIF may follow its pixel data), so a file
that does not decode is compared by its header size and then reported as truncated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.validation.problems import Check, Problem, Severity, Table, where
from pipeline.validation.records import RecordTable
from sam3.images import upright_size

DEFAULT_MAX_PIXELS = 100_000_000  # 100 megapixels; about 300 MB once decoded as RGB


def unsafe_reason(file_name: str) -> str | None:
    """Why `file_name` would point outside its split folder (absolute path or a `..` part), or None."""
    posix = PurePosixPath(file_name.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(file_name).drive:
        return "is an absolute path"
    if ".." in posix.parts:
        return "has a '..' part"
    return None


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
            real_width, real_height = image.size
    except UnidentifiedImageError:
        return Check.NOT_AN_IMAGE, "is not an image PIL can read; replace it with the real image"
    except OSError as err:
        return Check.NOT_AN_IMAGE, f"cannot be opened ({err}); replace it with the real image"
    if real_width * real_height > max_pixels:
        return (
            Check.IMAGE_TOO_LARGE,
            f"is {real_width}x{real_height} = {real_width * real_height:,} pixels, over the limit of "
            f"{max_pixels:,}; not decoded (downscale it, or raise --max-pixels if it is genuine)",
        )
    (real_width, real_height), err = _decode(path, (real_width, real_height))
    if width is not None and height is not None and (real_width, real_height) != (width, height):
        return (
            Check.IMAGE_SIZE_MISMATCH,
            f"is {real_width}x{real_height} but the annotation file says width {width}, height {height}; "
            "fix the record or re-export the image",
        )
    if err is not None:
        return (
            Check.TRUNCATED_IMAGE,
            f"does not decode (truncated or corrupt: {type(err).__name__}: {err}); re-export the image",
        )
    return None


def _decode(path: Path, header_size: tuple[int, int]) -> tuple[tuple[int, int], Exception | None]:
    """Decode the image in full: its upright size and None, or `header_size` and the error when it does not decode."""
    try:
        with Image.open(path) as image:
            image.verify()  # container integrity (e.g. PNG chunk checksums); the image is unusable afterwards
        with Image.open(path) as image:
            image.load()  # a full decode catches what verify does not look at (truncated JPEG data)
            return upright_size(image), None
    except Exception as err:  # decoders raise many types on bad bytes (OSError, SyntaxError, ...); all mean corrupt
        return header_size, err


def _size(value: float) -> int | None:
    return int(value) if not math.isnan(value) and value > 0 else None


def check_image_files(table: RecordTable, split_dir: Path, max_pixels: int) -> list[Problem]:
    """File problems of every image record of `table` (a `records.image_table`) whose file_name is a string."""
    problems = []
    frame = table.frame
    for index in tqdm(frame.index, desc=f"{table.split} image files", unit="image"):
        row = frame.loc[index]
        file_name = row["file_name"]
        if not isinstance(file_name, str):
            continue  # missing_key / wrong_type already report it
        unsafe = unsafe_reason(file_name)
        if unsafe is not None:
            shown = file_name  # not joined to the split folder: it is not inside it
            found = (
                Check.UNSAFE_FILE_NAME,
                f"file_name {file_name!r} {unsafe}; make it a path inside the split folder",
            )
        else:
            shown = f"{table.folder}/{file_name}"
            found = inspect_image(split_dir / file_name, _size(row["width_int"]), _size(row["height_int"]), max_pixels)
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
