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

One-to-many (DAC) terms, when the model ran its o2m queries (`pred_logits_o2m`, `pred_boxes_o2m`, and on the final
layer `pred_masks_o2m`, in the final dict and in each aux entry; sam3.decoder_pass): the same box, classification
and mask terms on the o2m predictions, each times o2m_weight (2), named `<term>_o2m` (`loss_bbox_o2m_0` for aux
layer 0), with no presence term (the presence token is shared with the o2o half and supervised there once). The
matching differs: the final layer's o2m outputs use the one-to-many matcher (sam3.o2m_matcher: a target takes the
slots whose 0.3 p + 0.7 IoU is above both the per-target (1 - 4/N) quantile and 0.4), the earlier layers' use the
Hungarian matcher (the recipe's use_o2m_matcher_on_o2m_aux false; `o2m_matcher_on_aux` switches). Box and mask
terms sum over every matched pair and divide by N_b, the number of target boxes, as the o2o terms do, so a target
matched by three slots counts three times. A slot matched to several targets (possible, as in the reference) is
one positive in the classification term, with the soft target of its best-overlapping target.

`Criterion` returns every term already weighted, the earlier layers' terms suffixed `_0`, `_1`, ... in the order of
`aux_outputs`, and `loss`, the sum of them all.

Matching comes first, for all of them at once (`sam3.match_pass`): every layer's costs on the device, one copy to the
host for scipy, one upload of the matched indices; the terms then run on the device without a host sync.

Where we differ from the reference, on purpose:
- The reference multiplies the total by sqrt(number of queries on the rank); that ties the effective learning rate
  to how many prompts a batch happens to hold. On by default, as in the reference (it sets the scale the recipe's
  learning rates were tuned with); `scale_by_sqrt_num_queries=False` turns it off. It scales every term, so `loss`
  is still their sum.
- The reference divides the IoU-aware BCE by Q x 200 even when a model has fewer than 200 predictions
  (`pad_n_queries`); we take the plain mean over Q x N. Identical at the SAM 3 default of N = 200.
- The reference takes the IABCE and presence means over the queries of its own rank; we divide by N_q, the
  query count averaged over ranks, as it does for boxes. Identical when every rank holds as many queries; exact
  for gradient accumulation (pass the accumulated counts) and for ranks with different query counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.ops import box_convert, sigmoid_focal_loss

from sam3.box_ops import paired_box_iou
from sam3.config import CLASS_LOSSES, LossConfig
from sam3.errors import ConfigError
from sam3.mask_losses import matched_mask_losses
from sam3.match_pass import LayerMatches, match_layers
from sam3.matcher import HungarianMatcher
from sam3.o2m_matcher import OneToManyMatcher

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
    # filled on the device (no host data to upload, which on a GPU would wait for the stream)
    counts = torch.stack([torch.full((), float(n), device=device) for n in (num_boxes, num_queries)])
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
    giou = giou_loss(src_xyxy, tgt_xyxy).sum() / num_boxes
    return l1, giou


def giou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - GIoU of paired boxes: torchvision's `generalized_box_iou_loss(reduction="none")`, op for op and value for
    value, except that the intersection of non-overlapping pairs is zeroed by `torch.where`, where torchvision writes
    the overlapping ones through a boolean mask (`inter[mask] = ...`): a data-dependent shape, i.e. a host sync on a
    GPU, in the forward and again in the backward.

    Args:
        boxes1, boxes2: float [M, 4] xyxy, paired row by row.

    Returns:
        float [M].
    """
    if boxes1.dtype not in (torch.float32, torch.float64):  # torchvision's upcast against overflow
        boxes1, boxes2 = boxes1.float(), boxes2.float()
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    # intersection
    xkis1, ykis1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xkis2, ykis2 = torch.min(x2, x2g), torch.min(y2, y2g)
    overlap = (ykis2 > ykis1) & (xkis2 > xkis1)
    intsctk = torch.where(overlap, (xkis2 - xkis1) * (ykis2 - ykis1), 0.0)
    unionk = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intsctk
    iouk = intsctk / (unionk + eps)
    # smallest enclosing box
    xc1, yc1 = torch.min(x1, x1g), torch.min(y1, y1g)
    xc2, yc2 = torch.max(x2, x2g), torch.max(y2, y2g)
    area_c = (xc2 - xc1) * (yc2 - yc1)
    miouk = iouk - ((area_c - unionk) / (area_c + eps))
    return 1 - miouk


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


def best_overlap_per_pair(
    match_query: torch.Tensor, match_pred: torch.Tensor, iou: torch.Tensor, shape: torch.Size
) -> torch.Tensor:
    """float [M]: for each matched pair, the largest IoU among the pairs of its (query, prediction).

    One-to-one matching never repeats a prediction; one-to-many matching may give one slot two targets. The
    classification term marks a prediction positive once, with the soft target of its best overlap: a fixed choice,
    where writing each pair's own IoU into the target tensor would keep whichever write lands last. Passed to
    `iou_aware_bce` with all M pairs, a slot matched to several targets is written several times with that same
    soft target: the term of the deduplicated pairs, value for value, with fixed shapes only (deduplicating needs a
    nonzero, a host sync on a GPU). Identical to `iou` when no prediction repeats (one-to-one matching).

    Args:
        match_query, match_pred: long [M]. iou: float [M], >= 0. shape: (Q, N) of the logits.
    """
    key = match_query * shape[1] + match_pred
    best = iou.new_full((shape[0] * shape[1],), -1.0).scatter_reduce(0, key, iou, reduce="amax")
    return best[key]


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
    - One-to-many terms (module docstring) when the outputs hold `pred_logits_o2m`: config.o2m_weight, o2m_topk,
      o2m_threshold, o2m_alpha (the one-to-many matcher), o2m_matcher_on_aux.
    - The reference's sqrt(num queries) scale of the total: config.scale_by_sqrt_num_queries (on).
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
    o2m_matcher: OneToManyMatcher = field(init=False)

    def __post_init__(self) -> None:
        # the params loader refuses other values; a LossConfig built in code is checked here
        class_loss = self.config.class_loss
        if class_loss not in CLASS_LOSSES:
            raise ConfigError(f"class_loss={class_loss!r} is not known: use one of {', '.join(CLASS_LOSSES)}")
        config = self.config
        self.o2m_matcher = OneToManyMatcher(
            alpha=config.o2m_alpha, threshold=config.o2m_threshold, topk=config.o2m_topk
        )

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
                earlier layers (masks not needed there). With the one-to-many branch, also `pred_logits_o2m`,
                `pred_boxes_o2m` (every layer) and `pred_masks_o2m` (final layer, when with_masks).
            targets: Q dicts with `boxes` [n_q, 4] normalised cxcywh and, when with_masks, `masks` [n_q, H, W].
            num_boxes, num_queries: this rank's target boxes and queries in the whole accumulated batch, for
                gradient accumulation; None: those of `targets`. Averaged over ranks here (`normalisers`).

        Returns:
            `loss_bbox`, `loss_giou`, `loss_ce`, `loss_presence` (+ `loss_mask`, `loss_dice` when with_masks) for the
            final layer, the o2m terms `loss_bbox_o2m` ... when the outputs hold them, the same with suffix `_i`
            for aux_outputs[i], all weighted, and `loss`, their sum.
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
        heads = self._heads(outputs)
        # Every head is matched first, with one host sync for all of them (sam3.match_pass); the terms follow.
        matched = match_layers([(head.matcher, head.logits, head.boxes) for head in heads], targets, logits.device)
        target_boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets])  # rows of LayerMatches.target
        losses = {}
        for head, matches in zip(heads, matched.layers, strict=True):
            terms = self._layer_losses(head, targets, target_boxes, matches, matched.has_target, norm)
            if head.weight is not None:
                terms = {name: head.weight * value for name, value in terms.items()}
            losses.update({f"{name}{head.suffix}": value for name, value in terms.items()})
        if self.config.scale_by_sqrt_num_queries:
            # The reference's factor: sqrt of the queries in this call (it never divides by accumulation steps).
            scale = math.sqrt(len(targets))
            losses = {name: value * scale for name, value in losses.items()}
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses

    def _heads(self, outputs: dict) -> list[_Head]:
        """The prediction sets to supervise, in the order of the returned terms: the final layer, its o2m half, then
        each aux layer and its o2m half."""
        layers = [(outputs, "", True)] + [
            (aux, f"_{i}", False) for i, aux in enumerate(outputs.get("aux_outputs") or [])
        ]
        heads = []
        for out, suffix, final in layers:
            heads.append(_Head.of(out, self.matcher, final and self.with_masks, suffix))
            if "pred_logits_o2m" in out:
                o2m = {"pred_logits": out["pred_logits_o2m"], "pred_boxes": out["pred_boxes_o2m"]}
                with_masks = final and self.with_masks
                if with_masks:
                    o2m["pred_masks"] = out.get("pred_masks_o2m")
                matcher = self.o2m_matcher if final or self.config.o2m_matcher_on_aux else self.matcher
                heads.append(_Head.of(o2m, matcher, with_masks, f"_o2m{suffix}", self.config.o2m_weight))
        return heads

    def _layer_losses(
        self,
        head: _Head,
        targets: list[dict],
        target_boxes: torch.Tensor,
        matches: LayerMatches,
        has_target: torch.Tensor,
        norm: tuple[torch.Tensor, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Weighted terms of one head, without suffix nor o2m weight; norm = (N_b, N_q). The presence term only when
        the head holds `presence_logits` (the o2m half has none).

        target_boxes: float [sum n_q, 4], every query's target boxes in query order. has_target: bool [Q].
        """
        num_boxes, num_queries = norm
        config = self.config
        out, logits, boxes = head.out, head.logits, head.boxes
        match_query, match_pred = matches.query, matches.pred
        tgt_boxes = target_boxes[matches.target].to(boxes)

        src_boxes = boxes[match_query, match_pred]  # [M, 4]
        l1, giou = box_losses(src_boxes, tgt_boxes, num_boxes)
        terms = {"loss_bbox": config.weight_bbox * l1, "loss_giou": config.weight_giou * giou}

        if config.class_loss == "iabce":
            with torch.no_grad():
                iou = paired_box_iou(box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
                # a one-to-many slot may hold two targets: one positive, with its best overlap
                class_iou = best_overlap_per_pair(match_query, match_pred, iou, logits.shape)
            ce = iou_aware_bce(
                logits,
                match_query,
                match_pred,
                class_iou,
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

        if "presence_logits" in out:
            presence = out["presence_logits"].float().reshape(-1)  # [Q]
            terms["loss_presence"] = config.weight_presence * presence_loss(
                presence, has_target, num_queries, self.presence_alpha
            )

        if head.with_masks:
            focal, dice = matched_mask_losses(
                out,
                targets,
                matches.per_query(),
                match_query,
                match_pred,
                num_boxes,
                self.focal_alpha,
                self.focal_gamma,
            )
            terms["loss_mask"] = config.weight_mask * focal
            terms["loss_dice"] = config.weight_dice * dice
        return terms


@dataclass
class _Head:
    """One set of predictions the criterion supervises: the one-to-one or one-to-many half of a decoder layer.

    out        its outputs: pred_logits, pred_boxes, and presence_logits / pred_masks where they apply
    logits     float32 [Q, N] and boxes float32 [Q, N, 4]: fp32 whatever the autocast dtype (BCE, focal and GIoU
               lose too much in bf16), cast once for the matcher and the losses
    matcher    matches it (HungarianMatcher or OneToManyMatcher)
    with_masks whether it has mask terms
    suffix     appended to its term names: "" (final layer), "_o2m", "_0" (aux layer 0), "_o2m_0"
    weight     multiplies each of its terms (the o2m weight); None: 1
    """

    out: dict
    logits: torch.Tensor
    boxes: torch.Tensor
    matcher: HungarianMatcher | OneToManyMatcher
    with_masks: bool
    suffix: str
    weight: float | None = None

    @classmethod
    def of(
        cls,
        out: dict,
        matcher: HungarianMatcher | OneToManyMatcher,
        with_masks: bool,
        suffix: str,
        weight: float | None = None,
    ) -> _Head:
        return cls(out, out["pred_logits"].float(), out["pred_boxes"].float(), matcher, with_masks, suffix, weight)
