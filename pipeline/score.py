"""Stage `score`: a GT file and a COCO results file in, metrics.json (box/mask AP, cgF1, IL_MCC, pmF1) out.

    python -m pipeline score --gt GT.json --predictions PRED.json --out metrics.json [--iou-type bbox|segm]
        [--pr-curve pr.json] [--per-category per_category.json]

Model-free: it scores predictions made elsewhere (the evaluate stage, or any other model), against a standard COCO
file or an SA-Co benchmark file (see `sam3.evaluation.scoring`). Every JSON file is written with indent 2 and
sorted keys, so reruns on the same inputs are byte-identical and `dvc metrics diff` shows only real changes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sam3.io import write_json  # the library's atomic writer (indent 2, sorted keys, no NaN)

MAIN_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75")
SACO_KEYS: tuple[str, ...] = ("cgF1", "cgF1_50", "IL_MCC", "pmF1", "pmF1_50")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", required=True, type=Path, help="ground truth: COCO json, or SA-Co benchmark json")
    parser.add_argument("--predictions", required=True, type=Path, help="COCO results list (json)")
    parser.add_argument("--out", required=True, type=Path, help="metrics file to write (json)")
    parser.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox", help="box or mask IoU (default bbox)")
    parser.add_argument("--pr-curve", type=Path, help="also write the PR curve at IoU 0.5 here (json, for dvc plots)")
    parser.add_argument("--per-category", type=Path, help="also write per-category AP rows here (json, for dvc plots)")


def _number(value: float | None, scale: str) -> str:
    return "n/a" if value is None else format(value, scale)


def summary_line(metrics: dict[str, Any], iou_type: str) -> str:
    """One line with the main numbers, e.g. `bbox AP 0.512 AP50 0.801 AP75 0.533 | cgF1 41.20 ...`."""
    ap = " ".join(f"{key} {_number(metrics[f'{iou_type}_{key}'], '.3f')}" for key in MAIN_KEYS)
    saco = " ".join(f"{key} {_number(metrics[key], '.2f' if key.startswith('cgF1') else '.3f')}" for key in SACO_KEYS)
    pairs = (
        f"pairs {metrics['num_pairs']} (positive {metrics['num_positive_pairs']}, "
        f"skipped {metrics['num_skipped_pairs']})"
    )
    return f"{iou_type} {ap} | {saco} | {pairs}"


def run(args: argparse.Namespace) -> int:
    from sam3.evaluation import per_category_rows, pr_curve, score

    metrics = score(args.gt, args.predictions, args.iou_type)
    write_json(args.out, metrics)
    if args.pr_curve is not None:
        write_json(args.pr_curve, pr_curve(args.gt, args.predictions, args.iou_type))
    if args.per_category is not None:
        write_json(args.per_category, per_category_rows(metrics))
    print(summary_line(metrics, args.iou_type))
    print(f"wrote {args.out}")
    return 0
