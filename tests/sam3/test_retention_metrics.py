"""sam3.evaluation.retention: rejection of negative prompts and IL_MCC with them, on cases counted by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sam3.evaluation import score
from sam3.evaluation.retention import (
    ImageLevelCounts,
    negative_pair_counts,
    own_pair_counts,
    rejection_rate,
    retention_metrics,
)

# 2 images x 3 phrases; the threshold is 0.5 and a score equal to it commits to nothing (SA-Co keeps score > 0.5)
BEST = np.array(
    [
        [0.10, 0.70, 0.50],  # rejected, fired, rejected (0.5 is not above 0.5)
        [0.20, 0.90, 0.30],  # rejected, fired, rejected
    ]
)


def box(image_id: int, category_id: int, ann_id: int, iscrowd: int = 0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [2, 2, 10, 10],
        "area": 100,
        "iscrowd": iscrowd,
    }


def detection(image_id: int, category_id: int, score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": [2, 2, 10, 10], "score": score}


# 2 images x 2 categories of the split itself:
#   (1, 1) an instance, detected 0.8               TP
#   (1, 2) a crowd region only (no instance), 0.6  FP   (crowd is not an instance, as in sam3.evaluation.saco)
#   (2, 2) an instance, detected 0.9               TP
#   (2, 1) nothing, a detection at 0.3             TN   (0.3 is not above 0.5)
GT = {
    "images": [{"id": 1, "width": 32, "height": 32}, {"id": 2, "width": 32, "height": 32}],
    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    "annotations": [box(1, 1, 1), box(1, 2, 2, iscrowd=1), box(2, 2, 3)],
}
PREDICTIONS = [detection(1, 1, 0.8), detection(1, 2, 0.6), detection(2, 2, 0.9), detection(2, 1, 0.3)]


def test_rejection_counts_scores_not_above_the_threshold():
    assert rejection_rate(BEST) == pytest.approx(4 / 6)
    assert negative_pair_counts(BEST) == ImageLevelCounts(tp=0, fp=2, fn=0, tn=4)
    assert rejection_rate(BEST, threshold=0.05) == 0.0
    assert rejection_rate(np.zeros((3, 0))) is None  # no pair, no rate


def test_own_pairs_are_counted_as_the_sa_co_metrics_count_them():
    own = own_pair_counts(GT, PREDICTIONS)
    assert own == ImageLevelCounts(tp=2, fp=1, fn=0, tn=1)
    # MCC = (TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN)) = (2 - 0) / sqrt(3 * 2 * 2 * 1)
    assert own.mcc == pytest.approx(2 / math.sqrt(12))
    assert own.mcc == pytest.approx(score(GT, PREDICTIONS, "bbox")["IL_MCC"])


def test_il_mcc_with_the_negative_pairs_by_hand():
    metrics = retention_metrics(BEST, own_pair_counts(GT, PREDICTIONS))
    # own TP 2, FP 1, FN 0, TN 1 plus the negatives' FP 2, TN 4: TP 2, FP 3, FN 0, TN 5
    # MCC = (2 * 5 - 3 * 0) / sqrt((2 + 3)(2 + 0)(5 + 3)(5 + 0)) = 10 / sqrt(400) = 0.5
    assert metrics["counts"] == {"tp": 2, "fp": 3, "fn": 0, "tn": 5}
    assert metrics["IL_MCC"] == pytest.approx(0.5)
    assert metrics["IL_MCC_own"] == pytest.approx(2 / math.sqrt(12))
    assert metrics["rejection"] == pytest.approx(4 / 6)
    assert (metrics["num_images"], metrics["num_phrases"], metrics["num_pairs"], metrics["num_rejected"]) == (
        2,
        3,
        6,
        4,
    )
    assert metrics["threshold"] == 0.5


def test_no_negative_pairs_leave_the_own_il_mcc_and_all_rejected_raise_it():
    own = ImageLevelCounts(tp=2, fp=1, fn=0, tn=1)
    assert retention_metrics(np.zeros((2, 0)), own)["IL_MCC"] == pytest.approx(own.mcc)
    # 6 rejected pairs: TN 1 + 6 = 7; MCC = (2 * 7 - 1 * 0) / sqrt(3 * 2 * 8 * 7) = 14 / sqrt(336)
    assert retention_metrics(np.zeros((2, 3)), own)["IL_MCC"] == pytest.approx(14 / math.sqrt(336))
    with pytest.raises(ValueError, match=r"\[images, phrases\]"):
        retention_metrics(np.zeros(3), own)


def test_counts_add_up():
    total = ImageLevelCounts(1, 2, 3, 4) + ImageLevelCounts(fp=5, tn=6)
    assert total == ImageLevelCounts(tp=1, fp=7, fn=3, tn=10) and total.num_pairs == 21
    assert total.as_dict() == {"tp": 1, "fp": 7, "fn": 3, "tn": 10}
