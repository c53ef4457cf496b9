"""Box operations that torchvision.ops lacks.

Everything torchvision.ops has (`box_convert`, `box_iou`, `generalized_box_iou`, `generalized_box_iou_loss`) is
used from there. What it lacks:
- the IoU of PAIRED boxes (row i of one set against row i of the other): the IoU-aware classification loss needs it
  for every matched (prediction, target) pair, and taking the diagonal of the pairwise `box_iou` matrix would cost
  M x M memory and time for M pairs instead of M (`paired_box_iou`);
- a BATCHED pairwise IoU ([..., N, 4] against [..., M, 4]) that gives 0, not NaN, for two zero-area boxes: the
  one-to-many matcher scores every query's predictions against its targets at once (`pairwise_box_iou`).
"""

from __future__ import annotations

import torch

# Keeps 0 / 0 out of the IoU of two degenerate (zero-area) boxes: their IoU becomes 0 instead of NaN.
_UNION_EPS = 1e-7


def paired_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of each box in `boxes1` with the box in the same row of `boxes2`.

    iou_i = area(b1_i ∩ b2_i) / max(area(b1_i) + area(b2_i) - area(b1_i ∩ b2_i), 1e-7)

    Args:
        boxes1: float [M, 4] boxes in (x1, y1, x2, y2).
        boxes2: float [M, 4] boxes in (x1, y1, x2, y2).

    Returns:
        float [M] IoU values in [0, 1] (same as `torchvision.ops.box_iou(boxes1, boxes2).diagonal()`).
    """
    if boxes1.shape != boxes2.shape or boxes1.shape[-1] != 4:
        raise ValueError(
            f"paired_box_iou needs two [M, 4] tensors of the same shape, got {boxes1.shape} and {boxes2.shape}"
        )
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter_wh = (bottom_right - top_left).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    return inter / (area1 + area2 - inter).clamp(min=_UNION_EPS)


def pairwise_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Batched IoU of every box in `boxes1` with every box in `boxes2`.

    Args:
        boxes1: float [..., N, 4] in (x1, y1, x2, y2). boxes2: float [..., M, 4] in (x1, y1, x2, y2).

    Returns:
        float [..., N, M]; inter / max(union, 1e-7), so two zero-area boxes have IoU 0, not NaN.
    """
    top_left = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    inter_wh = (bottom_right - top_left).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union.clamp(min=_UNION_EPS)
