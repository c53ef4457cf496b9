"""Checks across records and splits, made on the clean records once every split is sorted: all warnings.

- crowded_prompt: an image holds more non-crowd instances of one category than a prompt can take
  (`sam3.config.MAX_TARGETS`, the reference's 200). Training drops that (image, prompt) query: the category is
  neither a positive nor a negative prompt on that image (`sam3.data.index` counts it in its log line); evaluation
  still scores every instance.
- category_name_mismatch: a category id named differently (compared stripped, as prompts) than in an earlier split
  (train, valid, test order). Training prompts with the train split's names and evaluation with the test split's,
  so the model is asked for another phrase than it learnt.
- shared_image_file: an image file whose bytes (SHA-256) equal an image file of an earlier split: the same picture
  in train and test inflates every test metric (leakage). One warning per image of the later split, each naming
  the earlier split's image; the log says how many per pair of splits. Only byte-identical files are found: a
  re-encoded or resized copy is not.

Few-shot files are subsets of the train split and are left out (their images are train images by design).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from pipeline.validation.paths import locate
from pipeline.validation.problems import Check, Problem, Severity, Table, where
from pipeline.validation.quarantine import SplitOutcome
from pipeline.validation.records import owner_positions, record_problem
from sam3.config import MAX_TARGETS

log = logging.getLogger(__name__)


def crowded_prompts(outcome: SplitOutcome, limit: int = MAX_TARGETS) -> list[Problem]:
    """A `crowded_prompt` warning on each valid image with more than `limit` non-crowd valid instances of a
    category, naming the category and the count."""
    counts: Counter[tuple[int, int]] = Counter()
    for annotation in outcome.valid[Table.ANNOTATIONS]:
        if not annotation.get("iscrowd"):  # training never prompts with crowd regions
            counts[(annotation["image_id"], annotation["category_id"])] += 1
    crowded = sorted((key, n) for key, n in counts.items() if n > limit)
    if not crowded:
        return []
    names = {category["id"]: category["name"] for category in outcome.valid[Table.CATEGORIES]}
    positions = owner_positions(outcome.records.records(Table.IMAGES))
    return [
        record_problem(
            outcome.records,
            Check.CROWDED_PROMPT,
            Severity.WARNING,
            Table.IMAGES,
            positions[image_id],
            image_id,
            f"holds {count} instances of category {category_id} {names[category_id]!r}, over the {limit} one prompt "
            "can take: training drops this prompt on this image (it is neither a positive nor a negative there); "
            "evaluation still scores all of them. Tile the image to train on it",
        )
        for (image_id, category_id), count in crowded
    ]


def category_name_mismatches(outcomes: Sequence[SplitOutcome]) -> list[Problem]:
    """A `category_name_mismatch` warning on each valid category whose id an earlier split names otherwise."""
    first: dict[int, tuple[str, str]] = {}  # id -> (name, split) where it was first seen
    problems = []
    for outcome in outcomes:
        positions = owner_positions(outcome.records.records(Table.CATEGORIES))
        for category in outcome.valid[Table.CATEGORIES]:
            category_id, name = category["id"], category["name"]
            earlier = first.setdefault(category_id, (name, outcome.split))
            if earlier[1] == outcome.split or earlier[0].strip() == name.strip():
                continue
            problems.append(
                record_problem(
                    outcome.records,
                    Check.CATEGORY_NAME_MISMATCH,
                    Severity.WARNING,
                    Table.CATEGORIES,
                    positions[category_id],
                    category_id,
                    f"name {name!r} differs from {earlier[0]!r}, the name of category id {category_id} in "
                    f"{earlier[1]}; training prompts with the train split's name and evaluation with this split's: "
                    "give the id one name in every split",
                )
            )
    return problems


def _digest(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def shared_image_files(outcomes: Sequence[SplitOutcome], dataset_dir: Path) -> list[Problem]:
    """A `shared_image_file` warning on each valid image whose file has the bytes of an earlier split's image."""
    seen: dict[str, tuple[str, int, str]] = {}  # digest -> (split, image id, file) of its first image
    problems: list[Problem] = []
    shared: Counter[tuple[str, str]] = Counter()
    for outcome in outcomes:
        folder = outcome.records.folder
        positions = owner_positions(outcome.records.records(Table.IMAGES))
        mine: dict[str, tuple[str, int, str]] = {}
        for image in tqdm(outcome.valid[Table.IMAGES], desc=f"{outcome.split} image digests", unit="image"):
            path = locate(dataset_dir, folder, image["file_name"]).path
            if path is None:
                continue  # validation found it; a file that vanished since is not this check's business
            digest = _digest(path)
            file = f"{folder}/{image['file_name']}"
            earlier = seen.get(digest)
            mine.setdefault(digest, (outcome.split, image["id"], file))
            if earlier is None:
                continue
            shared[(earlier[0], outcome.split)] += 1
            index = positions[image["id"]]
            problems.append(
                Problem(
                    Check.SHARED_IMAGE_FILE,
                    Severity.WARNING,
                    f"{where(Table.IMAGES, index, image['id'])}: {file} has the same bytes as {earlier[2]} (image "
                    f"id {earlier[1]} of {earlier[0]}): one picture in two splits leaks into evaluation; remove it "
                    "from one of them",
                    split=outcome.split,
                    table=Table.IMAGES,
                    index=index,
                    record_id=image["id"],
                    file=file,
                )
            )
        for digest, where_first in mine.items():
            seen.setdefault(digest, where_first)
    for (earlier, later), count in sorted(shared.items()):
        log.warning("%s: %d image file(s) are also in %s (shared_image_file)", later, count, earlier)
    return problems


def across_splits(outcomes: Sequence[SplitOutcome], dataset_dir: Path) -> list[Problem]:
    """Every warning of this module over the splits' outcomes (in SPLITS order; few-shot files left out)."""
    problems: list[Problem] = []
    for outcome in outcomes:
        problems += crowded_prompts(outcome)
    problems += category_name_mismatches(outcomes)
    problems += shared_image_files(outcomes, dataset_dir)
    return problems
