"""Retention: what fine-tuning costs outside the user's categories (the `retention` block of the evaluate stage).

A model fine-tuned on a few categories can lose SAM 3's open vocabulary, e.g. fire on almost any phrase. The
evaluate stage measures it for the model and for its baseline, with the params.yaml `evaluate.retention_*` keys:

1. Negative prompts (`retention_prompts` P > 0). P phrases of the built-in bank (`pipeline.phrase_bank`) that are
   none of the split's categories, chosen once per evaluation with the evaluated model's text encoder and then
   scored for both models, so model and baseline answer the same pairs:
   - K = floor(P x retention_neighbours + 1/2) nearest neighbours of the categories: the bank ranked by
     s_j = max over categories c of cos(ê_j, ê_c) (`pipeline.negatives.BankRanker`, the negatives stage's `bank`
     ranking), highest first;
   - P - K drawn at random (numpy, seeded with retention_seed) from the rest of that ranking, kept in its order.
   Left out of both: a phrase naming a category (`pipeline.negatives.name_keys`: clean_text, plural / singular,
   a "(sense)"), and a near-duplicate, cos >= NEAR_DUPLICATE to a category (a synonym should be found, not
   rejected). Each (image, phrase) pair of the split is a negative pair, scored by the model's best detection
   score on it (`sam3.inference.best_scores_dataset`); the counts and formulas are `sam3.evaluation.retention`'s.
   A bank phrase may now and then be in an image all the same (a "ball" in a sports photo): rejection is a lower
   bound of what the model gets right.
2. Held-out concepts (`retention_dataset`, a COCO dataset folder): box AP (and mask AP in segmentation mode) on
   its `evaluate.split`, prompted with its own category names (`sam3.evaluation.ground_truth.score_predictions`).

The block: {"phrases": {"neighbours": [...], "random": [...]}, rejection, IL_MCC, IL_MCC_own, num_images,
num_phrases, num_pairs, num_rejected, threshold, counts, "dataset": {path, split, bbox_AP, ...}}; the
negative-prompt keys only with P > 0 (and a phrase left in the bank), "dataset" only with a retention dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sam3.errors import DataError

if TYPE_CHECKING:  # torch and the model load only when retention is measured
    from sam3.evaluation.retention import ImageLevelCounts
    from sam3.model import Sam3Detector

RETENTION_KEY = "retention"
DATASET_KEY = "dataset"
NEAR_DUPLICATE = 0.9  # cos to a category at or above which a phrase is a synonym (the negatives stage's default)
PARAM = "evaluate.retention_dataset"  # named in errors about the retention dataset


@dataclass(frozen=True)
class RetentionOptions:
    """params.yaml's evaluate.retention_* keys (checked by `pipeline.params.check_values`)."""

    prompts: int = 32  # negative phrases per evaluation; 0: no negative-prompt measurement
    neighbours: float = 0.5  # fraction of them that are the categories' nearest neighbours, the rest random
    seed: int = 0
    dataset: Path | None = None  # a COCO dataset folder of held-out concepts


@dataclass(frozen=True)
class RetentionPhrases:
    """The negative phrases of one evaluation: nearest neighbours of the categories first, then random ones."""

    neighbours: list[str]
    random: list[str]

    @property
    def all(self) -> list[str]:
        return self.neighbours + self.random

    def as_dict(self) -> dict[str, list[str]]:
        return {"neighbours": self.neighbours, "random": self.random}


def split_phrases(ranked: list[str], count: int, neighbours: float, seed: int) -> RetentionPhrases:
    """The first K = floor(count x neighbours + 1/2) of `ranked`, and count - K drawn (seeded) from the rest.

    Fewer when `ranked` is short: all of it at most. The random ones keep their order in `ranked`.
    """
    import numpy as np

    near = ranked[: min(math.floor(count * neighbours + 0.5), len(ranked))]
    rest = ranked[len(near) :]
    draw = min(count - len(near), len(rest))
    picked = sorted(np.random.default_rng(seed).choice(len(rest), size=draw, replace=False).tolist())
    return RetentionPhrases(neighbours=near, random=[rest[i] for i in picked])


def choose_phrases(detector: Sam3Detector, categories: list[str], options: RetentionOptions) -> RetentionPhrases:
    """The evaluation's negative phrases, ranked in `detector`'s text space (see the module docstring, 1)."""
    from pipeline.negatives import BankRanker
    from pipeline.phrase_bank import load_phrase_bank
    from sam3.text_similarity import PhraseEmbedder

    ranker = BankRanker(load_phrase_bank(), categories, PhraseEmbedder(detector))
    # every category "present": rank against all of them and leave out near-duplicates of any
    ranked = ranker.ranked(tuple(categories), NEAR_DUPLICATE)
    return split_phrases(ranked, options.prompts, options.neighbours, options.seed)


@dataclass(frozen=True)
class HeldOut:
    """The retention dataset: its folder and its split's ground truth in original image coordinates."""

    path: Path
    gt: dict[str, Any]


def read_held_out(dataset_dir: Path, split: str) -> HeldOut:
    """The retention dataset's split, read and checked; DataError naming the key and the path."""
    from sam3.evaluation.ground_truth import split_ground_truth

    try:
        return HeldOut(dataset_dir, split_ground_truth(dataset_dir, split))
    except DataError as err:
        raise DataError(f"{PARAM} = {dataset_dir}: not a COCO dataset with a {split!r} split: {err}") from None


def negative_prompt_metrics(
    detector: Sam3Detector,
    dataset_dir: Path,
    split: str,
    own: ImageLevelCounts,
    phrases: RetentionPhrases,
    prompt_chunk: int,
    batch_size: int,
    device: str,
) -> dict[str, Any]:
    """`retention_metrics` of `detector` on the split's images x `phrases`; `own` is the split's own
    `ImageLevelCounts` for the combined IL_MCC."""
    from sam3.evaluation.retention import retention_metrics
    from sam3.inference import best_scores_dataset

    _, best = best_scores_dataset(
        detector, dataset_dir, split, phrases.all, prompt_chunk, batch_size, device, desc="retention"
    )
    return {"phrases": phrases.as_dict(), **retention_metrics(best.numpy(), own)}


def held_out_metrics(
    held_out: HeldOut, predictions: list[dict[str, Any]], with_masks: bool, split: str
) -> dict[str, Any]:
    """The retention dataset's box (and mask) AP and SA-Co metrics, with where they come from."""
    from sam3.evaluation.ground_truth import score_predictions

    return {"path": str(held_out.path), "split": split, **score_predictions(held_out.gt, predictions, with_masks)}


# Rows of the Retention table: (label, where in the block, key); a row shows when the model's block has it.
TABLE_ROWS = (
    ("rejection of negative prompts", None, "rejection"),
    ("IL_MCC with negative prompts", None, "IL_MCC"),
    ("held-out bbox_AP", DATASET_KEY, "bbox_AP"),
    ("held-out bbox_AP50", DATASET_KEY, "bbox_AP50"),
    ("held-out segm_AP", DATASET_KEY, "segm_AP"),
    ("held-out segm_AP50", DATASET_KEY, "segm_AP50"),
)


def _part(block: dict[str, Any] | None, where: str | None) -> dict[str, Any]:
    """The block itself (where None) or its sub-dict `where`; {} when absent."""
    if block is None:
        return {}
    return block if where is None else block.get(where, {})


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _change(after: float | None, before: float | None) -> str:
    return "n/a" if after is None or before is None else f"{after - before:+.3f}"


def retention_table(model: dict[str, Any], baseline: dict[str, Any] | None, model_name: str, baseline_name: str) -> str:
    """Markdown "## Retention": one row per metric the model's block holds; baseline and change with a baseline."""
    lines = ["## Retention", "", _scope(model), ""]
    if baseline is None:
        lines += [f"| metric | model: {model_name} |", "|:--|--:|"]
    else:
        lines += [f"| metric | baseline: {baseline_name} | model: {model_name} | change |", "|:--|--:|--:|--:|"]
    for label, where, key in TABLE_ROWS:
        if key not in _part(model, where):
            continue
        after = _part(model, where)[key]
        if baseline is None:
            lines.append(f"| {label} | {_number(after)} |")
        else:
            before = _part(baseline, where).get(key)
            lines.append(f"| {label} | {_number(before)} | {_number(after)} | {_change(after, before)} |")
    return "\n".join(lines) + "\n"


def _scope(block: dict[str, Any]) -> str:
    """One sentence saying what the table's numbers are measured on."""
    parts = []
    if "num_pairs" in block:
        phrases = block["phrases"]
        parts.append(
            f"{block['num_phrases']} phrases outside the categories ({len(phrases['neighbours'])} nearest, "
            f"{len(phrases['random'])} random) on {block['num_images']} images: {block['num_pairs']} negative pairs, "
            f"rejected when the best score is <= {block['threshold']}"
        )
    if DATASET_KEY in block:
        parts.append(f"held-out concepts: {block[DATASET_KEY]['path']} ({block[DATASET_KEY]['split']})")
    return "; ".join(parts) + "."


def retention_line(block: dict[str, Any], iou_type: str) -> str:
    """One printed line, e.g. `retention: rejection 0.969 (992 of 1024 pairs) IL_MCC 0.412 | held-out bbox AP 0.3`."""
    parts = []
    if "num_pairs" in block:
        parts.append(
            f"rejection {_number(block['rejection'])} ({block['num_rejected']} of {block['num_pairs']} pairs) "
            f"IL_MCC {_number(block['IL_MCC'])}"
        )
    if DATASET_KEY in block:
        parts.append(f"held-out {iou_type} AP {_number(block[DATASET_KEY].get(f'{iou_type}_AP'))}")
    return "retention: " + " | ".join(parts)


def retention_summary(block: dict[str, Any], iou_type: str) -> dict[str, float | None]:
    """The run summary's retention numbers: retention_rejection (with negative prompts) and retention_AP (the held-out
    dataset's {iou_type}_AP, i.e. mask AP in segmentation mode), each only when measured."""
    out: dict[str, float | None] = {}
    if "rejection" in block:
        out["retention_rejection"] = block["rejection"]
    if DATASET_KEY in block:
        out["retention_AP"] = block[DATASET_KEY].get(f"{iou_type}_AP")
    return out
