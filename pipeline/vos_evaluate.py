"""`python -m pipeline vos-evaluate --model RUN/model --dataset ROOT --out DIR [--summary FILE] [--params FILE]`.

Semi-supervised VOS evaluation of a fine-tuned tracker on `vos.evaluate.split` of a MOSE-style root: each object's
ground-truth mask is given on the first frame where it appears, the model tracks it through the video (no clicks),
and the predictions (palette PNGs, DIR/predictions/<video>/<frame>.png) are scored with J, F and J&F as the DAVIS
2017 evaluation does (sam3.video.metrics). With `vos.evaluate.baseline` the starting model (`vos.model.source`) is
tracked and scored the same way, for the before / after table. Writes:

    DIR/metrics.json         {"model": scores, "baseline": scores}   (J, F, J&F, per_video)
    DIR/report.md            before / after table, per-video table, links to the figures
    DIR/plots/per_video_jf.png, DIR/plots/strips/<video>.png   (J&F per video; ground truth over prediction)
    SUMMARY (--summary)      the headline numbers (DVC metrics): J&F, J, F, the baseline's J&F, train loss, steps

Scores are computed at the preprocessed resolution (the frames the model saw), not the raw videos'.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.stage_args import add_params_arguments, stage_params
from sam3.config import DEVICE_CHOICES

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PREDICTIONS_FOLDER = "predictions"
BASELINE_PREDICTIONS_FOLDER = "baseline_predictions"
PLOTS_FOLDER = "plots"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the fine-tuned tracker folder (a vos-train run's model/)")
    parser.add_argument("--dataset", required=True, help="MOSE-style root (the preprocessed copy the run trained on)")
    parser.add_argument("--out", required=True, type=Path, help="folder for metrics.json, report.md, plots/")
    parser.add_argument("--summary", type=Path, help="headline numbers (JSON) for DVC metrics")
    parser.add_argument("--train-stats", type=Path, help="the run's train_stats.jsonl (train loss and steps)")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="auto: CUDA when there is one")
    add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from pipeline.vos_train import check_tracker_source
    from sam3.errors import DataError
    from sam3.inference import resolve_device
    from sam3.io import write_json, write_text

    params = stage_params(args)
    vos = params.vos
    split_dir = Path(args.dataset) / vos.evaluate.split
    if not (split_dir / "Annotations").is_dir():
        raise DataError(f"{split_dir}: no Annotations/ folder; vos.evaluate.split names a split of {args.dataset}")
    check_tracker_source(args.model, "--model")
    if vos.evaluate.threads is not None:
        torch.set_num_threads(vos.evaluate.threads)
    device = resolve_device(args.device)

    results = {"model": _track_and_score(args.model, vos, split_dir, args.out / PREDICTIONS_FOLDER, device)}
    if vos.evaluate.baseline:
        results["baseline"] = _track_and_score(
            vos.model.source, vos, split_dir, args.out / BASELINE_PREDICTIONS_FOLDER, device
        )
    write_json(args.out / METRICS_FILE, results)
    figures = _figures(results, split_dir, args.out, vos.evaluate.strips)
    write_text(args.out / REPORT_FILE, report(results, args.model, vos.model.source, figures, args.out))
    if args.summary:
        write_json(args.summary, summary(results, args.train_stats))
    for name, scores in results.items():
        print(f"{name:9s} J&F {scores['J&F']:.4f}  J {scores['J']:.4f}  F {scores['F']:.4f}")
    print(f"report: {args.out / REPORT_FILE}")
    return 0


def _track_and_score(source: str, vos: Any, split_dir: Path, out: Path, device: Any) -> dict[str, Any]:
    """Track every video of `split_dir` with the model at `source`, write its PNGs to `out`, return its scores."""
    import shutil

    from sam3.video.inference import predict_split
    from sam3.video.metrics import evaluate_folders
    from sam3.video.tracker import build_tracker

    model = build_tracker(source, vos.model.image_size).to(device).eval()
    if out.exists():  # a re-run starts clean: no PNG of an earlier run may be scored
        shutil.rmtree(out)
    log.info("tracking %s with %s", split_dir, source)
    predict_split(model, split_dir, out, device=device)
    return evaluate_folders(split_dir / "Annotations", out)


def _figures(results: dict[str, Any], split_dir: Path, out: Path, strips: int) -> list[Path]:
    """The per-video J&F bars and the frame strips of the `strips` lowest-scoring videos of the fine-tuned model."""
    import numpy as np
    from PIL import Image

    from pipeline.vos_plots import PER_VIDEO_PNG, STRIPS_FOLDER, frame_strip, per_video_figure
    from sam3.video.palette import read_label_map

    plots = out / PLOTS_FOLDER
    per_video = {name: scores["per_video"] for name, scores in results.items()}
    figures = [per_video_figure(per_video, plots / PER_VIDEO_PNG, "J&F per video")]
    ranked = sorted(results["model"]["per_video"].items(), key=lambda item: (item[1]["J&F"], item[0]))
    for video, _ in ranked[:strips]:
        gt_files = sorted((split_dir / "Annotations" / video).glob("*.png"))
        frames, gts, preds = [], [], []
        for gt_file in gt_files:
            frame_file = _frame_file(split_dir / "JPEGImages" / video, gt_file.stem)
            pred_file = out / PREDICTIONS_FOLDER / video / gt_file.name
            if frame_file is None or not pred_file.is_file():
                continue
            with Image.open(frame_file) as image:
                frames.append(np.asarray(image.convert("RGB")))
            gts.append(read_label_map(gt_file))
            preds.append(read_label_map(pred_file))
        if frames:
            figures.append(frame_strip(frames, gts, preds, plots / STRIPS_FOLDER / f"{video}.png"))
    return figures


def _frame_file(folder: Path, stem: str) -> Path | None:
    for suffix in (".jpg", ".jpeg", ".png"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def report(results: dict[str, Any], model: str, baseline: str, figures: list[Path], out: Path) -> str:
    """report.md: the before / after table, J&F per video, the figures."""
    names = list(results)
    header = "| | " + " | ".join(f"{name} ({model if name == 'model' else baseline})" for name in names) + " |"
    lines = ["# VOS evaluation (semi-supervised: first-frame masks, no clicks)", "", header]
    lines.append("|---|" + "---:|" * len(names))
    for key in ("J&F", "J", "F", "J_recall", "F_recall"):
        if key in results["model"]:
            lines.append(f"| {key} | " + " | ".join(f"{results[name][key]:.4f}" for name in names) + " |")
    lines.append(f"| videos | {results['model'].get('num_videos', len(results['model']['per_video']))} |")
    lines += ["", "## J&F per video", "", "| video | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for video in sorted(results["model"]["per_video"]):
        row = [f"{results[name]['per_video'].get(video, {}).get('J&F', float('nan')):.4f}" for name in names]
        lines.append(f"| {video} | " + " | ".join(row) + " |")
    lines += ["", "## Figures", ""]
    lines += [f"- [{path.name}]({path.relative_to(out).as_posix()})" for path in figures]
    return "\n".join(lines) + "\n"


def summary(results: dict[str, Any], train_stats: Path | None) -> dict[str, Any]:
    """The handful of numbers compared across runs (a path without the dataset's name: `dvc metrics diff`).

    The training's numbers are `vos_train_loss` and `vos_steps`, not the image summary's `train_loss` and `steps`:
    `dvc exp show` puts every metrics file's keys in one row of columns and names a key two files share after its
    file (`reports/summary.json:steps`), which `make exp`'s column list would miss."""
    model = results["model"]
    out: dict[str, Any] = {"J&F": model["J&F"], "J": model["J"], "F": model["F"]}
    if "baseline" in results:
        out["baseline_J&F"] = results["baseline"]["J&F"]
    if train_stats is not None and train_stats.is_file():
        records = [json.loads(line) for line in train_stats.read_text(encoding="utf-8").splitlines() if line.strip()]
        steps = [record for record in records if "loss" in record and "step" in record]
        if steps:
            out["vos_train_loss"] = steps[-1]["loss"]
            out["vos_steps"] = steps[-1]["step"]
    return out
