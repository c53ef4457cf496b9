"""Stage `evaluate`: a model and a dataset split in; predictions, metrics.json, plot data, a before/after table out.

    python -m pipeline evaluate --model DIR_OR_tiny --dataset DIR --out metrics.json [--predictions OUT.json]
        [--plots-dir DIR] [--summary summary.json] [--train-stats train_stats.jsonl] [--gt-original FILE_OR_DIR]
        [--batch-size N] [--device auto|cpu|cuda] [--params FILE] [--set section.key=value ...]

Settings: params.yaml's `evaluate` section (split, baseline, prompt_chunk, max_dets, retention_*) and model.mode /
model.image_size; `--split`, `--mode`, `--baseline`, `--prompt-chunk`, `--max-dets`, `--image-size` are short for the
matching `--set`. `evaluate.baseline: null` evaluates no baseline.

1. Inference (`sam3.inference.predict_dataset`): prompts = the split's category names; top `--max-dets` detections
   per image across prompts; boxes (and masks) in ORIGINAL image coordinates. Saved as a COCO results file
   (`--predictions`, default predictions.json next to metrics.json).
2. Ground truth in the same coordinates. A split that was not preprocessed is used as it is. On a preprocessed
   split (image records carry orig_width / orig_height) the annotations are scaled back with
   `sam3.resize.scale_annotation`: boxes and polygons exactly, RLE masks by resampling (so mask AP is then measured
   against a resampled copy of the masks). `--gt-original FILE` scores against the annotation file from before
   preprocessing instead (e.g. data/clean/<name>/test/_annotations.coco.json): exact masks; its image ids, sizes
   and categories must match the split's, or it is an error.
3. Metrics (`sam3.evaluation.score`): bbox_AP, bbox_AP50, bbox_AP75, bbox_APs/m/l and bbox_AP_per_category; in
   segmentation mode also the segm_* keys; SA-Co cgF1, cgF1_50, IL_MCC, pmF1, pmF1_50 (on masks in segmentation
   mode, on boxes otherwise), num_pairs, num_positive_pairs, num_images, num_predictions.
4. `--plots-dir DIR`: per_category_ap.json (rows category, iou_type, AP) and pr_curve.json (rows recall, precision
   at IoU 0.5, masks in segmentation mode) for `dvc plots`, and PNGs to open directly (`pipeline.eval_plots`):
   pr_curve.png and per_category_ap.png (the model and its baseline side by side), predictions.png (the first test
   images: ground truth beside the model's detections).
5. `--baseline SOURCE` (the model before fine-tuning: "tiny", a facebook/sam3 folder ...): evaluated the same way;
   its metrics go under "baseline" in metrics.json, and report.md holds a before/after table, which is also printed.
6. report.md next to metrics.json: the table (before/after, or the model's alone), the Retention table (step 7)
   and links to the PNGs. `--summary FILE`: the handful of numbers compared across runs (`eval_plots.summary`:
   box/mask AP and AP50, cgF1, IL_MCC, pmF1, the baseline's AP, retention_rejection and retention_AP, and from
   `--train-stats` the run's steps and final loss); DVC shows it as the run's metrics, while metrics.json keeps every
   detail (per category, per area).
7. Retention (`pipeline.retention`, counted by `sam3.evaluation.retention`): what fine-tuning costs outside the
   split's categories, for the model and for its baseline, under "retention" in metrics.json (and under
   "baseline" -> "retention"), as report.md's "Retention" table (metric, baseline, model, change) and one printed
   line per model. `evaluate.retention_prompts` P phrases of the phrase bank that name no category of the split
   (a share `retention_neighbours` nearest to the categories in the evaluated model's text space, the rest drawn
   with `retention_seed`; the same phrases for both models) are asked on every image of the split; each of the
   I x P pairs is a negative pair, scored by the model's best detection score (presence x query score):
       rejection = #(best <= 0.5) / (I P)                         keys: rejection, num_rejected, num_pairs
       IL_MCC    = image-level MCC over the split's own I x C pairs (counted as step 3 counts them) plus the I x P
                   negative pairs (a phrase fired on is a false positive)       keys: IL_MCC, IL_MCC_own, counts
   with phrases {neighbours, random}, num_images, num_phrases and threshold beside them. `evaluate.retention_dataset`
   (a COCO dataset folder of held-out concepts, or null) adds "dataset": its box AP (and mask AP in segmentation
   mode) and SA-Co metrics on its `evaluate.split`, prompted with its own category names. A missing folder or split
   is an error naming the key, before any model loads. `retention_prompts: 0` leaves out the negative prompts; with
   no retention dataset either, there is no "retention" key.

Every model is loaded before any inference runs, so a wrong folder fails at once. JSON files are written with
sorted keys and indent 2 (`sam3.io.write_json`, atomic): reruns on CPU give byte-identical files.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.params import EvaluateParams
from pipeline.retention import (
    DATASET_KEY,
    RETENTION_KEY,
    HeldOut,
    RetentionOptions,
    RetentionPhrases,
    choose_phrases,
    held_out_metrics,
    negative_prompt_metrics,
    read_held_out,
    retention_line,
    retention_table,
)
from pipeline.score import summary_line
from pipeline.stage_args import Shorthand, add_params_arguments, stage_params
from sam3.coco import split_annotation_path
from sam3.coco_split import CocoSplit
from sam3.errors import DataError
from sam3.evaluation.ground_truth import (
    score_predictions,
    split_ground_truth,
)
from sam3.io import write_json, write_text
from sam3.resize import original_size

log = logging.getLogger(__name__)

MODES = ("detection", "segmentation")
PREDICTIONS_FILE = "predictions.json"
REPORT_FILE = "report.md"
PER_CATEGORY_PLOT = "per_category_ap.json"
PR_CURVE_PLOT = "pr_curve.json"
BASELINE_KEY = "baseline"
# Rows of the before/after table, in order; segm_* rows appear in segmentation mode only.
TABLE_KEYS = (
    "bbox_AP",
    "bbox_AP50",
    "bbox_AP75",
    "segm_AP",
    "segm_AP50",
    "segm_AP75",
    "cgF1",
    "cgF1_50",
    "IL_MCC",
    "pmF1",
    "pmF1_50",
)


@dataclass(frozen=True)
class EvalOptions:
    """How inference runs; the same for the model and its baseline."""

    with_masks: bool
    prompt_chunk: int
    max_dets: int
    batch_size: int
    device: str  # auto | cpu | cuda
    image_size: int | None  # None: the model's own input size


SHORTHANDS = (
    Shorthand("--split", "evaluate.split", help="split to evaluate"),
    Shorthand("--mode", "model.mode", help="detection | segmentation (adds masks and mask AP)"),
    Shorthand("--baseline", "evaluate.baseline", help="also evaluate this model (e.g. before fine-tuning) and compare"),
    Shorthand("--prompt-chunk", "evaluate.prompt_chunk", int, help="prompts per decoder call; lower it on OOM"),
    Shorthand("--max-dets", "evaluate.max_dets", int, help="detections kept per image, across prompts"),
    Shorthand("--image-size", "model.image_size", int, help="model input size (default: the model's own)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sam3.config import DEVICE_CHOICES

    parser.add_argument("--model", required=True, help="'tiny', 'full' or a model folder (transformers format)")
    parser.add_argument("--dataset", required=True, type=Path, help="dataset folder (Roboflow COCO layout)")
    parser.add_argument("--out", required=True, type=Path, help="metrics file to write (json)")
    parser.add_argument(
        "--predictions", type=Path, help=f"COCO results file to write (default: {PREDICTIONS_FILE} next to --out)"
    )
    parser.add_argument(
        "--plots-dir", type=Path, help=f"write {PER_CATEGORY_PLOT}, {PR_CURVE_PLOT} and the PNG figures here"
    )
    parser.add_argument("--summary", type=Path, help="write the run's few headline metrics here (json)")
    parser.add_argument("--train-stats", type=Path, help="the run's train_stats.jsonl, for the summary's figures")
    parser.add_argument(
        "--gt-original",
        type=Path,
        help="score against this annotation file from before preprocessing (exact masks), or the same split's file "
        "of this dataset folder (the clean copy), instead of scaling the split's annotations back to the original size",
    )
    parser.add_argument(
        "--batch-size", type=int, default=1, help="images per vision-encoder call (default: %(default)s)"
    )
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto (default): CUDA when available")
    add_params_arguments(parser, SHORTHANDS)


def check_original(original: CocoSplit, split_gt: CocoSplit, source: Path) -> None:
    """DataError unless `original` has the split's image ids with its original sizes, and the same categories."""
    for image in split_gt.images.values():
        other = original.images.get(image["id"])
        if other is None:
            raise DataError(
                f"{source}: image id {image['id']} ({image.get('file_name')}) of the split is missing; "
                "--gt-original must be the same split before preprocessing"
            )
        expected = original_size(image)
        if (other.get("width"), other.get("height")) != expected:
            raise DataError(
                f"{source}: image id {image['id']} is {other.get('width')}x{other.get('height')} but the split "
                f"records its original size as {expected[0]}x{expected[1]}; --gt-original must be the file the "
                "split was preprocessed from"
            )
    extra = len(original.images) - len(split_gt.images)
    if extra > 0:
        raise DataError(f"{source}: {extra} images that the split does not have; give the same split's file")
    if original.categories != split_gt.categories:
        raise DataError(f"{source}: categories differ from the split's; predictions use the split's category ids")


def ground_truth(dataset_dir: Path, split: str, gt_original: Path | None = None) -> dict[str, Any]:
    """The split's GT in original image coordinates (see the module docstring, step 2); both files are checked and
    indexed by `CocoSplit`."""
    if gt_original is None:
        return split_ground_truth(dataset_dir, split)
    split_gt = CocoSplit.read(dataset_dir, split)
    if gt_original.is_dir():  # the dataset before preprocessing: its file of the same split
        gt_original = split_annotation_path(gt_original, split)
    original = CocoSplit.load(gt_original)
    check_original(original, split_gt, gt_original)
    return original.data


def run_inference(
    detector: Any, dataset_dir: Path, split: str, options: EvalOptions, desc: str = "inference"
) -> list[dict[str, Any]]:
    from sam3.inference import predict_dataset

    return predict_dataset(
        detector,
        dataset_dir,
        split,
        with_masks=options.with_masks,
        prompt_chunk=options.prompt_chunk,
        max_dets=options.max_dets,
        batch_size=options.batch_size,
        device=options.device,
        desc=desc,
    )


def held_out_split(dataset_dir: Path, split: str, with_masks: bool) -> HeldOut:
    """evaluate.retention_dataset's split, checked before any model loads (masks too in segmentation mode)."""
    held_out = read_held_out(dataset_dir, split)
    if with_masks:
        check_masks(held_out.gt, split_annotation_path(dataset_dir, split))
    return held_out


def retention_phrases(detector: Any, gt: dict[str, Any], retention: RetentionOptions) -> RetentionPhrases | None:
    """The negative phrases of step 7 for the split's categories (id order), or None when none are asked or left."""
    if retention.prompts == 0:
        return None
    categories = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    phrases = choose_phrases(detector, categories, retention)
    if not phrases.all:
        log.warning("retention: every phrase of the bank names or nearly repeats a category; no negative prompts")
        return None
    return phrases


def measure_retention(
    detector: Any,
    dataset_dir: Path,
    split: str,
    gt: dict[str, Any],
    predictions: list[dict[str, Any]],
    phrases: RetentionPhrases | None,
    held_out: HeldOut | None,
    options: EvalOptions,
) -> dict[str, Any]:
    """One model's retention block (step 7): negative prompts on the split's images, AP on the held-out dataset."""
    from sam3.evaluation.retention import own_pair_counts

    block: dict[str, Any] = {}
    if phrases is not None:
        own = own_pair_counts(gt, predictions)  # the split's own pairs, as its IL_MCC counts them
        block.update(
            negative_prompt_metrics(
                detector, dataset_dir, split, own, phrases, options.prompt_chunk, options.batch_size, options.device
            )
        )
    if held_out is not None:
        held_predictions = run_inference(detector, held_out.path, split, options, desc="retention dataset")
        block[DATASET_KEY] = held_out_metrics(held_out, held_predictions, options.with_masks, split)
    return block


def _number(value: float | None, key: str) -> str:
    return "n/a" if value is None else f"{value:.2f}" if key.startswith("cgF1") else f"{value:.3f}"


def _change(after: float | None, before: float | None, key: str) -> str:
    if after is None or before is None:
        return "n/a"
    return f"{after - before:+.2f}" if key.startswith("cgF1") else f"{after - before:+.3f}"


def metrics_table(metrics: dict[str, Any], model_name: str, title: str) -> str:
    """Markdown: a heading `title`, then one row per TABLE_KEYS metric present (no baseline to compare with)."""
    lines = [f"## {title}", "", f"| metric | model: {model_name} |", "|:--|--:|"]
    lines += [f"| {key} | {_number(metrics[key], key)} |" for key in TABLE_KEYS if key in metrics]
    return "\n".join(lines) + "\n"


def figure_links(figures: list[Path], report_dir: Path) -> str:
    """Markdown image links to `figures`, relative to the report's folder."""
    import os

    lines = ["", "## Figures", ""]
    for figure in figures:
        relative = Path(os.path.relpath(figure, report_dir)).as_posix()
        lines.append(f"![{figure.stem.replace('_', ' ')}]({relative})")
    return "\n".join(lines) + "\n"


def comparison_table(
    metrics: dict[str, Any], baseline: dict[str, Any], model_name: str, baseline_name: str, title: str
) -> str:
    """Markdown: a heading `title`, then one row per TABLE_KEYS metric present: baseline, model, change."""
    lines = [
        f"## {title}",
        "",
        f"| metric | baseline: {baseline_name} | model: {model_name} | change |",
        "|:--|--:|--:|--:|",
    ]
    for key in TABLE_KEYS:
        if key in metrics:
            after, before = metrics[key], baseline.get(key)
            lines.append(f"| {key} | {_number(before, key)} | {_number(after, key)} | {_change(after, before, key)} |")
    return "\n".join(lines) + "\n"


@dataclass
class EvalResult:
    metrics: dict[str, Any]  # what metrics.json holds
    predictions_file: Path
    report: str  # report.md: the before/after table (or the model's metrics alone) and the figures' links
    figures: list[Path]  # the PNGs written (none without a plots folder)


def evaluate(
    model: str,
    dataset_dir: Path,
    split: str,
    out: Path,
    options: EvalOptions,
    predictions_file: Path | None = None,
    plots_dir: Path | None = None,
    baseline: str | None = None,
    gt_original: Path | None = None,
    summary_file: Path | None = None,
    train_stats: Path | None = None,
    retention: RetentionOptions | None = None,
) -> EvalResult:
    """Steps 1-7 of the module docstring; writes `out`, the predictions, the plot files, report.md and the summary.

    `retention` None measures no retention (step 7).
    """
    from pipeline.eval_plots import FINE_TUNED, ModelResult, summary, write_figures
    from sam3.evaluation import per_category_rows, pr_curve
    from sam3.model import load_model

    iou_type = "segm" if options.with_masks else "bbox"
    gt = ground_truth(dataset_dir, split, gt_original)  # a missing split fails before any model loads
    if options.with_masks:
        check_masks(gt, gt_original or split_annotation_path(dataset_dir, split))
    retention = retention or RetentionOptions(prompts=0)
    held_out = held_out_split(retention.dataset, split, options.with_masks) if retention.dataset else None
    detector = load_model(model, image_size=options.image_size)
    baseline_detector = load_model(baseline, image_size=options.image_size) if baseline else None

    predictions = run_inference(detector, dataset_dir, split, options)
    predictions_file = predictions_file or out.parent / PREDICTIONS_FILE
    write_json(predictions_file, predictions)
    metrics = score_predictions(gt, predictions, options.with_masks)
    # chosen in the evaluated model's text space, then asked of both models: the same pairs side by side
    phrases = retention_phrases(detector, gt, retention)
    measured = phrases is not None or held_out is not None  # else no retention key at all
    if measured:
        metrics[RETENTION_KEY] = measure_retention(
            detector, dataset_dir, split, gt, predictions, phrases, held_out, options
        )
    del detector  # frees its device memory before the baseline runs

    results = {FINE_TUNED: ModelResult(metrics, predictions)}
    if baseline_detector is not None:
        baseline_predictions = run_inference(baseline_detector, dataset_dir, split, options)
        metrics[BASELINE_KEY] = score_predictions(gt, baseline_predictions, options.with_masks)
        if measured:
            metrics[BASELINE_KEY][RETENTION_KEY] = measure_retention(
                baseline_detector, dataset_dir, split, gt, baseline_predictions, phrases, held_out, options
            )
        results[f"baseline: {baseline}"] = ModelResult(metrics[BASELINE_KEY], baseline_predictions)
        title = f"{dataset_dir} ({split}): {baseline} before, {model} after"
        report = comparison_table(metrics, metrics[BASELINE_KEY], model, baseline, title)
    else:
        report = metrics_table(metrics, model, f"{dataset_dir} ({split}): {model}")
    if RETENTION_KEY in metrics:
        baseline_block = metrics.get(BASELINE_KEY, {}).get(RETENTION_KEY)
        report += "\n" + retention_table(metrics[RETENTION_KEY], baseline_block, model, str(baseline))
    figures: list[Path] = []
    if plots_dir is not None:
        # one COCOeval per model for the PR curve: the JSON plot and the figure share it
        curves = {label: pr_curve(gt, result.predictions, iou_type) for label, result in results.items()}
        write_json(plots_dir / PER_CATEGORY_PLOT, per_category_rows(metrics))
        write_json(plots_dir / PR_CURVE_PLOT, curves[FINE_TUNED])
        images = _image_folder(dataset_dir, split, gt_original)
        figures = write_figures(plots_dir, gt, results, curves, images, iou_type)
        report += figure_links(figures, out.parent)
    write_text(out.parent / REPORT_FILE, report)
    write_json(out, metrics)
    if summary_file is not None:
        write_json(summary_file, summary(metrics, iou_type, train_stats, BASELINE_KEY))
    return EvalResult(metrics, predictions_file, report, figures)


def _image_folder(dataset_dir: Path, split: str, gt_original: Path | None) -> Path:
    """Where the images of the ground truth's records are: the original split's folder when scoring against it."""
    if gt_original is None:
        return dataset_dir / split
    return gt_original / split if gt_original.is_dir() else gt_original.parent


def check_masks(gt: dict[str, Any], source: Path) -> None:
    """DataError naming the first annotation without a mask: segmentation mode scores masks."""
    for ann in gt["annotations"]:
        if not ann.get("segmentation"):
            raise DataError(
                f"{source}: annotation {ann.get('id')} (image id {ann.get('image_id')}) has no segmentation, so mask "
                "AP cannot be scored; use --mode detection or add masks"
            )


def retention_options(evaluate_params: EvaluateParams) -> RetentionOptions:
    """Step 7's settings from params.yaml's evaluate section (`pipeline.params.EvaluateParams`)."""
    dataset = evaluate_params.retention_dataset
    return RetentionOptions(
        prompts=evaluate_params.retention_prompts,
        neighbours=evaluate_params.retention_neighbours,
        seed=evaluate_params.retention_seed,
        dataset=Path(dataset) if dataset is not None else None,
    )


def run(args: argparse.Namespace) -> int:
    params = stage_params(args, SHORTHANDS)
    if params.evaluate.threads is not None:
        import torch

        torch.set_num_threads(params.evaluate.threads)
    options = EvalOptions(
        with_masks=params.model.mode == "segmentation",
        prompt_chunk=params.evaluate.prompt_chunk,
        max_dets=params.evaluate.max_dets,
        batch_size=args.batch_size,
        device=args.device,
        image_size=params.model.image_size,
    )
    result = evaluate(
        args.model,
        args.dataset,
        params.evaluate.split,
        args.out,
        options,
        predictions_file=args.predictions,
        plots_dir=args.plots_dir,
        baseline=params.evaluate.baseline,
        gt_original=args.gt_original,
        summary_file=args.summary,
        train_stats=args.train_stats,
        retention=retention_options(params.evaluate),
    )
    iou_type = "segm" if options.with_masks else "bbox"
    print(summary_line(result.metrics, iou_type))
    if RETENTION_KEY in result.metrics:
        print(retention_line(result.metrics[RETENTION_KEY], iou_type))
    if BASELINE_KEY in result.metrics:
        print(f"baseline: {summary_line(result.metrics[BASELINE_KEY], iou_type)}")
        if RETENTION_KEY in result.metrics[BASELINE_KEY]:
            print(f"baseline {retention_line(result.metrics[BASELINE_KEY][RETENTION_KEY], iou_type)}")
    print(result.report, end="")
    written = [args.out, result.predictions_file, args.out.parent / REPORT_FILE, *result.figures]
    print("wrote " + ", ".join(str(path) for path in written + ([args.summary] if args.summary else [])))
    return 0
