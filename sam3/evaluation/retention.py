"""Retention metrics: how a model treats prompts outside the categories it was fine-tuned on (model-free counting).

Fine-tuning on a handful of categories can cost SAM 3 its open vocabulary: asked for a phrase that is not in the
image, the fine-tuned model fires anyway. The measurement (run by `pipeline.evaluate`) asks the model for P phrases
that are none of the dataset's categories on each of I images; every such (image, phrase) pair is a negative pair.
This module only counts; the scores come from `sam3.inference.best_scores_dataset`.

Inputs:
    best      float [I, P]   best[i, p] = max over the decoder queries of sigmoid(logit) * sigmoid(presence): the
                             score `predict` compares with its threshold, for phrase p on image i
    t         the threshold, SCORE_THRESHOLD = 0.5 (the SA-Co operating point: a detection counts when score > t)

Negative prompts:
    rejected[i, p] = best[i, p] <= t                       nothing committed to: the right answer
    rejection      = sum rejected / (I P)                  in [0, 1]; None when I P = 0

Image-level MCC with the negative pairs added. Over the split's own pairs (image, category), as
`sam3.evaluation.saco` counts them: a pair is positive when the image has a (non-crowd) instance of the category,
detected when a kept detection of that category scores > t. Then
    own:       TP = #(positive, detected)   FN = #(positive, not detected)
               FP = #(negative, detected)   TN = #(negative, not detected)        TP + FN + FP + TN = I C
    negatives: FP_r = #(best > t)           TN_r = #(best <= t)                   FP_r + TN_r = I P
    IL_MCC     = il_mcc(TP, FP + FP_r, FN, TN + TN_r)
               = (TP TN' - FP' FN) / sqrt((TP + FP')(TP + FN)(TN' + FP')(TN' + FN))
with FP' = FP + FP_r and TN' = TN + TN_r (`sam3.evaluation.saco.il_mcc`, its zero-denominator rule included). With
P = 0 it equals the split's own IL_MCC; each fired-on negative pair pulls it down as a false positive would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sam3.evaluation.saco import SCORE_THRESHOLD, il_mcc


@dataclass(frozen=True)
class ImageLevelCounts:
    """Image-level confusion counts over (image, prompt) pairs: positive = the prompt is in the image."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: ImageLevelCounts) -> ImageLevelCounts:
        return ImageLevelCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def num_pairs(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def mcc(self) -> float:
        """(TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN)), `il_mcc`'s rule where that divides by 0."""
        return il_mcc(self.tp, self.fp, self.fn, self.tn)

    def as_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn}


def own_pair_counts(
    gt: dict[str, Any], predictions: list[dict[str, Any]], threshold: float = SCORE_THRESHOLD
) -> ImageLevelCounts:
    """Image-level counts over the I x C pairs (image, category) of a COCO ground truth dict (formulas above).

    gt: {images, annotations, categories}; predictions: COCO results {image_id, category_id, score, ...}. Crowd
    annotations are not instances (a pair with only crowd GT is negative), as in `sam3.evaluation.saco`.
    """
    image_ids = {image["id"] for image in gt["images"]}
    positive = {
        (ann["image_id"], ann["category_id"])
        for ann in gt["annotations"]
        if not ann.get("iscrowd") and ann["image_id"] in image_ids
    }
    detected = {
        (pred["image_id"], pred["category_id"])
        for pred in predictions
        if pred["score"] > threshold and pred["image_id"] in image_ids
    }
    tp = len(positive & detected)
    fn = len(positive) - tp
    fp = len(detected - positive)
    return ImageLevelCounts(tp=tp, fp=fp, fn=fn, tn=len(image_ids) * len(gt["categories"]) - tp - fn - fp)


def negative_pair_counts(best: np.ndarray, threshold: float = SCORE_THRESHOLD) -> ImageLevelCounts:
    """Counts of negative pairs from best scores float [I, P]: FP = #(best > t), TN = #(best <= t)."""
    best = np.asarray(best, dtype=np.float64)
    fired = int((best > threshold).sum())
    return ImageLevelCounts(fp=fired, tn=best.size - fired)


def rejection_rate(best: np.ndarray, threshold: float = SCORE_THRESHOLD) -> float | None:
    """sum(best <= t) / (I P) for best scores float [I, P] of negative pairs; None when there is no pair."""
    best = np.asarray(best, dtype=np.float64)
    if best.size == 0:
        return None
    return float((best <= threshold).sum() / best.size)


def retention_metrics(best: np.ndarray, own: ImageLevelCounts, threshold: float = SCORE_THRESHOLD) -> dict[str, Any]:
    """The negative-prompt metrics of one model, JSON-safe.

    best: float [I, P] best scores of the negative pairs; own: the split's own pair counts (`own_pair_counts`).
    Keys: rejection (None without pairs), IL_MCC (own + negative pairs), IL_MCC_own (the split's pairs alone),
    num_images I, num_phrases P, num_pairs I P, num_rejected, threshold, counts {tp, fp, fn, tn} (own + negative).
    """
    best = np.asarray(best, dtype=np.float64)
    if best.ndim != 2:
        raise ValueError(f"best scores must be float [images, phrases], got shape {best.shape}")
    negatives = negative_pair_counts(best, threshold)
    combined = own + negatives
    return {
        "rejection": rejection_rate(best, threshold),
        "IL_MCC": combined.mcc,
        "IL_MCC_own": own.mcc,
        "num_images": int(best.shape[0]),
        "num_phrases": int(best.shape[1]),
        "num_pairs": int(best.size),
        "num_rejected": negatives.tn,
        "threshold": threshold,
        "counts": combined.as_dict(),
    }
