"""J, F and J&F of semi-supervised video object segmentation, computed as the DAVIS 2017 evaluation computes them.

Per object k and frame t (pred, gt: (H, W) boolean masks, label map == k):

    J = |pred & gt| / |pred | gt|                                   region similarity (IoU); 1 when both are empty
    F = 2 P R / (P + R)                                              boundary F-measure, 0 when P + R = 0
        P = |B(pred) within r of B(gt)| / |B(pred)|,  R = |B(gt) within r of B(pred)| / |B(gt)|
        r = ceil(0.008 * sqrt(H^2 + W^2)) pixels                     (bound_th < 1 is a fraction of the diagonal)

"within r" means inside the dilation by a disk of radius r, the pixels (dy, dx) with dy^2 + dx^2 <= r^2.
Boundary maps B(.) are one pixel wide, half a pixel towards the origin of the true contour (see `seg_to_boundary`).
Empty boundaries: none on either side gives P = R = 1 (F = 1); only the prediction's empty gives P = 1, R = 0 and
only the ground truth's empty gives P = 0, R = 1 (F = 0 in both). A mask covering the whole frame has no boundary,
so a full ground truth against an empty prediction scores J = 0 but F = 1; that is the reference's behaviour, kept.

Conventions of the official DAVIS 2017 semi-supervised evaluation that we follow:

* Frames: each video's frames are its ground-truth PNGs in name order; the first one (given to the tracker) and the
  last one are not scored. Prediction PNGs of other frames, the first and the last included, are never read; one that
  is missing for a scored frame is an error naming the video and the frame.
* Objects: ids 1..N where N is the largest id in the first ground-truth frame (an id skipped there is still an
  object, empty on that frame). Ground-truth pixels 255 are "void" and are set to background; the semi-supervised
  scores do not exclude them (only the unsupervised task does), so `evaluate_folders` passes no void mask.
  A prediction without id k scores an empty mask for k; a prediction with an id above N is an error.
* Per object, over its T scored frames: mean, recall = fraction of frames with a value > 0.5, and decay = mean of the
  first quarter minus mean of the last quarter (`frame_statistics`). Global J (F, recalls, decays) is the mean over
  all objects of all videos, each object weighing the same whatever its video; J&F = (J + F) / 2.
* Videos: the ground truth's (all its sub-folders, or the given list); prediction folders of other videos are
  ignored and a listed video without a prediction folder is an error.

Where we differ: errors are `DataError`s (the reference prints a message and exits); the reference's quarter
indices are stored in 8 bits and wrap for videos of more than 256 scored frames, ours do not (identical below);
per-video J and F (the mean of its objects') are our addition, the reference reports objects only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from sam3.errors import DataError
from sam3.video.palette import read_label_map

BOUND_TH = 0.008  # boundary tolerance: a fraction of the image diagonal, or pixels when >= 1
VOID_ID = 255  # ground-truth pixels that belong to no object
RECALL_THRESHOLD = 0.5  # recall counts the frames scoring strictly above this
DECAY_BINS = 4  # decay compares the first and the last of this many (overlapping) parts of the video


def _binary_pair(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as booleans (non-zero is foreground), with void pixels cleared. ValueError on a shape mismatch."""
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must be (H, W) masks of the same shape")
    if void is not None:
        void = np.asarray(void).astype(bool)
        if void.shape != gt.shape:
            raise ValueError(f"void {void.shape} must have the masks' shape {gt.shape}")
        pred, gt = pred & ~void, gt & ~void
    return pred, gt


def region_similarity(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> float:
    """J = |pred & gt| / |pred | gt| over the non-void pixels of two (H, W) masks; 1.0 when the union is empty."""
    pred, gt = _binary_pair(pred, gt, void)
    union = np.count_nonzero(pred | gt)
    if union == 0:  # nothing to find and nothing found: a perfect answer
        return 1.0
    return np.count_nonzero(pred & gt) / union


def seg_to_boundary(mask: np.ndarray) -> np.ndarray:
    """The (H, W) boolean boundary map of a mask: pixel (y, x) is on it when the mask differs between it and any of
    its east (y, x+1), south (y+1, x) or south-east (y+1, x+1) neighbours.

    Outside the frame a neighbour repeats the nearest pixel, so the frame's edge is no boundary: a mask touching the
    right or bottom edge has no boundary along it, and one covering the whole frame has none at all. The contour of
    a square at rows a..b, columns c..d (inside the frame) is the ring [a-1, b] x [c-1, d] minus [a, b-1] x [c, d-1].
    """
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask is (H, W), got shape {mask.shape}")
    padded = np.pad(mask, ((0, 1), (0, 1)), mode="edge")
    east, south, south_east = padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]
    return (mask != east) | (mask != south) | (mask != south_east)


def boundary_tolerance(shape: tuple[int, int], bound_th: float = BOUND_TH) -> int:
    """The matching radius r in pixels: bound_th itself when >= 1, else ceil(bound_th * sqrt(H^2 + W^2)).

    e.g. 10 x 10 -> ceil(0.113) = 1, 100 x 100 -> ceil(1.131) = 2, DAVIS's 480 x 854 -> ceil(7.835) = 8.
    """
    if bound_th >= 1:
        return int(bound_th)
    return math.ceil(bound_th * math.hypot(*shape))


def disk_footprint(radius: int) -> np.ndarray:
    """The (2r+1, 2r+1) boolean disk {(dy, dx): dy^2 + dx^2 <= r^2}: radius 1 is the 4-neighbour cross."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def _count_within(points: np.ndarray, targets: np.ndarray, footprint: np.ndarray) -> int:
    """How many True pixels of `points` lie inside `targets` dilated by `footprint`.

    Only pixels near a target can match, and every one of them lies in the bounding box of both maps, so dilating
    that crop alone (nothing outside it to spread in) gives the same count at a fraction of the full frame's cost.
    """
    rows, cols = np.nonzero(points | targets)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    reached = ndimage.binary_dilation(targets[box], structure=footprint)
    return int(np.count_nonzero(points[box] & reached))


def boundary_f_measure(
    pred: np.ndarray, gt: np.ndarray, bound_th: float = BOUND_TH, void: np.ndarray | None = None
) -> float:
    """F = 2 P R / (P + R) of the boundaries of two (H, W) masks matched within `boundary_tolerance` (module doc).

    Void pixels are cleared from both masks before their boundaries are taken.
    """
    pred, gt = _binary_pair(pred, gt, void)
    pred_boundary, gt_boundary = seg_to_boundary(pred), seg_to_boundary(gt)
    n_pred, n_gt = np.count_nonzero(pred_boundary), np.count_nonzero(gt_boundary)
    if n_pred == 0 or n_gt == 0:
        # both empty: P = R = 1, F = 1; one empty: (P, R) = (1, 0) or (0, 1), F = 0
        return 1.0 if n_pred == n_gt else 0.0
    footprint = disk_footprint(boundary_tolerance(gt.shape, bound_th))
    precision = _count_within(pred_boundary, gt_boundary, footprint) / n_pred
    recall = _count_within(gt_boundary, pred_boundary, footprint) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def frame_statistics(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Mean, recall and decay of one object's per-frame scores v_0 .. v_{T-1} (T >= 1).

    recall = mean(v_t > 0.5). decay = mean(first part) - mean(last part) with the parts' bounds
    i_b = round(1 + b (T - 1) / 4) - 1 for b = 0..4, part b = v[i_b .. i_{b+1}] (both ends included, so neighbouring
    parts share a frame); e.g. T = 2: bounds 0, 0, 1, 1, 1, decay = v_0 - v_1; T = 1: decay = 0.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"need a non-empty 1-D array of per-frame scores, got shape {values.shape}")
    # the tiny offset rounds halves up (numpy rounds them to even), as the reference does
    bounds = (np.round(np.linspace(1, values.size, DECAY_BINS + 1) + 1e-10) - 1).astype(np.int64)
    first, last = values[bounds[0] : bounds[1] + 1], values[bounds[-2] : bounds[-1] + 1]
    return {
        "mean": float(values.mean()),
        "recall": float(np.mean(values > RECALL_THRESHOLD)),
        "decay": float(first.mean() - last.mean()),
    }


def _read_frame(path: Path, what: str, video: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"video {video!r}, frame {path.stem!r}: no {what} PNG {path}")
    return read_label_map(path)


def evaluate_video(
    gt_video_dir: str | Path, pred_video_dir: str | Path, bound_th: float = BOUND_TH
) -> dict[int, dict[str, np.ndarray]]:
    """Per-frame scores of one video: {object id: {"J": (T,), "F": (T,)}} over its T scored frames (all ground-truth
    frames but the first and the last; module doc). DataError on a missing or unreadable PNG, a prediction whose size
    differs from its ground truth's, a predicted id above the first frame's largest, or fewer than 3 frames."""
    gt_video_dir, pred_video_dir = Path(gt_video_dir), Path(pred_video_dir)
    video = gt_video_dir.name
    frames = sorted(path.name for path in gt_video_dir.glob("*.png"))
    if len(frames) < 3:
        raise DataError(
            f"video {video!r}: {len(frames)} ground-truth PNG(s) in {gt_video_dir}; at least 3 are needed, since the "
            "first and the last frame are not scored"
        )
    if not pred_video_dir.is_dir():
        raise DataError(f"video {video!r}: no predictions folder {pred_video_dir}")
    first = read_label_map(gt_video_dir / frames[0])
    num_objects = int(np.max(np.where(first == VOID_ID, 0, first)))
    scores: dict[int, dict[str, list[float]]] = {k: {"J": [], "F": []} for k in range(1, num_objects + 1)}
    for name in frames[1:-1]:
        gt = read_label_map(gt_video_dir / name)
        pred = _read_frame(pred_video_dir / name, "prediction", video)
        if pred.shape != gt.shape:
            raise DataError(
                f"{pred_video_dir / name}: prediction is {pred.shape[1]}x{pred.shape[0]} (W x H) but its ground truth "
                f"{gt_video_dir / name} is {gt.shape[1]}x{gt.shape[0]}"
            )
        if pred.max() > num_objects:
            raise DataError(
                f"{pred_video_dir / name}: object id {int(pred.max())} is not in the video: the first ground-truth "
                f"frame {gt_video_dir / frames[0]} has objects 1..{num_objects}"
            )
        for k, per_frame in scores.items():
            pred_k, gt_k = pred == k, gt == k
            per_frame["J"].append(region_similarity(pred_k, gt_k))
            per_frame["F"].append(boundary_f_measure(pred_k, gt_k, bound_th))
    return {k: {name: np.asarray(values) for name, values in per_frame.items()} for k, per_frame in scores.items()}


def _video_names(gt_dir: Path, videos: Sequence[str] | None) -> list[str]:
    """The videos to score: the given ones (each must be a ground-truth folder), else every ground-truth folder."""
    if videos is None:
        names = sorted(path.name for path in gt_dir.iterdir() if path.is_dir())
        if not names:
            raise DataError(f"{gt_dir}: no video folders (expected <video>/<frame>.png)")
        return names
    names = list(videos)
    if not names:
        raise DataError("the list of videos to score is empty")
    missing = [name for name in names if not (gt_dir / name).is_dir()]
    if missing:
        raise DataError(f"{gt_dir}: no ground-truth folder for video(s) {', '.join(map(repr, missing))}")
    return names


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def evaluate_folders(
    gt_dir: str | Path,
    pred_dir: str | Path,
    videos: Sequence[str] | None = None,
    progress: bool = True,
    bound_th: float = BOUND_TH,
) -> dict[str, Any]:
    """Score the predicted label maps PRED_DIR/<video>/<frame>.png against GT_DIR/<video>/<frame>.png.

    Returns {"J", "F", "J&F", "J_recall", "J_decay", "F_recall", "F_decay": means over all objects,
    "per_video": {video: {"J", "F", "J&F" (means over its objects; None without objects),
    "objects": {"<id>": {"J", "F", "J&F", "J_recall", "J_decay", "F_recall", "F_decay"}}}},
    "num_videos", "num_objects"}. Values are fractions in [0, 1] (decays in [-1, 1]).
    """
    from tqdm import tqdm

    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for folder, what in ((gt_dir, "ground-truth"), (pred_dir, "predictions")):
        if not folder.is_dir():
            raise DataError(f"{folder}: the {what} folder does not exist")
    names = _video_names(gt_dir, videos)
    per_video: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, float]] = []  # one per object of every video
    for video in tqdm(names, desc="vos-score", unit="video", disable=not progress):
        per_frame = evaluate_video(gt_dir / video, pred_dir / video, bound_th)
        objects: dict[str, dict[str, float]] = {}
        for k, measures in per_frame.items():
            row: dict[str, float] = {}
            for measure in ("J", "F"):
                stats = frame_statistics(measures[measure])
                row[measure] = stats["mean"]
                row |= {f"{measure}_recall": stats["recall"], f"{measure}_decay": stats["decay"]}
            row["J&F"] = (row["J"] + row["F"]) / 2
            objects[str(k)] = row
        rows.extend(objects.values())
        j, f = _mean([row["J"] for row in objects.values()]), _mean([row["F"] for row in objects.values()])
        per_video[video] = {
            "J": j,
            "F": f,
            "J&F": None if j is None else (j + f) / 2,
            "objects": objects,
        }
    if not rows:
        raise DataError(f"{gt_dir}: no objects to score: the first ground-truth frame of every video is empty")
    keys = ("J", "F", "J_recall", "J_decay", "F_recall", "F_decay")
    result: dict[str, Any] = {key: float(np.mean([row[key] for row in rows])) for key in keys}
    result["J&F"] = (result["J"] + result["F"]) / 2
    return result | {"per_video": per_video, "num_videos": len(names), "num_objects": len(rows)}
