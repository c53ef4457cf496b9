"""The SAM 3 training criterion: matching, then box, classification, presence and mask losses
(docs/RECIPE.md section 3).

Shapes: Q queries (one per (image, prompt) pair), N predictions per query, M matched pairs in total, n_q target
boxes of query q. Model outputs (a dict, one per decoder layer; earlier layers listed in `aux_outputs`):

    pred_logits     float [Q, N]        score logit of each prediction
    pred_boxes      float [Q, N, 4]     normalised cxcywh
    presence_logits float [Q] or [Q, 1] does the prompt occur in the image at all
    pred_masks      float [Q, N, h, w]  mask logits (final layer, segmentation mode only)

Targets: Q dicts with `boxes` float [n_q, 4] normalised cxcywh (n_q = 0 for a negative prompt) and, in segmentation
mode, `masks` bool [n_q, H, W].

Per decoder layer, after Hungarian matching (sam3.matcher), with N_b the number of target boxes and N_q the number
of queries, each averaged over ranks and clamped at >= 1 (`normalisers`; N_q = Q in a single process):

    loss_bbox     = 5 * sum_matched |b - g|_1 / N_b                                      (cxcywh)
    loss_giou     = 2 * sum_matched (1 - GIoU(b, g)) / N_b                               (xyxy)
    loss_ce       = 20 * sum over Q x N of the IoU-aware BCE / (N_q x N), the mean over all pairs
                    (`iou_aware_bce`), or with class_loss="focal"
                    2 * sum over Q x N of the sigmoid focal loss / N_b (`focal_class_loss`)
    loss_presence = 20 * sum over Q of 0.5 * BCE(presence_logit, 1 if n_q > 0 else 0) / N_q, the mean over
                    prompts (`presence_loss`)
and on the final layer only, in segmentation mode (`sam3.mask_losses`):
    loss_mask     = 200 * sum_matched mean_pixels focal(mask_logit, mask) / N_b
    loss_dice     = 10 * sum_matched dice(mask_logit, mask) / N_b

`Criterion` returns every term already weighted, the earlier layers' terms suffixed `_0`, `_1`, ... in the order of
`aux_outputs`, and `loss`, the sum of them all.

Where we differ from the reference, on purpose:
- The reference multiplies the total by sqrt(number of queries on the rank); that ties the effective learning rate
  to how many prompts a batch happens to hold. Off by default; `scale_by_sqrt_num_queries=True` restores it (and
  scales every term, so `loss` is still their sum).
- The reference divides the IoU-aware BCE by Q x 200 even when a model has fewer than 200 predictions
  (`pad_n_queries`); we take the plain mean over Q x N. Identical at the SAM 3 default of N = 200.
- The reference takes the IABCE and presence means over the queries of its own rank; we divide by N_q, the
  query count averaged over ranks, as it does for boxes. Identical when every rank holds as many queries; exact
  for gradient accumulation (pass the accumulated counts) and for ranks with different query counts.
- The reference's optional one-to-many branch (200 extra queries matched one-to-many, weight 2) is not
  implemented: transformers' `Sam3Model` has no such queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from sam3.box_ops import paired_box_iou
from sam3.config import CLASS_LOSSES, LossConfig
from sam3.errors import ConfigError
from sam3.mask_losses import matched_mask_losses
from sam3.matcher import HungarianMatcher

# The IoU-aware soft target never falls below this, so a matched prediction with no overlap is still pushed up a bit.
SOFT_TARGET_MIN = 0.01


def normalisers(num_boxes: float, num_queries: float, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss normalisers (N_b, N_q): this rank's counts averaged over ranks, each clamped at >= 1.

    N_b = max(1, sum over ranks of num_boxes / world size) divides the box, mask and focal class losses; N_q, the
    same for num_queries, makes the IABCE and presence "means over queries". Averaging over ranks (one all_reduce
    when torch.distributed is initialised) gives every rank the same normaliser, so after DDP averages gradients
    each target box (query) weighs the same whichever rank holds it. For gradient accumulation pass the counts of
    the whole accumulated batch: then accumulated micro-batches sum to exactly the loss of the large batch.

    Args:
        num_boxes, num_queries: counts on this rank. device: where the all_reduce runs (the model's device).

    Returns:
        (N_b, N_q), float scalar tensors on `device`.
    """
    counts = torch.tensor([float(num_boxes), float(num_queries)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
        counts = counts / dist.get_world_size()
    counts = counts.clamp(min=1.0)
    return counts[0], counts[1]


def box_losses(
    src_boxes: torch.Tensor, tgt_boxes: torch.Tensor, num_boxes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted box losses of M matched pairs.

    l1   = sum_k sum_c |src[k, c] - tgt[k, c]| / N_b     over the 4 normalised cxcywh coordinates
    giou = sum_k (1 - GIoU(src[k], tgt[k])) / N_b          GIoU on the xyxy forms

    Args:
        src_boxes, tgt_boxes: float [M, 4] normalised cxcywh. num_boxes: N_b, a scalar.

    Returns:
        (l1, giou), two scalars; 0 (still attached to the graph) when M = 0.
    """
    l1 = (src_boxes - tgt_boxes).abs().sum() / num_boxes
    src_xyxy = box_convert(src_boxes, "cxcywh", "xyxy")
    tgt_xyxy = box_convert(tgt_boxes, "cxcywh", "xyxy")
    giou = generalized_box_iou_loss(src_xyxy, tgt_xyxy, reduction="none").sum() / num_boxes
    return l1, giou


def iou_aware_bce(
    logits: torch.Tensor,
    match_query: torch.Tensor,
    match_pred: torch.Tensor,
    match_iou: torch.Tensor,
    has_target: torch.Tensor,
    num_queries: torch.Tensor | float,
    pos_weight: float = 10.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
    on_negative_prompts: bool = False,
) -> torch.Tensor:
    """IoU-aware BCE (the reference's IABCE with its presence head on), unweighted.

    With p = sigmoid(logit) for each of the Q x N (query, prediction) pairs:
        matched pair:    pos_weight * BCE(logit, t),  t = max(p^alpha * IoU^(1-alpha), 0.01), detached
        unmatched pair:  BCE(logit, 0) * p^gamma = -log(1 - p) * p^gamma
        pair of a query with no target: 0 (a negative prompt is supervised by the presence loss alone), or,
            with on_negative_prompts, the unmatched term above (every prediction of it is a false positive)
    loss = sum of all of them / (N_q x N), N_q = Q for a single process without accumulation (see `normalisers`):
    the mean over all pairs, the zeroed pairs of negative prompts included.

    The p^gamma factor of unmatched pairs is NOT detached, as in the reference: its gradient also flows through
    p^gamma, d/dx [softplus(x) * sigmoid(x)^gamma], which pushes confident false positives down harder.
    Only the soft target t is a constant.

    Args:
        logits: float [Q, N]. match_query, match_pred: long [M], the matched (query, prediction) pairs.
        match_iou: float [M] IoU of each matched prediction's box with its target box.
        has_target: bool [Q], whether each query has at least one target box. num_queries: N_q.

    Returns:
        scalar.
    """
    prob = logits.sigmoid()
    matched = torch.zeros_like(logits, dtype=torch.bool)
    matched[match_query, match_pred] = True
    with torch.no_grad():
        soft_target = torch.zeros_like(logits)
        t = prob[match_query, match_pred] ** alpha * match_iou.to(logits) ** (1 - alpha)
        soft_target[match_query, match_pred] = t.clamp(min=SOFT_TARGET_MIN)
    # One BCE serves both cases: the soft target is 0 wherever a pair is unmatched.
    bce = F.binary_cross_entropy_with_logits(logits, soft_target, reduction="none")
    per_pair = torch.where(matched, pos_weight * bce, bce * prob**gamma)
    if not on_negative_prompts:
        per_pair = per_pair * has_target[:, None]
    return per_pair.sum() / (num_queries * logits.shape[1])


def focal_class_loss(
    logits: torch.Tensor,
    match_query: torch.Tensor,
    match_pred: torch.Tensor,
    num_boxes: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal classification over all Q x N pairs, unweighted (for training from scratch).

    y = 1 for matched pairs, 0 for every other pair (negative prompts included); p_t = p if y else 1 - p,
    alpha_t = alpha if y else 1 - alpha:
        loss = sum over Q x N of alpha_t * (1 - p_t)^gamma * BCE(logit, y) / N_b

    Args:
        logits: float [Q, N]. match_query, match_pred: long [M]. num_boxes: N_b, a scalar.

    Returns:
        scalar.
    """
    labels = torch.zeros_like(logits)
    labels[match_query, match_pred] = 1.0
    return sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma, reduction="sum") / num_boxes


def presence_loss(
    presence_logits: torch.Tensor, has_target: torch.Tensor, num_queries: torch.Tensor | float, alpha: float = 0.5
) -> torch.Tensor:
    """Presence loss, unweighted: sum over Q of alpha_t * BCE(presence_logit, y) / N_q, y = 1 if the query has a target.

    alpha_t = alpha if y else 1 - alpha; N_q = Q for a single process without accumulation, so this is the mean
    over prompts. The reference writes it as a sigmoid focal loss with gamma 0 and alpha 0.5, i.e. 0.5 * BCE for
    both classes.

    Args:
        presence_logits: float [Q]. has_target: bool [Q]. num_queries: N_q (see `normalisers`).

    Returns:
        scalar.
    """
    y = has_target.to(presence_logits.dtype)
    bce = F.binary_cross_entropy_with_logits(presence_logits, y, reduction="none")
    alpha_t = alpha * y + (1 - alpha) * (1 - y)
    return (alpha_t * bce).sum() / num_queries


@dataclass
class Criterion:
    """Weighted SAM 3 training losses over all decoder layers (formulas in the module docstring).

    `config` (sam3.config.LossConfig, the `loss` section of params.yaml; default: the recipe's) holds what a run
    sets; the other fields are constants of the method. Features and the fields that control them:
    - Box L1 + GIoU on matched pairs: config.weight_bbox, config.weight_giou.
    - Classification: config.class_loss "iabce" (the recipe: IoU-aware BCE with config.pos_weight, iabce_alpha,
      iabce_gamma, config.weight_ce) or "focal" (focal_alpha, focal_gamma, weight_focal_ce) for training from
      scratch, where the recipe measured that IABCE stays on the plateau (docs/RECIPE.md section 1). weight_focal_ce
      defaults to Deformable DETR's class weight 2 for the same sum / N_b normalisation.
    - Presence: config.weight_presence, presence_alpha.
    - Masks (final layer only; sam3.mask_losses): with_masks, config.weight_mask, config.weight_dice, focal_alpha,
      focal_gamma.
    - Auxiliary decoder layers: every entry of outputs["aux_outputs"], same terms except masks.
    - The reference's sqrt(num queries) scale of the total: config.scale_by_sqrt_num_queries (off).
    - IABCE on the predictions of negative prompts (unmatched term, as if each were a false positive):
      config.ce_on_negative_prompts (off: the reference supervises negative prompts through presence alone).

    Call: `criterion(outputs, targets, num_boxes=None, num_queries=None) -> dict[str, Tensor]` (see `__call__`).
    """

    config: LossConfig = field(default_factory=LossConfig)
    matcher: HungarianMatcher = field(default_factory=HungarianMatcher)
    with_masks: bool = False
    iabce_alpha: float = 0.25
    iabce_gamma: float = 2.0
    weight_focal_ce: float = 2.0
    presence_alpha: float = 0.5
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        # the params loader refuses other values; a LossConfig built in code is checked here
        class_loss = self.config.class_loss
        if class_loss not in CLASS_LOSSES:
            raise ConfigError(f"class_loss={class_loss!r} is not known: use one of {', '.join(CLASS_LOSSES)}")

    def __call__(
        self,
        outputs: dict,
        targets: list[dict],
        num_boxes: float | None = None,
        num_queries: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses of one batch (or one micro-batch of an accumulated batch).

        Args:
            outputs: the final decoder layer's `pred_logits`, `pred_boxes`, `presence_logits` (and `pred_masks`
                when with_masks), plus optional `aux_outputs`, a list of dicts with the same keys for the
                earlier layers (masks not needed there).
            targets: Q dicts with `boxes` [n_q, 4] normalised cxcywh and, when with_masks, `masks` [n_q, H, W].
            num_boxes, num_queries: this rank's target boxes and queries in the whole accumulated batch, for
                gradient accumulation; None: those of `targets`. Averaged over ranks here (`normalisers`).

        Returns:
            `loss_bbox`, `loss_giou`, `loss_ce`, `loss_presence` (+ `loss_mask`, `loss_dice` when with_masks) for the
            final layer, the same with suffix `_i` for aux_outputs[i], all weighted, and `loss`, their sum.
        """
        logits = outputs["pred_logits"]
        if logits.dim() != 2 or logits.shape[0] != len(targets):
            raise ValueError(
                f"pred_logits must be [Q, N] with one target dict per query; got {tuple(logits.shape)} and "
                f"{len(targets)} targets"
            )
        if num_boxes is None:
            num_boxes = sum(int(t["boxes"].shape[0]) for t in targets)
        if num_queries is None:
            num_queries = len(targets)
        norm = normalisers(num_boxes, num_queries, logits.device)
        losses = self._layer_losses(outputs, targets, norm, with_masks=self.with_masks)
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            aux_losses = self._layer_losses(aux, targets, norm, with_masks=False)
            losses.update({f"{name}_{i}": value for name, value in aux_losses.items()})
        if self.config.scale_by_sqrt_num_queries:
            # The reference's factor: sqrt of the queries in this call (it never divides by accumulation steps).
            scale = math.sqrt(len(targets))
            losses = {name: value * scale for name, value in losses.items()}
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses

    def _layer_losses(
        self, out: dict, targets: list[dict], norm: tuple[torch.Tensor, torch.Tensor], with_masks: bool
    ) -> dict[str, torch.Tensor]:
        """Weighted terms of one decoder layer, without suffix; norm = (N_b, N_q)."""
        num_boxes, num_queries = norm
        config = self.config
        # fp32 whatever the autocast dtype: BCE, focal and GIoU lose too much in bf16.
        logits = out["pred_logits"].float()  # [Q, N]
        boxes = out["pred_boxes"].float()  # [Q, N, 4]
        presence = out["presence_logits"].float().reshape(-1)  # [Q]
        device = logits.device

        matches = self.matcher(logits, boxes, targets)
        match_query = torch.cat([torch.full_like(pred, q) for q, (pred, _) in enumerate(matches)]).to(device)
        match_pred = torch.cat([pred for pred, _ in matches]).to(device)
        tgt_boxes = torch.cat(
            [t["boxes"].reshape(-1, 4)[tgt] for t, (_, tgt) in zip(targets, matches, strict=True)]
        ).to(boxes)
        has_target = torch.tensor([t["boxes"].shape[0] > 0 for t in targets], device=device)

        src_boxes = boxes[match_query, match_pred]  # [M, 4]
        l1, giou = box_losses(src_boxes, tgt_boxes, num_boxes)
        terms = {"loss_bbox": config.weight_bbox * l1, "loss_giou": config.weight_giou * giou}

        if config.class_loss == "iabce":
            with torch.no_grad():
                iou = paired_box_iou(box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
            ce = iou_aware_bce(
                logits,
                match_query,
                match_pred,
                iou,
                has_target,
                num_queries,
                config.pos_weight,
                self.iabce_alpha,
                self.iabce_gamma,
                config.ce_on_negative_prompts,
            )
            terms["loss_ce"] = config.weight_ce * ce
        else:
            ce = focal_class_loss(logits, match_query, match_pred, num_boxes, self.focal_alpha, self.focal_gamma)
            terms["loss_ce"] = self.weight_focal_ce * ce

        terms["loss_presence"] = config.weight_presence * presence_loss(
            presence, has_target, num_queries, self.presence_alpha
        )

        if with_masks:
            focal, dice = matched_mask_losses(
                out, targets, matches, match_query, match_pred, num_boxes, self.focal_alpha, self.focal_gamma
            )
            terms["loss_mask"] = config.weight_mask * focal
            terms["loss_dice"] = config.weight_dice * dice
        return terms
