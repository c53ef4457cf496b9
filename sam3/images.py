"""Image files read upright: EXIF orientation applied, as image viewers and annotation tools show them.

A camera stores a portrait photo as landscape pixels plus an EXIF Orientation tag o saying how to turn them for
display. Annotation tools draw on the turned (upright) view, so a COCO record's width/height and its boxes are in
that view. Every reader of an image for the model, and every check of a file's size against a record, goes through
here, so that a rotated photo is the same upright picture everywhere (training, evaluation, negatives mining,
predict, validate, preprocess).

    o:        1 or none   2       3      4      5          6             7           8
    turn:     as stored   mirror  180    flip   transpose  90 clockwise  transverse  90 anticlockwise
    (w, h) -> (w, h) for o in 1..4, (h, w) for o in 5..8            (PIL `ImageOps.exif_transpose`)
"""

from __future__ import annotations

from pathlib import Path

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from sam3.errors import DataError

# What reading a bad file raises: missing (FileNotFoundError, an OSError), not an image (UnidentifiedImageError),
# truncated or corrupt (OSError, SyntaxError, ValueError from the decoders). Callers name the file in their message.
READ_ERRORS: tuple[type[Exception], ...] = (OSError, UnidentifiedImageError, SyntaxError, ValueError)
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # the orientations that turn by 90 degrees


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


def read_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """The image at `path`, decoded in full, upright, converted to `mode` ("RGB": [H, W, 3] uint8 once an array).

    Raises one of READ_ERRORS for a missing, unreadable or truncated file (decoding happens here, not later).
    """
    with Image.open(path) as image:
        return make_upright(image).convert(mode)  # convert copies: the result outlives the closed file


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
