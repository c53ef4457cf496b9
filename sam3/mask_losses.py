"""The mask terms of the SAM 3 criterion (`sam3.losses.Criterion`, final decoder layer, segmentation mode).

Shapes: M matched (query, prediction) pairs; mask logits [M, h, w] at the decoder's resolution, target masks
[M, H, W] at the input's. With p = sigmoid(logit), N_b the target-box normaliser (`sam3.losses.normalisers`):

    loss_mask = 200 * sum_matched mean_pixels focal(mask_logit, mask) / N_b
    loss_dice = 10 * sum_matched dice(mask_logit, mask) / N_b,  dice = 1 - (2 sum p t + 1) / (sum p + sum t + 1)

(weights: sam3.config.LossConfig weight_mask, weight_dice; applied by the criterion, not here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from sam3.errors import ConfigError


def dice_loss(mask_logits: torch.Tensor, target_masks: torch.Tensor) -> torch.Tensor:
    """Per-instance dice loss with +1 smoothing: 1 - (2 sum(p t) + 1) / (sum p + sum t + 1), p = sigmoid(logit).

    Args:
        mask_logits: float [M, P] (P pixels). target_masks: float [M, P] in {0, 1}.

    Returns:
        float [M].
    """
    prob = mask_logits.sigmoid()
    numerator = 2 * (prob * target_masks).sum(1) + 1
    denominator = prob.sum(1) + target_masks.sum(1) + 1
    return 1 - numerator / denominator


def mask_losses(
    mask_logits: torch.Tensor,
    target_masks: torch.Tensor,
    num_boxes: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted mask losses of M matched pairs.

    The logits are first upsampled bilinearly (align_corners=False) from h x w to the target's H x W; then
        focal = sum_k mean over the H x W pixels of sigmoid_focal(logit, mask; alpha, gamma) / N_b
        dice  = sum_k dice_loss(logit_k, mask_k) / N_b

    Args:
        mask_logits: float [M, h, w]. target_masks: bool or float [M, H, W]. num_boxes: N_b, a scalar.

    Returns:
        (focal, dice), two scalars; 0 (still attached to the graph) when M = 0.
    """
    if mask_logits.shape[0] == 0:
        zero = mask_logits.sum()
        return zero, zero
    size = target_masks.shape[-2:]
    if mask_logits.shape[-2:] != size:
        mask_logits = F.interpolate(mask_logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    logits = mask_logits.flatten(1)
    targets = target_masks.flatten(1).to(logits.dtype)
    focal = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma).mean(1).sum() / num_boxes
    dice = dice_loss(logits, targets).sum() / num_boxes
    return focal, dice


def matched_mask_losses(
    out: dict,
    targets: list[dict],
    matches: list[tuple[torch.Tensor, torch.Tensor]],
    match_query: torch.Tensor,
    match_pred: torch.Tensor,
    num_boxes: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted mask focal and dice of the matched pairs (`mask_losses`); errors that say what to change if masks
    are missing.

    Args:
        out: one decoder layer's outputs; `pred_masks` float [Q, N, h, w]. targets: Q dicts, `masks` [n_q, H, W].
        matches: per query, (prediction indices, target indices) from the matcher. match_query, match_pred:
            long [M], the same pairs flattened. num_boxes: N_b, a scalar.

    Returns:
        (focal, dice), two scalars.
    """
    if out.get("pred_masks") is None:
        raise ConfigError(
            "Criterion(with_masks=True) needs 'pred_masks' in the model outputs: build the model with its mask "
            "head (segmentation mode) or train boxes only (with_masks false)"
        )
    # Select before casting: a float copy of all Q x N masks would be large (Q x 200 x 288 x 288 at 1008 px).
    mask_logits = out["pred_masks"][match_query, match_pred].float()  # [M, h, w]
    tgt_masks = []
    for q, (t, (_, tgt)) in enumerate(zip(targets, matches, strict=True)):
        if tgt.numel() == 0:
            continue
        if "masks" not in t:
            raise ConfigError(
                f"query {q} has {t['boxes'].shape[0]} target boxes but no 'masks': load the dataset with its "
                "segmentation masks (segmentation mode) or train boxes only (with_masks false)"
            )
        tgt_masks.append(t["masks"][tgt])
    # No matched pair at all (only negative prompts): empty [0, h, w] targets, and both terms are 0.
    target = torch.cat(tgt_masks).to(mask_logits.device) if tgt_masks else torch.zeros_like(mask_logits)
    return mask_losses(mask_logits, target, num_boxes, alpha, gamma)
