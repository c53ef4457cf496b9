"""The SAM 3 reference image transforms: warp to a square, pad to S x S, normalise (docs/RECIPE.md section 2).

Image, instance boxes and instance masks go through the same torchvision.transforms.v2 ops as tv_tensors, so they
stay aligned. Two variants, one code path (`warp_pad`):

- train: warp (aspect not kept) to a random square side s from `train_sides(S)`, pad to S x S at a random offset
  (left, top) with pixel value 0, normalise with mean = std = 0.5. Padding is applied to the uint8 image before
  normalising, so it becomes (0 - 0.5) / 0.5 = -1 exactly.
- validation: warp to S x S (s = S, offset 0) and normalise. Deterministic.

No flips and no colour jitter (the reference has none).

The random draws (side, offset) come from a caller-owned `torch.Generator`, not torch's global RNG, so the dataset
can seed one per (seed, epoch, index) and a run is reproducible whatever the number of DataLoader workers.

Output boxes are normalised cxcywh of the final S x S canvas: (cx / S, cy / S, w / S, h / S).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from sam3.config import SAM3_IMAGE_SIZE

REFERENCE_IMAGE_SIZE = SAM3_IMAGE_SIZE  # SAM 3's input side; the reference's side set below is defined at this size
REFERENCE_TRAIN_SIDES = tuple(range(480, 993, 32))  # 480, 512, ..., 992
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)


def train_sides(image_size: int) -> tuple[int, ...]:
    """The square sides a training image is warped to, for input side S = `image_size`.

    Rule: sides = sorted set of round(k * S / 1008) for k in 480, 512, ..., 992 (Python's round: half to even).
    At S = 1008 this is the reference set itself (17 sides); at S = 224 it is 107, 114, 121, 128, ..., 220.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    sides = {max(1, round(k * image_size / REFERENCE_IMAGE_SIZE)) for k in REFERENCE_TRAIN_SIDES}
    return tuple(sorted(sides))


@dataclass(frozen=True)
class WarpPad:
    """Warp the image to `side` x `side`, then place it at (`left`, `top`) on the S x S canvas."""

    side: int
    left: int
    top: int


@dataclass
class Transformed:
    """One transformed image with its instances.

    image  float [3, S, S]  normalised (padding is -1)
    boxes  float [n, 4]     normalised cxcywh of the S x S canvas
    masks  bool  [n, S, S]  or None when no masks were given
    """

    image: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor | None


def sample_train_warp_pad(image_size: int, generator: torch.Generator) -> WarpPad:
    """Draw the training geometry: a side uniformly from `train_sides(S)`, then an offset uniformly in [0, S - side]."""
    sides = train_sides(image_size)
    side = sides[int(torch.randint(len(sides), (1,), generator=generator))]
    left = int(torch.randint(image_size - side + 1, (1,), generator=generator))
    top = int(torch.randint(image_size - side + 1, (1,), generator=generator))
    return WarpPad(side=side, left=left, top=top)


def warp_pad(
    image: torch.Tensor,
    boxes_xyxy: torch.Tensor,
    masks: torch.Tensor | None,
    geometry: WarpPad,
    image_size: int,
) -> Transformed:
    """Apply one warp-and-pad to an image and its instances.

    Args:
        image: uint8 [3, H, W].
        boxes_xyxy: float [n, 4] absolute pixel (x0, y0, x1, y1) in the H x W image.
        masks: bool [n, H, W], or None.
        geometry: the square side and offset on the S x S canvas (S = `image_size`).
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] image, got {image.dtype} {list(image.shape)}")
    height, width = image.shape[-2:]
    right = image_size - geometry.side - geometry.left
    bottom = image_size - geometry.side - geometry.top
    if right < 0 or bottom < 0 or geometry.left < 0 or geometry.top < 0:
        raise ValueError(f"{geometry} does not fit on a {image_size} x {image_size} canvas")
    ops = v2.Compose(
        [
            v2.Resize((geometry.side, geometry.side), antialias=True),  # masks get nearest, boxes are scaled
            v2.Pad([geometry.left, geometry.top, right, bottom], fill=0),
            v2.ToDtype(torch.float32, scale=True),  # images only: [0, 255] -> [0, 1]; padding 0 stays 0
            v2.Normalize(PIXEL_MEAN, PIXEL_STD),  # (x - 0.5) / 0.5: padding 0 -> -1
            v2.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.CXCYWH),
        ]
    )
    inputs = [
        tv_tensors.Image(image),
        tv_tensors.BoundingBoxes(boxes_xyxy.float(), format="XYXY", canvas_size=(height, width)),
    ]
    if masks is not None:
        inputs.append(tv_tensors.Mask(masks))
    outputs = ops(*inputs)
    out_masks = outputs[2].as_subclass(torch.Tensor) if masks is not None else None
    return Transformed(
        image=outputs[0].as_subclass(torch.Tensor),
        boxes=outputs[1].as_subclass(torch.Tensor) / image_size,
        masks=out_masks,
    )


def train_transform(
    image: torch.Tensor,
    boxes_xyxy: torch.Tensor,
    masks: torch.Tensor | None,
    image_size: int,
    generator: torch.Generator,
) -> Transformed:
    """Random square warp + random-offset pad + normalise (shapes as `warp_pad`)."""
    return warp_pad(image, boxes_xyxy, masks, sample_train_warp_pad(image_size, generator), image_size)


def val_transform(
    image: torch.Tensor,
    boxes_xyxy: torch.Tensor,
    masks: torch.Tensor | None,
    image_size: int,
) -> Transformed:
    """Plain warp to S x S + normalise (shapes as `warp_pad`). Deterministic."""
    return warp_pad(image, boxes_xyxy, masks, WarpPad(side=image_size, left=0, top=0), image_size)
