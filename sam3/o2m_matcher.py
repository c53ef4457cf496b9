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

As the Hungarian matcher, it works in two halves (`sam3.match_pass` matches a step's layers with one host copy):
`prepare` computes, on the device and in fixed shapes, which (slot, target) pairs pass both tests; `assign` lists
them on the host copy (numpy), where a device nonzero would have been one more host sync.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.ops import box_convert

from sam3.box_ops import pairwise_box_iou
from sam3.errors import ConfigError
from sam3.matcher import PaddedTargets, match_now

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
        """Match each query's predictions to its targets, one target to several predictions (`prepare`, one
        `to_host`, `assign`).

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
        return match_now(self, pred_logits, pred_boxes, targets, torch.float32)

    @torch.no_grad()
    def prepare(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, padded: PaddedTargets
    ) -> torch.Tensor | None:
        """The device half: bool [2, Q, N, max n_q], per (query, slot, padded target column) whether the pair passes
        both tests ([0]) and whether its C is non-finite ([1]), for `assign` on the host; None when there is nothing
        to match (no query has a target, or N = 0).

        The quantile is taken per target column, so the padding columns never influence the real ones; `assign`
        masks them out. Fixed shapes only: the selected pairs are listed on the host, not by a device nonzero.
        """
        tgt = padded.boxes  # [Q, n_max, 4]
        num_preds = pred_logits.shape[1]
        if tgt is None or num_preds == 0:
            return None
        logits = pred_logits.float()
        boxes = pred_boxes.float()
        score = self.score(logits, boxes, tgt)  # [Q, N, n_max]
        # A slot with a non-finite logit or box is broken even where C happens to be finite (sigmoid(inf) = 1).
        slot_ok = torch.isfinite(logits) & torch.isfinite(boxes).all(dim=-1)  # [Q, N]
        finite = torch.isfinite(score) & slot_ok[:, :, None]
        score = torch.where(finite, score, torch.full_like(score, _NON_FINITE_FILL))

        selected = finite & (score > self.threshold)
        if self.topk < num_preds:
            level = 1.0 - self.topk / num_preds  # in (0, 1)
            selected &= score > torch.quantile(score, level, dim=1, keepdim=True)  # [Q, 1, n_max] per target
        return torch.stack([selected, ~finite])

    def assign(self, flags: np.ndarray, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The host half: the selected pairs of the real targets, from the host copy of `prepare`'s flags; counts the
        non-finite entries of real targets.

        Args:
            flags: bool [2, Q, N, max n_q] (`prepare`'s result on the host). sizes: n_q per query.

        Returns:
            Q pairs (pred_idx, tgt_idx) of int64 arrays (see `__call__`).
        """
        selected, non_finite = flags
        real = (np.arange(selected.shape[2]) < np.asarray(sizes)[:, None])[:, None, :]  # [Q, 1, n_max]
        self._count_non_finite(int((non_finite & real).sum()))
        # nonzero lists the selected (query, pred, tgt) triples row-major: sorted by query, prediction, target
        q_idx, pred_idx, tgt_idx = np.nonzero(selected & real)
        bounds = np.cumsum(np.bincount(q_idx, minlength=len(sizes)))[:-1]
        return list(zip(np.split(pred_idx, bounds), np.split(tgt_idx, bounds), strict=True))

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
