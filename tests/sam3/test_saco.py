"""SA-Co metric parts (sam3.evaluation.saco), each against values worked out by hand.

Formulas under test (docs/RECIPE.md section 5):
    per pair: Hungarian assignment maximising IoU; TP_t = #{matched with IoU >= t}, FP_t = D - TP_t, FN_t = G - TP_t
    pmF1_t = 2 TP / (2 TP + FP + FN) over pairs with GT;  IL_MCC = (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    cgF1 = 100 * mean_t(pmF1_t * IL_MCC)
"""

import numpy as np
import pytest

from sam3.coco import encode_mask
from sam3.evaluation.saco import (
    IOU_THRESHOLDS,
    SacoCounts,
    il_mcc,
    matched_true_positives,
    pair_ious,
    positive_micro_f1,
)


def test_thresholds_are_the_ten_from_050_to_095():
    assert IOU_THRESHOLDS.tolist() == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def test_box_ious_by_hand():
    gt = [[0, 0, 10, 10]]  # area 100
    # [0,0,6,10]: intersection 60, union 100 -> 0.6;  [5,0,10,10]: intersection 5*10 = 50, union 150 -> 1/3
    # [20,20,5,5]: disjoint -> 0
    ious = pair_ious([[0, 0, 6, 10], [5, 0, 10, 10], [20, 20, 5, 5]], gt)
    assert ious.shape == (3, 1)
    assert ious[:, 0].tolist() == pytest.approx([0.6, 1 / 3, 0.0])


def test_mask_iou_by_hand():
    gt = np.zeros((20, 20), dtype=bool)
    gt[0:10, 0:10] = True  # 100 pixels
    dt = np.zeros((20, 20), dtype=bool)
    dt[0:10, 0:6] = True  # 60 pixels, all inside gt -> IoU 60 / 100
    ious = pair_ious([encode_mask(dt), encode_mask(gt)], [encode_mask(gt)])
    assert ious[:, 0].tolist() == pytest.approx([0.6, 1.0])


def test_empty_sides_give_empty_matrices():
    assert pair_ious([], [[0, 0, 1, 1]]).shape == (0, 1)
    assert pair_ious([[0, 0, 1, 1]], []).shape == (1, 0)


def test_hungarian_beats_greedy():
    # greedy takes d0-g0 (0.9) then must give d1-g1 (0.1): one TP at 0.5.
    # The assignment maximising total IoU is d0-g1 (0.8) + d1-g0 (0.8) = 1.6: two TPs up to t = 0.80, then none
    # (matched IoUs are both 0.8 < 0.85); matching is done once, as in the reference, not redone per threshold.
    ious = np.array([[0.9, 0.8], [0.8, 0.1]])
    assert matched_true_positives(ious).tolist() == [2, 2, 2, 2, 2, 2, 2, 0, 0, 0]


def test_iou_06_counts_at_three_thresholds():
    # IoU exactly 0.6 is >= 0.50, 0.55, 0.60 and below the other seven thresholds.
    assert matched_true_positives(np.array([[0.6]])).tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]


def test_il_mcc_2x2_by_hand():
    # TP 2, FP 1, FN 1, TN 3: (2*3 - 1*1) / sqrt((2+1)(2+1)(3+1)(3+1)) = 5 / sqrt(144) = 5/12
    assert il_mcc(2, 1, 1, 3) == pytest.approx(5 / 12)
    # all wrong: TP 0, FP 2, FN 2, TN 0: (0 - 4) / sqrt(2*2*2*2) = -1
    assert il_mcc(0, 2, 2, 0) == pytest.approx(-1.0)


def test_il_mcc_zero_denominator_rule():
    assert il_mcc(3, 0, 0, 0) == 1.0  # only positive pairs, all found: perfect
    assert il_mcc(0, 0, 0, 5) == 1.0  # only negative pairs, none fired on: perfect
    assert il_mcc(3, 0, 1, 0) == 0.0  # TN + FP = 0, and one positive pair missed
    assert il_mcc(0, 1, 0, 4) == 0.0  # TP + FN = 0, and one negative pair fired on


def test_positive_micro_f1_by_hand():
    tp, fp, fn = np.array([3, 0, 0]), np.array([1, 2, 0]), np.array([2, 1, 0])
    # t0: P = 3/4, R = 3/5, 2PR/(P+R) = (9/10) / (27/20) = 2/3 = 2*3 / (6+1+2)
    # t1: TP 0 -> 0;  t2: no counts at all (no pair with GT) -> defined as 1
    assert positive_micro_f1(tp, fp, fn).tolist() == pytest.approx([2 / 3, 0.0, 1.0])


def test_counts_false_detection_on_negative_pair_stays_out_of_pmf1():
    counts = SacoCounts()
    counts.add_pair(np.ones((1, 1)))  # a perfect positive pair
    counts.add_pair(np.zeros((1, 0)))  # one detection, no GT: image-level FP only
    counts.add_empty_pairs(1)
    assert (counts.il_tp, counts.il_fp, counts.il_fn, counts.il_tn) == (1, 1, 0, 1)
    assert counts.fp.tolist() == [0] * 10
    summary = counts.summary()
    # pmF1 = 2*1 / (2 + 0 + 0) = 1; IL_MCC = (1*1 - 1*0) / sqrt(2*1*2*1) = 1/2; cgF1 = 100 * 1 * 0.5
    assert summary["pmF1"] == pytest.approx(1.0)
    assert summary["IL_MCC"] == pytest.approx(0.5)
    assert summary["cgF1"] == pytest.approx(50.0)
    assert (summary["num_pairs"], summary["num_positive_pairs"]) == (3, 1)


def test_counts_missed_instance_and_duplicate():
    counts = SacoCounts()
    counts.add_pair(np.zeros((0, 2)))  # two GT, no detection: IL FN, FN += 2
    counts.add_pair(np.array([[1.0], [1.0]]))  # one GT, found twice: TP 1, FP 1 (the duplicate)
    counts.add_empty_pairs(2)
    assert counts.tp.tolist() == [1] * 10
    assert counts.fp.tolist() == [1] * 10
    assert counts.fn.tolist() == [2] * 10
    summary = counts.summary()
    # pmF1 = 2*1 / (2 + 1 + 2) = 0.4 at every threshold
    # IL: TP 1, FP 0, FN 1, TN 2 -> (1*2 - 0) / sqrt(1*2*2*3) = 2 / sqrt(12)
    mcc = 2 / 12**0.5
    assert summary["pmF1"] == pytest.approx(0.4)
    assert summary["IL_MCC"] == pytest.approx(mcc)
    assert summary["cgF1"] == pytest.approx(100 * 0.4 * mcc)  # 23.09
    assert summary["cgF1_50"] == pytest.approx(100 * 0.4 * mcc)


def test_counts_iou_06_averages_to_three_tenths():
    counts = SacoCounts()
    counts.add_pair(np.array([[0.6]]))
    summary = counts.summary()
    # pmF1_t = 1 at 0.50/0.55/0.60 (TP 1), 0 at the other seven (TP 0, FP 1, FN 1): mean 3/10
    # IL: TP 1 only -> zero denominator with FP = FN = 0 -> 1;  cgF1 = 100 * 0.3
    assert summary["pmF1"] == pytest.approx(0.3)
    assert summary["pmF1_50"] == pytest.approx(1.0)
    assert summary["IL_MCC"] == 1.0
    assert summary["cgF1"] == pytest.approx(30.0)
    assert summary["cgF1_50"] == pytest.approx(100.0)
