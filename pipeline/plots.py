"""PNG figures a person opens without any tool: training curves, the PR curve, per-category AP, and a mosaic of test
images with the predictions beside the ground truth.

    training_figure(stats_jsonl, out)                  loss terms, learning rates, validation AP over steps
    pr_figure(curves, out)                             precision vs recall at IoU 0.5, one line per model
    per_category_figure(rows_by_model, out)            horizontal bars of AP per category, one bar per model
    mosaic_figure(images, out)                         rows of (ground truth | predictions) image pairs

matplotlib draws with its file-only backend (Agg), imported inside the functions so that importing this module
costs nothing. PNGs are written without a timestamp or software tag in their metadata (matplotlib otherwise writes
its version), atomically (beside, then renamed). Every function returns the path it wrote.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sam3.errors import DataError

TRAINING_PNG = "training.png"
PR_CURVE_PNG = "pr_curve.png"
PER_CATEGORY_PNG = "per_category_ap.png"
MOSAIC_PNG = "predictions.png"
DPI = 100
_LAYER_SUFFIX = "_"  # loss terms of auxiliary decoder layers end in _<layer>: loss_bbox_0 ... (the last has none)
_BOOKKEEPING = {"val/best", "val/since_best"}  # logged with validation for early stopping, not metrics to plot


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, out: Path) -> Path:
    """Write `figure` as a PNG at `out` atomically, without metadata that changes from run to run."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    _pyplot().close(figure)
    os.replace(tmp, out)
    return out


def read_stats(path: Path) -> list[dict[str, Any]]:
    """The records of a run's train_stats.jsonl (DataError naming the line when one is not JSON)."""
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not a JSON line ({err.msg}); the file is damaged") from None
    return records


def step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of optimiser steps (a loss; not validation, rollback or early-stop records)."""
    return [r for r in records if "loss" in r and "event" not in r]


def _is_final_layer_term(key: str) -> bool:
    """loss_bbox, loss_ce, ... of the last decoder layer (the auxiliary layers' end in _0, _1, ...)."""
    if not key.startswith("loss_"):
        return False
    head, _, tail = key.rpartition(_LAYER_SUFFIX)
    return not (tail.isdigit() and head.startswith("loss_"))


def training_figure(stats: Path, out: Path) -> Path:
    """Three panels over optimiser steps from a train_stats.jsonl: the total loss and the last decoder layer's loss
    terms (log scale: the terms differ by orders of magnitude), the learning rate of each parameter group, and the
    validation metrics when the run validated. Rollbacks of the divergence guard are marked on the loss panel."""
    plt = _pyplot()
    records = read_stats(stats)
    steps = step_records(records)
    validation = [r for r in records if any(k.startswith("val/") for k in r)]
    rollbacks = [r["step"] for r in records if r.get("event") == "rollback"]
    panels = 3 if validation else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4), constrained_layout=True)
    loss_axis, lr_axis = axes[0], axes[1]
    x = [r["step"] for r in steps]
    loss_axis.plot(x, [r["loss"] for r in steps], color="black", linewidth=2, label="loss (weighted sum)")
    terms = sorted({k for r in steps for k in r if _is_final_layer_term(k)})
    for term in terms:
        loss_axis.plot(x, [r.get(term, math.nan) for r in steps], linewidth=1, label=term)
    for step in rollbacks:
        loss_axis.axvline(step, color="red", linestyle=":", linewidth=1)
    loss_axis.set(title="training loss" + (" (red: guard rollbacks)" if rollbacks else ""), xlabel="step")
    if steps and all(r["loss"] > 0 for r in steps):
        loss_axis.set_yscale("log")
    loss_axis.legend(fontsize=7)
    for key in sorted({k for r in steps for k in r if k.startswith("lr/")}):
        lr_axis.plot(x, [r.get(key, math.nan) for r in steps], label=key.removeprefix("lr/"))
    lr_axis.set(title="learning rate", xlabel="step")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr_axis.legend(fontsize=7)
    if validation:
        val_axis = axes[2]
        metrics = {k for r in validation for k in r if k.startswith("val/")} - _BOOKKEEPING
        for key in sorted(metrics):
            points = [(r["step"], r[key]) for r in validation if r.get(key) is not None]
            val_axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key.removeprefix("val/"))
        val_axis.set(title="validation (valid split)", xlabel="step", ylim=(0, 1))
        val_axis.legend(fontsize=7)
    if not steps:
        loss_axis.text(0.5, 0.5, "no step logged yet", ha="center", transform=loss_axis.transAxes)
    return _save(figure, out)


def pr_figure(curves: Mapping[str, Sequence[Mapping[str, float]]], out: Path, title: str) -> Path:
    """Precision against recall, one line per model (`curves`: {label: rows {recall, precision}}); a model with no
    detection at some recall has no precision there (the line stops)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 4.5), constrained_layout=True)
    for label, rows in curves.items():
        points = [(r["recall"], r["precision"]) for r in rows if r.get("precision") is not None]
        axis.plot([p[0] for p in points], [p[1] for p in points], label=label)
    axis.set(title=title, xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, out)


def per_category_figure(rows: Mapping[str, Sequence[Mapping[str, Any]]], out: Path, title: str) -> Path:
    """Horizontal bars of AP per category, one bar per model (`rows`: {label: rows {category, AP}}), categories in
    the order of the first model's AP (best on top)."""
    plt = _pyplot()
    labels = list(rows)
    values = {label: {r["category"]: r["AP"] for r in rows[label]} for label in labels}
    order = sorted(values[labels[0]], key=lambda name: (values[labels[0]][name], name)) if labels else []
    height = 0.8 / max(1, len(labels))
    figure, axis = plt.subplots(figsize=(6.5, 1.2 + 0.32 * max(1, len(order)) * max(1, len(labels))))
    for k, label in enumerate(labels):
        positions = [i + (k - (len(labels) - 1) / 2) * height for i in range(len(order))]
        axis.barh(positions, [values[label].get(name, 0.0) for name in order], height=height, label=label)
    axis.set_yticks(range(len(order)), order)
    axis.set(title=title, xlabel="AP (IoU 0.50:0.95)", xlim=(0, 1))
    axis.legend(loc="lower right")
    figure.tight_layout()
    return _save(figure, out)


@dataclass(frozen=True)
class MosaicRow:
    """One test image drawn twice: with its ground truth and with the model's predictions (same size)."""

    name: str
    truth: Image.Image
    predicted: Image.Image


def mosaic_figure(rows: Sequence[MosaicRow], out: Path, title: str) -> Path:
    """A grid with one row per image: ground truth on the left, predictions on the right."""
    plt = _pyplot()
    count = max(1, len(rows))
    figure, axes = plt.subplots(count, 2, figsize=(10, 4.6 * count), squeeze=False, constrained_layout=True)
    figure.suptitle(title)
    for k, row in enumerate(rows):
        for axis, image, label in ((axes[k][0], row.truth, "ground truth"), (axes[k][1], row.predicted, "predicted")):
            axis.imshow(image)
            axis.set_title(f"{row.name}: {label}", fontsize=9)
            axis.axis("off")
    if not rows:
        for axis in axes[0]:
            axis.axis("off")
        axes[0][0].text(0.5, 0.5, "no test images", ha="center")
    return _save(figure, out)
