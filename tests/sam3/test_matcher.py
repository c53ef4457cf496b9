"""Hungarian matcher: cost = 5 * L1(cxcywh) + 2 * c_cls - 2 * GIoU, c_cls = pos_cost - neg_cost, where
pos_cost = 0.25 (1-p)^2 (-log p), neg_cost = 0.75 p^2 (-log(1-p)), p = sigmoid(logit); one-to-one assignment per
query by scipy's linear_sum_assignment; queries without targets are not matched.

Every expected value is worked out by hand in the comments next to it.
"""

import logging
import math

import pytest
import torch

from sam3.matcher import NON_FINITE_COST, HungarianMatcher


def _box(cx: float, cy: float = 0.5, w: float = 0.1, h: float = 0.1) -> list[float]:
    return [cx, cy, w, h]


def _focal_cost(logit: float) -> float:
    """c_cls written out: -0.25 (1-p)^2 log p + 0.75 p^2 log(1-p)."""
    p = 1 / (1 + math.exp(-logit))
    return -0.25 * (1 - p) ** 2 * math.log(p) + 0.75 * p**2 * math.log(1 - p)


def test_hungarian_beats_greedy_on_a_3x3_cost_matrix():
    """L1 cost only (class and GIoU weights 0), boxes that differ only in cx, so cost = |cx_pred - cx_tgt|.

    predictions cx = 0.40, 0.50, 0.90; targets cx = 0.48, 0.58, 0.80:
                 t0     t1     t2
        p0     0.08   0.18   0.40
        p1     0.02   0.08   0.30
        p2     0.42   0.32   0.10
    Greedy (cheapest pair first): p1-t0 0.02, then p2-t2 0.10, then p0-t1 0.18: total 0.30.
    Optimal: p0-t0 0.08 + p1-t1 0.08 + p2-t2 0.10 = 0.26 < 0.30 (the only other candidates cost more:
    p0-t1 + p1-t0 + p2-t2 = 0.30, p0-t2 + p1-t0 + p2-t1 = 0.74, ...).
    """
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    logits = torch.zeros(1, 3)
    boxes = torch.tensor([[_box(0.40), _box(0.50), _box(0.90)]])
    targets = [{"boxes": torch.tensor([_box(0.48), _box(0.58), _box(0.80)])}]

    expected_cost = torch.tensor([[0.08, 0.18, 0.40], [0.02, 0.08, 0.30], [0.42, 0.32, 0.10]])
    torch.testing.assert_close(matcher.cost(logits, boxes, targets[0]["boxes"][None])[0], expected_cost)

    [(pred_idx, tgt_idx)] = matcher(logits, boxes, targets)
    assert pred_idx.tolist() == [0, 1, 2]
    assert tgt_idx.tolist() == [0, 1, 2]  # greedy would give p0-t1 and p1-t0
    assert pred_idx.dtype == tgt_idx.dtype == torch.long


def test_full_cost_by_hand_trades_box_error_against_score():
    """Default weights, one target g = (0.5, 0.5, 0.2, 0.2), xyxy (0.4, 0.4, 0.6, 0.6).

    pred 0: the same box as g, logit -2:  L1 = 0, GIoU = 1
        p = sigmoid(-2) = 0.119203, -log p = 2.126928, -log(1-p) = 0.126928
        pos_cost = 0.25 * 0.880797^2 * 2.126928 = 0.412520; neg_cost = 0.75 * 0.119203^2 * 0.126928 = 0.001353
        c_cls = 0.411167;  cost = 5 * 0 + 2 * 0.411167 - 2 * 1 = -1.177666
    pred 1: g moved right by 0.1, xyxy (0.5, 0.4, 0.7, 0.6), logit +2:
        L1 = 0.1; intersection 0.1 x 0.2 = 0.02, union 0.04 + 0.04 - 0.02 = 0.06, IoU = 1/3;
        enclosing box (0.4, 0.4, 0.7, 0.6) has area 0.06 = union, so GIoU = 1/3
        p = 0.880797: pos_cost = 0.25 * 0.119203^2 * 0.126928 = 0.000451; neg_cost = 0.75 * 0.880797^2 * 2.126928
        = 1.237559; c_cls = -1.237108;  cost = 5 * 0.1 + 2 * (-1.237108) - 2 / 3 = -2.640882
    The confident, slightly offset prediction 1 is cheaper, so it is the match.
    """
    matcher = HungarianMatcher()
    logits = torch.tensor([[-2.0, 2.0]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]]])
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2]])

    assert math.isclose(_focal_cost(-2.0), 0.411167, abs_tol=1e-6)
    assert math.isclose(_focal_cost(2.0), -1.237108, abs_tol=1e-6)
    cost = matcher.cost(logits, boxes, target[None])[0, :, 0]
    torch.testing.assert_close(cost, torch.tensor([-1.177666, -2.640882]), atol=1e-5, rtol=0)

    [(pred_idx, tgt_idx)] = matcher(logits, boxes, [{"boxes": target}])
    assert pred_idx.tolist() == [1] and tgt_idx.tolist() == [0]


def test_class_cost_prefers_the_confident_prediction_for_equal_boxes():
    """Two predictions with g's exact box: costs 2 * c_cls - 2, c_cls(+2) = -1.237108 < c_cls(-2) = 0.411167."""
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    target = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    [(pred_idx, _)] = HungarianMatcher()(torch.tensor([[-2.0, 2.0]]), boxes, target)
    assert pred_idx.tolist() == [1]
    [(pred_idx, _)] = HungarianMatcher()(torch.tensor([[2.0, -2.0]]), boxes, target)
    assert pred_idx.tolist() == [0]


def test_queries_without_targets_get_empty_matches():
    """Query 1 is a negative prompt (0 targets): empty index tensors; queries 0 and 2 are matched as usual.

    Query 0: one target at cx 0.7 -> prediction 1 (cx 0.7, L1 0) beats prediction 0 (cx 0.3, L1 0.4).
    Query 2: two targets at cx 0.3 and 0.7 -> prediction 0 to target 0 and prediction 1 to target 1.
    """
    logits = torch.zeros(3, 2)
    boxes = torch.tensor([[_box(0.3), _box(0.7)]] * 3)
    targets = [
        {"boxes": torch.tensor([_box(0.7)])},
        {"boxes": torch.zeros(0, 4)},
        {"boxes": torch.tensor([_box(0.3), _box(0.7)])},
    ]
    matches = HungarianMatcher()(logits, boxes, targets)
    assert [m[0].tolist() for m in matches] == [[1], [], [0, 1]]
    assert [m[1].tolist() for m in matches] == [[0], [], [0, 1]]
    assert matches[1][0].dtype == matches[1][1].dtype == torch.long

    # a batch of negative prompts only: every query unmatched
    only_negative = HungarianMatcher()(logits[:1], boxes[:1], [{"boxes": torch.zeros(0, 4)}])
    assert only_negative[0][0].numel() == 0 and only_negative[0][1].numel() == 0


def test_nan_logits_do_not_crash_and_are_counted(caplog):
    """Prediction 0 has a NaN logit, so its 2 costs (one per target) are NaN.

    scipy would refuse the matrix ("invalid numeric entries"); the matcher replaces them by NON_FINITE_COST, so the
    exact-box prediction 0 is avoided and predictions 1 and 2 take the targets: 2 entries counted, one warning.
    """
    matcher = HungarianMatcher()
    logits = torch.tensor([[float("nan"), 0.0, 0.0]])
    boxes = torch.tensor([[_box(0.3), _box(0.35), _box(0.75)]])
    targets = [{"boxes": torch.tensor([_box(0.3), _box(0.7)])}]

    with caplog.at_level(logging.WARNING, logger="sam3.matcher"):
        [(pred_idx, tgt_idx)] = matcher(logits, boxes, targets)
        matcher(logits, boxes, targets)
    assert pred_idx.tolist() == [1, 2] and tgt_idx.tolist() == [0, 1]
    assert matcher.non_finite_count == 4  # 2 entries per call, 2 calls
    warnings = [r for r in caplog.records if r.name == "sam3.matcher"]
    assert len(warnings) == 1 and "NaN/inf" in warnings[0].getMessage()
    assert NON_FINITE_COST > 1e6

    # nothing finite at all (NaN boxes and logits): still a full one-to-one assignment
    all_nan = torch.full((1, 3, 4), float("nan"))
    [(pred_idx, tgt_idx)] = matcher(torch.full((1, 3), float("nan")), all_nan, targets)
    assert len(pred_idx) == 2 and sorted(tgt_idx.tolist()) == [0, 1]
    assert matcher.non_finite_count == 4 + 6


def test_more_targets_than_predictions_are_counted(caplog):
    """N = 1 prediction, 3 targets: min(N, n) = 1 pair; the 2 targets left over are counted, with one warning.

    The prediction (cx 0.5) is matched to the target at cx 0.5 (L1 0), not to those at 0.2 or 0.8 (L1 0.3).
    """
    matcher = HungarianMatcher()
    targets = [{"boxes": torch.tensor([_box(0.2), _box(0.5), _box(0.8)])}]
    with caplog.at_level(logging.WARNING, logger="sam3.matcher"):
        [(pred_idx, tgt_idx)] = matcher(torch.zeros(1, 1), torch.tensor([[_box(0.5)]]), targets)
    assert pred_idx.tolist() == [0] and tgt_idx.tolist() == [1]
    assert matcher.unmatched_target_count == 2
    assert any("get no box loss" in r.getMessage() for r in caplog.records)


def test_one_target_dict_per_query_is_required():
    with pytest.raises(ValueError, match="1 targets for 2 queries"):
        HungarianMatcher()(torch.zeros(2, 3), torch.zeros(2, 3, 4), [{"boxes": torch.zeros(0, 4)}])
