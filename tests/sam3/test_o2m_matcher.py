"""One-to-many (DAC) matcher: C_ij = alpha * p_i + (1 - alpha) * IoU_ij with p = sigmoid(logit), alpha 0.3; slot i
matches target j iff C_ij > torch.quantile(C_:j, 1 - topk / N) (linear interpolation) and C_ij > 0.4, topk 4.

Every expected value is worked out by hand in the comments next to it. Logits are chosen so that p is a round
number: logit ln(p / (1 - p)), e.g. 0 -> 0.5, ln 3 -> 0.75, -ln 3 -> 0.25, ln 9 -> 0.9, -ln 9 -> 0.1. Boxes are
normalised cxcywh; the target g = (0.5, 0.5, 0.2, 0.2) is xyxy (0.4, 0.4, 0.6, 0.6) and
    the same box:             IoU 1
    g moved right by 0.05:    intersection 0.15 x 0.2 = 0.03, union 0.04 + 0.04 - 0.03 = 0.05, IoU 0.6
    g moved right by 0.1:     intersection 0.1 x 0.2 = 0.02, union 0.06, IoU 1/3
    FAR = (0.1, 0.1, 0.1, 0.1), xyxy (0.05, 0.05, 0.15, 0.15): no overlap with anything here, IoU 0
"""

import logging
import math
import random

import pytest
import torch

from sam3.errors import ConfigError
from sam3.o2m_matcher import OneToManyMatcher

G = [0.5, 0.5, 0.2, 0.2]
FAR = [0.1, 0.1, 0.1, 0.1]


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _shifted(dx: float, box: list[float] = G) -> list[float]:
    return [box[0] + dx, box[1], box[2], box[3]]


# Eight slots against the one target G: (p, box) and C = 0.3 p + 0.7 IoU.
EIGHT_SLOTS = [
    (0.5, G),  # slot 0: 0.15  + 0.7        = 0.85
    (0.75, _shifted(0.05)),  # slot 1: 0.225 + 0.7 * 0.6  = 0.645
    (0.9, FAR),  # slot 2: 0.27  + 0          = 0.27
    (0.5, _shifted(0.1)),  # slot 3: 0.15  + 0.7 / 3    = 0.383333
    (0.1, FAR),  # slot 4: 0.03  + 0          = 0.03
    (0.25, _shifted(0.05)),  # slot 5: 0.075 + 0.7 * 0.6  = 0.495
    (0.5, FAR),  # slot 6: 0.15  + 0          = 0.15
    (0.25, FAR),  # slot 7: 0.075 + 0          = 0.075
]
EIGHT_C = [0.85, 0.645, 0.27, 0.7 / 3 + 0.15, 0.03, 0.495, 0.15, 0.075]


def _inputs(slots: list[tuple[float, list[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, N] logits and [1, N, 4] boxes of one query."""
    return torch.tensor([[_logit(p) for p, _ in slots]]), torch.tensor([[box for _, box in slots]])


def _one_target(box: list[float] = G) -> list[dict]:
    return [{"boxes": torch.tensor([box])}]


def test_one_target_takes_three_slots():
    """N = 8, topk = 4: quantile level 1 - 4/8 = 0.5.

    torch.quantile, linear: position 0.5 * (8 - 1) = 3.5 in the sorted column
        0.03 (s4), 0.075 (s7), 0.15 (s6), 0.27 (s2), 0.383333 (s3), 0.495 (s5), 0.645 (s1), 0.85 (s0)
    sorted[3] = 0.27, sorted[4] = 0.383333 -> quantile 0.27 + 0.5 * (0.383333 - 0.27) = 0.326667.
    Above it (strict >): slots 3, 5, 1, 0 (the top 4). Above the threshold 0.4: slots 0, 1, 5; slot 3 (0.383) drops.
    """
    matcher = OneToManyMatcher()
    logits, boxes = _inputs(EIGHT_SLOTS)
    targets = _one_target()

    c = matcher.score(logits, boxes, targets[0]["boxes"][None])[0, :, 0]
    torch.testing.assert_close(c, torch.tensor(EIGHT_C), atol=1e-6, rtol=0)
    quantile = torch.quantile(c, 0.5)
    assert math.isclose(float(quantile), 0.27 + 0.5 * (0.7 / 3 + 0.15 - 0.27), abs_tol=1e-6)
    assert math.isclose(float(quantile), 0.326667, abs_tol=1e-6)

    [(pred_idx, tgt_idx)] = matcher(logits, boxes, targets)
    assert pred_idx.tolist() == [0, 1, 5]
    assert tgt_idx.tolist() == [0, 0, 0]
    assert pred_idx.dtype == tgt_idx.dtype == torch.long
    assert pred_idx.device.type == tgt_idx.device.type == "cpu"
    assert matcher.non_finite_count == 0


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0.0, [0, 1, 3, 5]),  # only the quantile (0.326667) acts; slot 2 (0.27 > 0) is not in the top 4
        (0.4, [0, 1, 5]),  # slot 3 (0.383) passes the quantile, not the threshold
        (0.5, [0, 1]),  # slot 5 (0.495) drops too
        (0.9, []),  # even the best slot (0.85) is below: the target gets no slot at all
    ],
)
def test_threshold_removes_slots_that_pass_the_quantile(threshold, expected):
    """The eight slots above; the quantile test keeps slots 0, 1, 3, 5, the threshold then thins them out."""
    logits, boxes = _inputs(EIGHT_SLOTS)
    [(pred_idx, tgt_idx)] = OneToManyMatcher(threshold=threshold)(logits, boxes, _one_target())
    assert pred_idx.tolist() == expected
    assert tgt_idx.tolist() == [0] * len(expected)


def test_negative_prompts_get_no_matches_in_a_mixed_batch():
    """Queries 0 and 2 are negative prompts (n_q = 0); query 1 holds the eight slots above and target G.

    The negative queries get empty long tensors; query 1 is matched exactly as on its own: slots 0, 1, 5.
    """
    logits, boxes = _inputs(EIGHT_SLOTS)
    no_target = {"boxes": torch.zeros(0, 4)}
    matches = OneToManyMatcher()(logits.repeat(3, 1), boxes.repeat(3, 1, 1), [no_target, *_one_target(), no_target])
    assert [m[0].tolist() for m in matches] == [[], [0, 1, 5], []]
    assert [m[1].tolist() for m in matches] == [[], [0, 0, 0], []]
    assert all(t.dtype == torch.long for m in matches for t in m)

    # a batch of negative prompts only
    only_negative = OneToManyMatcher()(logits, boxes, [no_target])
    assert only_negative[0][0].numel() == 0 and only_negative[0][1].numel() == 0


def test_both_comparisons_are_strict():
    """Ties with the quantile and with the threshold do not match.

    Quantile: slots 0..4 hold G with p 0.5 (C 0.85 each), slots 5..7 are FAR with p 0.5 (C 0.15). Sorted column
    0.15, 0.15, 0.15, 0.85, 0.85, 0.85, 0.85, 0.85: position 3.5 falls between two 0.85, so the quantile is 0.85
    itself and no slot is strictly above it: five equally good slots leave the target unmatched (Meta's semantics;
    a tie at the boundary gives fewer than topk slots, here none).
    Threshold: the eight slots above with the threshold set to slot 5's own C (0.495 as float32): slot 5 drops.
    """
    logits, boxes = _inputs([(0.5, G)] * 5 + [(0.5, FAR)] * 3)
    matcher = OneToManyMatcher()
    c = matcher.score(logits, boxes, torch.tensor([[G]]))[0, :, 0]
    assert float(torch.quantile(c, 0.5)) == float(c[0])
    [(pred_idx, _)] = matcher(logits, boxes, _one_target())
    assert pred_idx.tolist() == []

    logits, boxes = _inputs(EIGHT_SLOTS)
    c5 = float(matcher.score(logits, boxes, torch.tensor([[G]]))[0, 5, 0])
    assert math.isclose(c5, 0.495, abs_tol=1e-6)
    [(pred_idx, _)] = OneToManyMatcher(threshold=c5)(logits, boxes, _one_target())
    assert pred_idx.tolist() == [0, 1]


def test_a_slot_matches_two_overlapping_targets():
    """Targets t0 = G moved left by 0.05 (xyxy 0.35..0.55) and t1 = G moved right by 0.05 (xyxy 0.45..0.65).

    slot 0: G itself, p 0.9: IoU 0.6 with each (a 0.05 shift) -> C = 0.27 + 0.42 = 0.69 for t0 and for t1
    slot 1: t1 itself, p 0.5: t1 IoU 1 -> 0.85; t0 is 0.1 away, IoU 1/3 -> 0.15 + 0.233333 = 0.383333
    slots 2..7: FAR with p 0.25, 0.5, 0.75, 0.9, 0.1, 0.25 -> C = 0.075, 0.15, 0.225, 0.27, 0.03, 0.075 (both)
    Column t0 sorted: 0.03, 0.075, 0.075, 0.15, 0.225, 0.27, 0.383333, 0.69 -> quantile (0.15 + 0.225) / 2 = 0.1875;
        above it slots 4, 5, 1, 0; above 0.4 only slot 0.
    Column t1 sorted: 0.03, 0.075, 0.075, 0.15, 0.225, 0.27, 0.69, 0.85 -> quantile 0.1875; above 0.4: slots 0, 1.
    So slot 0 is matched to both targets (Meta's code allows it), sorted by slot then target: (0,0), (0,1), (1,1).
    """
    t0, t1 = _shifted(-0.05), _shifted(0.05)
    slots = [(0.9, G), (0.5, t1), (0.25, FAR), (0.5, FAR), (0.75, FAR), (0.9, FAR), (0.1, FAR), (0.25, FAR)]
    logits, boxes = _inputs(slots)
    targets = [{"boxes": torch.tensor([t0, t1])}]
    matcher = OneToManyMatcher()

    c = matcher.score(logits, boxes, targets[0]["boxes"][None])[0]
    far = [0.075, 0.15, 0.225, 0.27, 0.03, 0.075]
    expected_c = torch.tensor([[0.69, 0.69], [0.15 + 0.7 / 3, 0.85], *[[v, v] for v in far]])
    torch.testing.assert_close(c, expected_c, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.quantile(c, 0.5, dim=0), torch.tensor([0.1875, 0.1875]), atol=1e-6, rtol=0)

    [(pred_idx, tgt_idx)] = matcher(logits, boxes, targets)
    assert pred_idx.tolist() == [0, 0, 1]
    assert tgt_idx.tolist() == [0, 1, 1]


def test_topk_at_least_n_keeps_every_slot_above_the_threshold():
    """N = 3 slots against G: C = 0.85 (G, p 0.5), 0.495 (0.05 shift, p 0.25), 0.383333 (0.1 shift, p 0.5).

    topk >= N: no quantile test (level 1 - topk/N <= 0); the threshold alone decides. Meta's code would raise for
    topk > N (negative quantile level) and, at topk = N, compare against the minimum, dropping slot 2 with
    threshold 0; here topk = N keeps all of "the top N".
    topk = 2 < N for contrast: level 1/3, position 1/3 * 2 = 2/3 between sorted 0.383333 and 0.495:
    quantile 0.383333 + 2/3 * 0.111667 = 0.457778, so only slots 0 and 1 pass, whatever the threshold.
    """
    slots = [(0.5, G), (0.25, _shifted(0.05)), (0.5, _shifted(0.1))]
    logits, boxes = _inputs(slots)
    for topk in (3, 4, 100):
        [(pred_idx, _)] = OneToManyMatcher(topk=topk)(logits, boxes, _one_target())
        assert pred_idx.tolist() == [0, 1], topk  # slot 2 (0.383) is below the threshold 0.4
        [(pred_idx, _)] = OneToManyMatcher(topk=topk, threshold=0.0)(logits, boxes, _one_target())
        assert pred_idx.tolist() == [0, 1, 2], topk
    [(pred_idx, _)] = OneToManyMatcher(topk=2, threshold=0.0)(logits, boxes, _one_target())
    assert pred_idx.tolist() == [0, 1]


def test_nan_logits_never_match_and_are_counted(caplog):
    """The eight slots above with slot 0's logit NaN (then +inf, whose sigmoid 1 is finite but still broken).

    Slot 0 ranks below every finite slot in the quantile:
        sorted column: broken, 0.03, 0.075, 0.15, 0.27, 0.383333, 0.495, 0.645
    position 3.5 -> quantile (0.15 + 0.27) / 2 = 0.21; above it slots 2, 3, 5, 1; above 0.4: slots 1 and 5.
    (Meta's torch.quantile over a column holding NaN returns NaN, so the whole target would go unmatched.)
    One entry (slot 0 x 1 target) is counted per call, with a single warning.
    """
    matcher = OneToManyMatcher()
    logits, boxes = _inputs(EIGHT_SLOTS)
    logits[0, 0] = float("nan")
    assert torch.quantile(torch.tensor([float("nan"), 1.0, 2.0]), 0.5).isnan()

    with caplog.at_level(logging.WARNING, logger="sam3.o2m_matcher"):
        [(pred_idx, tgt_idx)] = matcher(logits, boxes, _one_target())
        logits[0, 0] = float("inf")
        [(pred_idx_inf, _)] = matcher(logits, boxes, _one_target())
    assert pred_idx.tolist() == [1, 5] and tgt_idx.tolist() == [0, 0]
    assert pred_idx_inf.tolist() == [1, 5]
    assert matcher.non_finite_count == 2
    warnings = [r for r in caplog.records if r.name == "sam3.o2m_matcher"]
    assert len(warnings) == 1 and "NaN/inf" in warnings[0].getMessage()

    # a NaN box is just as broken: slot 0 with a finite logit but a NaN box -> the same matches
    logits, boxes = _inputs(EIGHT_SLOTS)
    boxes[0, 0, 2] = float("nan")
    [(pred_idx, _)] = matcher(logits, boxes, _one_target())
    assert pred_idx.tolist() == [1, 5]
    assert matcher.non_finite_count == 3

    # an infinite width gives a finite C (IoU 0.04 / inf = 0, so C = 0.3 * 0.5 = 0.15) but the slot is still broken:
    # with no quantile test (topk >= N) and no threshold, every other slot matches, slot 0 does not
    logits, boxes = _inputs(EIGHT_SLOTS)
    boxes[0, 0, 2] = float("inf")
    assert math.isclose(float(matcher.score(logits, boxes, torch.tensor([[G]]))[0, 0, 0]), 0.15, abs_tol=1e-6)
    no_filter = OneToManyMatcher(topk=8, threshold=-math.inf)
    [(pred_idx, _)] = no_filter(logits, boxes, _one_target())
    assert pred_idx.tolist() == [1, 2, 3, 4, 5, 6, 7]
    [(pred_idx, _)] = no_filter(torch.full((1, 8), float("nan")), boxes, _one_target())
    assert pred_idx.tolist() == []  # even the sentinel that ranks broken slots last cannot pass a -inf threshold
    assert no_filter.non_finite_count == 1 + 8

    # nothing finite, two targets: no match, 8 slots x 2 targets = 16 entries; padding of other queries not counted
    all_nan = torch.full((2, 8, 4), float("nan"))
    targets = [{"boxes": torch.tensor([G, FAR])}, {"boxes": torch.tensor([G, G, G, G, G])}]
    matches = matcher(torch.full((2, 8), float("nan")), all_nan, targets)
    assert [m[0].numel() for m in matches] == [0, 0]
    assert matcher.non_finite_count == 3 + 8 * 2 + 8 * 5


def test_invalid_config_raises_config_error():
    for kwargs in ({"topk": 0}, {"topk": -3}, {"topk": 2.5}, {"alpha": -0.1}, {"alpha": 1.5}, {"alpha": math.nan}):
        with pytest.raises(ConfigError):
            OneToManyMatcher(**kwargs)
    OneToManyMatcher(alpha=0.0)
    OneToManyMatcher(alpha=1.0, topk=1)


def test_one_target_dict_per_query_is_required():
    with pytest.raises(ValueError, match="1 targets for 2 queries"):
        OneToManyMatcher()(torch.zeros(2, 3), torch.zeros(2, 3, 4), [{"boxes": torch.zeros(0, 4)}])


# ---------------------------------------------------------------------------------------------------------------
# Slow reference: per query, per target, in plain Python floats.


def _iou(a: list[float], b: list[float]) -> float:
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union


def _reference(logits, boxes, targets, alpha=0.3, threshold=0.4, topk=4):
    """Returns the matches as lists of (pred, tgt) pairs, and the smallest distance of any C to the quantile or the
    threshold it was compared with (float32 vs float64 rounding could only matter below ~1e-6)."""
    all_pairs, margin = [], math.inf
    for q, target in enumerate(targets):
        slots = logits[q].tolist()
        slot_boxes = boxes[q].tolist()
        n = len(slots)
        pairs = []
        for j, g in enumerate(target["boxes"].tolist()):
            column = [alpha / (1 + math.exp(-slots[i])) + (1 - alpha) * _iou(slot_boxes[i], g) for i in range(n)]
            if topk < n:
                ordered = sorted(column)
                position = (1 - topk / n) * (n - 1)
                lo, hi = math.floor(position), math.ceil(position)
                quantile = ordered[lo] + (position - lo) * (ordered[hi] - ordered[lo])
            else:
                quantile = -math.inf
            for i in range(n):
                margin = min(margin, abs(column[i] - quantile), abs(column[i] - threshold))
                if column[i] > quantile and column[i] > threshold:
                    pairs.append((i, j))
        all_pairs.append(sorted(pairs))
    return all_pairs, margin


def _random_box(rng: random.Random, lo: float, hi: float, min_size: float, max_size: float) -> list[float]:
    return [rng.uniform(lo, hi), rng.uniform(lo, hi), rng.uniform(min_size, max_size), rng.uniform(min_size, max_size)]


@pytest.mark.parametrize(
    ("seed", "sizes"), [(0, (0, 1, 5)), (1, (2, 0, 7)), (2, (3, 3, 0)), (3, (6, 1, 2)), (4, (4, 4, 4)), (5, (1, 9, 2))]
)
def test_matches_a_slow_reference_on_random_inputs(seed, sizes):
    """Q = 3, N = 20 (level 0.8, position 15.2): about 60% of the slots are jittered copies of a target, so targets
    get several candidates; logits ~ N(0, 2^2)."""
    rng = random.Random(seed)
    num_preds = 20
    targets = []
    logits = torch.empty(len(sizes), num_preds)
    boxes = torch.empty(len(sizes), num_preds, 4)
    for q, n in enumerate(sizes):
        gts = [_random_box(rng, 0.2, 0.8, 0.05, 0.4) for _ in range(n)]
        targets.append({"boxes": torch.tensor(gts).reshape(n, 4)})
        for i in range(num_preds):
            logits[q, i] = rng.gauss(0.0, 2.0)
            if gts and rng.random() < 0.6:
                g = rng.choice(gts)
                box = [g[0] + rng.gauss(0, 0.03), g[1] + rng.gauss(0, 0.03)]
                box += [g[2] * math.exp(rng.gauss(0, 0.15)), g[3] * math.exp(rng.gauss(0, 0.15))]
            else:
                box = _random_box(rng, 0.1, 0.9, 0.05, 0.5)
            boxes[q, i] = torch.tensor(box)

    # the reference reads back the float32 values the matcher sees
    expected, margin = _reference(logits.double(), boxes.double(), [{"boxes": t["boxes"].double()} for t in targets])
    assert margin > 1e-5  # no C sits on a decision boundary, so float32 rounding cannot flip a match
    matches = OneToManyMatcher()(logits, boxes, targets)
    got = [list(zip(p.tolist(), t.tolist(), strict=True)) for p, t in matches]
    assert got == expected
    assert sum(map(len, expected)) >= 3  # the comparison is not vacuous

    for (pred_idx, tgt_idx), n in zip(matches, sizes, strict=True):
        assert pred_idx.dtype == tgt_idx.dtype == torch.long
        if n:
            assert int(torch.bincount(tgt_idx, minlength=n).max()) <= 4  # at most topk slots per target


def test_padding_and_batching_do_not_change_a_query():
    """A query matched alone and inside a batch with a more crowded query (so its targets are padded) agree."""
    rng = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 20, generator=rng) * 2
    boxes = torch.rand(2, 20, 4, generator=rng) * 0.4 + 0.2
    targets = [{"boxes": boxes[0, :2] + 0.01}, {"boxes": boxes[1, :6] - 0.01}]
    together = OneToManyMatcher()(logits, boxes, targets)
    alone = OneToManyMatcher()(logits[:1], boxes[:1], targets[:1])
    assert together[0][0].tolist() == alone[0][0].tolist() and together[0][1].tolist() == alone[0][1].tolist()
    assert len(together[0][0]) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_give_the_cpu_result_on_the_cpu():
    rng = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50, generator=rng) * 2
    boxes = torch.rand(4, 50, 4, generator=rng) * 0.4 + 0.2
    targets = [{"boxes": boxes[q, : 3 * q] + 0.01} for q in range(4)]
    on_cpu = OneToManyMatcher()(logits, boxes, targets)
    on_gpu = OneToManyMatcher()(logits.cuda(), boxes.cuda(), [{"boxes": t["boxes"].cuda()} for t in targets])
    for (p_cpu, t_cpu), (p_gpu, t_gpu) in zip(on_cpu, on_gpu, strict=True):
        assert p_gpu.device.type == "cpu" and torch.equal(p_cpu, p_gpu) and torch.equal(t_cpu, t_gpu)
