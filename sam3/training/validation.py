"""Validation of the model being trained on the dataset's valid split: box AP (mask AP in segmentation mode) and
cgF1, computed by rank 0 while the other ranks wait; every K epochs of a run, or the "val" mode's only pass."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sam3.coco import split_annotation_path
from sam3.config import TrainJob
from sam3.distributed import DistInfo, barrier
from sam3.io import write_json
from sam3.model import Sam3Detector

logger = logging.getLogger(__name__)


def validate(detector: Sam3Detector, job: TrainJob, device: torch.device, dist_info: DistInfo) -> dict | None:
    """Metrics of the model on the dataset's valid split (rank 0 computes them; the others wait and get None)."""
    from sam3.evaluation.ground_truth import score_predictions, split_ground_truth
    from sam3.inference import predict_dataset

    gt_path = split_annotation_path(job.dataset_dir, "valid")
    if not gt_path.is_file():
        logger.warning("%s not found: no validation pass", gt_path)
        return None
    metrics = None
    if dist_info.is_main:
        detector.eval()
        predictions = predict_dataset(detector, job.dataset_dir, "valid", with_masks=job.with_masks, device=device)
        detector.train()
        metrics = score_predictions(split_ground_truth(job.dataset_dir, "valid"), predictions, job.with_masks)
        logger.info(
            "validation: bbox_AP %.4f%s",
            metrics["bbox_AP"],
            f", segm_AP {metrics['segm_AP']:.4f}" if "segm_AP" in metrics else "",
        )
    barrier()
    return metrics


def write_val_metrics(detector: Sam3Detector, job: TrainJob, dist_info: DistInfo) -> Path:
    """The "val" mode: validate the (resumed) model, write run_dir/val_metrics.json (rank 0), return its path."""
    metrics = validate(detector, job, dist_info.device, dist_info)
    path = Path(job.run_dir) / "val_metrics.json"
    if metrics is not None and dist_info.is_main:
        write_json(path, metrics)
        logger.info("validation metrics written to %s", path)
    barrier()
    return path
