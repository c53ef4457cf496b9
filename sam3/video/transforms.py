"""The reference recipe's clip transforms (SAM 2.1's MOSE fine-tuning, `ClipConfig`), on whole clips at once.

A clip enters as frames (T, 3, H, W) uint8 and masks (T, O, H, W) bool at the video's resolution, and leaves as
frames (T, 3, S, S) float32 normalised and masks (T, O, S, S) bool. Train, in the reference's order:

1. horizontal flip with probability `hflip`, the same for every frame;
2. random affine, the same for every frame: rotation a ~ U(-degrees, degrees), x-shear s ~ U(-shear, shear) (no
   y-shear, translation or scale: the reference's RandomAffine with `shear: 20` draws one shear angle), about the
   centre, at the video's resolution; frames bilinear with the fill (123, 116, 103) (the reference's image_mean),
   masks nearest with fill 0. If it empties the mask of any object in the first frame (every object of a clip is
   visible there), the affine is dropped and the clip stays unwarped (the reference: num_tentatives 1, then "Skip
   RandomAffine" with a warning), so the tracker is always prompted with something;
3. square resize to S x S: frames bilinear with antialias, masks nearest (aspect ratio not kept, as the reference);
4. colour jitter, one draw for the clip: brightness, contrast, saturation factors f ~ U(max(0, 1 - x), 1 + x),
   applied in a random order (torchvision's ColorJitter); no hue;
5. grayscale (3 equal channels) with probability `grayscale`, the same for every frame;
6. colour jitter again, drawn per frame, with the `frame_*` strengths;
7. x / 255, then (x - mean) / std per channel.

Eval (`eval_clip`) is 3 and 7 only. Every random draw comes from the caller's torch.Generator, in a fixed order, so a
clip depends only on the generator's seed.

Normalisation: SAM 2.1's tracker takes ImageNet mean/std (transformers' Sam2VideoVideoProcessor: IMAGENET_DEFAULT_*,
and SAM 2's training config); SAM 3 normalises every input with mean = std = 0.5 (transformers maps
sam3_tracker_video to Sam3ImageProcessor, IMAGENET_STANDARD_*; Meta's sam3 `io_utils` defaults to 0.5).
`PIXEL_STATS` holds both, keyed by tracker kind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from sam3.video.config import ClipConfig

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)
PIXEL_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "sam2.1": (IMAGENET_MEAN, IMAGENET_STD),
    "sam3": (HALF_MEAN, HALF_STD),
}
AFFINE_FILL = [123.0, 116.0, 103.0]  # the reference's fill for pixels the affine brings in (ImageNet mean x 255)


@dataclass(frozen=True)
class Jitter:
    """Colour-jitter strengths x: each factor is drawn from U(max(0, 1 - x), 1 + x); 0 leaves that property alone."""

    brightness: float
    contrast: float
    saturation: float


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _chance(generator: torch.Generator, probability: float) -> bool:
    # always draw, so later draws do not shift with the probability's value
    return float(torch.rand((), generator=generator)) < probability


def flip(frames: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror left-right: pixel (y, x) moves to (y, W - 1 - x) in frames (T, 3, H, W) and masks (T, O, H, W)."""
    return frames.flip(-1), masks.flip(-1)


def affine(frames: torch.Tensor, masks: torch.Tensor, angle: float, shear: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate by `angle` degrees and shear along x by `shear` degrees about the image centre (torchvision's affine
    convention), frames bilinear filled with AFFINE_FILL, masks nearest filled with False."""
    frames = F.affine(
        frames,
        angle=angle,
        translate=[0.0, 0.0],
        scale=1.0,
        shear=[shear, 0.0],
        interpolation=InterpolationMode.BILINEAR,
        fill=AFFINE_FILL,
    )
    warped = F.affine(
        masks.to(torch.uint8),
        angle=angle,
        translate=[0.0, 0.0],
        scale=1.0,
        shear=[shear, 0.0],
        interpolation=InterpolationMode.NEAREST,
        fill=0.0,
    )
    return frames, warped.bool()


def resize(frames: torch.Tensor, masks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Square resize to size x size: frames bilinear with antialias, masks nearest (they stay binary)."""
    frames = F.resize(frames, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    masks = F.resize(masks.to(torch.uint8), [size, size], interpolation=InterpolationMode.NEAREST_EXACT)
    return frames, masks.bool()


def color_jitter(frames: torch.Tensor, jitter: Jitter, generator: torch.Generator) -> torch.Tensor:
    """One draw of brightness, contrast and saturation factors, applied in a random order to uint8 `frames`
    (..., 3, H, W): a clip (T, 3, H, W) gets one draw for all frames, a frame (3, H, W) its own."""
    order = torch.randperm(3, generator=generator).tolist()
    strengths = (jitter.brightness, jitter.contrast, jitter.saturation)
    factors = [_uniform(generator, max(0.0, 1.0 - x), 1.0 + x) for x in strengths]
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    for which in order:
        if strengths[which] > 0:
            frames = adjust[which](frames, factors[which])
    return frames


def normalize(frames: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (T, 3, S, S) -> float32 (x / 255 - mean) / std per channel."""
    frames = frames.to(torch.float32) / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (frames - mean_t) / std_t


def train_clip(
    frames: torch.Tensor,
    masks: torch.Tensor,
    clip: ClipConfig,
    image_size: int,
    generator: torch.Generator,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The train transforms (module docstring, steps 1-7).

    frames (T, 3, H, W) uint8, masks (T, O, H, W) bool -> frames (T, 3, S, S) float32, masks (T, O, S, S) bool.
    """
    if _chance(generator, clip.hflip):
        frames, masks = flip(frames, masks)

    angle = _uniform(generator, -clip.degrees, clip.degrees)
    shear = _uniform(generator, -clip.shear, clip.shear)
    if clip.degrees or clip.shear:
        warped_frames, warped_masks = affine(frames, masks, angle, shear)
        visible_before = masks[0].flatten(1).any(dim=1)
        visible_after = warped_masks[0].flatten(1).any(dim=1)
        if bool((visible_after | ~visible_before).all()):
            frames, masks = warped_frames, warped_masks
        else:
            # the reference keeps the clip unwarped rather than prompt the tracker with an empty mask
            logger.debug("affine (angle %.1f, shear %.1f) empties a first-frame object: clip unwarped", angle, shear)

    frames, masks = resize(frames, masks, image_size)

    frames = color_jitter(frames, Jitter(clip.brightness, clip.contrast, clip.saturation), generator)
    if _chance(generator, clip.grayscale):
        frames = F.rgb_to_grayscale(frames, num_output_channels=3)
    per_frame = Jitter(clip.frame_brightness, clip.frame_contrast, clip.frame_saturation)
    frames = torch.stack([color_jitter(frame, per_frame, generator) for frame in frames])
    return normalize(frames, mean, std), masks


def eval_clip(
    frames: torch.Tensor,
    masks: torch.Tensor,
    image_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize and normalise only (steps 3 and 7): deterministic."""
    frames, masks = resize(frames, masks, image_size)
    return normalize(frames, mean, std), masks
