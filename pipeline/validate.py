"""Stage `validate`: check a COCO dataset, write a clean copy, a quarantine of the rejected records and a JSON report.

    python -m pipeline validate DATASET_DIR --out CLEAN_DIR --report report.json [--strict] [--max-pixels N]

Per split: load it (unreadable -> DataError, exit 2), flatten images/annotations/categories into tables
(validation.records), run the great-expectations suites on them (validation.suites), open every image file
(validation.files), and sort the records into clean and quarantined (validation.quarantine). Then, across splits,
warn about categories without any valid annotation, write the outputs (validation.output) and the report
(validation.report). The exit code is the report's (0 usable, 1 not usable or --strict with errors).

Decisions a user should know:
- An error quarantines only the record it names, except that annotations follow their image or category into
  the quarantine when that image or category is quarantined. A bad annotation never takes its image.
- Duplicate ids: the first record keeps the id (and the annotations pointing at it); later ones are quarantined.
- Duplicate category names (compared stripped, as prompts): the first category keeps the name; the later one is
  quarantined with its annotations and left out of the clean categories. Categories are never merged.
- A category without any valid annotation is a warning and stays (it still serves as a negative prompt);
  an image without annotations is legal and not reported.
- Records keep unknown keys; the clean copy holds them exactly as read.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.validation.files import DEFAULT_MAX_PIXELS, check_image_files
from pipeline.validation.output import QUARANTINE_DIR, prepare_out_dir, write_outcome
from pipeline.validation.problems import Problem, Table
from pipeline.validation.quarantine import SplitOutcome, partition_split
from pipeline.validation.records import (
    SplitRecords,
    annotation_table,
    category_table,
    category_usage_table,
    image_table,
    is_int,
    load_split,
)
from pipeline.validation.report import Report, SplitCounts, unusable_reasons, write_report
from pipeline.validation.suites import SuiteRunner, annotation_rules, category_rules, image_rules, usage_rules
from sam3.coco import present_splits
from sam3.errors import ConfigError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset_dir", type=Path, help="dataset in the Roboflow COCO layout ({train,valid,test}/)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the clean dataset (and _quarantine/)")
    parser.add_argument("--report", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument("--strict", action="store_true", help="exit 1 on any error, even though it was quarantined")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"largest width * height an image may have (checked before decoding; default {DEFAULT_MAX_PIXELS:,})",
    )


def run(args: argparse.Namespace) -> int:
    report = validate_dataset(args.dataset_dir, args.out, args.report, strict=args.strict, max_pixels=args.max_pixels)
    return report.exit_code


def _ints(records: list) -> list[int]:
    return [r["id"] for r in records if isinstance(r, dict) and is_int(r.get("id"))]


def _check_split(runner: SuiteRunner, dataset_dir: Path, split: SplitRecords, max_pixels: int) -> list[Problem]:
    """Every problem of one split: the suites over its three tables, then its image files."""
    images, problems = image_table(split)
    problems += runner.check(images, image_rules())
    problems += check_image_files(images, dataset_dir / split.split, max_pixels)
    annotations, found = annotation_table(split)
    image_ids, category_ids = _ints(split.records(Table.IMAGES)), _ints(split.records(Table.CATEGORIES))
    problems += found + runner.check(annotations, annotation_rules(image_ids, category_ids))
    categories, found = category_table(split)
    problems += found + runner.check(categories, category_rules())
    return problems


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


def validate_dataset(
    dataset_dir: str | Path,
    out_dir: str | Path,
    report_path: str | Path,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Report:
    """Validate `dataset_dir`, write the clean copy and quarantine to `out_dir` and the report to `report_path`.

    Raises DataError when the dataset cannot be read at all (no folder or split, invalid JSON, a top level that is
    not a COCO object) and ConfigError for unusable arguments; nothing is written then.
    """
    dataset_dir, out_dir, report_path = Path(dataset_dir), Path(out_dir), Path(report_path)
    if max_pixels <= 0:
        raise ConfigError(f"--max-pixels must be > 0, got {max_pixels}")
    splits = [load_split(dataset_dir, split) for split in present_splits(dataset_dir)]
    prepare_out_dir(out_dir, dataset_dir)

    runner = SuiteRunner()  # one great-expectations context for the whole run
    problems: list[Problem] = []
    outcomes = []
    for split in splits:
        found = _check_split(runner, dataset_dir, split, max_pixels)
        outcomes.append(partition_split(split, found))
        problems += found
    problems += runner.check(category_usage_table(_category_usage(outcomes)), usage_rules())

    for outcome in outcomes:
        write_outcome(outcome, dataset_dir, out_dir)
    counts = {outcome.split: SplitCounts.of(outcome) for outcome in outcomes}
    report = Report(
        dataset=str(dataset_dir),
        counts=counts,
        problems=sorted(problems, key=Problem.sort_key),
        unusable_reasons=unusable_reasons(counts),
        strict=strict,
    )
    write_report(report_path, report)

    for line in report.summary():
        log.info("%s", line)
    carried = sum(len(o.consequences) for o in outcomes)
    if carried:
        log.info("%d annotation(s) quarantined with their image or category", carried)
    log.info("clean dataset: %s, quarantine: %s, report: %s", out_dir, out_dir / QUARANTINE_DIR, report_path)
    if report.exit_code:
        log.error("exit 1: %s", "; ".join(report.unusable_reasons) or f"--strict and {len(report.errors)} error(s)")
    return report
