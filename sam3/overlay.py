"""Draw detections on their image for a person to look at: masks, boxes, a "prompt score" label each, a legend.

Each prompt has one colour (PALETTE[prompt index % 20]), used for its masks, boxes and label backgrounds. Detections
are drawn from the lowest score up, so the best ones end on top. torchvision.utils draws masks and boxes; Pillow
draws the legend (a swatch, the prompt and its number of detections, for each prompt detected), in the corner
where it hides the least.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from sam3.inference import Detection

# Sasha Trubetskoy's 20 distinct colours, in his order (most distinct first).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)  # fmt: skip
MASK_ALPHA = 0.45  # the image stays readable under the mask
LEGEND_ALPHA = 160  # of 255: the legend's dark background lets the image show through a little
FONT_FILE = "DejaVuSans.ttf"  # Pillow looks it up in the system font folders; if absent, its built-in font is used
BLACK, WHITE = (0, 0, 0), (255, 255, 255)


def prompt_colour(prompt_index: int) -> tuple[int, int, int]:
    return PALETTE[prompt_index % len(PALETTE)]


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones (ITU-R 601 luma above or below the middle)."""
    red, green, blue = background
    return BLACK if 0.299 * red + 0.587 * green + 0.114 * blue > 128 else WHITE


@lru_cache(maxsize=1)
def _font_file() -> str | None:
    """FONT_FILE if Pillow can load it, else None (torchvision then falls back to Pillow's small bitmap font)."""
    try:
        ImageFont.truetype(FONT_FILE, 12)
    except OSError:
        return None
    return FONT_FILE


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = _font_file()
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)


def font_size(width: int, height: int) -> int:
    """Text height in pixels: 1/40 of the shorter side, at least 11 (readable on a 224-pixel image)."""
    return max(11, round(min(width, height) / 40))


def draw_detections(
    image: Image.Image,
    detections: Sequence[Detection],
    prompts: Sequence[str],
    legend: bool = True,
    show_scores: bool = True,
) -> Image.Image:
    """A new RGB image of the same size: `image` with each detection's mask (if any), box and label drawn on it.

    `detections` carry boxes (x0, y0, x1, y1) and bool masks [H, W] in this image's pixels (as `predict_images`
    returns them) and index into `prompts`. Labels are "prompt score", or the prompt alone without `show_scores`
    (ground truth has no score).
    """
    canvas = pil_to_tensor(image.convert("RGB"))  # uint8 [3, H, W]
    ordered = sorted(detections, key=lambda d: d.score)  # lowest first: the best are drawn last, on top
    for detection in ordered:
        if detection.mask is not None:
            # one call per mask: given several, torchvision paints the pixels where masks overlap black
            mask = torch.from_numpy(detection.mask)
            canvas = draw_segmentation_masks(canvas, mask, MASK_ALPHA, prompt_colour(detection.prompt_index))
    if ordered:
        colours = [prompt_colour(d.prompt_index) for d in ordered]
        canvas = draw_bounding_boxes(
            canvas,
            torch.tensor([d.box for d in ordered], dtype=torch.float32),
            labels=[f"{d.prompt} {d.score:.2f}" if show_scores else d.prompt for d in ordered],
            colors=colours,
            width=max(2, round(min(image.size) / 300)),
            font=_font_file(),
            font_size=font_size(*image.size),
            label_colors=[text_colour(c) for c in colours],
            label_background_colors=colours,
            fill_labels=True,
        )
    out = to_pil_image(canvas)
    if legend:
        out = draw_legend(out, prompts, detections)
    return out


def draw_legend(image: Image.Image, prompts: Sequence[str], detections: Sequence[Detection]) -> Image.Image:
    """`image` with a legend of the prompts that have detections, one row each: "<swatch> prompt (count)".

    It goes in the corner where it covers the least box area, so that it hides as few detections as possible.
    """
    counts = Counter(d.prompt_index for d in detections)
    lines = [(i, f"{prompts[i]} ({counts[i]})") for i in sorted(counts)] or [(None, "no detections")]
    size = font_size(*image.size)
    font = _font(size)
    pad, row = max(3, size // 3), size + max(3, size // 3)
    measure = ImageDraw.Draw(image)
    width = int(pad * 3 + size + max(measure.textlength(text, font=font) for _, text in lines))
    height = pad * 2 + row * len(lines) - (row - size)
    left, top = _emptiest_corner(image.size, (width, height), [d.box for d in detections])

    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.rectangle((left, top, left + width, top + height), fill=(0, 0, 0, LEGEND_ALPHA))
    for k, (prompt_index, text) in enumerate(lines):
        y = top + pad + k * row
        if prompt_index is not None:
            draw.rectangle((left + pad, y, left + pad + size, y + size), fill=(*prompt_colour(prompt_index), 255))
        draw.text((left + pad * 2 + size, y), text, fill=(*WHITE, 255), font=font)
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def _emptiest_corner(
    image_size: tuple[int, int], box_size: tuple[int, int], boxes: Sequence[tuple[float, float, float, float]]
) -> tuple[int, int]:
    """(left, top) of the corner position of a `box_size` rectangle that overlaps `boxes` (xyxy) the least;
    ties go to top-left, top-right, bottom-left, bottom-right in that order."""
    (image_w, image_h), (w, h) = image_size, box_size
    corners = [(0, 0), (max(0, image_w - w), 0), (0, max(0, image_h - h)), (max(0, image_w - w), max(0, image_h - h))]

    def covered(corner: tuple[int, int]) -> float:
        x0, y0 = corner
        return sum(
            max(0.0, min(x0 + w, bx1) - max(x0, bx0)) * max(0.0, min(y0 + h, by1) - max(y0, by0))
            for bx0, by0, bx1, by1 in boxes
        )

    return min(corners, key=covered)  # min keeps the first of equal values
