"""One-to-many (DAC) matching of predictions to target boxes, per (image, prompt) query.

This is the semantics of Meta's `BinaryOneToManyMatcher` (facebookresearch/sam3, sam3/train/matcher.py), written
anew. For a query q with N predictions ("slots") and n_q > 0 target boxes:

    p_i     = sigmoid(logit_i)                                        [N]
    IoU_ij  = IoU(box_i, target_j)   boxes normalised cxcywh, IoU taken on xyxy; plain IoU, not GIoU   [N, n_q]
    C_ij    = alpha * p_i + (1 - alpha) * IoU_ij                      [N, n_q], higher is better
    match(i, j)  iff  C_ij > quantile(C_:j, 1 - topk / N)  and  C_ij > threshold

The quantile is torch.quantile over the N slots of target j, with linear interpolation, and both comparisons are
strict. With distinct C values that selects exactly the topk best slots of each target (the quantile lies strictly
between the (topk+1)-th and the topk-th best), so a target takes at most topk slots, fewer when ties sit at the
boundary or when the threshold removes some, and possibly none. Nothing stops one slot from matching several
targets (Meta's docstring says "at most one target", its code does not enforce it, and neither does this one):
a slot that overlaps two targets well enough is trained towards both. Queries without targets (negative prompts)
get no matches. Defaults alpha 0.3, threshold 0.4, topk 4 are those of Meta's RF100-VL and ODinW configs.

In the recipe this matcher matches only the o2m (one-to-many) outputs of the final decoder layer; the o2m outputs
of the earlier decoder layers are matched by the one-to-one Hungarian matcher (sam3.matcher.HungarianMatcher),
as Meta's configs set `use_o2m_matcher_on_o2m_aux: false`.

Where this differs from Meta's code, deliberately:
- topk >= N (quantile level <= 0): the quantile test is skipped and every slot above the threshold matches. Meta's
  code raises for topk > N (torch.quantile refuses a negative level) and, at topk == N, takes the minimum as the
  quantile, so its strict > drops the worst slot(s) although "the top N of N slots" are all of them.
- Non-finite C (a NaN/inf logit or box, i.e. a diverging run) never matches and ranks below every finite slot in
  the quantile. In Meta's code one NaN slot makes torch.quantile return NaN for that target, so the target gets no
  match at all. Non-finite entries are counted in `non_finite_count`, with a warning the first time.
- IoU of two zero-area boxes is 0 (`sam3.box_ops.pairwise_box_iou`: union clamped at 1e-7) instead of Meta's
  0 / 0 = NaN.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torchvision.ops import box_convert

from sam3.box_ops import pairwise_box_iou
from sam3.errors import ConfigError
from sam3.matcher import no_matches, pad_targets

log = logging.getLogger(__name__)

# Stands in for non-finite C before the quantile: far below any finite C (C lies in [0, 1] for probabilities in
# [0, 1] and IoU in [0, 1]), so a broken slot ranks last. Finite, because torch.quantile's linear interpolation
# between -inf and a finite value gives NaN. Those entries are masked out of the matches separately anyway.
_NON_FINITE_FILL = -1e9


@dataclass
class OneToManyMatcher:
    """Match each target to up to `topk` predictions per query (see the module docstring).

    Args:
        alpha: weight of the probability in C; 1 - alpha weighs the IoU. In [0, 1].
        threshold: C must exceed it (strictly) for a match.
        topk: a slot must be strictly above the 1 - topk / N quantile of its target's column; >= 1. topk >= N
            disables the quantile test.

    Non-finite C entries (NaN/inf logits or boxes) never match; their number, counted over real (not padding)
    targets, accumulates in `non_finite_count` and the first occurrence logs a warning.
    """

    alpha: float = 0.3
    threshold: float = 0.4
    topk: int = 4
    non_finite_count: int = field(default=0, init=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ConfigError(
                f"o2m matcher topk must be an integer >= 1 (the number of slots each target may take), got "
                f"{self.topk!r}; the recipe uses 4"
            )
        if not 0.0 <= self.alpha <= 1.0:  # also rejects NaN
            raise ConfigError(
                f"o2m matcher alpha must lie in [0, 1] (weight of the score against the IoU), got {self.alpha!r}; "
                "the recipe uses 0.3"
            )
        if self.threshold != self.threshold:
            raise ConfigError("o2m matcher threshold is NaN: nothing could ever match; the recipe uses 0.4")

    @torch.no_grad()
    def __call__(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: list[dict]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each query's predictions to its targets, one target to several predictions.

        Args:
            pred_logits: float [Q, N] score logits of N predictions for each of Q queries.
            pred_boxes: float [Q, N, 4] predicted boxes, normalised cxcywh.
            targets: Q dicts whose `boxes` is float [n_q, 4] normalised cxcywh (n_q may be 0).

        Returns:
            Q pairs (pred_idx, tgt_idx), CPU long tensors of equal length, sorted by pred_idx then tgt_idx:
            prediction pred_idx[k] of query q is matched to target tgt_idx[k]. A prediction may appear several
            times (several targets), and so may a target (up to topk predictions). Empty for a query without
            targets or without any pair passing both tests.
        """
        num_queries, num_preds = pred_logits.shape
        # All queries at once on the model's device, padded to the most targets, then one copy to the CPU. The
        # quantile is taken per target column, so padding columns never influence the real ones; they are masked
        # out of the matches.
        padded = pad_targets(targets, num_queries, pred_boxes.device, torch.float32)
        matches = no_matches(num_queries)
        sizes, with_targets, tgt = padded.sizes, padded.rows, padded.boxes  # tgt [Q', n_max, 4]
        if not with_targets or num_preds == 0:
            return matches
        n_max = tgt.shape[1]
        num_real = torch.tensor([sizes[q] for q in with_targets], device=tgt.device)
        real = (torch.arange(n_max, device=tgt.device) < num_real[:, None])[:, None, :]  # [Q', 1, n_max]

        logits = pred_logits[with_targets].float()
        boxes = pred_boxes[with_targets].float()
        score = self.score(logits, boxes, tgt)  # [Q', N, n_max]
        # A slot with a non-finite logit or box is broken even where C happens to be finite (sigmoid(inf) = 1).
        slot_ok = torch.isfinite(logits) & torch.isfinite(boxes).all(dim=-1)  # [Q', N]
        finite = torch.isfinite(score) & slot_ok[:, :, None]
        score = torch.where(finite, score, torch.full_like(score, _NON_FINITE_FILL))

        selected = finite & real & (score > self.threshold)
        if self.topk < num_preds:
            level = 1.0 - self.topk / num_preds  # in (0, 1)
            selected &= score > torch.quantile(score, level, dim=1, keepdim=True)  # [Q', 1, n_max] per target

        # nonzero lists the selected (row, pred, tgt) triples row-major, i.e. sorted by query, prediction, target.
        # They travel to the CPU in one copy, together with the count of non-finite entries on real targets.
        num_bad = (~finite & real).sum()
        packed = torch.cat([num_bad.view(1), torch.nonzero(selected).flatten()]).cpu()
        self._count_non_finite(int(packed[0]))
        q_idx, pred_idx, tgt_idx = packed[1:].view(-1, 3).unbind(dim=1)

        counts = torch.bincount(q_idx, minlength=len(with_targets)).tolist()
        pred_chunks, tgt_chunks = torch.split(pred_idx, counts), torch.split(tgt_idx, counts)
        for row, q in enumerate(with_targets):
            matches[q] = (pred_chunks[row].contiguous(), tgt_chunks[row].contiguous())
        return matches

    def score(self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, tgt_boxes: torch.Tensor) -> torch.Tensor:
        """Matching quality C of every prediction against every target, per query (higher is better).

        Args:
            pred_logits: float [Q, N]. pred_boxes: float [Q, N, 4] and tgt_boxes: float [Q, n, 4], normalised cxcywh.

        Returns:
            float32 [Q, N, n]; C[q, i, j] = alpha * sigmoid(logit_qi) + (1 - alpha) * IoU(box_qi, target_qj).
        """
        prob = pred_logits.float().sigmoid()
        iou = pairwise_box_iou(
            box_convert(pred_boxes.float(), "cxcywh", "xyxy"), box_convert(tgt_boxes.float(), "cxcywh", "xyxy")
        )
        return self.alpha * prob[..., None] + (1 - self.alpha) * iou

    def _count_non_finite(self, num_bad: int) -> None:
        """Count non-finite C entries, with a warning on the first occurrence."""
        if num_bad == 0:
            return
        if self.non_finite_count == 0:
            log.warning(
                "One-to-many matching: %d NaN/inf (prediction, target) entries; those predictions are not matched. "
                "Later ones are counted in OneToManyMatcher.non_finite_count without a warning. Non-finite "
                "predictions usually mean the run is diverging: lower the learning rate or resume from an earlier "
                "checkpoint.",
                num_bad,
            )
        self.non_finite_count += num_bad
