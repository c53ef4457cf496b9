"""Model-free scoring: a GT file and a COCO results list in, box/mask AP and SA-Co metrics out.

Two ground-truth formats, told apart by `text_input` in the `images` entries:
- standard COCO: a prompt is a category name, so the SA-Co pairs are every image x every category;
- SA-Co benchmark: each `images` entry is already one (image, noun phrase) pair with `text_input`,
  `queried_category`, `is_instance_exhaustive`, `is_pixel_exhaustive`, file_name, height, width; its annotations
  are that pair's instances and predictions use the pair id as `image_id`. Pairs that are not instance-exhaustive
  are left out of every metric (AP included: a correct detection of an unannotated instance would count as a
  false positive) and counted in `num_skipped_pairs`. The category field is not used there (the prompt is the
  text), so AP pools categories (COCOeval useCats=0) and the per-category AP dict is empty.

Predictions are a COCO results list: {image_id, category_id, bbox [x, y, w, h], score, segmentation (RLE, for
"segm")}. AP uses all of them; SA-Co metrics only those with score > SCORE_THRESHOLD. Crowd GT annotations are
ignored regions for AP (COCOeval's rule) and are not instances for SA-Co metrics (left out, counted in the log).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sam3.coco import load_coco, read_json
from sam3.errors import ConfigError, DataError
from sam3.evaluation.coco_metrics import (
    IOU_TYPES,
    coco_index,
    load_results,
    per_category_ap,
    precision_recall_points,
    run_cocoeval,
    summary_metrics,
    unique_category_names,
)
from sam3.evaluation.saco import SCORE_THRESHOLD, SacoCounts, pair_ious

log = logging.getLogger(__name__)

SACO_PROMPT_FIELD = "text_input"  # its presence in `images` marks the SA-Co format
PER_CATEGORY_SUFFIX = "_AP_per_category"


@dataclass
class ScoringInputs:
    """Validated private copies of the inputs, and what the metrics are computed over."""

    coco_gt: Any  # pycocotools COCO index over the GT copy
    predictions: list[dict[str, Any]]
    iou_type: str
    saco_format: bool
    eval_image_ids: list[Any]  # GT image (SA-Co: pair) ids the metrics cover
    num_skipped_pairs: int


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_box(box: Any) -> bool:
    return isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box) and min(box[2:]) >= 0


def load_ground_truth(gt_json: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A private copy of the GT dict and a name for messages (the file path, or "ground truth")."""
    if isinstance(gt_json, dict):
        return copy.deepcopy(gt_json), "ground truth"
    return load_coco(gt_json), str(gt_json)


def load_predictions(predictions_json: str | Path | list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """A private copy of the results list and a name for messages. Raises DataError for a missing/broken file."""
    if isinstance(predictions_json, list):
        return copy.deepcopy(predictions_json), "predictions"
    path = Path(predictions_json)
    data = read_json(path, missing="predictions file not found")
    if not isinstance(data, list):
        raise DataError(f"{path}: predictions must be a JSON list of COCO results ({{image_id, category_id, ...}})")
    return data, str(path)


def _check_ground_truth(gt: dict[str, Any], source: str, iou_type: str) -> bool:
    """Validate the GT copy in place, fill absent `iscrowd` (0) and `area` (box w*h); return True for SA-Co."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise DataError(f"{source}: '{key}' must be a list (COCO format: images, annotations, categories)")
    images, categories = gt["images"], gt["categories"]
    if not categories:
        raise DataError(f"{source}: 'categories' is empty; give at least one {{id, name}}")
    for i, category in enumerate(categories):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise DataError(f"{source}: categories[{i}] needs an 'id' and a 'name'")
    with_prompt = sum(1 for image in images if isinstance(image, dict) and SACO_PROMPT_FIELD in image)
    if 0 < with_prompt < len(images):
        raise DataError(
            f"{source}: {with_prompt} of {len(images)} images carry '{SACO_PROMPT_FIELD}'; an SA-Co file needs it "
            "on every (image, noun phrase) entry, a COCO file on none"
        )
    saco = with_prompt > 0
    image_ids: set[Any] = set()
    for i, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image:
            raise DataError(f"{source}: images[{i}] has no 'id'")
        if image["id"] in image_ids:
            raise DataError(f"{source}: image id {image['id']} appears twice in 'images'")
        image_ids.add(image["id"])
        if iou_type == "segm" and not (_is_number(image.get("height")) and _is_number(image.get("width"))):
            raise DataError(f"{source}: image {image['id']} needs 'height' and 'width' to score masks")
        if saco and "is_instance_exhaustive" not in image:
            raise DataError(f"{source}: SA-Co pair {image['id']} has no 'is_instance_exhaustive' (0 or 1)")
    category_ids = {c["id"] for c in categories}
    filled = {"iscrowd": 0, "area": 0}  # how many annotations got a default, logged below
    for i, ann in enumerate(gt["annotations"]):
        where = f"{source}: annotations[{i}] (id {ann.get('id') if isinstance(ann, dict) else '?'})"
        if not isinstance(ann, dict) or "id" not in ann:
            raise DataError(f"{where}: needs an 'id'")
        if ann.get("image_id") not in image_ids:
            raise DataError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in category_ids:  # COCOeval would drop it silently, even with useCats=0
            raise DataError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        if not _check_box(ann.get("bbox")):
            raise DataError(f"{where}: 'bbox' must be [x, y, w, h] with w, h >= 0, got {ann.get('bbox')!r}")
        if iou_type == "segm" and not ann.get("segmentation"):
            raise DataError(f"{where}: no 'segmentation' to score masks against; use --iou-type bbox")
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            filled["iscrowd"] += 1
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
            filled["area"] += 1
    if filled["iscrowd"]:
        log.info("%s: %d annotations had no 'iscrowd'; set to 0", source, filled["iscrowd"])
    if filled["area"]:
        log.info("%s: %d annotations had no 'area'; set to the box's w*h", source, filled["area"])
    return saco


def _compressed_rle(segmentation: Any, height: int, width: int, where: str) -> dict[str, Any]:
    """A prediction's RLE with string counts; uncompressed (list) counts are compressed by pycocotools."""
    from pycocotools import mask as mask_utils

    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise DataError(f"{where}: 'segmentation' must be a COCO RLE {{size: [h, w], counts}}")
    if list(segmentation["size"]) != [height, width]:
        raise DataError(f"{where}: mask size {segmentation['size']} differs from the image's [{height}, {width}]")
    if isinstance(segmentation["counts"], list):
        segmentation = mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _check_predictions(predictions: list[Any], source: str, gt: dict[str, Any], iou_type: str, saco: bool) -> None:
    """Validate the prediction copy in place; for SA-Co give every one a GT category id (categories are unused)."""
    images = {image["id"]: image for image in gt["images"]}
    category_ids = {c["id"] for c in gt["categories"]}
    pooled_category = gt["categories"][0]["id"]
    for i, pred in enumerate(predictions):
        where = f"{source}: prediction {i}"
        if not isinstance(pred, dict):
            raise DataError(f"{where}: must be an object {{image_id, category_id, bbox, score}}")
        image = images.get(pred.get("image_id"))
        if image is None:
            raise DataError(f"{where}: image_id {pred.get('image_id')!r} is not in the ground truth's 'images'")
        if saco:
            pred["category_id"] = pooled_category
        elif pred.get("category_id") not in category_ids:
            raise DataError(f"{where}: category_id {pred.get('category_id')!r} is not in the ground truth's categories")
        if not _is_number(pred.get("score")):
            raise DataError(f"{where}: 'score' must be a finite number, got {pred.get('score')!r}")
        if iou_type == "bbox" and not _check_box(pred.get("bbox")):
            raise DataError(f"{where}: 'bbox' must be [x, y, w, h] with w, h >= 0, got {pred.get('bbox')!r}")
        if iou_type == "segm":
            pred["segmentation"] = _compressed_rle(pred.get("segmentation"), image["height"], image["width"], where)


def _warn_box_units(gt: dict[str, Any], predictions: list[dict[str, Any]], source: str) -> None:
    """SA-Co Gold stores boxes normalised to 0..1; predictions in pixels would then never overlap. Say so."""
    gt_max = max((max(a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]) for a in gt["annotations"]), default=0)
    pred_max = max((max(p["bbox"][0] + p["bbox"][2], p["bbox"][1] + p["bbox"][3]) for p in predictions), default=0)
    if 0 < gt_max <= 1.0 < pred_max:
        log.warning(
            "%s: GT boxes are normalised (all <= 1) but predicted boxes are not (up to %.1f): box IoUs will be near "
            "0; score masks with --iou-type segm or normalise the predicted boxes",
            source,
            pred_max,
        )


def prepare_inputs(
    gt_json: str | Path | dict[str, Any], predictions_json: str | Path | list[dict[str, Any]], iou_type: str
) -> ScoringInputs:
    """Load, copy and validate both inputs and decide which images (pairs) are scored."""
    if iou_type not in IOU_TYPES:
        raise ConfigError(f"iou_type must be one of {', '.join(IOU_TYPES)}, got {iou_type!r}")
    gt, gt_source = load_ground_truth(gt_json)
    predictions, pred_source = load_predictions(predictions_json)
    saco = _check_ground_truth(gt, gt_source, iou_type)
    _check_predictions(predictions, pred_source, gt, iou_type, saco)
    if saco:
        eval_ids = [image["id"] for image in gt["images"] if image["is_instance_exhaustive"]]
        skipped = len(gt["images"]) - len(eval_ids)
        if skipped:
            log.info("%s: %d of %d pairs are not instance-exhaustive; skipped", gt_source, skipped, len(gt["images"]))
        if iou_type == "bbox":
            _warn_box_units(gt, predictions, gt_source)
    else:
        eval_ids, skipped = [image["id"] for image in gt["images"]], 0
    return ScoringInputs(coco_index(gt), predictions, iou_type, saco, eval_ids, skipped)


def _region(ann: dict[str, Any], coco_gt: Any, iou_type: str, is_prediction: bool) -> Any:
    """The box [x, y, w, h] or the RLE that IoU is computed on."""
    if iou_type == "bbox":
        return ann["bbox"]
    return ann["segmentation"] if is_prediction else coco_gt.annToRLE(ann)


def saco_counts(inputs: ScoringInputs) -> SacoCounts:
    """Count every scored pair: (image, category) for COCO GT, the pair id for SA-Co GT."""
    coco_gt, iou_type = inputs.coco_gt, inputs.iou_type
    scored = set(inputs.eval_image_ids)

    def pair_key(ann: dict[str, Any]) -> Any:
        return ann["image_id"] if inputs.saco_format else (ann["image_id"], ann["category_id"])

    gt_regions: dict[Any, list[Any]] = defaultdict(list)
    crowd = 0
    for ann in coco_gt.dataset["annotations"]:
        if ann["image_id"] not in scored:
            continue
        if ann["iscrowd"]:
            crowd += 1
            continue
        gt_regions[pair_key(ann)].append(_region(ann, coco_gt, iou_type, is_prediction=False))
    if crowd:
        log.info("%d crowd annotations are not instances for SA-Co metrics; left out of them", crowd)
    dt_regions: dict[Any, list[Any]] = defaultdict(list)
    for pred in inputs.predictions:
        if pred["image_id"] in scored and pred["score"] > SCORE_THRESHOLD:
            dt_regions[pair_key(pred)].append(_region(pred, coco_gt, iou_type, is_prediction=True))

    num_pairs = len(scored) if inputs.saco_format else len(scored) * len(coco_gt.dataset["categories"])
    touched = list(gt_regions.keys() | dt_regions.keys())
    counts = SacoCounts()
    for key in tqdm(touched, desc="SA-Co pairs", unit="pair", disable=None, leave=False):
        counts.add_pair(pair_ious(dt_regions.get(key, []), gt_regions.get(key, [])))
    counts.add_empty_pairs(num_pairs - len(touched))  # neither GT nor kept detections: true negatives
    return counts


def _cocoeval(inputs: ScoringInputs) -> Any:
    """COCOeval over the scored images; categories pooled for SA-Co GT."""
    coco_dt = load_results(inputs.coco_gt, inputs.predictions, inputs.iou_type)
    return run_cocoeval(
        inputs.coco_gt, coco_dt, inputs.iou_type, inputs.eval_image_ids, use_cats=not inputs.saco_format
    )


def score(
    gt_json: str | Path | dict[str, Any],
    predictions_json: str | Path | list[dict[str, Any]],
    iou_type: str = "bbox",
) -> dict[str, Any]:
    """All metrics as one JSON-safe dict (no NaN: undefined values are None).

    Keys: `{iou_type}_AP`, `_AP50`, `_AP75`, `_APs`, `_APm`, `_APl` (0..1, COCOeval), `{iou_type}_AP_per_category`
    {category name: AP or None when the category has no GT}, and the SA-Co metrics `cgF1`, `cgF1_50` (0..100),
    `pmF1`, `pmF1_50` (0..1), `IL_MCC` (-1..1), `num_pairs`, `num_positive_pairs`, `num_skipped_pairs`.
    Raises DataError for unreadable or inconsistent inputs and ConfigError for an unknown `iou_type`.
    """
    inputs = prepare_inputs(gt_json, predictions_json, iou_type)
    evaluator = _cocoeval(inputs)
    metrics: dict[str, Any] = summary_metrics(evaluator, iou_type)
    names = unique_category_names(inputs.coco_gt.dataset["categories"])
    metrics[iou_type + PER_CATEGORY_SUFFIX] = per_category_ap(evaluator, names)
    metrics.update(saco_counts(inputs).summary())
    metrics["num_skipped_pairs"] = inputs.num_skipped_pairs
    return metrics


def pr_curve(
    gt_json: str | Path | dict[str, Any],
    predictions_json: str | Path | list[dict[str, Any]],
    iou_type: str = "bbox",
) -> list[dict[str, float]]:
    """Precision at each recall 0, 0.01, ..., 1 (IoU 0.5, all areas, 100 detections), mean over categories with GT."""
    return precision_recall_points(_cocoeval(prepare_inputs(gt_json, predictions_json, iou_type)))


def per_category_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows {category, iou_type, AP} for a per-category plot, sorted by iou_type then name.

    Categories whose AP is None (no GT) have nothing to plot and are left out (they stay null in metrics.json).
    """
    rows = []
    for key in sorted(k for k in metrics if k.endswith(PER_CATEGORY_SUFFIX)):
        iou_type = key[: -len(PER_CATEGORY_SUFFIX)]
        for name, ap in sorted(metrics[key].items()):
            if ap is not None:
                rows.append({"category": name, "iou_type": iou_type, "AP": ap})
    return rows
