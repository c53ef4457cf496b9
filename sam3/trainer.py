"""Fine-tuning SAM 3: `train(job)`, the run from setup to export, over the pieces in `sam3.training`.

Features and the `TrainJob` fields (sam3.config) that turn them on:
- model source (tiny | full | transformers folder) and input size: model_source, image_size
- detection or detection + segmentation: with_masks
- epochs or a fixed number of optimiser steps: loop.epochs, loop.max_steps
- batch size per process and gradient accumulation: loop.batch_size, loop.accumulation
- a seeded subset of N training images (RF100-VL "100 images"): loop.subset_images
- another annotation file of the train split, e.g. an ODinW few-shot file: train_annotations
- the recipe's optimiser, layer decay and schedule: optim
- the recipe's loss weights, or focal classification for training from scratch: loss
- freezing: loop.freeze (sam3.freeze modes)
- training from a feature cache of the frozen encoders instead of pixels (sam3.features): cache, feature_cache_dir
- bf16 / fp16 autocast on CUDA, fp32 on CPU: loop.amp_dtype; TF32 / cudnn: loop.tf32, loop.cudnn_benchmark
- memory and speed: loop.activation_checkpointing (sam3.memory), loop.compile (sam3.compiling)
- distributed data parallel from torchrun's environment (NCCL on GPU, gloo on CPU): ddp
- checkpoints every N steps, at each epoch end and at the end, atomic, resumed automatically:
  loop.checkpoint_every, loop.keep_last, loop.checkpoint_epochs; other params -> a new run. They hold what trains
  (frozen weights are rebuilt from the model source, checked by a fingerprint) and are written by a background
  thread while training goes on (sam3.checkpoint, sam3.checkpoint_writer)
- a longer (or shorter) loop.max_steps / loop.epochs resumes with the lr schedule recomputed for the new total; a
  total below the checkpoint's step is a ConfigError (sam3.training.resume)
- validation every loop.val_every_epochs epochs and at the last step; the best by loop.best_metric kept as
  checkpoints/best.pt (unless loop.keep_best is false); early stopping after loop.patience validations without
  improvement; loop.export: the last or the best weights exported (sam3.training.best)
- divergence guard (roll back, lower lr, go on, up to a limit): guard
- one trainer per run folder: rank 0 holds run_dir/.lock for the whole run (sam3.run_lock); a second one gets
  RunLocked. On resume a damaged checkpoint (zip CRC mismatch, truncated) is moved to checkpoints/corrupt/ and the
  run goes on from the newest intact one (sam3.checkpoint_integrity)
- logs: TensorBoard, train_stats.jsonl, every loop.log_every steps; progress: a tqdm bar with the loss and images/s
  on a terminal, else a plain line (step/total, loss, lr, images/s, ETA) every loop.log_every steps
At the end the model (the last or the best weights, loop.export) is exported, self-contained (`sam3.export`: weights,
class names, processor, tokenizer, model card), to run_dir/model
(`Sam3Model.from_pretrained` loads it).

A run: setup (sam3.training.setup: seed, model, data, optimiser, criterion, guard), resume or start
(sam3.training.resume), then the fit loop (sam3.training.fit) or, in mode "val", one validation pass
(sam3.training.validation), then the export.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sam3.checkpoint import TrainState
from sam3.coco_split import CocoSplit
from sam3.config import LoopConfig, TrainJob
from sam3.distributed import DistInfo, barrier, init_distributed
from sam3.export import ModelCard, export_model
from sam3.training.best import check_validation_settings, load_export_weights, metric_name
from sam3.training.ddp import main_rank_lock
from sam3.training.fit import FitLoop
from sam3.training.logs import TrainLogs
from sam3.training.resume import RunCheckpoints, changed_params, resume_or_start
from sam3.training.setup import RunParts, build_run
from sam3.training.validation import write_val_metrics

__all__ = ["changed_params", "train"]

logger = logging.getLogger(__name__)


def train(job: TrainJob) -> Path:
    """Fine-tune as `job` says; return the exported model folder (transformers format), or in mode "val" the
    validation metrics file (run_dir/val_metrics.json) of the resumed model, which trains nothing."""
    check_validation_settings(job)  # a ConfigError before the run folder is touched
    if job.loop.threads is not None:
        torch.set_num_threads(job.loop.threads)
    dist_info = init_distributed(timeout_s=job.ddp.timeout_s)
    if dist_info.device.type == "cuda":
        _set_cuda_backends(job.loop)
    # one trainer per run folder (RunLocked otherwise), before anything in it is read or written
    with main_rank_lock(Path(job.run_dir), dist_info):
        return _run(job, dist_info)


def _run(job: TrainJob, dist_info: DistInfo) -> Path:
    """The run inside the lock: setup, resume or start, fit (or one validation pass), export."""
    run_dir = Path(job.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if dist_info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    parts = build_run(job, dist_info)
    checkpoints = RunCheckpoints(ckpt_dir, parts, job, dist_info)
    completed = False
    try:
        state = resume_or_start(checkpoints)
        logs = TrainLogs(run_dir, dist_info, job.loop.wandb_project, job.params, fresh=state.step == 0)
        if job.loop.mode == "val":  # the reference's "val" mode: evaluate the (resumed) model, train nothing
            logs.close()
            result = write_val_metrics(parts.detector, job, dist_info)
        else:
            state = FitLoop(job, parts, checkpoints, logs, dist_info).run(state)  # closes the logs
            checkpoints.flush()  # every checkpoint on disk (best.pt too) before the export; a failed write raises
            result = _export(job, parts, checkpoints, state, dist_info)
        completed = True
    finally:
        # the write in flight completes on every exit (where it cannot, the files it would replace stay valid); after
        # an error that error is the one raised, and a write that failed too is logged
        checkpoints.close(raise_error=completed)
    return result


def _export(
    job: TrainJob, parts: RunParts, checkpoints: RunCheckpoints, state: TrainState, dist_info: DistInfo
) -> Path:
    """Rank 0 exports the weights train.export names to run_dir/model; every rank returns that folder."""
    export_dir = Path(job.run_dir) / "model"
    if dist_info.is_main:
        # the weights loop.export names, in the model; then the one export call
        metric = metric_name(job.loop, job.with_masks)
        load_export_weights(job.loop, checkpoints, state, metric)
        export_model(parts.detector, export_dir, class_names(job), model_card(job, state, metric))
        logger.info("exported the fine-tuned model to %s", export_dir)
    barrier()
    return export_dir


def class_names(job: TrainJob) -> list[str]:
    """The prompts the run was fine-tuned on, in category-id order: the training annotation file's categories (read
    from the file, not from the data pipeline, which may be a feature cache)."""
    categories = CocoSplit.read(job.dataset_dir, "train", job.train_annotations).categories
    return [categories[i] for i in sorted(categories)]


def model_card(job: TrainJob, state: TrainState, metric: str) -> ModelCard:
    """What the export's model card says about the run: data, starting weights, params, the best validation."""
    metrics = None
    if state.best_metric is not None:
        metrics = {f"best validation {metric} (step {state.best_step})": state.best_metric}
    return ModelCard(
        dataset=f"{job.dataset_dir} (train/{job.train_annotations})",
        base_model=job.model_source,
        params=job.params,
        metrics=metrics,
    )


def _set_cuda_backends(loop: LoopConfig) -> None:
    torch.backends.cuda.matmul.allow_tf32 = loop.tf32
    torch.backends.cudnn.allow_tf32 = loop.tf32
    torch.backends.cudnn.benchmark = loop.cudnn_benchmark
