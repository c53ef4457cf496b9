"""Decide, record by record, what goes into the clean dataset and what into the quarantine.

- A record with any `error` problem is quarantined, and so is one `set_aside` by design (a Roboflow placeholder
  category); `warning`s keep it.
- Duplicate ids: the later records carry the `duplicate_id` problem; the first record with an id keeps it, and
  annotations pointing at that id belong to the first record.
- An annotation goes with its image only when that image (the first with its image_id) is quarantined
  (`image_quarantined`), and with its category when that category is quarantined (`category_quarantined`), e.g. a
  later category repeating an earlier one's name. A bad annotation alone never takes its image with it.
- Every quarantined record carries `_problems`, the reasons (check, severity, message) in report order; an item
  that is not a JSON object is kept as `{"_record": item, "_problems": [...]}`.
Nothing is dropped: for each table, valid + quarantined == input, checked before anything is written.
Packed annotations (`packed.PackedRecords`) stay packed: the valid ones are a subset sharing the texts, and only
the quarantined ones are decoded (to carry their `_problems`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.validation.packed import PackedRecords
from pipeline.validation.problems import Check, Problem, Severity, Table, where
from pipeline.validation.records import SplitRecords, is_int, owner_positions, record_problem


@dataclass(frozen=True)
class SplitOutcome:
    """One split sorted into records to keep and records to quarantine (those with `_problems` attached)."""

    records: SplitRecords
    valid: dict[Table, Sequence[Any]]  # annotations: a PackedRecords subset when they were read packed
    quarantined: dict[Table, list[Any]]
    consequences: list[Problem]  # image_quarantined / category_quarantined: on the records, not in the report

    @property
    def split(self) -> str:
        return self.records.split


def _consequence(
    check: Check, split: SplitRecords, index: int, annotation: dict[str, Any], table: Table, owner: int, causes: list
) -> Problem:
    owner_id = split.records(table)[owner]["id"]
    reasons = ", ".join(sorted({str(p.check) for p in causes}))
    kind = "image" if table == Table.IMAGES else "category"
    return record_problem(
        split,
        check,
        Severity.ERROR,
        Table.ANNOTATIONS,
        index,
        annotation.get("id"),
        f"quarantined with its {kind} {where(table, owner, owner_id)} ({reasons})",
    )


def _quarantined(record: Any, problems: list[Problem]) -> dict[str, Any]:
    reasons = [p.brief() for p in sorted(problems, key=Problem.sort_key)]
    if isinstance(record, dict):
        return {**record, "_problems": reasons}
    return {"_record": record, "_problems": reasons}


def partition_split(split: SplitRecords, problems: list[Problem]) -> SplitOutcome:
    """Sort `split`'s records by the `problems` found in it (problems of other splits are ignored)."""
    errors: dict[tuple[Table, int], list[Problem]] = defaultdict(list)
    for problem in problems:
        quarantines = problem.severity in (Severity.ERROR, Severity.SET_ASIDE)
        if problem.split == split.split and quarantines and problem.index is not None:
            errors[(problem.table, problem.index)].append(problem)

    consequences = []
    owner_tables = (
        (Table.IMAGES, "image_id", Check.IMAGE_QUARANTINED),
        (Table.CATEGORIES, "category_id", Check.CATEGORY_QUARANTINED),
    )
    owners = {table: owner_positions(split.records(table)) for table, _, _ in owner_tables}
    for index, annotation in enumerate(split.records(Table.ANNOTATIONS)):  # one pass: packed ones decode once
        if not isinstance(annotation, dict):
            continue
        for table, key, check in owner_tables:
            if not is_int(annotation.get(key)):
                continue
            owner = owners[table].get(annotation[key])
            if owner is not None and (table, owner) in errors:
                causes = errors[(table, owner)]
                consequences.append(_consequence(check, split, index, annotation, table, owner, causes))
    consequences.sort(key=lambda p: str(p.check) != str(Check.IMAGE_QUARANTINED))  # images' first, as listed
    for problem in consequences:
        errors[(problem.table, problem.index)].append(problem)

    valid: dict[Table, Sequence[Any]] = {}
    quarantined: dict[Table, list[Any]] = {}
    for table in Table:
        records = split.records(table)
        keep = [i for i in range(len(records)) if (table, i) not in errors]
        valid[table] = records.subset(keep) if isinstance(records, PackedRecords) else [records[i] for i in keep]
        gone = sorted(index for t, index in errors if t == table)
        quarantined[table] = [_quarantined(records[i], errors[(table, i)]) for i in gone]
        if len(valid[table]) + len(quarantined[table]) != len(records):
            raise RuntimeError(
                f"bug: {split.file} {table}: {len(valid[table])} valid + {len(quarantined[table])} quarantined "
                f"!= {len(records)} in the input"
            )
    return SplitOutcome(split, valid, quarantined, consequences)
