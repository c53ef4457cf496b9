"""Roboflow's placeholder category: recognised, set aside with its reason, never a prompt.

A Roboflow COCO export lists one extra category, named after the project (say "coins"), that no annotation uses:
it has id 0 and is the `supercategory` of every real class. Kept, it would be a negative prompt on every image
and a negative pair of every image in cgF1 / IL_MCC: the model would be told that "coins" are absent from images
full of coins. A category is taken for the placeholder when no annotation of any split uses it AND it has id 0 or
every other category names it as its supercategory. It is moved to the quarantine (severity `set_aside`: by design,
not an error) in every annotation file that lists it, and the report and the log say so.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.validation.problems import Check, Problem, Severity, Table
from pipeline.validation.records import SplitRecords, is_int, record_problem

PLACEHOLDER_ID = 0


def placeholder_categories(files: Sequence[SplitRecords]) -> dict[int, str]:
    """{id: name} of the placeholder categories of a dataset (its splits' annotation files), by the rule above."""
    used: set[int] = set()
    categories: dict[int, dict] = {}
    for records in files:
        for annotation in records.records(Table.ANNOTATIONS):
            if isinstance(annotation, dict) and is_int(annotation.get("category_id")):
                used.add(annotation["category_id"])
        for category in records.records(Table.CATEGORIES):
            if isinstance(category, dict) and is_int(category.get("id")) and isinstance(category.get("name"), str):
                categories.setdefault(category["id"], category)
    found = {}
    for category_id, category in categories.items():
        if category_id in used:
            continue
        others = [c for i, c in categories.items() if i != category_id]
        named_above_all = bool(others) and all(c.get("supercategory") == category["name"] for c in others)
        if category_id == PLACEHOLDER_ID or named_above_all:
            found[category_id] = category["name"]
    return found


def placeholder_problems(records: SplitRecords, placeholders: dict[int, str]) -> list[Problem]:
    """A `roboflow_placeholder` (set aside) for each category record of `records` that is a placeholder."""
    problems = []
    for index, category in enumerate(records.records(Table.CATEGORIES)):
        if not isinstance(category, dict) or category.get("id") not in placeholders or not is_int(category["id"]):
            continue
        problems.append(
            record_problem(
                records,
                Check.ROBOFLOW_PLACEHOLDER,
                Severity.SET_ASIDE,
                Table.CATEGORIES,
                index,
                category["id"],
                f"{category.get('name')!r} is Roboflow's placeholder category (no annotation uses it; id 0 or the "
                "supercategory of every class): set aside, never a prompt",
            )
        )
    return problems
