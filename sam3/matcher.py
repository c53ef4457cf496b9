"""One-to-one Hungarian matching of predictions to target boxes, per (image, prompt) query (docs/RECIPE.md section 3).

For each query q with n_q > 0 target boxes, the cost of prediction i against target j is

    C[i, j] = cost_bbox * |b_i - g_j|_1  +  cost_class * c_cls(p_i)  -  cost_giou * GIoU(b_i, g_j)

with boxes in normalised cxcywh for the L1 term, xyxy for GIoU, p_i = sigmoid(logit_i) and the focal cost

    c_cls(p) = pos_cost - neg_cost
    pos_cost = alpha * (1 - p)^gamma * (-log p)          focal loss if the prediction is labelled positive
    neg_cost = (1 - alpha) * p^gamma * (-log(1 - p))     focal loss if it is labelled negative

i.e. c_cls = -0.25 (1-p)^2 log p + 0.75 p^2 log(1-p) at the defaults. Matching prediction i instead of leaving it
unmatched changes its focal classification loss by exactly pos_cost - neg_cost, which is why that difference is
the class cost. `scipy.optimize.linear_sum_assignment` then minimises the total cost; min(N, n_q) pairs result.
Queries without targets (negative prompts) are not matched at all.

The matcher works in two halves, so that a training step matches all its decoder layers with one device->host copy
(`sam3.match_pass`): `prepare` computes the costs of all queries on the device, `assign` runs scipy per query on
their host copy (numpy). `__call__` chains them for one layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou

from sam3.host_sync import to_host

log = logging.getLogger(__name__)

# Stands in for NaN/inf costs. Finite, so scipy can solve the problem (it refuses NaN with "invalid numeric
# entries", a reported failure of the reference at small batches), and far above any real cost (the L1 and GIoU
# terms are bounded for boxes in [0, 1], the class term grows only linearly with |logit|), so the assignment
# avoids those pairs whenever it can.
NON_FINITE_COST = 1e9

# Fills the padding of queries with fewer targets than the most crowded one: a valid box (0.5, 0.5, 1, 1) keeps
# GIoU finite there.
_PAD_CENTRE, _PAD_SIZE = 0.5, 1.0


@dataclass
class PaddedTargets:
    """The target boxes of a batch of queries in one tensor, as both matchers compute over them.

    sizes  n_q of every query (0 for a negative prompt)
    boxes  float [Q, max n_q, 4] normalised cxcywh: row q holds query q's targets, then the padding box (a negative
           prompt's row is all padding); None when no query has a target
    """

    sizes: list[int]
    boxes: torch.Tensor | None

    @property
    def rows(self) -> list[int]:
        """The queries with n_q > 0, in order."""
        return [q for q, n in enumerate(self.sizes) if n > 0]


def pad_targets(targets: list[dict], num_queries: int, device: torch.device, dtype: torch.dtype) -> PaddedTargets:
    """Pad the `boxes` of `targets` (one dict per query) into one tensor on `device` in `dtype`; ValueError when
    there is not one target dict per query.

    Built on the device from the targets already there (fills and device copies): no host data is uploaded.
    """
    if len(targets) != num_queries:
        raise ValueError(f"{len(targets)} targets for {num_queries} queries: need one target dict per query")
    sizes = [int(t["boxes"].shape[0]) for t in targets]
    if max(sizes, default=0) == 0:
        return PaddedTargets(sizes, None)
    boxes = torch.full((num_queries, max(sizes), 4), _PAD_CENTRE, device=device, dtype=dtype)
    boxes[..., 2:].fill_(_PAD_SIZE)
    for q, n in enumerate(sizes):
        if n:
            boxes[q, :n] = targets[q]["boxes"].to(boxes)
    return PaddedTargets(sizes, boxes)


def no_matches(num_queries: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`num_queries` empty (pred_idx, tgt_idx) pairs: what a matcher returns for a query it matches nothing in."""
    return [(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)) for _ in range(num_queries)]


def as_tensors(pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Host (pred_idx, tgt_idx) arrays per query as CPU long tensors, the matchers' `__call__` result."""
    return [(torch.from_numpy(p.astype(np.int64)), torch.from_numpy(t.astype(np.int64))) for p, t in pairs]


def match_now(
    matcher, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: list[dict], dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One layer matched on its own, the matchers' `__call__`: targets padded in `dtype`, the matcher's device half
    (`prepare`), one copy to the host, its host half (`assign`). A training step matches every layer at once
    instead (`sam3.match_pass`)."""
    padded = pad_targets(targets, pred_logits.shape[0], pred_boxes.device, dtype)
    device_part = matcher.prepare(pred_logits, pred_boxes, padded)
    if device_part is None:
        return no_matches(len(targets))
    (host_part,) = to_host(device_part)
    return as_tensors(matcher.assign(host_part.numpy(), padded.sizes))


def _empty_pairs(num_queries: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)) for _ in range(num_queries)]


@dataclass
class HungarianMatcher:
    """Match predictions to targets per query, minimising the recipe's cost (see the module docstring).

    Args:
        cost_class: weight of the focal class cost c_cls.
        cost_bbox: weight of the L1 distance of normalised cxcywh boxes.
        cost_giou: weight of -GIoU.
        alpha, gamma: focal parameters of c_cls.

    Non-finite costs (NaN or inf logits or boxes, i.e. a diverging run) are replaced by NON_FINITE_COST; the number
    of replaced entries accumulates in `non_finite_count` and the first occurrence logs a warning. A query with
    more targets than predictions leaves n_q - N targets unmatched (no box loss for them): they accumulate in
    `unmatched_target_count`, with a warning the first time.
    """

    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    alpha: float = 0.25
    gamma: float = 2.0
    non_finite_count: int = field(default=0, init=False, compare=False)
    unmatched_target_count: int = field(default=0, init=False, compare=False)

    @torch.no_grad()
    def __call__(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: list[dict]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each query's predictions to its targets (`prepare`, one `to_host`, `assign`).

        Args:
            pred_logits: float [Q, N] score logits of N predictions for each of Q queries.
            pred_boxes: float [Q, N, 4] predicted boxes, normalised cxcywh.
            targets: Q dicts whose `boxes` is float [n_q, 4] normalised cxcywh (n_q may be 0).

        Returns:
            Q pairs (pred_idx, tgt_idx), CPU long tensors of length min(N, n_q), sorted by pred_idx:
            prediction pred_idx[k] of query q is matched to target tgt_idx[k]. Empty for a query without targets.
        """
        return match_now(self, pred_logits, pred_boxes, targets, pred_boxes.dtype)

    @torch.no_grad()
    def prepare(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, padded: PaddedTargets
    ) -> torch.Tensor | None:
        """The device half: float32 [Q, N, max n_q] costs of every query against its padded targets (`cost`), for
        `assign` on the host; None when no query has a target (nothing to match)."""
        if padded.boxes is None:
            return None
        return self.cost(pred_logits, pred_boxes, padded.boxes)

    def assign(self, cost: np.ndarray, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The host half: scipy's assignment per query on the host copy of `prepare`'s costs, in float64.

        Args:
            cost: float32 [Q, N, max n_q] (`prepare`'s result on the host). sizes: n_q per query.

        Returns:
            Q pairs (pred_idx, tgt_idx) of int64 arrays (see `__call__`).
        """
        num_preds = cost.shape[1]
        matches = _empty_pairs(len(sizes))
        for q, n in enumerate(sizes):
            if n == 0:
                continue
            if n > num_preds:
                self._count_unmatched(q, n, num_preds)
            # float64 as scipy computes; float32 -> float64 is exact, so casting on the host changes no value
            c = self._finite(cost[q, :, :n].astype(np.float64), q)
            pred_idx, tgt_idx = linear_sum_assignment(c)
            matches[q] = (pred_idx.astype(np.int64), tgt_idx.astype(np.int64))
        return matches

    def cost(self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, tgt_boxes: torch.Tensor) -> torch.Tensor:
        """Matching cost of every prediction against every target, per query (formula in the module docstring).

        Args:
            pred_logits: float [Q, N]. pred_boxes: float [Q, N, 4] and tgt_boxes: float [Q, n, 4], normalised cxcywh.

        Returns:
            float32 [Q, N, n]; cost[q, i, j] is the cost of matching prediction i of query q to its target j.
        """
        logits = pred_logits.float()
        boxes = pred_boxes.float()
        tgt = tgt_boxes.float()
        cost_l1 = torch.cdist(boxes, tgt, p=1)  # [Q, N, n]
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
        prob = logits.sigmoid()
        # logsigmoid(x) = log p and logsigmoid(-x) = log(1 - p), without the log(0) of a saturated sigmoid.
        pos_cost = self.alpha * (1 - prob) ** self.gamma * -F.logsigmoid(logits)
        neg_cost = (1 - self.alpha) * prob**self.gamma * -F.logsigmoid(-logits)
        cost_cls = (pos_cost - neg_cost)[..., None]  # [Q, N, 1]: the same for every target
        return self.cost_bbox * cost_l1 + self.cost_class * cost_cls - self.cost_giou * giou

    def _finite(self, cost: np.ndarray, query: int) -> np.ndarray:
        """`cost` with NaN/inf replaced by NON_FINITE_COST, counted, and a warning on the first occurrence."""
        bad = ~np.isfinite(cost)
        num_bad = int(bad.sum())
        if num_bad == 0:
            return cost
        if self.non_finite_count == 0:
            log.warning(
                "Hungarian matching: %d NaN/inf cost entries in query %d (%d predictions x %d targets) replaced by "
                "%g; later ones are counted in HungarianMatcher.non_finite_count without a warning. Non-finite "
                "predictions usually mean the run is diverging: lower the learning rate or resume from an earlier "
                "checkpoint.",
                num_bad,
                query,
                cost.shape[0],
                cost.shape[1],
                NON_FINITE_COST,
            )
        self.non_finite_count += num_bad
        return np.where(bad, NON_FINITE_COST, cost)

    def _count_unmatched(self, query: int, num_targets: int, num_preds: int) -> None:
        """Count the targets of `query` that cannot be matched, with a warning on the first occurrence."""
        if self.unmatched_target_count == 0:
            log.warning(
                "Hungarian matching: query %d has %d targets but the model makes only %d predictions; %d targets "
                "get no box loss. Later ones are counted in HungarianMatcher.unmatched_target_count without a "
                "warning. Use more queries in the model or drop queries with that many targets.",
                query,
                num_targets,
                num_preds,
                num_targets - num_preds,
            )
        self.unmatched_target_count += num_targets - num_preds
