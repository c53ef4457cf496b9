"""`python -m pipeline shapes-data`: a generated dataset of coloured shapes, where training must visibly help.

Each image has a plain or lightly noisy grey background and 1-4 filled shapes; the 9 categories are
"<colour> <shape>" for red / green / blue x circle / square / triangle, so a prompt such as "red circle" must tell
colour and form apart. Shapes are drawn fully inside the image at 10-40% of its side, rotated at random
(squares, triangles), and may overlap a little: a shape is placed only if every shape under it keeps at least
1 - MAX_HIDDEN_FRACTION of its pixels, and never touches a shape of its own colour (the two would merge).
Masks are exact (a pixel is in a shape when its centre is; no anti-aliasing), and each annotation's RLE, bbox
and area describe the VISIBLE part.

Deterministic: image i of split s is drawn from `numpy.random.default_rng([seed, index of s in SPLITS, i])`,
so a seed gives byte-identical files, splits differ, and the first k training images do not depend on `n`.
Same layout as the demo dataset: `{train,valid,test}/_annotations.coco.json` + PNG images.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.dataset_writer import ImageSample, write_split
from sam3.coco import SPLITS
from sam3.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_OUT = "data/raw/shapes"
DEFAULT_IMAGE_SIZE = 224  # the tiny test model's input size: no resizing on the way in

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}  # base RGB of each colour name
SHAPES = ("circle", "square", "triangle")
CATEGORY_NAMES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)  # id = index + 1

COLOUR_JITTER = 25  # per channel, so "red" is a range of reds that stays far from green and blue
BACKGROUND_GREY = (110, 240)  # grey level range; a tint of up to BACKGROUND_TINT per channel is added
BACKGROUND_TINT = 12
NOISY_FRACTION = 0.5  # share of images whose background gets Gaussian noise
NOISE_STD = (2.0, 8.0)
SIZE_FRACTION = (0.10, 0.40)  # circle diameter, square side, triangle circumscribed diameter / image side
MAX_HIDDEN_FRACTION = 0.3  # a shape drawn on top may hide at most this much of each shape below it
SAME_COLOUR_GAP = 3.0  # pixels between the bounding circles of two shapes of one colour
PLACEMENT_TRIES = 100  # random positions and sizes tried before a shape is given up


def default_holdout(n: int) -> int:
    """Images in valid and in test when not given: max(4, n // 5)."""
    return max(4, n // 5)


def shape_mask(shape: str, centre: tuple[float, float], size: float, angle: float, image_size: int) -> np.ndarray:
    """Bool [S, S] mask of one filled shape: pixel (row y, column x) is in it when its centre (x + 0.5, y + 0.5) is.

    `size` is the circle's diameter, the square's side, or the triangle's circumscribed diameter; `angle` (radians)
    rotates squares and triangles about `centre` = (x, y). Written here rather than with Pillow's ImageDraw because
    Pillow rounds vertices to whole pixels and fills both end rows (a 20-pixel square covers 21 x 21), while testing
    pixel centres keeps sizes and sub-pixel positions true. Inside a convex polygon with vertices v_k in angle
    order, every edge has the point on its left: cross(v_k+1 - v_k, p - v_k) >= 0 for all k.
    """
    cx, cy = centre
    radius = bounding_radius(shape, size)
    # only the shape's bounding square is tested: [h, 1] and [1, w] offsets of pixel centres from the centre
    x0, x1 = max(0, math.floor(cx - radius)), min(image_size, math.ceil(cx + radius) + 1)
    y0, y1 = max(0, math.floor(cy - radius)), min(image_size, math.ceil(cy + radius) + 1)
    px = (np.arange(x0, x1) + 0.5 - cx)[None, :]
    py = (np.arange(y0, y1) + 0.5 - cy)[:, None]
    if shape == "circle":
        inside = px**2 + py**2 <= radius**2
    else:
        corners = 4 if shape == "square" else 3
        vx = [radius * math.cos(angle + 2 * math.pi * k / corners) for k in range(corners + 1)]
        vy = [radius * math.sin(angle + 2 * math.pi * k / corners) for k in range(corners + 1)]
        inside = np.ones((y1 - y0, x1 - x0), dtype=bool)
        for k in range(corners):
            inside &= (vx[k + 1] - vx[k]) * (py - vy[k]) - (vy[k + 1] - vy[k]) * (px - vx[k]) >= 0
    mask = np.zeros((image_size, image_size), dtype=bool)
    mask[y0:y1, x0:x1] = inside
    return mask


def bounding_radius(shape: str, size: float) -> float:
    """Distance from the centre to the farthest point of the shape, whatever its rotation."""
    return size / math.sqrt(2) if shape == "square" else size / 2


@dataclass
class PlacedShape:
    """A shape already in the image: its category id, colour, bounding circle and masks (bool [S, S])."""

    category_id: int
    colour: str
    centre: tuple[float, float]
    radius: float
    full: np.ndarray  # the whole shape
    visible: np.ndarray  # what the shapes drawn later leave of it


def hides_too_much(mask: np.ndarray, placed: list[PlacedShape]) -> bool:
    """True if painting `mask` on top would leave any placed shape less than 1 - MAX_HIDDEN_FRACTION visible."""
    return any((p.visible & ~mask).sum() < (1 - MAX_HIDDEN_FRACTION) * p.full.sum() for p in placed)


def touches_same_colour(colour: str, centre: tuple[float, float], radius: float, placed: list[PlacedShape]) -> bool:
    """True if the bounding circle comes within SAME_COLOUR_GAP of a placed shape of the same colour.

    Two touching shapes of one colour would read as a single blob, with no edge to tell the instances apart.
    """
    return any(p.colour == colour and math.dist(centre, p.centre) < radius + p.radius + SAME_COLOUR_GAP for p in placed)


def draw_image(
    rng: np.random.Generator, image_size: int, n_shapes: int
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]], int]:
    """One image: RGB uint8 [S, S, 3], (category id, visible bool [S, S] mask) per shape, shapes given up.

    Shapes are painted in order, each on top of the ones before; a candidate that would hide too much of an
    earlier shape or touch one of its colour is redrawn elsewhere (PLACEMENT_TRIES times at most).
    """
    grey = rng.integers(BACKGROUND_GREY[0], BACKGROUND_GREY[1] + 1)
    background = grey + rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT + 1, size=3)
    rgb = np.broadcast_to(background.astype(np.float64), (image_size, image_size, 3)).copy()
    if rng.random() < NOISY_FRACTION:
        rgb += rng.normal(0.0, rng.uniform(*NOISE_STD), size=rgb.shape)
    rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)

    placed: list[PlacedShape] = []
    given_up = 0
    for _ in range(n_shapes):
        category = int(rng.integers(len(CATEGORY_NAMES)))
        colour, shape = CATEGORY_NAMES[category].split(" ")
        for _ in range(PLACEMENT_TRIES):
            size = rng.uniform(*SIZE_FRACTION) * image_size
            radius = bounding_radius(shape, size)
            centre = (rng.uniform(radius, image_size - radius), rng.uniform(radius, image_size - radius))
            angle = rng.uniform(0, 2 * math.pi)
            if touches_same_colour(colour, centre, radius, placed):
                continue
            mask = shape_mask(shape, centre, size, angle, image_size)
            if not hides_too_much(mask, placed):
                break
        else:
            given_up += 1
            continue
        fill = np.array(COLOURS[colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        rgb[mask] = np.clip(fill, 0, 255).astype(np.uint8)
        for p in placed:
            p.visible &= ~mask
        placed.append(PlacedShape(category + 1, colour, centre, radius, mask, mask.copy()))
    return rgb, [(p.category_id, p.visible) for p in placed], given_up


def split_samples(
    seed: int, split: str, count: int, image_size: int, min_shapes: int, max_shapes: int, stats: Counter[str]
) -> Iterator[ImageSample]:
    """The `count` images of one split, generated lazily; counts the shapes given up in `stats["given_up"]`."""
    width = max(6, len(str(count - 1)))
    for index in range(count):
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        rgb, instances, given_up = draw_image(rng, image_size, int(rng.integers(min_shapes, max_shapes + 1)))
        if len(instances) < min_shapes:
            raise ConfigError(
                f"shapes-data: could only fit {len(instances)} of at least {min_shapes} shapes into {split} image "
                f"{index} ({image_size}x{image_size}); lower --min-shapes or raise --image-size"
            )
        stats["given_up"] += given_up
        yield ImageSample(f"{index:0{width}d}.png", rgb, instances)


def build_shapes_dataset(
    out: str | Path,
    n: int,
    seed: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    n_valid: int | None = None,
    n_test: int | None = None,
    min_shapes: int = 1,
    max_shapes: int = 4,
) -> dict[str, dict[str, int]]:
    """Generate `n` train images and `n_valid` / `n_test` (default max(4, n // 5)) held-out images under `out`.

    Returns {split: {"images", "annotations", "categories"}}. Raises ConfigError for counts or sizes out of range.
    """
    counts = {
        "train": n,
        "valid": default_holdout(n) if n_valid is None else n_valid,
        "test": default_holdout(n) if n_test is None else n_test,
    }
    for split, count in counts.items():
        if count < 1:
            raise ConfigError(f"shapes-data: {split} needs at least 1 image, got {count}")
    if seed < 0:
        raise ConfigError(f"shapes-data: --seed must be >= 0, got {seed}")
    if image_size < 32:
        raise ConfigError(f"shapes-data: --image-size must be >= 32 pixels, got {image_size}")
    if not 1 <= min_shapes <= max_shapes:
        raise ConfigError(f"shapes-data: need 1 <= min_shapes <= max_shapes, got {min_shapes} and {max_shapes}")

    categories = [{"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORY_NAMES, start=1)]
    info = {
        "description": "generated coloured shapes (python -m pipeline shapes-data)",
        "generator": {"seed": seed, "image_size": image_size, "min_shapes": min_shapes, "max_shapes": max_shapes},
    }
    summary = {}
    for split in SPLITS:
        stats: Counter[str] = Counter()
        samples = split_samples(seed, split, counts[split], image_size, min_shapes, max_shapes, stats)
        summary[split] = write_split(out, split, samples, categories, info, total=counts[split])
        if stats["given_up"]:
            log.info(
                "%s: %d shapes found no free place in %d tries; their images have fewer shapes",
                split,
                stats["given_up"],
                PLACEMENT_TRIES,
            )
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"dataset folder to write (default: {DEFAULT_OUT})")
    parser.add_argument("--n", type=int, default=200, help="number of training images (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default: 0)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=DEFAULT_IMAGE_SIZE,
        help=f"side of the square images in pixels (default: {DEFAULT_IMAGE_SIZE})",
    )
    parser.add_argument("--n-valid", type=int, default=None, help="validation images (default: max(4, n // 5))")
    parser.add_argument("--n-test", type=int, default=None, help="test images (default: max(4, n // 5))")
    parser.add_argument("--min-shapes", type=int, default=1, help="fewest shapes per image (default: 1)")
    parser.add_argument("--max-shapes", type=int, default=4, help="most shapes per image (default: 4)")


def run(args: argparse.Namespace) -> int:
    build_shapes_dataset(
        args.out, args.n, args.seed, args.image_size, args.n_valid, args.n_test, args.min_shapes, args.max_shapes
    )
    return 0
