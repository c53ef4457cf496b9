"""Image files read upright: EXIF orientation applied, as image viewers and annotation tools show them.

A camera stores a portrait photo as landscape pixels plus an EXIF Orientation tag o saying how to turn them for
display. Annotation tools draw on the turned (upright) view, so a COCO record's width/height and its boxes are in
that view. Every reader of an image for the model, and every check of a file's size against a record, goes through
here, so that a rotated photo is the same upright picture everywhere (training, evaluation, negatives mining,
predict, validate, preprocess).

    o:        1 or none   2       3      4      5          6             7           8
    turn:     as stored   mirror  180    flip   transpose  90 clockwise  transverse  90 anticlockwise
    (w, h) -> (w, h) for o in 1..4, (h, w) for o in 5..8            (PIL `ImageOps.exif_transpose`)

High bit depth: a 16-bit greyscale file (PNG, TIFF; Pillow modes "I;16*", and "I" for 16-bit PGM, which Pillow
scales to 0..65535) is mapped to 8 bits here, once, as round(v / 257): 65535 -> 255, 32896 -> 128, 0 -> 0. Pillow's
own `convert("RGB")` clips those values at 255, so a 16-bit picture would be all white. (Pillow already reads a
16-bit RGB(A) PNG as 8 bits per channel, by keeping the high byte.) We divide by the format's full scale, not by
the image's own maximum: 16-bit formats store values on a fixed 0..65535 scale (the PNG specification has encoders
scale 10- or 12-bit samples up to it), so a dark photo stays dark, every file of a dataset gets the same mapping,
and a resized copy gets the same pixels as the original. Pixels with no agreed scale are refused with the reason
(`UnsupportedPixels`): 32-bit float ("F": 0..1? 0..255? physical units?) and 32-bit integers outside 0..65535.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from sam3.errors import DataError


class UnsupportedPixels(ValueError):
    """The image decodes, but its pixel values have no agreed mapping to 8 bits (the message says why)."""


# What reading a bad file raises: missing (FileNotFoundError, an OSError), not an image (UnidentifiedImageError),
# truncated or corrupt (OSError, SyntaxError, ValueError from the decoders), pixels with no 8-bit mapping
# (UnsupportedPixels, a ValueError). Callers name the file in their message.
READ_ERRORS: tuple[type[Exception], ...] = (OSError, UnidentifiedImageError, SyntaxError, ValueError)
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # the orientations that turn by 90 degrees
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # greyscale on the 0..65535 scale
_FULL_SCALE_16 = 65535


def exif_orientation(image: Image.Image) -> object:
    """The EXIF (or XMP) Orientation of an opened image, 1 when it has none; the value `exif_transpose` acts on.

    From the header for JPEG, TIFF and WebP; Pillow decodes a PNG to find an eXIf chunk after its pixel data.
    """
    return image.getexif().get(ExifTags.Base.Orientation, 1)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once upright: its stored size, swapped for orientations 5..8."""
    width, height = image.size
    return (height, width) if exif_orientation(image) in _SWAPS_SIDES else (width, height)


def make_upright(image: Image.Image) -> Image.Image:
    """Decode `image` and turn it upright in place, removing the Orientation tag from its EXIF (so a copy saved
    with that EXIF is not turned a second time); returns it. Its mode and `format` are kept."""
    ImageOps.exif_transpose(image, in_place=True)
    return image


def unsupported_pixels(image: Image.Image) -> str | None:
    """Why `to_8bit` refuses the (decoded) `image`, or None when it maps it (module docstring)."""
    if image.mode == "F":
        return (
            "has 32-bit float pixels, which have no agreed range to map to 8 bits (0..1? 0..255?); "
            "save it as an 8- or 16-bit image"
        )
    if image.mode == "I":
        low, high = image.getextrema()
        if low < 0 or high > _FULL_SCALE_16:
            return (
                f"has 32-bit integer pixels from {low} to {high}, outside the 16-bit range 0..{_FULL_SCALE_16} "
                "that can be mapped to 8 bits; save it as an 8- or 16-bit image"
            )
    return None


def to_8bit(image: Image.Image) -> Image.Image:
    """`image` with 8 bits per channel: a 16-bit greyscale image (SIXTEEN_BIT_MODES) as mode "L" with
    round(v / 257); any other mode unchanged (the same object). UnsupportedPixels for float pixels and integers
    outside 0..65535. `image` must be decoded or decodable (this reads its pixels)."""
    reason = unsupported_pixels(image)
    if reason is not None:
        raise UnsupportedPixels(reason)
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image).astype(np.uint32)  # I;16B is big-endian, I is int32: one dtype for the arithmetic
    # (v + 128) // 257 == round(v / 257): 257 is odd, so v / 257 is never exactly halfway
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))


def read_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """The image at `path`, decoded in full, upright, with 8 bits per channel (`to_8bit`), converted to `mode`
    ("RGB": [H, W, 3] uint8 once an array).

    Raises one of READ_ERRORS for a missing, unreadable or truncated file, or pixels with no 8-bit mapping
    (decoding happens here, not later).
    """
    with Image.open(path) as image:
        return to_8bit(make_upright(image)).convert(mode)  # convert copies: the result outlives the closed file


def read_record_image(path: str | Path, image_id: int, listed_in: str | Path | None = None) -> Image.Image:
    """`read_image(path)` for an image record of a dataset split (RGB, upright).

    DataError naming the file, the image id (and `listed_in`, the annotation file listing it) when the file is
    missing or does not decode.
    """
    listed = f" (listed in {listed_in})" if listed_in is not None else ""
    remedy = "or remove the image from the annotations (the validate stage quarantines it)"
    try:
        return read_image(path)
    except FileNotFoundError:
        raise DataError(
            f"{path}: image file of image id {image_id} not found{listed}; restore the file {remedy}"
        ) from None
    except READ_ERRORS as err:
        raise DataError(
            f"{path}: cannot decode image id {image_id} ({err}){listed}; replace the file {remedy}"
        ) from None
