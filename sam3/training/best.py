"""The best checkpoint, early stopping, and which weights the run exports.

Validation (every train.val_every_epochs epochs and at the run's last step, `sam3.training.fit`) measures m, the
value of train.best_metric (`metric_name`; the higher the better). With b the best value so far, measured at
best_step, and n the validations since then (all three in `TrainState`, so every checkpoint carries them and a
resumed run goes on with them):

    m > b, or no b yet       ->  b = m, best_step = step, n = 0; checkpoints/best.pt is (re)written (unless
                                 train.keep_best is false: then only the counters change)
    m <= b                   ->  n = n + 1                  (a tie is no improvement)
    m undefined (None, NaN)  ->  nothing changes, a warning (no evidence either way)

Early stopping, train.patience = P > 0: the run stops at the validation where n reaches P, i.e. after P validations
in a row without improvement. The rule reads the saved n and the current P, so a resumed run that had stopped stays
stopped, while raising P (or setting it 0) lets it go on from where it stopped.

Export, train.export: `last` exports the final step's weights, `best` loads best.pt's weights into the model first.
best.pt holds weights only (no optimiser state; of the model, only what trains, like every checkpoint:
`sam3.checkpoint`), is never rotated away, and is written before the step checkpoint that records it (the background
writer writes in the order of the saves): a crash between the two leaves a best.pt one validation ahead of the
resumed counters, which the replayed validation writes again.
"""

from __future__ import annotations

import logging
import math

from sam3.checkpoint import CheckpointError, TrainState
from sam3.coco import split_annotation_path
from sam3.config import LoopConfig, TrainJob, loop_problem
from sam3.errors import ConfigError
from sam3.training.resume import RunCheckpoints

logger = logging.getLogger(__name__)


def metric_name(loop: LoopConfig, with_masks: bool) -> str:
    """The validation metric key of train.best_metric; auto: segm_AP in segmentation mode, else bbox_AP."""
    if loop.best_metric == "auto":
        return "segm_AP" if with_masks else "bbox_AP"
    return loop.best_metric


def check_validation_settings(job: TrainJob) -> None:
    """ConfigError, before anything is written, when the best checkpoint, early stopping or the best export cannot
    work: settings without validation (`sam3.config.loop_problem`), or a dataset without a valid split."""
    loop = job.loop
    problem = loop_problem(loop, job.with_masks)
    if problem is not None:
        raise ConfigError(problem)
    if loop.mode != "train" or not (loop.patience or loop.export == "best"):
        return
    valid = split_annotation_path(job.dataset_dir, "valid")
    if not valid.is_file():
        key = "train.export = 'best'" if loop.export == "best" else f"train.patience = {loop.patience}"
        raise ConfigError(f"{key} needs the dataset's valid split, but {valid} is not a file")


def record_validation(state: TrainState, value: float | None, metric: str) -> bool:
    """Count the validation of `value` at `state.step` into `state` (module docstring); True when it is a new best
    (best.pt must be written)."""
    if value is None or not math.isfinite(value):
        logger.warning(
            "step %d: validation %s is undefined (%s); not counted for best or patience", state.step, metric, value
        )
        return False
    if state.best_metric is None or value > state.best_metric:
        state.best_metric, state.best_step, state.validations_since_best = value, state.step, 0
        return True
    state.validations_since_best += 1
    return False


def stop_reason(state: TrainState, patience: int | None, metric: str) -> str | None:
    """Why the run stops early at `state` (None: it goes on): `patience` validations without improvement."""
    if not patience or state.validations_since_best < patience:
        return None
    return (
        f"validation {metric} has not improved for {state.validations_since_best} validations "
        f"(train.patience {patience}; best {state.best_metric:.4g} at step {state.best_step})"
    )


def load_export_weights(loop: LoopConfig, checkpoints: RunCheckpoints, state: TrainState, metric: str) -> None:
    """Put the weights train.export names into the run's model (rank 0, before the export) and say which."""
    if loop.export == "last":
        logger.info("exporting the last weights (step %d)", state.step)
        return
    path = checkpoints.best_path
    if not path.is_file():
        if state.best_step is None:
            logger.warning(
                "train.export is best but no validation gave a defined %s: exporting the last weights (step %d)",
                metric,
                state.step,
            )
            return
        raise CheckpointError(
            f"{path} is missing, but the run's best {metric} was at step {state.best_step}: restore the file, or "
            "set train.export last to export the last weights"
        )
    best = checkpoints.load_weights(path)
    if best.step != state.best_step:
        logger.warning("%s holds step %d, the run's record says step %s", path, best.step, state.best_step)
    logger.info(
        "exporting the best weights: validation %s %.4g at step %d (%s; the last step was %d)",
        metric,
        best.best_metric,
        best.step,
        path,
        state.step,
    )
