"""Prompts drawn from ground-truth masks for VOS training: a positive click, a noisy box, a correction click.

The reference (SAM 2's `sam2_utils.sample_box_points`, `sample_random_points_from_errors`) samples these; we draw
the same distributions from a caller's `torch.Generator`, so a training step is reproducible whatever else used
torch's global random state. Coordinates are (x, y) pixels of the S x S model input, the convention of transformers'
prompt encoder (it adds 0.5 to reach the pixel centre). A box is two points labelled 2 (top left) and 3 (bottom
right), as the reference trains them, so correction clicks can be appended to a box prompt.

Shapes: N masks (objects), H x W pixels. Labels: 1 positive click, 0 negative click, 2 / 3 box corners.
"""

from __future__ import annotations

import torch

BOX_NOISE = 0.1  # box corner noise, as a fraction of the box's width and height (the reference's SAM default)
BOX_NOISE_BOUND = 20.0  # ... and at most this many pixels (the reference's bound, at its 1024 px input)
POSITIVE, NEGATIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 1, 0, 2, 3


def uniform(generator: torch.Generator, *shape: int, device: torch.device | str | None = None) -> torch.Tensor:
    """U[0, 1) floats of `shape` drawn from `generator` (on its own device, as torch requires), then moved to
    `device`: a few numbers per call, so a CPU generator can drive a CUDA step without a sizeable copy."""
    values = torch.rand(shape, generator=generator, device=generator.device)
    return values if device is None else values.to(device)


def mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) float boxes (x0, y0, x1, y1): the first and last foreground column and row.

    An empty mask gives (W, H, -1, -1), an inverted box, as the reference's `mask_to_box` does."""
    num, height, width = masks.shape
    cols = masks.any(dim=1)  # (N, W): columns holding foreground
    rows = masks.any(dim=2)  # (N, H)
    xs = torch.arange(width, device=masks.device)
    ys = torch.arange(height, device=masks.device)
    x0 = torch.where(cols, xs, width).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1)
    y0 = torch.where(rows, ys, height).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1)
    return torch.stack((x0, y0, x1, y1), dim=1).float()


def sample_box(
    masks: torch.Tensor, generator: torch.Generator, noise: float = BOX_NOISE, noise_bound: float = BOX_NOISE_BOUND
) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy bounding box of each mask, as two labelled points (the reference's `sample_box_points`).

    Each coordinate moves by U(-1, 1) * min(noise * box side, noise_bound) pixels, then is clamped to the image.
    masks: (N, H, W) bool. Returns points (N, 2, 2) float (x, y) and labels (N, 2) int32 [2, 3].
    """
    num, height, width = masks.shape
    box = mask_to_box(masks)
    if noise > 0:
        side = torch.stack((box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]), dim=1)  # (N, 2): width, height
        max_shift = torch.minimum(side * noise, torch.tensor(noise_bound, device=box.device)).repeat(1, 2)
        shift = (2 * uniform(generator, num, 4, device=box.device) - 1) * max_shift
        upper = torch.tensor([width - 1, height - 1] * 2, dtype=box.dtype, device=box.device)
        box = torch.minimum(torch.clamp(box + shift, min=0), upper)
    labels = torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], dtype=torch.int32, device=masks.device)
    return box.view(num, 2, 2), labels.repeat(num, 1)


def sample_error_click(
    gt_masks: torch.Tensor, pred_masks: torch.Tensor | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per mask, uniform over the pixels where the prediction is wrong (`sample_random_points_from_errors`).

    A pixel of the false negatives (gt & ~pred) gives a positive click, one of the false positives (~gt & pred) a
    negative click. Where the prediction is right everywhere, a negative click on the background; `pred_masks=None`
    means an empty prediction, so the click is a positive one on the object (a negative one if the object is absent).
    If no pixel qualifies (a full mask predicted full), the click is a negative one at (0, 0), as in the reference.

    Drawn as the k-th qualifying pixel in raster order, k = floor(u * count) with u ~ U[0, 1): the reference's
    argmax of per-pixel noise picks the same uniform pixel, but needs H x W random numbers per click.
    gt_masks, pred_masks: (N, H, W) bool. Returns points (N, 1, 2) float (x, y) and labels (N, 1) int32.
    """
    num, height, width = gt_masks.shape
    if pred_masks is None:
        pred_masks = torch.zeros_like(gt_masks)
    false_neg = gt_masks & ~pred_masks
    false_pos = ~gt_masks & pred_masks
    all_correct = ~(false_neg | false_pos).flatten(1).any(dim=1)  # (N,)
    region = false_neg | false_pos | (all_correct[:, None, None] & ~gt_masks)
    flat = region.flatten(1)
    count = flat.sum(dim=1)
    k = (uniform(generator, num, device=gt_masks.device) * count).long().clamp(max=(count - 1).clamp(min=0))
    # first raster index where the running count of qualifying pixels passes k: the k-th qualifying pixel
    index = (flat.cumsum(dim=1) > k[:, None]).int().argmax(dim=1)
    labels = false_neg.flatten(1).gather(1, index[:, None]).to(torch.int32)
    points = torch.stack((index % width, index // width), dim=1).float()
    return points[:, None], labels


def sample_positive_click(gt_masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One click uniform on each object (a negative one on the background where the object is absent), the
    reference's initial click on a conditioning frame. gt_masks: (N, H, W) bool -> (N, 1, 2), (N, 1)."""
    return sample_error_click(gt_masks, None, generator)


def concat_points(
    points: torch.Tensor | None, labels: torch.Tensor | None, new_points: torch.Tensor, new_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append clicks (N, K, 2) / (N, K) to the prompt so far (None: no prompt yet) along the point axis."""
    if points is None or labels is None:
        return new_points, new_labels
    return torch.cat((points, new_points), dim=1), torch.cat((labels, new_labels), dim=1)
