"""The figures of the vos-evaluate stage: J&F per video (fine-tuned beside the starting model) and frame strips
(frames with the ground truth above and the prediction below, objects in their palette colours).

    per_video_figure(per_video_by_model, out)    horizontal bars of J&F per video, one bar per model
    frame_strip(frames, gt_maps, pred_maps, out) one PNG per video: a row of ground-truth overlays over a row of
                                                 prediction overlays, at up to `columns` evenly spaced frames
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.plots import _pyplot, _save
from sam3.video.palette import PALETTE

PER_VIDEO_PNG = "per_video_jf.png"
STRIPS_FOLDER = "strips"
ALPHA = 0.55  # how much of an object's colour covers its pixels in an overlay


def per_video_figure(per_video: Mapping[str, Mapping[str, Mapping[str, Any]]], out: Path, title: str) -> Path:
    """Bars of J&F per video; `per_video` maps a model name to its scores' "per_video" block (video -> {"J&F"})."""
    plt = _pyplot()
    models = list(per_video)
    videos = sorted({video for block in per_video.values() for video in block})
    height = max(2.5, 0.32 * len(videos) * max(1, len(models)) + 1.2)
    figure, axes = plt.subplots(figsize=(7, height))
    bar = 0.8 / max(1, len(models))
    positions = np.arange(len(videos))
    for index, model in enumerate(models):
        values = [float(per_video[model].get(video, {}).get("J&F", 0.0)) for video in videos]
        axes.barh(positions + index * bar, values, height=bar, label=model)
    axes.set_yticks(positions + bar * (len(models) - 1) / 2, videos)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("J&F")
    axes.set_title(title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    return _save(figure, out)


def overlay(frame: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: `frame` with each object's pixels blended toward its palette colour (background kept)."""
    colours = np.asarray(PALETTE, dtype=np.float32).reshape(256, 3)
    tinted = frame.astype(np.float32)
    objects = label_map > 0
    tinted[objects] = (1 - ALPHA) * tinted[objects] + ALPHA * colours[label_map[objects]]
    return tinted.round().clip(0, 255).astype(np.uint8)


def frame_strip(
    frames: Sequence[np.ndarray],
    gt_maps: Sequence[np.ndarray],
    pred_maps: Sequence[np.ndarray],
    out: Path,
    columns: int = 6,
) -> Path:
    """A PNG of two rows: ground truth over prediction, at up to `columns` evenly spaced frames of one video."""
    count = len(frames)
    shown = min(columns, count)
    picks = sorted({round(i * (count - 1) / max(1, shown - 1)) for i in range(shown)})
    top = np.concatenate([overlay(frames[i], gt_maps[i]) for i in picks], axis=1)
    bottom = np.concatenate([overlay(frames[i], pred_maps[i]) for i in picks], axis=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([top, bottom], axis=0)).save(out)
    return out
