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

from sam3.errors import ConfigError


def dice_loss(mask_logits: torch.Tensor, target_masks: torch.Tensor, prob: torch.Tensor | None = None) -> torch.Tensor:
    """Per-instance dice loss with +1 smoothing: 1 - (2 sum(p t) + 1) / (sum p + sum t + 1), p = sigmoid(logit).

    Args:
        mask_logits: float [M, P] (P pixels). target_masks: float [M, P] in {0, 1}.
        prob: sigmoid(mask_logits) when the caller has it already (`mask_losses`): reused, not recomputed, with the
            gradient of a sigmoid of its own (`_SigmoidOf`), so values and gradients are those of recomputing it.

    Returns:
        float [M].
    """
    prob = mask_logits.sigmoid() if prob is None else _SigmoidOf.apply(mask_logits, prob.detach())
    numerator = 2 * (prob * target_masks).sum(1) + 1
    denominator = prob.sum(1) + target_masks.sum(1) + 1
    return 1 - numerator / denominator


def sigmoid_focal(
    logits: torch.Tensor, masks: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's `sigmoid_focal_loss(reduction="none")` for binary targets, value for value and gradient for
    gradient, keeping less full-size memory for the backward; and sigmoid(logits), for the dice term.

    With p = sigmoid(x), t the target:  alpha_t * BCE(x, t) * (1 - p_t)^gamma,  p_t = p if t else 1 - p,
    alpha_t = alpha if t else 1 - alpha. torchvision forms p_t = p t + (1 - p)(1 - t) and alpha_t = alpha t +
    (1 - alpha)(1 - t) as float products, which for t in {0, 1} are exactly p or 1 - p and alpha or 1 - alpha (the
    other product is an exact 0); `torch.where` on the boolean mask picks the same values, and its backward routes
    the same gradients, but autograd then keeps the 1-byte mask instead of the float tensors (1 - t) and alpha_t.

    Args:
        logits: float [M, P]. masks: bool [M, P], the targets; targets: the same as floats (0 / 1) in logits' dtype.

    Returns:
        (per-pixel focal loss float [M, P], p float [M, P]).
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = torch.where(masks, prob, 1 - prob)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        positive = alpha * loss
        # in place: one full-size temporary fewer at the loss's memory peak; autograd allows it, as no backward
        # needs `loss` itself (its product saved ce and the power), and the gradient of `*= c` is that of `* c`
        loss = torch.where(masks, positive, loss.mul_(1 - alpha))
    return loss, prob


class _SigmoidOf(torch.autograd.Function):
    """sigmoid(x) from its value p = sigmoid(x), computed before: returns p itself, not a second full-size tensor,
    and differentiates as torch.sigmoid does (aten.sigmoid_backward(grad, p)), so x's gradient is bitwise the same
    as if the sigmoid had been computed again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(p)
        return p.view_as(p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (p,) = ctx.saved_tensors
        return torch.ops.aten.sigmoid_backward(grad, p), None


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

    Memory: the upsampled logits and the float targets are the full-size copies the formula needs; the focal and
    dice terms share one sigmoid and keep boolean masks where torchvision keeps float tensors (`sigmoid_focal`):
    6 full-size float tensors (and a 1-byte mask) wait for the backward instead of 9, with the same values and
    gradients.

    Args:
        mask_logits: float [M, h, w]. target_masks: binary masks, bool (or float 0 / 1) [M, H, W].
        num_boxes: N_b, a scalar.

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
    masks = target_masks.flatten(1)
    masks = masks if masks.dtype == torch.bool else masks != 0
    targets = masks.to(logits.dtype)  # BCE and dice take float targets: one copy for both
    focal, prob = sigmoid_focal(logits, masks, targets, alpha, gamma)
    focal = focal.mean(1).sum() / num_boxes
    dice = dice_loss(logits, targets, prob).sum() / num_boxes
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
