"""Stage `negatives`: extra negative phrases per image (prompts that must find nothing there), for training.

    python -m pipeline negatives DATASET_DIR --out negatives.json [--split train] [--device cpu|cuda]
        [--params FILE] [--set section.key=value ...]

Settings: params.yaml's `negatives` section and model.source; `--per-image`, `--strategy absent|bank|mined ...`,
`--model`, `--seed`, `--similarity-threshold`, `--score-threshold`, `--mine-candidates` are short for their `--set`.

Why: SAM 3's paper raised cgF1 from 31.8 to 49.2 by going from 0 to 30 hard negatives per image
(docs/RECIPE.md section 2).

The strategies run in the order given, each filling the image's list up to `per_image` phrases:
- absent: the dataset categories with no annotation in the image, in category id order (the reference's negatives).
  When there are more than the free slots, a random subset is kept (seeded per image, see below).
- bank:   phrases of the built-in bank (`pipeline.phrase_bank`) nearest to the categories present in the image, in
  the model's own text-embedding space (`sam3.text_similarity`): rank by s_j = max over present categories c of
  cos(ê_j, ê_c), highest first (ties: bank order). An image without annotations ranks against every dataset
  category. Left out: a phrase naming any dataset category (present ones must never be negatives; absent ones are
  already queried by the dataset and by `absent`), and a near-duplicate of a present category: cos >= the
  similarity threshold.
- mined:  the model's own false positives. The bank's ranking (same exclusions, minus phrases already chosen) gives
  `mine_candidates` phrases; the model runs on the image (validation transform) with each, scoring a phrase by
  max over the decoder queries of sigmoid(logit) * sigmoid(presence) (the inference score, docs/RECIPE.md
  section 5). Those scoring above the score threshold are kept, highest score first (ties: candidate order).

"Naming a category" compares names as the model reads them (`sam3.tokenizer.clean_text`) and also matches plural and
singular forms (+s / +es) and a bank sense in parentheses ("bat (animal)" names "bat"). An absent category naming a
present one ("coins" when "coin" is present) is skipped and counted. No phrase equal to a present category is ever
written.

Deterministic: images in id order, rankings with fixed tie-breaks, and the one random draw (the absent subset) from
numpy's generator seeded with (seed, image id), so an image's phrases depend on nothing else. Output (read by
`sam3.data.negatives.load_negatives`):

    {"images": {"<image id>": [{"phrase": "...", "strategy": "absent|bank|mined"[, "score": 0.83]}, ...]},
     "summary": {images, phrases, per_image {asked, min, mean, max}, strategies {absent, bank, mined}, ...}}
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.stage_args import Shorthand, add_params_arguments, stage_params
from sam3.coco_split import CocoSplit
from sam3.config import DEFAULT_PROMPT_CHUNK
from sam3.errors import ConfigError
from sam3.io import write_json
from sam3.tokenizer import clean_text

if TYPE_CHECKING:  # torch and the model load only when the bank or mined strategy runs
    import numpy as np
    import torch

    from sam3.model import Sam3Detector
    from sam3.text_similarity import PhraseEmbedder

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("absent", "bank", "mined")
MODEL_STRATEGIES: tuple[str, ...] = ("bank", "mined")  # the ones that need --model
MINE_PROMPT_CHUNK = DEFAULT_PROMPT_CHUNK  # prompts per decoder call when mining, as at inference (bounds memory)
SCORE_DECIMALS = 6  # mined scores are written rounded: the file stays readable, the choice used the exact value
_QUALIFIER = re.compile(r"\s*\([^()]*\)$")  # a trailing "(sense)", as in LVIS names


@dataclass
class NegativesConfig:
    """Parameters of the negatives stage (see the module docstring for what each strategy does)."""

    split: str = "train"
    per_image: int = 30  # the paper's best setting
    strategies: tuple[str, ...] = ("absent",)
    seed: int = 0
    similarity_threshold: float = 0.9  # bank/mined: cos >= this to a present category = near-duplicate, left out
    score_threshold: float = 0.5  # mined: kept when the model's score is above this
    mine_candidates: int = 64  # mined: bank phrases scored per image

    def check(self) -> None:
        """Raise ConfigError naming the first parameter out of range."""
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ConfigError(f"strategies must be some of {', '.join(STRATEGIES)}; got {list(self.strategies)}")
        repeated = [s for s, n in Counter(self.strategies).items() if n > 1]
        if repeated:
            raise ConfigError(f"strategy {repeated[0]!r} given twice; give each strategy once, in the order wanted")
        if self.per_image < 0:
            raise ConfigError(f"per_image must be >= 0, got {self.per_image}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if not -1.0 <= self.similarity_threshold <= 1.0:
            raise ConfigError(f"similarity_threshold is a cosine in [-1, 1], got {self.similarity_threshold}")
        if self.mine_candidates < 0:
            raise ConfigError(f"mine_candidates must be >= 0, got {self.mine_candidates}")


@dataclass(frozen=True)
class SplitImage:
    """One image of the split: id, file and the names of the categories annotated in it (category id order)."""

    image_id: int
    path: Path
    present: tuple[str, ...]


def name_keys(text: str) -> frozenset[str]:
    """The forms under which `text` names a thing: its clean_text key, without a trailing "(sense)", each +s, +es,
    and without a final s / es. Two names name the same thing when their key sets intersect."""
    key = clean_text(text)
    keys: set[str] = set()
    for base in {key, _QUALIFIER.sub("", key)}:
        if not base:
            continue
        keys.update((base, base + "s", base + "es"))
        if base.endswith("es"):
            keys.add(base[:-2])
        if base.endswith("s"):
            keys.add(base[:-1])
    return frozenset(keys)


def read_split(dataset_dir: str | Path, split: str) -> tuple[list[str], list[SplitImage]]:
    """Category names (id order) and the split's images (id order) with the categories present in each.

    A category is present in an image when any annotation of the image has it (crowd ones included: such a
    category is not absent either). Raises DataError for a missing split or inconsistent ids (`CocoSplit`).
    """
    coco = CocoSplit.read(dataset_dir, split)
    return list(coco.categories.values()), [
        SplitImage(i, coco.image_path(i), tuple(coco.categories[c] for c in coco.present_categories(i)))
        for i in sorted(coco.images)
    ]


def image_rng(seed: int, image_id: int) -> np.random.Generator:
    """numpy Generator seeded from (seed, image id) alone; a negative id is read as its 64-bit two's complement."""
    import numpy as np

    return np.random.default_rng([seed, image_id & 0xFFFF_FFFF_FFFF_FFFF])


def absent_phrases(
    categories: list[str], present: tuple[str, ...], slots: int, rng: np.random.Generator
) -> tuple[list[str], int]:
    """Up to `slots` categories absent from the image (category order), a seeded random subset when more are absent;
    and the number of absent categories left out because they name a present one (plural/singular, `name_keys`).
    """
    present_keys = frozenset().union(*(name_keys(p) for p in present))
    absent = [c for c in categories if c not in present]
    negatives = [c for c in absent if name_keys(c).isdisjoint(present_keys)]
    naming_present = len(absent) - len(negatives)
    if len(negatives) > slots:
        keep = sorted(rng.choice(len(negatives), size=slots, replace=False).tolist())
        negatives = [negatives[i] for i in keep]
    return negatives, naming_present


class BankRanker:
    """Ranks the phrase bank for an image by similarity to its present categories (the `bank` strategy).

    Built once per dataset: the bank minus every phrase naming a dataset category, and the similarity matrix
    float [N, C] between those N phrases and the C dataset categories, from the model's text encoder.
    """

    def __init__(self, bank: tuple[str, ...], categories: list[str], embedder: PhraseEmbedder) -> None:
        category_keys = frozenset().union(*(name_keys(c) for c in categories))
        self.phrases = [p for p in bank if name_keys(p).isdisjoint(category_keys)]
        self.removed = len(bank) - len(self.phrases)
        self.columns = {name: i for i, name in enumerate(categories)}
        self.similarity = embedder.similarity(self.phrases, categories)  # [N, C]
        self._rankings: dict[tuple[tuple[str, ...], float], list[str]] = {}  # images often share a category set

    def ranked(self, present: tuple[str, ...], threshold: float) -> list[str]:
        """Bank phrases for an image, nearest first, near-duplicates of present categories (cos >= threshold) out."""
        import torch

        key = (present, threshold)
        if key in self._rankings:
            return self._rankings[key]
        present_columns = [self.columns[p] for p in present]
        reference = present_columns or list(self.columns.values())  # no annotation: rank against every category
        nearest = self.similarity[:, reference].max(dim=1).values  # [N]
        keep = [True] * len(self.phrases)
        if present_columns:
            keep = (self.similarity[:, present_columns].max(dim=1).values < threshold).tolist()
        order = torch.sort(-nearest, stable=True).indices.tolist()  # stable: equal similarities keep bank order
        self._rankings[key] = [self.phrases[i] for i in order if keep[i]]
        return self._rankings[key]


def first_unused(phrases: list[str], used: set[str], count: int) -> list[str]:
    """The first `count` phrases whose clean_text key is not in `used` (stops early: clean_text is not free)."""
    chosen: list[str] = []
    for phrase in phrases:
        if len(chosen) == count:
            break
        if clean_text(phrase) not in used:
            chosen.append(phrase)
    return chosen


def load_val_image(path: Path, image_id: int, image_size: int) -> torch.Tensor:
    """float [3, S, S]: the image warped to S x S and normalised (`sam3.data.transforms.val_transform`)."""
    import torch
    from torchvision.transforms.v2 import functional as F

    from sam3.data.transforms import val_transform
    from sam3.images import read_record_image

    rgb = read_record_image(path, image_id)  # upright, as the dataset reads it for training
    return val_transform(F.pil_to_tensor(rgb), torch.zeros(0, 4), None, image_size).image


def phrase_scores(model: Sam3Detector, image: torch.Tensor, phrases: list[str]) -> list[float]:
    """For each phrase, max over the N decoder queries of sigmoid(logit) * sigmoid(presence) on one image.

    image: float [3, S, S] normalised (as `load_val_image`); model in eval mode. The vision encoder runs once; the
    prompts go through the text encoder and decoder MINE_PROMPT_CHUNK at a time.
    """
    import torch

    from sam3.inference import detection_scores
    from sam3.tokenizer import attention_mask, tokenize

    device = next(model.parameters()).device
    scores: list[float] = []
    with torch.inference_mode():
        features = model.encode_images(image.unsqueeze(0).to(device), levels=1)  # detection only
        for start in range(0, len(phrases), MINE_PROMPT_CHUNK):
            ids = tokenize(phrases[start : start + MINE_PROMPT_CHUNK])
            prompts = model.encode_prompts(ids.to(device), attention_mask(ids).to(device))
            count = ids.shape[0]
            out = model.decode(
                features,
                prompts,
                query_image=torch.zeros(count, dtype=torch.long, device=device),
                query_prompt=torch.arange(count, device=device),
            )
            score = detection_scores(out["pred_logits"].float(), out["presence_logits"].float())  # [count, N]
            scores.extend(score.max(dim=1).values.cpu().tolist())
    return scores


def build_negatives(
    dataset_dir: str | Path,
    config: NegativesConfig,
    model: Sam3Detector | None = None,
    bank: tuple[str, ...] | None = None,
    embedder: PhraseEmbedder | None = None,
) -> dict[str, Any]:
    """The negatives file's content for one split: {"images": {id: [entries]}, "summary": {...}}.

    `model` is needed by the bank and mined strategies; `bank` defaults to `pipeline.phrase_bank.load_phrase_bank()`;
    `embedder` (a `PhraseEmbedder` of `model`) may be passed to reuse its cached bank embeddings across calls.
    """
    from tqdm import tqdm

    config.check()
    needs_model = [s for s in config.strategies if s in MODEL_STRATEGIES]
    if needs_model and model is None:
        raise ConfigError(
            f"strategy {needs_model[0]!r} needs a model (--model): a facebook/sam3 download, a fine-tuned export, "
            "or 'tiny' for tests"
        )
    categories, images = read_split(dataset_dir, config.split)
    ranker, image_size = None, 0
    if needs_model:
        from pipeline.phrase_bank import load_phrase_bank
        from sam3.inference import model_input_size
        from sam3.text_similarity import PhraseEmbedder

        embedder = embedder or PhraseEmbedder(model)
        ranker = BankRanker(load_phrase_bank() if bank is None else tuple(bank), categories, embedder)
        log.info("phrase bank: %d phrases, %d naming a dataset category left out", len(ranker.phrases), ranker.removed)
        image_size = model_input_size(model) if "mined" in config.strategies else 0  # S: mined images go in S x S

    counts: Counter[str] = Counter()
    out_images: dict[str, list[dict[str, Any]]] = {}
    for image in tqdm(images, desc=f"negatives {config.split}", unit="img"):
        entries: list[dict[str, Any]] = []
        for strategy in config.strategies:
            slots = config.per_image - len(entries)
            if slots <= 0:
                break
            used = {clean_text(e["phrase"]) for e in entries}
            if strategy == "absent":
                rng = image_rng(config.seed, image.image_id)
                phrases, naming_present = absent_phrases(categories, image.present, slots, rng)
                counts["absent_skipped_naming_present"] += naming_present
                entries += [{"phrase": p, "strategy": "absent"} for p in phrases]
            elif strategy == "bank":
                ranked = ranker.ranked(image.present, config.similarity_threshold)
                entries += [{"phrase": p, "strategy": "bank"} for p in first_unused(ranked, used, slots)]
            else:
                ranked = ranker.ranked(image.present, config.similarity_threshold)
                candidates = first_unused(ranked, used, config.mine_candidates)
                if not candidates:
                    continue
                scores = phrase_scores(model, load_val_image(image.path, image.image_id, image_size), candidates)
                counts["mined_candidates_scored"] += len(candidates)
                fired = sorted(
                    (i for i, s in enumerate(scores) if s > config.score_threshold), key=lambda i: -scores[i]
                )
                entries += [
                    {"phrase": candidates[i], "strategy": "mined", "score": round(scores[i], SCORE_DECIMALS)}
                    for i in fired[:slots]
                ]
        out_images[str(image.image_id)] = entries
    summary = summarize(out_images, config, counts)
    log.info(
        "negatives %s: %d images, %d phrases (%s), per image min %d mean %.2f max %d (asked %d)",
        config.split,
        summary["images"],
        summary["phrases"],
        ", ".join(f"{s} {n}" for s, n in summary["strategies"].items()),
        summary["per_image"]["min"],
        summary["per_image"]["mean"],
        summary["per_image"]["max"],
        config.per_image,
    )
    return {"images": out_images, "summary": summary}


def summarize(images: dict[str, list[dict[str, Any]]], config: NegativesConfig, counts: Counter[str]) -> dict:
    """Counts per strategy, phrases per image (min / mean / max), images short of `per_image`, and the config."""
    sizes = [len(entries) for entries in images.values()] or [0]
    by_strategy = Counter(e["strategy"] for entries in images.values() for e in entries)
    return {
        "images": len(images),
        "phrases": sum(by_strategy.values()),
        "strategies": {s: by_strategy[s] for s in config.strategies},
        "per_image": {"asked": config.per_image, "min": min(sizes), "mean": statistics.fmean(sizes), "max": max(sizes)},
        "images_below_per_image": sum(1 for n in sizes if n < config.per_image) if images else 0,
        **{key: counts[key] for key in sorted(counts)},
        "config": {**asdict(config), "strategies": list(config.strategies)},
    }


SHORTHANDS = (
    Shorthand("--per-image", "negatives.per_image", int, help="phrases per image at most"),
    Shorthand(
        "--strategy",
        "negatives.strategies",
        nargs="+",
        joined=True,
        help=f"strategies in the order they fill each image's list ({' | '.join(STRATEGIES)})",
    ),
    Shorthand("--model", "model.source", help="model for bank/mined: 'tiny', 'full' or a transformers folder"),
    Shorthand("--seed", "negatives.seed", int, help="seed of the random choices"),
    Shorthand(
        "--similarity-threshold",
        "negatives.similarity_threshold",
        float,
        help="bank/mined: leave out phrases with cosine >= this to a present category",
    ),
    Shorthand("--score-threshold", "negatives.score_threshold", float, help="mined: keep phrases scored above this"),
    Shorthand("--mine-candidates", "negatives.mine_candidates", int, help="mined: nearest bank phrases scored"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = NegativesConfig()
    parser.add_argument("dataset_dir", type=Path, help="dataset folder: {train,valid,test}/_annotations.coco.json")
    parser.add_argument("--out", required=True, type=Path, help="negatives file to write (json)")
    parser.add_argument("--split", default=defaults.split, help=f"split to read (default {defaults.split})")
    parser.add_argument("--device", help="torch device for the model (default: cuda when available, else cpu)")
    add_params_arguments(parser, SHORTHANDS)


def run(args: argparse.Namespace) -> int:
    params = stage_params(args, SHORTHANDS)
    negative = params.negatives
    config = NegativesConfig(
        split=args.split,
        per_image=negative.per_image,
        strategies=tuple(negative.strategies.split()),
        seed=negative.seed,
        similarity_threshold=negative.similarity_threshold,
        score_threshold=negative.score_threshold,
        mine_candidates=negative.mine_candidates,
    )
    config.check()
    model = None
    if any(s in MODEL_STRATEGIES for s in config.strategies):
        import torch

        from sam3.model import load_model

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(params.model.source).to(device)
    result = build_negatives(args.dataset_dir, config, model=model)
    write_json(args.out, result)
    summary = result["summary"]
    print(
        f"{summary['images']} images, {summary['phrases']} phrases "
        f"({', '.join(f'{s} {n}' for s, n in summary['strategies'].items())}); wrote {args.out}"
    )
    return 0
