"""The multi-step multi-mask loss of VOS training: SAM 2's `MultiStepMultiMasksAndIous`, written for our types.

Shapes: T frames, O objects, M masks per decoder pass, S the input side, P = S * S pixels. For one decoder pass
(`FrameStep`) on frame t, object k, mask m, with x the mask logits, y = target_masks[t, k], p = sigmoid(x) and
present_k = any(y) (the object is in the frame):

    focal[k, m] = mean over the P pixels of alpha_t (1 - p_t)^gamma BCE(x, y)       (alpha 0.25, gamma 2)
    dice[k, m]  = 1 - (2 sum(p y) + 1) / (sum p + sum y + 1)
    iou[k, m]   = |iou_pred[k, m] - IoU(x > 0, y)|,  IoU = |A & B| / max(1, |A | B|)   (L1; no gradient to x)
    score[k]    = the same focal with alpha -1, gamma 0 (= BCE) of object_score_logits[k] against present_k

With M > 1 only the mask b_k = argmin_m (focal_weight focal[k, m] + dice_weight dice[k, m]) is trained:

    focal_k = focal[k, b_k],  dice_k = dice[k, b_k],  iou_k = mean_m iou[k, m] if supervise_all_iou else iou[k, b_k]

(with M = 1 both are just the one mask). Mask terms count only where the object is present; the score always:

    term = sum over frames t, over steps of t, over objects k of present_k * term_k   / N     (score: without present)
    loss = focal_weight focal + dice_weight dice + iou_weight iou + object_score_weight score

N = max(1, num_objects): the caller's object count (summed over processes and micro-batches as the optimiser step
needs it; the reference uses the per-process mean, sum / world_size, as DDP averages gradients). Steps and frames
are summed, never averaged, as the reference does (its `_forward` sums a frame's steps, its `forward` the frames).
"""

from __future__ import annotations

import torch

from sam3.mask_losses import sigmoid_focal
from sam3.video.config import VosLossConfig
from sam3.video.types import ClipOutput, FrameStep

TERMS = ("focal", "dice", "iou", "object_score")


def vos_loss(
    output: ClipOutput,
    target_masks: torch.Tensor,
    config: VosLossConfig,
    num_objects: float | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The clip's loss, its weighted total and each unweighted term, every one already divided by N.

    Computed in fp32 whatever the logits' dtype (autocast off inside), with no host sync: the best-mask choice is an
    argmin and gather, absence a multiplication by 0, so the same kernels run whatever the values.

    Args:
        output: the tracker's passes; frame f.frame_index's steps are scored against target_masks[f.frame_index].
        target_masks: bool (T, O, S, S), `VideoClip.masks`.
        config: the weights, focal parameters and `supervise_all_iou`.
        num_objects: N before the clamp at 1 (a float, or a scalar tensor to keep an all-reduced count on the
            device); None: O of this clip.

    Returns:
        {"loss", "focal", "dice", "iou", "object_score"}: fp32 scalars on target_masks' device.
    """
    num_frames, objects = target_masks.shape[:2]
    masks = target_masks if target_masks.dtype == torch.bool else target_masks != 0
    device = target_masks.device
    totals = {name: torch.zeros((), dtype=torch.float32, device=device) for name in TERMS}
    with torch.autocast(device_type=device.type, enabled=False):
        for frame in output.frames:
            if not 0 <= frame.frame_index < num_frames:
                raise ValueError(f"frame_index {frame.frame_index} is outside the clip's {num_frames} target frames")
            for step in frame.steps:
                for name, value in step_losses(step, masks[frame.frame_index], config).items():
                    totals[name] = totals[name] + value
    if num_objects is None:
        num_objects = float(objects)
    # clamp as the reference does: a clip without objects gives 0, not 0 / 0
    normaliser = num_objects.float().clamp(min=1) if torch.is_tensor(num_objects) else max(float(num_objects), 1.0)
    losses = {name: value / normaliser for name, value in totals.items()}
    losses["loss"] = (
        config.focal_weight * losses["focal"]
        + config.dice_weight * losses["dice"]
        + config.iou_weight * losses["iou"]
        + config.object_score_weight * losses["object_score"]
    )
    return losses


def step_losses(step: FrameStep, target: torch.Tensor, config: VosLossConfig) -> dict[str, torch.Tensor]:
    """One decoder pass's four terms, summed over the O objects and not yet divided by N (the module docstring).

    Args:
        step: mask_logits (O, M, S, S), iou_pred (O, M), object_score_logits (O, 1); any float dtype.
        target: bool (O, S, S), the objects' masks in this frame.

    Returns:
        {"focal", "dice", "iou", "object_score"}: fp32 scalars.
    """
    _check_shapes(step, target)
    logits = step.mask_logits.float().flatten(2)  # (O, M, P)
    gt = target.flatten(1)[:, None]  # (O, 1, P): broadcast over the M masks, never copied M times
    gt_float = gt.to(torch.float32)
    # BCE wants a target of the input's size: expand is a view, so this costs no memory
    focal_px, prob = sigmoid_focal(logits, gt, gt_float.expand_as(logits), config.focal_alpha, config.focal_gamma)
    focal = focal_px.mean(-1)  # (O, M)
    dice = 1 - (2 * (prob * gt_float).sum(-1) + 1) / (prob.sum(-1) + gt_float.sum(-1) + 1)  # (O, M)
    iou = (step.iou_pred.float() - mask_ious(logits, gt)).abs()  # (O, M)

    # The mask the step is trained on; argmin takes the first of equal losses, as the reference's does.
    best = torch.argmin(config.focal_weight * focal + config.dice_weight * dice, dim=-1, keepdim=True)  # (O, 1)
    focal = focal.gather(1, best)[:, 0]
    dice = dice.gather(1, best)[:, 0]
    iou = iou.mean(-1) if config.supervise_all_iou else iou.gather(1, best)[:, 0]

    present = gt.any(-1)  # (O, 1) bool
    present_float = present.to(torch.float32)[:, 0]
    score_logits = step.object_score_logits.float()
    score, _ = sigmoid_focal(
        score_logits, present, present.to(torch.float32), config.object_score_alpha, config.object_score_gamma
    )
    return {
        # multiply, as the reference does, rather than select: the same kernels whatever is present
        "focal": (focal * present_float).sum(),
        "dice": (dice * present_float).sum(),
        "iou": (iou * present_float).sum(),
        "object_score": score.mean(-1).sum(),
    }


def mask_ious(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each binarised prediction (logit > 0) with its target: |A & B| / max(1, |A | B|), so 0 when both are
    empty. A plain count, detached from the logits (the IoU head learns to predict it; the masks do not chase it).

    Args:
        logits: (..., P). target: bool (..., P), broadcastable to logits.

    Returns:
        fp32 (...).
    """
    pred = logits.detach() > 0
    inter = (pred & target).sum(-1, dtype=torch.float32)
    union = (pred | target).sum(-1, dtype=torch.float32)
    return inter / union.clamp(min=1)


def _check_shapes(step: FrameStep, target: torch.Tensor) -> None:
    """Shape checks only (Python ints, no host sync), with what was expected, so a tracker bug fails here."""
    objects, side = target.shape[0], tuple(target.shape[1:])
    if step.mask_logits.dim() != 4 or step.mask_logits.shape[0] != objects or tuple(step.mask_logits.shape[2:]) != side:
        raise ValueError(
            f"mask_logits {tuple(step.mask_logits.shape)} should be (O, M, S, S) = ({objects}, M, {side[0]}, "
            f"{side[1]}), at the targets' resolution"
        )
    masks_per_pass = step.mask_logits.shape[1]
    if tuple(step.iou_pred.shape) != (objects, masks_per_pass):
        raise ValueError(f"iou_pred {tuple(step.iou_pred.shape)} should be (O, M) = ({objects}, {masks_per_pass})")
    if tuple(step.object_score_logits.shape) != (objects, 1):
        raise ValueError(f"object_score_logits {tuple(step.object_score_logits.shape)} should be ({objects}, 1)")
