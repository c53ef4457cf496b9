"""The evaluate stage's figures and summary: what `pipeline.evaluate` writes besides metrics.json.

    write_figures(plots_dir, gt, models, curves, images_dir, iou_type)   pr_curve.png, per_category_ap.png,
                                                                          predictions.png
    summary(metrics, iou_type, train_stats, baseline_key)                the numbers people compare across runs
                                                                          (retention's too: `retention_summary`)

`models` maps a label (FINE_TUNED, "baseline: <source>") to its metrics and COCO results, the fine-tuned model
first; `curves` maps the same labels to their PR curves, computed once by the caller (it also writes them as JSON).
The mosaic shows the first MOSAIC_IMAGES test images (by id): the ground truth (box and category name) on the left,
the fine-tuned model's best detections on the right, as many as the image has ground-truth objects (at least one),
with their scores: a weak model's guesses are visible too, where a fixed threshold would often show nothing. Both are
drawn on the original image (`images_dir` holds the split as validated, before preprocessing).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.plots import (
    MOSAIC_PNG,
    PER_CATEGORY_PNG,
    PR_CURVE_PNG,
    MosaicRow,
    mosaic_figure,
    per_category_figure,
    pr_figure,
    read_stats,
    step_records,
)
from pipeline.retention import RETENTION_KEY, retention_summary

MOSAIC_IMAGES = 4
FINE_TUNED = "fine-tuned"  # the label of the evaluated model in the figures (its baseline's: "baseline: <source>")
SUMMARY_KEYS = ("AP", "AP50")  # per IoU type, prefixed bbox_ / segm_
SA_CO_KEYS = ("cgF1", "IL_MCC", "pmF1")


@dataclass(frozen=True)
class ModelResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]


def write_figures(
    plots_dir: Path,
    gt: dict[str, Any],
    models: Mapping[str, ModelResult],
    curves: Mapping[str, Sequence[Mapping[str, float]]],
    images_dir: Path,
    iou_type: str,
) -> list[Path]:
    """The three PNGs of an evaluation (`curves`: each model's `sam3.evaluation.pr_curve` rows, by label); returns
    their paths."""
    from sam3.evaluation import per_category_rows

    what = "masks" if iou_type == "segm" else "boxes"
    rows = {
        label: [r for r in per_category_rows(result.metrics) if r["iou_type"] == iou_type]
        for label, result in models.items()
    }
    first = next(iter(models.values()))
    return [
        pr_figure(curves, plots_dir / PR_CURVE_PNG, f"precision-recall, IoU 0.5 ({what})"),
        per_category_figure(rows, plots_dir / PER_CATEGORY_PNG, f"AP per category ({what})"),
        mosaic_figure(
            mosaic_rows(gt, first.predictions, images_dir),
            plots_dir / MOSAIC_PNG,
            "test images: ground truth | the model's best detections, as many as ground-truth objects",
        ),
    ]


def _xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = box
    return (x, y, x + w, y + h)


def mosaic_rows(gt: dict[str, Any], predictions: Sequence[dict[str, Any]], images_dir: Path) -> list[MosaicRow]:
    """Ground truth and predictions drawn on the first MOSAIC_IMAGES images of `gt` (by id)."""
    from sam3.images import read_image
    from sam3.inference import Detection
    from sam3.overlay import draw_detections

    names = {c["id"]: c["name"] for c in gt["categories"]}
    order = sorted(names)
    prompts = [names[i] for i in order]
    index = {category_id: k for k, category_id in enumerate(order)}
    rows = []
    for image in sorted(gt["images"], key=lambda record: record["id"])[:MOSAIC_IMAGES]:
        picture = read_image(images_dir / image["file_name"])
        size = (image.get("orig_width", image["width"]), image.get("orig_height", image["height"]))
        if picture.size != size:  # a preprocessed copy: the annotations and predictions are in original pixels
            picture = picture.resize(size)
        truth = [
            Detection(index[a["category_id"]], names[a["category_id"]], 1.0, _xyxy(a["bbox"]))
            for a in gt["annotations"]
            if a["image_id"] == image["id"] and not a.get("iscrowd")
        ]
        mine = sorted((p for p in predictions if p["image_id"] == image["id"]), key=lambda p: -p["score"])
        found = [
            Detection(index[p["category_id"]], names[p["category_id"]], p["score"], _xyxy(p["bbox"]))
            for p in mine[: max(1, len(truth))]
        ]
        rows.append(
            MosaicRow(
                name=str(image["file_name"]),
                truth=draw_detections(picture, truth, prompts, show_scores=False),
                predicted=draw_detections(picture, found, prompts),
            )
        )
    return rows


def train_numbers(train_stats: Path | None) -> dict[str, float | int | None]:
    """steps and train_loss (the mean of the last 5 logged losses: one logged value is noisy) from a run's
    train_stats.jsonl; None when absent. Not the speed: images/s differs from machine to machine, and the summary is
    committed (the demo's must reproduce); it is in train_stats.jsonl and the progress lines."""
    empty: dict[str, float | int | None] = {"steps": None, "train_loss": None}
    if train_stats is None or not train_stats.is_file():
        return empty
    steps = step_records(read_stats(train_stats))
    if not steps:
        return empty
    return {"steps": steps[-1]["step"], "train_loss": statistics.fmean(r["loss"] for r in steps[-5:])}


def summary(metrics: dict[str, Any], iou_type: str, train_stats: Path | None, baseline_key: str) -> dict[str, Any]:
    """The small file DVC shows as this run's metrics: box (and mask) AP and AP50, cgF1, IL_MCC, pmF1, the
    baseline's headline AP when there is one, retention_rejection and retention_AP when measured
    (`pipeline.retention.retention_summary`), and the training's steps and final loss (`train_numbers`)."""
    out: dict[str, Any] = {}
    for kind in ("bbox", "segm") if iou_type == "segm" else ("bbox",):
        for key in SUMMARY_KEYS:
            out[f"{kind}_{key}"] = metrics.get(f"{kind}_{key}")
    for key in SA_CO_KEYS:
        out[key] = metrics.get(key)
    if baseline_key in metrics:
        out[f"baseline_{iou_type}_AP"] = metrics[baseline_key].get(f"{iou_type}_AP")
    if RETENTION_KEY in metrics:
        out |= retention_summary(metrics[RETENTION_KEY], iou_type)
    return out | train_numbers(train_stats)
