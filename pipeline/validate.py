"""Stage `validate`: check a COCO dataset, write a clean copy, a quarantine of the rejected records and a JSON report.

    python -m pipeline validate DATASET_DIR --out CLEAN_DIR --report report.json [--strict]
        [--params FILE] [--set section.key=value ...]

Settings: params.yaml's `validate` section (`--max-pixels N`, `--fewshot-seeds S [S ...]`, `--fewshot-k K` are
short for `--set validate.max_pixels=N` and so on).

Per split: load it (unreadable -> DataError, exit 2), flatten images/annotations/categories into tables
(validation.records), run the great-expectations suites on them (validation.suites), open every image file
(validation.files), and sort the records into clean and quarantined (validation.quarantine). Then, across splits,
warn about categories without any valid annotation, write the outputs (validation.output) and the report
(validation.report). The exit code is the report's (0 usable, 1 not usable or --strict with errors).

Few-shot files: every `fewshot_train_shot*_seed*.json` of the train folder is carried along. Each is checked like a
split (same suites, same image file checks) and, as a subset of the train split, every one of its images must be a
valid image of the train split with the same id and file_name (`not_in_train`). Its problems, counts and
quarantine are its own, labelled "train/<file name>"; its clean copy is CLEAN_DIR/train/<file name>.
`--fewshot-seeds` (ODinW13 10-shot: 3 30 300) asks for `fewshot_train_shot{K}_seed{S}.json` for each seed: those the
dataset lacks are drawn from the CLEAN train split by `pipeline.fewshot.make_fewshot` (k instances per category,
GLIP-style, deterministic), written to CLEAN_DIR/train/ and logged as generated; the report's "fewshot" section
says which files came from the dataset and which were generated.

Decisions a user should know:
- An error quarantines only the record it names, except that annotations follow their image or category into
  the quarantine when that image or category is quarantined. A bad annotation never takes its image.
- Duplicate ids: the first record keeps the id (and the annotations pointing at it); later ones are quarantined.
- Duplicate category names (compared stripped, as prompts): the first category keeps the name; the later one is
  quarantined with its annotations and left out of the clean categories. Categories are never merged.
- A category without any valid annotation is a warning and stays (it still serves as a negative prompt);
  an image without annotations is legal and not reported. The exception is Roboflow's placeholder category (no
  annotation, id 0 or every class's supercategory; validation.placeholder): it is set aside in the quarantine
  (`roboflow_placeholder`, severity set_aside), never a prompt.
- Two image records naming one file (`duplicate_file_name`): the first keeps the file, the later one is quarantined
  with its annotations. Polygons without area (`degenerate_polygon`) and boxes that disagree with their polygons
  (`box_polygon_mismatch`, IoU of the box and the polygons' bounds < 0.5) quarantine the annotation.
- Across records and splits, on the clean records (validation.across), warnings only: an image with more than 200
  instances of a category (`crowded_prompt`: training drops that prompt there), a category id named otherwise
  than in an earlier split (`category_name_mismatch`), an image file whose bytes are an earlier split's image
  (`shared_image_file`: leakage, counted per pair of splits in the log).
- Memory: annotations are kept as their JSON text and decoded one at a time (validation.packed), so a 100 MB
  annotation file validates in about 4x its size (bench/validate_memory.py) instead of 22x.
- Records keep unknown keys; the clean copy holds them exactly as read.
- Image files are read only inside the dataset folder (validation.paths): a symbolic link that leads outside it, or
  nowhere, quarantines its record (link_outside_dataset, broken_link) and its target is never read or copied; a
  link inside it is fine, and the clean copy holds its target's file under the record's file_name (no links).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.fewshot import FEWSHOT_SPLIT, fewshot_file_name, fewshot_files, make_fewshot, shortfall
from pipeline.stage_args import Shorthand, add_params_arguments, stage_params
from pipeline.suites import ODINW13_SHOTS
from pipeline.validation.across import across_splits
from pipeline.validation.files import DEFAULT_MAX_PIXELS, check_image_files
from pipeline.validation.output import QUARANTINE_DIR, prepare_out_dir, write_outcome
from pipeline.validation.packed import as_list
from pipeline.validation.placeholder import placeholder_categories, placeholder_problems
from pipeline.validation.problems import Check, Problem, Severity, Table
from pipeline.validation.quarantine import SplitOutcome, partition_split
from pipeline.validation.records import (
    SplitRecords,
    annotation_table,
    category_table,
    category_usage_table,
    image_table,
    is_int,
    load_split,
    record_problem,
)
from pipeline.validation.report import (
    FROM_DATASET,
    GENERATED,
    Report,
    SplitCounts,
    unusable_reasons,
    write_report,
)
from pipeline.validation.suites import SuiteRunner, annotation_rules, category_rules, image_rules, usage_rules
from sam3.coco import ANNOTATIONS_FILE, present_splits, save_coco
from sam3.errors import ConfigError, DataError

log = logging.getLogger(__name__)


SHORTHANDS = (
    Shorthand("--max-pixels", "validate.max_pixels", int, help="largest width * height an image may have"),
    Shorthand(
        "--fewshot-seeds",
        "validate.fewshot_seeds",
        int,
        nargs="+",
        help="complete train/fewshot_train_shot{K}_seed{S}.json for these seeds: the ones the dataset lacks are "
        "drawn from the clean train split (GLIP-style) and written to the clean copy",
    ),
    Shorthand("--fewshot-k", "validate.fewshot_k", int, help="instances per category of the few-shot files"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset_dir", type=Path, help="dataset in the Roboflow COCO layout ({train,valid,test}/)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the clean dataset (and _quarantine/)")
    parser.add_argument("--report", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument("--strict", action="store_true", help="exit 1 on any error, even though it was quarantined")
    add_params_arguments(parser, SHORTHANDS)


def run(args: argparse.Namespace) -> int:
    params = stage_params(args, SHORTHANDS).validate
    report = validate_dataset(
        args.dataset_dir,
        args.out,
        args.report,
        strict=args.strict,
        max_pixels=params.max_pixels,
        fewshot_seeds=params.fewshot_seeds,
        fewshot_k=params.fewshot_k,
    )
    return report.exit_code


def _ints(records: list) -> list[int]:
    return [r["id"] for r in records if isinstance(r, dict) and is_int(r.get("id"))]


def _check_split(
    runner: SuiteRunner, dataset_dir: Path, split: SplitRecords, max_pixels: int, placeholders: dict[int, str]
) -> list[Problem]:
    """Every problem of one split: the suites over its three tables, then its image files. Placeholder categories
    are set aside before the category rules run (a real class may share the project's name)."""
    images, problems = image_table(split)
    problems += runner.check(images, image_rules())
    problems += check_image_files(images, dataset_dir, max_pixels)
    annotations, found = annotation_table(split)
    image_ids, category_ids = _ints(split.records(Table.IMAGES)), _ints(split.records(Table.CATEGORIES))
    problems += found + runner.check(annotations, annotation_rules(image_ids, category_ids))
    categories, found = category_table(split)
    if placeholders:
        kept = ~categories.frame["id_int"].isin([float(i) for i in placeholders])
        categories = dataclasses.replace(categories, frame=categories.frame[kept])
    problems += found + runner.check(categories, category_rules()) + placeholder_problems(split, placeholders)
    return problems


def not_in_train(fewshot: SplitRecords, train: SplitOutcome) -> list[Problem]:
    """`not_in_train` errors for the images of a few-shot file that are not valid images of the train split: no
    valid train image has their id, or the one that has it names another file. (Their annotations follow them into
    the quarantine: `image_quarantined`.)"""
    train_files = {image["id"]: image.get("file_name") for image in train.valid[Table.IMAGES]}
    problems = []
    for index, image in enumerate(fewshot.records(Table.IMAGES)):
        if not isinstance(image, dict) or not is_int(image.get("id")):
            continue  # wrong_type / missing_key already quarantine it
        image_id = image["id"]
        if image_id not in train_files:
            reason = f"image id {image_id} is not a valid image of the train split ({train.records.file})"
        elif image.get("file_name") != train_files[image_id]:
            reason = (
                f"file_name {image.get('file_name')!r} differs from {train_files[image_id]!r}, the train split's "
                f"image id {image_id}"
            )
        else:
            continue
        problems.append(
            record_problem(
                fewshot,
                Check.NOT_IN_TRAIN,
                Severity.ERROR,
                Table.IMAGES,
                index,
                image_id,
                f"{reason}; a few-shot file is a subset of the train split: fix the record or draw the file again",
            )
        )
    return problems


def _clean_data(outcome: SplitOutcome) -> dict[str, Any]:
    """The clean COCO data of one annotation file: its top-level object with the valid records."""
    return {**outcome.records.data, **{str(table): as_list(outcome.valid[table]) for table in Table}}


def complete_fewshot(
    train: SplitOutcome, train_out: Path, k: int, seeds: Sequence[int], shipped: set[str]
) -> dict[str, dict[str, Any]]:
    """Draw `fewshot_file_name(k, seed)` from the clean train split for each seed whose file is not in `shipped` (the
    file names the dataset had), write it to `train_out`, and log it. Returns {label: entry of the report's
    "fewshot" section} for the generated files."""
    generated = {}
    for seed in dict.fromkeys(seeds):  # each seed once, in the order given
        name = fewshot_file_name(k, seed)
        if name in shipped:
            continue
        fewshot = make_fewshot(_clean_data(train), k, seed)
        save_coco(train_out / name, fewshot)
        short = shortfall(fewshot, k)
        log.info(
            "%s/%s: not in the dataset; generated from the clean train split (GLIP-style draw, k %d, seed %d): "
            "%d images, %d instances%s",
            FEWSHOT_SPLIT,
            name,
            k,
            seed,
            len(fewshot["images"]),
            len(fewshot["annotations"]),
            f" (categories below k, all their instances taken: {short})" if short else "",
        )
        generated[f"{FEWSHOT_SPLIT}/{name}"] = {
            "source": GENERATED,
            "images": len(fewshot["images"]),
            "annotations": len(fewshot["annotations"]),
            "below_k": short,
        }
    return generated


def _category_usage(outcomes: list[SplitOutcome]) -> dict[int, tuple[str, int]]:
    """`{id: (name, valid annotations in all splits)}` over the valid categories of every split."""
    usage: dict[int, tuple[str, int]] = {}
    for outcome in outcomes:
        for category in outcome.valid[Table.CATEGORIES]:
            usage.setdefault(category["id"], (category["name"], 0))
    for outcome in outcomes:
        for annotation in outcome.valid[Table.ANNOTATIONS]:
            if annotation["category_id"] in usage:
                name, count = usage[annotation["category_id"]]
                usage[annotation["category_id"]] = (name, count + 1)
    return usage


def _load_fewshot(dataset_dir: Path, splits: list[SplitRecords], seeds: Sequence[int]) -> list[SplitRecords]:
    """The few-shot files of the train folder, loaded; DataError when there are some (or seeds to draw) but no train
    split to check them against."""
    files = fewshot_files(dataset_dir / FEWSHOT_SPLIT)
    if (files or seeds) and FEWSHOT_SPLIT not in [split.split for split in splits]:
        what = f"few-shot files ({', '.join(p.name for p in files)})" if files else "--fewshot-seeds"
        raise DataError(
            f"{dataset_dir / FEWSHOT_SPLIT / ANNOTATIONS_FILE}: not found, but {what} need the train split (few-shot "
            "files are subsets of it); add it"
        )
    return [load_split(dataset_dir, FEWSHOT_SPLIT, path.name) for path in files]


def validate_dataset(
    dataset_dir: str | Path,
    out_dir: str | Path,
    report_path: str | Path,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fewshot_seeds: Sequence[int] = (),
    fewshot_k: int = ODINW13_SHOTS,
) -> Report:
    """Validate `dataset_dir`, write the clean copy and quarantine to `out_dir` and the report to `report_path`;
    carry the train split's few-shot files along and draw those of `fewshot_seeds` it lacks (module docstring).

    Raises DataError when the dataset cannot be read at all (no folder or split, invalid JSON, a top level that is
    not a COCO object) and ConfigError for unusable arguments; nothing is written then.
    """
    dataset_dir, out_dir, report_path = Path(dataset_dir), Path(out_dir), Path(report_path)
    if max_pixels <= 0:
        raise ConfigError(f"--max-pixels must be > 0, got {max_pixels}")
    if fewshot_k < 1:
        raise ConfigError(f"--fewshot-k must be >= 1, got {fewshot_k}")
    splits = [load_split(dataset_dir, split) for split in present_splits(dataset_dir)]
    fewshot = _load_fewshot(dataset_dir, splits, fewshot_seeds)
    prepare_out_dir(out_dir, dataset_dir)
    placeholders = placeholder_categories(splits)
    for category_id, name in sorted(placeholders.items()):
        log.info(
            "category %d %r is Roboflow's placeholder (the project's name, used by no annotation): set aside, "
            "never a prompt",
            category_id,
            name,
        )

    runner = SuiteRunner()  # one great-expectations context for the whole run
    problems: list[Problem] = []
    outcomes = []
    for split in splits:
        found = _check_split(runner, dataset_dir, split, max_pixels, placeholders)
        outcomes.append(partition_split(split, found))
        problems += found
    # few-shot files are subsets of the train split: they do not count towards category usage, nor leak
    problems += runner.check(category_usage_table(_category_usage(outcomes)), usage_rules())
    problems += across_splits(outcomes, dataset_dir)
    train = next((outcome for outcome in outcomes if outcome.split == FEWSHOT_SPLIT), None)
    fewshot_outcomes = []
    for records in fewshot:
        found = _check_split(runner, dataset_dir, records, max_pixels, placeholders) + not_in_train(records, train)
        fewshot_outcomes.append(partition_split(records, found))
        problems += found

    for outcome in outcomes + fewshot_outcomes:
        write_outcome(outcome, dataset_dir, out_dir)
    fewshot_sources = {
        outcome.split: {
            "source": FROM_DATASET,
            "images": len(outcome.valid[Table.IMAGES]),
            "annotations": len(outcome.valid[Table.ANNOTATIONS]),
        }
        for outcome in fewshot_outcomes
    }
    if fewshot_seeds:
        shipped = {outcome.records.name for outcome in fewshot_outcomes}
        fewshot_sources |= complete_fewshot(train, out_dir / FEWSHOT_SPLIT, fewshot_k, fewshot_seeds, shipped)
    counts = {outcome.split: SplitCounts.of(outcome) for outcome in outcomes + fewshot_outcomes}
    report = Report(
        dataset=str(dataset_dir),
        counts=counts,
        problems=sorted(problems, key=Problem.sort_key),
        unusable_reasons=unusable_reasons(counts),
        strict=strict,
        fewshot=dict(sorted(fewshot_sources.items())),
    )
    write_report(report_path, report)

    for line in report.summary():
        log.info("%s", line)
    carried = sum(len(o.consequences) for o in outcomes + fewshot_outcomes)
    if carried:
        log.info("%d annotation(s) quarantined with their image or category", carried)
    log.info("clean dataset: %s, quarantine: %s, report: %s", out_dir, out_dir / QUARANTINE_DIR, report_path)
    if report.exit_code:
        log.error("exit 1: %s", "; ".join(report.unusable_reasons) or f"--strict and {len(report.errors)} error(s)")
    return report
