"""SA-Co metrics (SAM 3 paper; docs/RECIPE.md section 5): cgF1, IL_MCC and pmF1 from per-pair IoU matrices.

The unit of evaluation is a pair (image, prompt). Only predictions with score > SCORE_THRESHOLD take part: the
model is judged as a user would use it, on the detections it commits to, not on a ranking.

Per pair, with D kept detections, G ground-truth instances and their IoU matrix `ious` [D, G]:
- one Hungarian assignment maximising the total IoU (scipy `linear_sum_assignment`), done once; at each IoU
  threshold t in IOU_THRESHOLDS a matched couple with IoU >= t is a true positive:
      TP_t = #{matched (d, g): iou[d, g] >= t},  FP_t = D - TP_t,  FN_t = G - TP_t.
- image level (independent of t): TP if G > 0 and D > 0, FP if G = 0 and D > 0, FN if G > 0 and D = 0, else TN.

Over all pairs (micro average):
- pmF1_t (positive micro F1) = 2 P R / (P + R), P = TP_t / (TP_t + FP_t), R = TP_t / (TP_t + FN_t), where TP, FP
  and FN are summed over the pairs that have ground truth only (FPs on pairs without GT are the image-level
  metric's business). Equivalently pmF1_t = 2 TP_t / (2 TP_t + FP_t + FN_t); it is 0 when TP_t = 0.
- IL_MCC = (TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN)) over the image-level counts.
- cgF1 = 100 * mean over t of (pmF1_t * IL_MCC).

Edge cases (decided here, where the formulas divide by zero):
- IL_MCC with a zero denominator is 1 when FP = FN = 0 (every pair judged right) and 0 otherwise.
- pmF1 with no pair that has ground truth is 1 (nothing to find, and FPs on negative pairs are not counted in
  it); cgF1 then rests on IL_MCC alone: 100 when no negative pair has a detection, 0 otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

SCORE_THRESHOLD = 0.5
# 0.50:0.05:0.95; rounded so that a threshold equals the double nearest its decimal value (IoU 0.6 >= 0.6).
IOU_THRESHOLDS: np.ndarray = np.round(np.linspace(0.5, 0.95, 10), 2)


def pair_ious(detections: list[Any], ground_truth: list[Any]) -> np.ndarray:
    """IoU matrix [D, G] between detection and GT regions of one pair, by `pycocotools.mask.iou`.

    Regions are either all boxes [x, y, w, h] or all COCO RLE dicts (the same IoU COCOeval uses, so box and mask
    IoU agree with AP). Crowd regions must be removed by the caller: every GT here is an instance.
    """
    from pycocotools import mask as mask_utils

    if not detections or not ground_truth:
        return np.zeros((len(detections), len(ground_truth)))
    ious = mask_utils.iou(detections, ground_truth, [0] * len(ground_truth))
    return np.asarray(ious, dtype=np.float64).reshape(len(detections), len(ground_truth))


def matched_true_positives(ious: np.ndarray, thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """TP count per threshold [T] for one pair: Hungarian assignment on IoU [D, G], then IoU >= t."""
    if ious.size == 0:
        return np.zeros(len(thresholds), dtype=np.int64)
    rows, cols = linear_sum_assignment(ious, maximize=True)
    matched = ious[rows, cols]  # [min(D, G)]
    return (matched[None, :] >= thresholds[:, None]).sum(axis=1).astype(np.int64)


def il_mcc(tp: int, fp: int, fn: int, tn: int) -> float:
    """Matthews correlation of the image-level counts; 1 if the denominator is 0 and FP = FN = 0, else 0 there."""
    denominator = math.sqrt(float(tp + fp) * float(tp + fn) * float(tn + fp) * float(tn + fn))
    if denominator == 0.0:
        return 1.0 if fp == 0 and fn == 0 else 0.0
    return (tp * tn - fp * fn) / denominator


def positive_micro_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """pmF1 per threshold [T] = 2 TP / (2 TP + FP + FN) from counts summed over positive pairs; 1 where all are 0."""
    denominator = 2 * tp + fp + fn
    safe = np.where(denominator > 0, denominator, 1)
    return np.where(denominator > 0, 2 * tp / safe, 1.0)


@dataclass
class SacoCounts:
    """Running totals over pairs. tp/fp/fn [T] are summed over pairs with GT only; il_* count pairs."""

    thresholds: np.ndarray = field(default_factory=lambda: IOU_THRESHOLDS.copy())
    tp: np.ndarray = field(init=False)
    fp: np.ndarray = field(init=False)
    fn: np.ndarray = field(init=False)
    il_tp: int = 0
    il_fp: int = 0
    il_fn: int = 0
    il_tn: int = 0

    def __post_init__(self) -> None:
        self.tp = np.zeros(len(self.thresholds), dtype=np.int64)
        self.fp = np.zeros(len(self.thresholds), dtype=np.int64)
        self.fn = np.zeros(len(self.thresholds), dtype=np.int64)

    def add_pair(self, ious: np.ndarray) -> None:
        """Count one pair from its IoU matrix [D kept detections, G instances]."""
        num_dt, num_gt = ious.shape
        if num_gt == 0:
            if num_dt == 0:
                self.il_tn += 1
            else:
                self.il_fp += 1  # its D false detections stay out of pmF1 by definition
            return
        if num_dt == 0:
            self.il_fn += 1
        else:
            self.il_tp += 1
        tp = matched_true_positives(ious, self.thresholds)
        self.tp += tp
        self.fp += num_dt - tp
        self.fn += num_gt - tp

    def add_empty_pairs(self, count: int) -> None:
        """Count `count` pairs with neither GT nor detections (true negatives) without building them."""
        self.il_tn += count

    @property
    def num_pairs(self) -> int:
        return self.il_tp + self.il_fp + self.il_fn + self.il_tn

    @property
    def num_positive_pairs(self) -> int:
        return self.il_tp + self.il_fn

    def summary(self) -> dict[str, float | int]:
        """cgF1 (0..100), IL_MCC (-1..1), pmF1 (0..1) averaged over thresholds, and their values at IoU 0.5."""
        mcc = il_mcc(self.il_tp, self.il_fp, self.il_fn, self.il_tn)
        pm_f1 = positive_micro_f1(self.tp, self.fp, self.fn)  # [T]
        cg_f1 = 100.0 * pm_f1 * mcc  # [T]
        at_50 = int(np.flatnonzero(self.thresholds == 0.5)[0])
        return {
            "cgF1": float(cg_f1.mean()),
            "cgF1_50": float(cg_f1[at_50]),
            "pmF1": float(pm_f1.mean()),
            "pmF1_50": float(pm_f1[at_50]),
            "IL_MCC": float(mcc),
            "num_pairs": self.num_pairs,
            "num_positive_pairs": self.num_positive_pairs,
        }
