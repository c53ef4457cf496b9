"""Forgetting, measured: pretrain the tiny SAM 3 on one concept, fine-tune it on another three ways, and see what
each fine-tune keeps of the first.

    python -m bench.retention                                  # seeds 0 and 1: about 20 minutes on 2 CPU cores
    python -m bench.retention --seeds 0 --pretrain-minutes 2 --finetune-steps 100 --n-train 800
    python -m bench.retention --variants       # also full + retain, and LoRA + retain with concept A's names

Prints one JSON object (progress goes to stderr): per seed, for the pretrained model and after each fine-tune, box
AP and AP50 on held-out concept-A images with A's prompts and on held-out concept-B images with B's prompts, and
the negative-prompt rejection rates; `summary`: each method's metrics averaged over the seeds; the settings, the
wall time of every phase, the machine and the date.

Data (`pipeline.shapes_data`, 9 categories "<colour> <shape>"): concept A is circles and squares (6 categories),
concept B triangles (3). One generated dataset per seed is split into an A dataset and a B dataset in the same COCO
layout: each keeps the images holding at least one shape of its concept, with only that concept's categories and
annotations. The other concept's shapes stay in those images unlabelled, as background: what a user's new data looks
like (the old objects are in the pictures, nobody labels them), and a prompt must not fire on a shape of the other
concept. Both held-out (test) sets come from the same generated test split.

Phases, per seed:
1. Pretrain from scratch on A with `bench.learning`'s from-scratch recipe (its image size and warm-up; hidden-64
   tiny model with the scratch priors, one-to-many queries, drop-path 0.1 in the ViT, AdamW lr 1e-3 weight decay
   1e-4, warm-up then cosine over the steps the first 20 steps' pace predicts, clip 1.0, batch 8 with 3 random
   absent prompts per image, focal class loss, presence weight 5) for --pretrain-minutes.
2. Three fine-tunes on B from that model, each the same --finetune-steps steps over the same B images in the same
   order (the sampler and the samples are seeded by the seed), same loss and batch, warm-up over the first tenth
   of the steps then cosine to 0, clip 1.0:
     full         every parameter trains, AdamW lr 1e-4 (a tenth of the pretraining peak: the usual fine-tuning
                  step, large enough to move the model in a few hundred steps without wiping it at once)
     lora         LoRA rank 8, alpha 16 in the ViT attention and MLP, the DETR encoder and decoder
                  (`sam3.adapters`), train.freeze heads: the adapter weights at lr 1e-3 (ten times the full
                  fine-tune's: B starts at zero and the update is scaled by alpha / rank, so adapters need the larger
                  step, as usual for LoRA); what train.freeze heads leaves trainable outside the adapted layers
                  (the decoder's norms, query, box and presence heads, the dot-product scorer) trains in full at the
                  full fine-tune's 1e-4 (the same weights at the same rate in both methods); all else is frozen
     lora_retain  lora plus the retention regulariser (`sam3.retain`): 8 phrases per step from the phrase bank,
                  teacher = the same network with the adapter switched off, loss weight 1.0 (loss.retain_weight's
                  default). The bank loses every phrase naming a triangle (B, what is taught) and the negative
                  phrases the evaluation asks (below), so the rejection measured is on phrases retain never saw.
   and with --variants:
     full_retain    full plus the regulariser, the teacher a frozen copy of the pretrained model (sam3.retain's
                    rule without an adapter): the regulariser with a teacher that does not move
     lora_retain_a  lora_retain with concept A's six names as the retention prompts (their names, never their
                    labels): what a user who knows the old classes would do
   Weight decay 1e-4 (biases and norms 0) in every fine-tune, as in pretraining.
3. Measure every model (the pretrained one and each fine-tune):
     AP_A, AP50_A   box AP / AP50 (pycocotools via `sam3.evaluation.score`) on the held-out A images, prompts = A's
                    six names (`sam3.inference.predict_dataset`, as `bench.learning` measures)
     AP_B, AP50_B   the same on the held-out B images with B's three names
   and the rejection rates on the whole held-out split (A and B images together): the fraction of negative
   (image, phrase) pairs whose best detection score max_queries sigmoid(logit) x sigmoid(presence) stays at or
   below 0.5 (`sam3.evaluation.retention.rejection_rate`; scores from `sam3.inference.best_scores_dataset`):
     rejection_bank      20 phrases of the bank drawn once (seeded, the same for every seed and model) among those
                         without a colour or shape word; every pair is negative (no such object is ever drawn)
     rejection_absent_A  the A categories absent from each image ("green circle" on an image without one)
     rejection_absent_B  the B categories absent from each image
     rejection           all three sets of pairs together
   A model that never fires rejects everything, so the present pairs' side is reported too:
     recall_A, recall_B  fraction of (image, present category) pairs whose best score is above 0.5
   and, since a small model trained from scratch with the focal loss may score below 0.5 everywhere (every rate
   above then reads 1 or 0 whatever the model does), the threshold-free mean best score of each set of pairs:
     score_bank, score_absent_A, score_absent_B, score_present_A, score_present_B

Wall time is measured per phase (`seconds`): pretraining, each fine-tune's steps, each measurement. Note the methods
cost differently per step at equal steps (retain runs the teacher and 8 more prompts per image).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench.learning import IMAGE_SIZE, WARMUP
from pipeline.phrase_bank import load_phrase_bank
from pipeline.shapes_data import CATEGORY_NAMES, COLOURS, SHAPES, build_shapes_dataset
from sam3.adapters import adapter_summary, attach_adapter, set_adapter_trainable
from sam3.coco import SPLITS, load_coco, save_coco
from sam3.config import META_DROP_PATH, AdapterConfig, LossConfig, OptimConfig
from sam3.data import CocoPromptDataset, collate_prompts
from sam3.data.sampler import ResumableSampler
from sam3.drop_path import attach_drop_path
from sam3.engine import train_step
from sam3.evaluation import score
from sam3.evaluation.retention import rejection_rate
from sam3.evaluation.saco import SCORE_THRESHOLD
from sam3.freeze import apply_freeze
from sam3.inference import best_scores_dataset, predict_dataset
from sam3.losses import Criterion
from sam3.model import Sam3Detector, load_model
from sam3.optim import build_optimizer
from sam3.retain import RetainCriterion, RetainedDetector

CONCEPTS = {"A": ("circle", "square"), "B": ("triangle",)}
METHODS = ("full", "lora", "lora_retain")
A_VARIANT = "lora_retain_a"
VARIANTS = ("full_retain", A_VARIANT)
METRICS = (
    "AP_A",
    "AP50_A",
    "AP_B",
    "AP50_B",
    "rejection_bank",
    "rejection_absent_A",
    "rejection_absent_B",
    "rejection",
    "recall_A",
    "recall_B",
    "score_bank",
    "score_absent_A",
    "score_absent_B",
    "score_present_A",
    "score_present_B",
)
NEGATIVE_PHRASES = 20
NEGATIVE_SEED = 0  # the bank sample is the same for every seed: the seeds vary the data and the model, not the test
# a bank phrase holding one of these words is left out of the negative phrases: it could name what the images show
VISUAL_WORDS = (
    frozenset(COLOURS)
    | frozenset(SHAPES)
    | {
        *(f"{shape}s" for shape in SHAPES),
        "colour",
        "color",
        "shape",
        "round",
        "ball",
        "disk",
        "disc",
        "ring",
        "box",
        "block",
        "tile",
        "orange",
        "yellow",
        "purple",
        "pink",
        "white",
        "black",
        "grey",
        "gray",
        "brown",
    }
)
BATCH = 8
NUM_NEGATIVES = 3  # absent prompts per image, as bench.learning (B has only two absent categories: all of them)
WEIGHT_DECAY = 1e-4
PRETRAIN_LR = 1e-3
PRESENCE_WEIGHT = 5.0
LOG_EVERY = 100


@dataclass(frozen=True)
class FinetuneSettings:
    """What every fine-tune shares, and each method's rates (module docstring: why these)."""

    steps: int = 200
    lr_full: float = 1e-4  # every weight of the full fine-tune; the heads trained in full under LoRA
    lr_adapter: float = 1e-3  # the LoRA weights
    rank: int = 8
    alpha: float = 16.0
    parts: tuple[str, ...] = ("vision_attention", "vision_mlp", "detr_encoder", "detr_decoder")
    freeze: str = "heads"  # under LoRA: what trains in full besides the adapter (sam3.freeze)
    retain_prompts: int = 8  # train.retain_prompts' default
    retain_weight: float = 1.0  # loss.retain_weight's default

    @property
    def warmup(self) -> int:
        return max(1, self.steps // 10)


@dataclass(frozen=True)
class ConceptData:
    """The folders of one seed: the whole generated dataset, and its A and B datasets (same COCO layout)."""

    full: Path
    A: Path
    B: Path


# ---------------------------------------------------------------------------------------------------- data


def concept_category_ids(categories: Sequence[dict], shapes: Sequence[str]) -> set[int]:
    """Ids of the categories "<colour> <shape>" whose shape is one of `shapes`."""
    return {c["id"] for c in categories if c["name"].split(" ")[-1] in shapes}


def write_concept_split(source: Path, target: Path, split: str, shapes: Sequence[str]) -> int:
    """`source`'s split restricted to the concept of `shapes` (module docstring) under `target`; returns its images.

    Images are hard-linked when the file system allows (copied otherwise): the split is a view, not new data.
    """
    coco = load_coco(source / split / "_annotations.coco.json")
    keep_categories = concept_category_ids(coco["categories"], shapes)
    annotations = [a for a in coco["annotations"] if a["category_id"] in keep_categories]
    image_ids = {a["image_id"] for a in annotations}
    images = [image for image in coco["images"] if image["id"] in image_ids]
    (target / split).mkdir(parents=True, exist_ok=True)
    for image in images:
        src, dst = source / split / image["file_name"], target / split / image["file_name"]
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    filtered = {
        **coco,
        "images": images,
        "annotations": annotations,
        "categories": [c for c in coco["categories"] if c["id"] in keep_categories],
    }
    save_coco(target / split / "_annotations.coco.json", filtered)
    return len(images)


def build_concepts(root: Path, n_train: int, n_test: int, seed: int) -> tuple[ConceptData, dict[str, Any]]:
    """Generate the shapes dataset of `seed` under root/full, write its A and B datasets; return the image counts."""
    data = ConceptData(full=root / "full", A=root / "A", B=root / "B")
    build_shapes_dataset(data.full, n=n_train, seed=seed, image_size=IMAGE_SIZE, n_valid=1, n_test=n_test)
    counts: dict[str, Any] = {}
    for concept, shapes in CONCEPTS.items():
        counts[concept] = {
            split: write_concept_split(data.full, getattr(data, concept), split, shapes) for split in SPLITS
        }
        for split in ("train", "test"):
            if counts[concept][split] == 0:
                raise SystemExit(
                    f"seed {seed}: no {split} image holds a {' or '.join(shapes)}; raise --n-train/--n-test"
                )
    return data, counts


def negative_phrases(count: int = NEGATIVE_PHRASES, seed: int = NEGATIVE_SEED) -> list[str]:
    """`count` bank phrases without a colour or shape word, drawn once (seeded), in bank order."""
    pool = [p for p in load_phrase_bank() if not VISUAL_WORDS & set(re.findall(r"[a-z]+", p.lower()))]
    chosen = np.random.default_rng(seed).choice(len(pool), size=min(count, len(pool)), replace=False)
    return [pool[i] for i in sorted(chosen.tolist())]


def retain_phrases(held_out: Sequence[str]) -> list[str]:
    """The bank without any phrase naming a triangle (concept B, what the fine-tune teaches) nor the held-out
    negative phrases (so that the rejection measured is on phrases the regulariser never asked)."""
    taught = CONCEPTS["B"]
    excluded = {p.lower() for p in held_out}
    return [p for p in load_phrase_bank() if not any(s in p.lower() for s in taught) and p.lower() not in excluded]


# ---------------------------------------------------------------------------------------------------- training


def detection_criterion() -> Criterion:
    """bench.learning's from-scratch loss (focal class loss, presence weight 5), for pretraining and fine-tuning."""
    return Criterion(LossConfig(class_loss="focal", weight_presence=PRESENCE_WEIGHT))


def new_tiny(seed: int) -> Sam3Detector:
    """The tiny model as bench.learning builds it (scratch priors, one-to-many queries), in train mode."""
    return load_model("tiny", seed=seed, one_to_many=True).train()


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0 at `total` (bench.learning's schedule)."""
    warm = min(1.0, (step + 1) / warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - warmup) / max(1, total - warmup))))
    return warm * cosine


def train(
    model: torch.nn.Module,
    criterion,
    optimizer: torch.optim.Optimizer,
    dataset: CocoPromptDataset,
    *,
    seed: int,
    label: str,
    steps: int | None = None,
    budget_s: float | None = None,
    warmup: int = WARMUP,
) -> dict[str, Any]:
    """Train for `steps` steps, or for `budget_s` seconds with the schedule laid over the steps the first 20 steps'
    pace predicts (bench.learning's rule). Each group's rate is its `base_lr` times `lr_factor`. Returns
    {steps, seconds, loss (the mean of the last 20 steps)}."""
    sampler = ResumableSampler(len(dataset), seed=seed)
    total = steps or 10**9
    step, epoch, started = 0, 0, time.perf_counter()
    recent: list[float] = []

    def done(elapsed: float) -> bool:
        return step >= total if steps is not None else elapsed >= (budget_s or 0.0)

    while not done(time.perf_counter() - started):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for batch in DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=collate_prompts):
            elapsed = time.perf_counter() - started
            if done(elapsed):
                break
            if steps is None and step == 20:  # the first steps' pace sets the length of the cosine schedule
                total = max(warmup + 1, int(budget_s / (elapsed / 20)))
            factor = lr_factor(step, min(warmup, max(1, total // 2)), total)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            result = train_step(model, criterion, optimizer, [batch], device=torch.device("cpu"), grad_clip=1.0)
            step += 1
            recent = (recent + [result.mean_loss])[-20:]
            if step % LOG_EVERY == 0:
                terms = " ".join(f"{k}={float(v):.3f}" for k, v in result.terms.items() if not k[-1].isdigit())
                print(f"[{label}] step {step} {elapsed:.0f}s loss={result.mean_loss:.3f} {terms}", file=sys.stderr)
        epoch += 1
    return {"steps": step, "seconds": round(time.perf_counter() - started, 1), "loss": round(float(np.mean(recent)), 4)}


def pretrain(data: Path, seed: int, minutes: float, steps: int | None) -> tuple[Sam3Detector, dict[str, Any]]:
    """The tiny model trained from scratch on `data` (concept A) with bench.learning's recipe."""
    detector = new_tiny(seed)
    attach_drop_path(detector.model, META_DROP_PATH)
    dataset = CocoPromptDataset(
        data, "train", image_size=IMAGE_SIZE, train=False, seed=seed, num_negatives=NUM_NEGATIVES
    )
    # fused: one kernel for every parameter, as bench.learning and sam3.optim use (4x faster on the CPU)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=PRETRAIN_LR, weight_decay=WEIGHT_DECAY, fused=True)
    for group in optimizer.param_groups:
        group["base_lr"] = PRETRAIN_LR
    warmup = WARMUP if steps is None else max(1, min(WARMUP, steps // 10))
    run = train(
        detector,
        detection_criterion(),
        optimizer,
        dataset,
        seed=seed,
        label="pretrain A",
        steps=steps,
        budget_s=minutes * 60,
        warmup=warmup,
    )
    return detector, run


def start_from(state: dict[str, torch.Tensor], seed: int) -> Sam3Detector:
    """A fresh tiny detector holding the pretrained weights `state`, in train mode (no adapter, no drop-path yet)."""
    detector = new_tiny(seed)
    detector.model.load_state_dict(state)
    return detector


def finetune(
    method: str,
    state: dict[str, torch.Tensor],
    data: Path,
    seed: int,
    settings: FinetuneSettings,
    retain_pool: Sequence[str],
) -> tuple[Sam3Detector, dict[str, Any]]:
    """Fine-tune the pretrained weights on `data` (concept B) by `method` (module docstring)."""
    detector = start_from(state, seed)
    optim = OptimConfig(
        lr_detr=settings.lr_full,
        lr_vision=settings.lr_full,
        lr_text=settings.lr_full,
        layer_decay=1.0,
        weight_decay=WEIGHT_DECAY,
    )
    adapter = method.startswith("lora")
    if adapter:  # sam3.training.setup's order: adapter, then freeze, then the adapter's own trainable rule
        config = AdapterConfig(kind="lora", rank=settings.rank, alpha=settings.alpha, parts=list(settings.parts))
        torch.manual_seed(seed)  # the adapter's A matrices draw from the global generator: same for both LoRA runs
        attach_adapter(detector, config)
        apply_freeze(detector.model, settings.freeze)
        set_adapter_trainable(detector.model)
        print(f"[{method}] {adapter_summary(detector.model)}", file=sys.stderr)
    attach_drop_path(detector.model, META_DROP_PATH)  # the ViT trains in every method (in full or via the adapter)
    num_blocks = detector.config.vision_config.backbone_config.num_hidden_layers
    optimizer = build_optimizer(detector.model, optim, num_blocks, adapter_lr=settings.lr_adapter if adapter else None)
    criterion = detection_criterion()
    model: torch.nn.Module = detector
    if "retain" in method:
        # without an adapter the teacher is a frozen copy of the starting model (with one: the adapter switched off)
        reference = None if adapter else start_from(state, seed).requires_grad_(False).eval()
        model = RetainedDetector(detector, retain_pool, settings.retain_prompts, reference=reference)
        criterion = RetainCriterion(criterion, settings.retain_weight)
    dataset = CocoPromptDataset(
        data, "train", image_size=IMAGE_SIZE, train=False, seed=seed, num_negatives=NUM_NEGATIVES
    )
    torch.manual_seed(seed)  # drop-path and the retention draws: every method starts from the same global state
    run = train(
        model,
        criterion,
        optimizer,
        dataset,
        seed=seed,
        label=f"{method} B",
        steps=settings.steps,
        warmup=settings.warmup,
    )
    run["trainable_parameters"] = sum(p.numel() for p in detector.parameters() if p.requires_grad)
    run["lr"] = {group.get("component", "all"): group["base_lr"] for group in optimizer.param_groups}
    return detector, run


# ---------------------------------------------------------------------------------------------------- measuring


def box_ap(detector: Sam3Detector, dataset_dir: Path) -> tuple[float, float]:
    """(box AP, AP50) on the held-out split of `dataset_dir`, prompted with its category names."""
    predictions = predict_dataset(detector, dataset_dir, "test", device="cpu", desc=dataset_dir.name)
    metrics = score(dataset_dir / "test" / "_annotations.coco.json", predictions, "bbox")
    return float(metrics["bbox_AP"] or 0.0), float(metrics["bbox_AP50"] or 0.0)


def presence_matrix(dataset_dir: Path, image_ids: Sequence[int]) -> np.ndarray:
    """bool [I, 9]: whether image i (in `image_ids` order) holds a shape of category CATEGORY_NAMES[c]."""
    coco = load_coco(dataset_dir / "test" / "_annotations.coco.json")
    column = {c["id"]: CATEGORY_NAMES.index(c["name"]) for c in coco["categories"]}
    row = {image_id: i for i, image_id in enumerate(image_ids)}
    present = np.zeros((len(image_ids), len(CATEGORY_NAMES)), dtype=bool)
    for ann in coco["annotations"]:
        if not ann.get("iscrowd"):
            present[row[ann["image_id"]], column[ann["category_id"]]] = True
    return present


def measure(detector: Sam3Detector, data: ConceptData, negatives: Sequence[str]) -> dict[str, float]:
    """Every metric of the module docstring for one model, each in [0, 1]."""
    ap_a, ap50_a = box_ap(detector, data.A)
    ap_b, ap50_b = box_ap(detector, data.B)
    image_ids, best = best_scores_dataset(detector, data.full, "test", [*negatives, *CATEGORY_NAMES], device="cpu")
    scores = best.numpy()
    bank, categories = scores[:, : len(negatives)], scores[:, len(negatives) :]
    present = presence_matrix(data.full, image_ids)
    in_concept = {
        concept: np.array([name.split(" ")[-1] in shapes for name in CATEGORY_NAMES])
        for concept, shapes in CONCEPTS.items()
    }

    def pairs(mask: np.ndarray) -> np.ndarray:
        return categories[mask][None, :]  # [1, n]: rejection_rate counts over every entry

    absent = {c: ~present & in_concept[c][None, :] for c in CONCEPTS}
    positive = {c: present & in_concept[c][None, :] for c in CONCEPTS}
    everything = np.concatenate([bank.ravel(), categories[~present]])[None, :]
    return {
        "AP_A": ap_a,
        "AP50_A": ap50_a,
        "AP_B": ap_b,
        "AP50_B": ap50_b,
        "rejection_bank": rejection_rate(bank),
        "rejection_absent_A": rejection_rate(pairs(absent["A"])),
        "rejection_absent_B": rejection_rate(pairs(absent["B"])),
        "rejection": rejection_rate(everything),
        "recall_A": 1.0 - rejection_rate(pairs(positive["A"])),
        "recall_B": 1.0 - rejection_rate(pairs(positive["B"])),
        "score_bank": float(bank.mean()),
        **{f"score_absent_{c}": float(pairs(absent[c]).mean()) for c in CONCEPTS},
        **{f"score_present_{c}": float(pairs(positive[c]).mean()) for c in CONCEPTS},
    }


# ---------------------------------------------------------------------------------------------------- the run


def run_seed(
    seed: int,
    args: argparse.Namespace,
    settings: FinetuneSettings,
    negatives: Sequence[str],
    retain_pool: Sequence[str],
    methods: Sequence[str],
) -> dict[str, Any]:
    """Every phase of one seed: data, pretraining, the fine-tunes and their measurements."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="retention-") as tmp:
        started = time.perf_counter()
        data, counts = build_concepts(Path(tmp), args.n_train, args.n_test, seed)
        data_seconds = round(time.perf_counter() - started, 1)
        print(f"[seed {seed}] images {counts} ({data_seconds}s)", file=sys.stderr)

        detector, pretrain_run = pretrain(data.A, seed, args.pretrain_minutes, args.pretrain_steps)
        state = {k: v.detach().clone() for k, v in detector.model.state_dict().items()}
        results: dict[str, Any] = {"pretrained": {"train": pretrain_run, **timed_measure(detector, data, negatives)}}
        report(seed, "pretrained", results["pretrained"])
        for method in methods:
            pool = (
                [name for name in CATEGORY_NAMES if name.split(" ")[-1] in CONCEPTS["A"]]
                if method == A_VARIANT
                else retain_pool
            )
            tuned, run = finetune(method, state, data.B, seed, settings, pool)
            results[method] = {"train": run, **timed_measure(tuned, data, negatives)}
            report(seed, method, results[method])
    return {"seed": seed, "images": counts, "data_seconds": data_seconds, "methods": results}


def timed_measure(detector: Sam3Detector, data: ConceptData, negatives: Sequence[str]) -> dict[str, Any]:
    started = time.perf_counter()
    metrics = measure(detector, data, negatives)
    return {
        "metrics": {k: round(v, 4) for k, v in metrics.items()},
        "measure_seconds": round(time.perf_counter() - started, 1),
    }


def report(seed: int, method: str, result: dict[str, Any]) -> None:
    metrics = " ".join(f"{k}={v:.3f}" for k, v in result["metrics"].items())
    train = result["train"]
    print(f"[seed {seed}] {method}: {train['steps']} steps {train['seconds']}s; {metrics}", file=sys.stderr)


def summarise(seeds: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, float]]:
    """method -> metric -> mean over the seeds (and the mean training seconds)."""
    summary = {}
    for method in ("pretrained", *methods):
        entries = [s["methods"][method] for s in seeds]
        summary[method] = {k: round(float(np.mean([e["metrics"][k] for e in entries])), 4) for k in METRICS}
        summary[method]["train_seconds"] = round(float(np.mean([e["train"]["seconds"] for e in entries])), 1)
    return summary


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--pretrain-minutes", type=float, default=5.0, help="pretraining time budget per seed")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="pretrain this many steps instead (tests)")
    parser.add_argument("--finetune-steps", type=int, default=FinetuneSettings.steps, help="steps of every fine-tune")
    parser.add_argument("--n-train", type=int, default=2000, help="generated training images (A and B split them)")
    parser.add_argument("--n-test", type=int, default=150, help="generated held-out images (A and B split them)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variants",
        action="store_true",
        help=f"also run {', '.join(VARIANTS)} (full + retain; LoRA + retain with concept A's names as prompts)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = FinetuneSettings(steps=args.finetune_steps)
    methods = (*METHODS, *VARIANTS) if args.variants else METHODS
    negatives = negative_phrases()
    retain_pool = retain_phrases(negatives)
    started = time.perf_counter()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    seeds = [run_seed(seed, args, settings, negatives, retain_pool, methods) for seed in args.seeds]
    result = {
        "summary": summarise(seeds, methods),
        "seeds": seeds,
        "settings": {
            "n_train": args.n_train,
            "n_test": args.n_test,
            "pretrain_minutes": None if args.pretrain_steps else args.pretrain_minutes,
            "pretrain_steps": args.pretrain_steps,
            "pretrain_lr": PRETRAIN_LR,
            "batch": BATCH,
            "num_negatives": NUM_NEGATIVES,
            "presence_weight": PRESENCE_WEIGHT,
            "weight_decay": WEIGHT_DECAY,
            "drop_path": META_DROP_PATH,
            "threads": args.threads,
            "finetune": {**asdict(settings), "warmup": settings.warmup},
            "methods": list(methods),
            "negative_phrases": list(negatives),
            "retain_phrase_pool": len(retain_pool),
            "score_threshold": SCORE_THRESHOLD,
            "concepts": {k: list(v) for k, v in CONCEPTS.items()},
        },
        "machine": machine(),
        "date": date,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
