"""Ground truth and predictions in the same frame: the ORIGINAL image coordinates.

Predictions are mapped back to the original images (`sam3.inference`); a preprocessed split's ground truth is
mapped back the same way (`scale_to_original`; `split_ground_truth` for a split folder, read and checked by
`sam3.coco_split.CocoSplit`), so metrics compare like with like. `score_predictions` gives the box metrics, plus
mask metrics in segmentation mode.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sam3.coco_split import CocoSplit
from sam3.resize import ORIG_HEIGHT, ORIG_WIDTH, original_size, scale_annotation, to_original_scale

log = logging.getLogger(__name__)


def scale_to_original(coco: dict[str, Any]) -> dict[str, Any]:
    """A copy of a COCO dict with every preprocessed image (orig_width / orig_height) and its annotations moved
    back to the original size: width/height become the original's, the orig keys go, and each annotation is
    `scale_annotation(ann, orig_width / width, orig_height / height, orig_height, orig_width)`."""
    out = copy.deepcopy(coco)
    scales: dict[Any, tuple[float, float, int, int]] = {}
    for image in out["images"]:
        orig_w, orig_h = original_size(image)
        if (orig_w, orig_h) != (int(image["width"]), int(image["height"])):
            sx, sy = to_original_scale(image)
            scales[image["id"]] = (sx, sy, orig_h, orig_w)
        image.pop(ORIG_WIDTH, None)
        image.pop(ORIG_HEIGHT, None)
        image["width"], image["height"] = orig_w, orig_h
    annotations = out.get("annotations", [])
    out["annotations"] = [
        scale_annotation(ann, *scales[ann["image_id"]]) if ann.get("image_id") in scales else ann
        for ann in tqdm(annotations, desc="ground truth to original size", unit="ann", disable=not scales or None)
    ]
    if scales:
        log.info("ground truth of %d of %d images scaled back to their original size", len(scales), len(out["images"]))
    return out


def split_ground_truth(dataset_dir: str | Path, split: str) -> dict[str, Any]:
    """The ground truth of one split of `dataset_dir`, checked (`CocoSplit`) and in ORIGINAL image coordinates."""
    return scale_to_original(CocoSplit.read(dataset_dir, split).data)


def score_predictions(gt: dict[str, Any], predictions: list[dict[str, Any]], with_masks: bool) -> dict[str, Any]:
    """bbox metrics, plus segm metrics in segmentation mode; SA-Co metrics from masks there, from boxes otherwise."""
    from sam3.evaluation.scoring import score

    metrics = score(gt, predictions, "bbox")
    if with_masks:
        box_ap = {key: value for key, value in metrics.items() if key.startswith("bbox_")}
        metrics = {**box_ap, **score(gt, predictions, "segm")}
    metrics["num_images"] = len(gt["images"])
    metrics["num_predictions"] = len(predictions)
    return metrics
