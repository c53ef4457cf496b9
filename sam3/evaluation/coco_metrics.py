"""COCO box and mask AP with pycocotools' COCOeval, silenced, as plain JSON-safe numbers.

COCOeval reports -1 where a value is undefined (no GT in an area range, a category without GT); here those
become None (JSON null), so a metrics file never holds a sentinel that reads like a score, nor a NaN.
`precision` is COCOeval's array [T IoU thresholds, R=101 recall thresholds, K categories, A=4 area ranges,
M=3 max-detection settings (1, 10, 100)]; "all" areas is index 0 and 100 detections is the last index.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
# The first six entries of COCOeval.stats, in its order: AP@[.5:.95], AP@.5, AP@.75, AP small, medium, large.
SUMMARY_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_AREA_ALL = 0
_MAX_DETS_100 = -1
_IOU_50 = 0  # COCOeval's iouThrs start at 0.5


@contextlib.contextmanager
def _quiet():
    """Capture pycocotools' prints (it writes progress to stdout) and pass them to the debug log."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        log.debug("pycocotools: %s", buffer.getvalue().strip())


def coco_index(dataset: dict[str, Any]) -> Any:
    """A `pycocotools.coco.COCO` over an in-memory dataset dict (not copied: the caller owns a private copy)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def load_results(coco_gt: Any, predictions: list[dict[str, Any]], iou_type: str) -> Any:
    """COCO results object for `predictions` (copied; pycocotools writes ids and areas into them).

    An empty list gives an empty results index (COCO.loadRes fails on []), so every GT instance is a miss.
    For "segm" each prediction's `bbox` is dropped, so loadRes takes area and box from the mask (as detectron2
    does); with a box present it would keep the box area, which decides the small/medium/large ranges.
    """
    if not predictions:
        return coco_index({"images": list(coco_gt.dataset["images"]), "categories": [], "annotations": []})
    results = copy.deepcopy(predictions)
    if iou_type == "segm":
        for result in results:
            result.pop("bbox", None)
    with _quiet():
        return coco_gt.loadRes(results)


def run_cocoeval(coco_gt: Any, coco_dt: Any, iou_type: str, img_ids: Iterable[Any] | None, use_cats: bool) -> Any:
    """Evaluate, accumulate and summarise silently; returns the COCOeval holding `.stats` and `.eval`.

    `img_ids` restricts the evaluated images (None: all GT images); `use_cats=False` pools categories, as for
    the SA-Co format where the prompt is the image entry's text and the category field is unused.
    """
    from pycocotools.cocoeval import COCOeval

    with _quiet():
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if img_ids is not None:
            evaluator.params.imgIds = sorted(img_ids)
        evaluator.params.useCats = int(use_cats)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _defined(value: float) -> float | None:
    """COCOeval's -1 (undefined) as None; anything else as a Python float."""
    return None if value < 0 else float(value)


def summary_metrics(evaluator: Any, iou_type: str) -> dict[str, float | None]:
    """`{iou_type}_AP`, `_AP50`, `_AP75`, `_APs`, `_APm`, `_APl` from COCOeval.stats, in 0..1 or None."""
    return {f"{iou_type}_{key}": _defined(evaluator.stats[i]) for i, key in enumerate(SUMMARY_KEYS)}


def per_category_ap(evaluator: Any, category_names: dict[Any, str]) -> dict[str, float | None]:
    """AP@[.5:.95] per category name (area all, 100 detections); None for a category without GT.

    AP_k = mean of precision[:, :, k, all, 100] over its defined (> -1) entries, as COCOeval's own summary
    averages. `category_names` maps category id to a unique display name.
    """
    if not evaluator.params.useCats:
        return {}
    precision = evaluator.eval["precision"]
    result: dict[str, float | None] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, _AREA_ALL, _MAX_DETS_100]
        defined = values[values > -1]
        result[category_names[cat_id]] = float(defined.mean()) if defined.size else None
    return result


def precision_recall_points(evaluator: Any) -> list[dict[str, float]]:
    """PR curve at IoU 0.5 (area all, 100 detections): precision averaged over the categories with GT.

    One point per COCOeval recall threshold (0, 0.01, ..., 1). Empty when no category has GT.
    """
    precision = evaluator.eval["precision"][_IOU_50, :, :, _AREA_ALL, _MAX_DETS_100]  # [R, K]
    with_gt = precision[0, :] > -1  # a category without GT is -1 at every recall
    if not with_gt.any():
        return []
    mean_precision = precision[:, with_gt].mean(axis=1)  # [R]
    return [
        {"recall": float(r), "precision": float(p)}
        for r, p in zip(evaluator.params.recThrs, mean_precision, strict=True)
    ]


def unique_category_names(categories: list[dict[str, Any]]) -> dict[Any, str]:
    """Category id -> name; a name shared by several ids gets " (id N)" appended so no AP overwrites another."""
    counts: dict[str, int] = {}
    for category in categories:
        counts[str(category["name"])] = counts.get(str(category["name"]), 0) + 1
    names = {}
    for category in categories:
        name = str(category["name"])
        names[category["id"]] = name if counts[name] == 1 else f"{name} (id {category['id']})"
    duplicated = sorted(n for n, c in counts.items() if c > 1)
    if duplicated:
        log.warning("category names used by several ids, told apart by id in per-category AP: %s", duplicated)
    return names
