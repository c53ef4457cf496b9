"""The validation report: per-split counts, the problems, whether the clean dataset is usable, the exit code.

Report JSON (written with save_coco, so sorted keys and byte-stable):
    {"ok": bool, "usable": bool, "unusable_reasons": [str], "dataset": str,
     "counts": {split: {images, annotations, categories, valid_*, quarantined_*}},
     "problems": [{check, severity, split, image_id, annotation_id, category_id, table, index, file, message}],
     "fewshot": {"train/<file>": {"source": "dataset" | "generated", "images": int, "annotations": int, ...}}}
A few-shot file found in the dataset is checked like a split: its counts and problems are keyed "train/<file>".
`ok` means usable and no error; warnings do not spoil it.

Exit code: 1 when the clean dataset is not usable (a split without a valid image or category, or no valid
annotation anywhere), or with `strict` when there is any error; 0 otherwise (errors were quarantined).
Unreadable datasets never get here: they raise DataError (exit 2).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.validation.problems import Problem, Severity, Table
from pipeline.validation.quarantine import SplitOutcome
from sam3.coco import SPLITS, save_coco

FROM_DATASET, GENERATED = "dataset", "generated"  # the "source" of a few-shot file of the clean copy


@dataclass(frozen=True)
class SplitCounts:
    """Records of one split: in the input, kept, quarantined (valid + quarantined == input for each table)."""

    images: int
    annotations: int
    categories: int
    valid_images: int
    valid_annotations: int
    valid_categories: int
    quarantined_images: int
    quarantined_annotations: int
    quarantined_categories: int

    @classmethod
    def of(cls, outcome: SplitOutcome) -> SplitCounts:
        kept = {table: len(outcome.valid[table]) for table in Table}
        gone = {table: len(outcome.quarantined[table]) for table in Table}
        return cls(
            images=kept[Table.IMAGES] + gone[Table.IMAGES],
            annotations=kept[Table.ANNOTATIONS] + gone[Table.ANNOTATIONS],
            categories=kept[Table.CATEGORIES] + gone[Table.CATEGORIES],
            valid_images=kept[Table.IMAGES],
            valid_annotations=kept[Table.ANNOTATIONS],
            valid_categories=kept[Table.CATEGORIES],
            quarantined_images=gone[Table.IMAGES],
            quarantined_annotations=gone[Table.ANNOTATIONS],
            quarantined_categories=gone[Table.CATEGORIES],
        )


def unusable_reasons(counts: dict[str, SplitCounts]) -> list[str]:
    """Why training or evaluation could not use the clean dataset; empty when it can."""
    reasons = []
    for split, c in counts.items():
        what = f"split {split}" if split in SPLITS else split  # a few-shot file is named by its path
        if c.valid_images == 0:
            reasons.append(f"{what} has no valid image ({c.quarantined_images} quarantined)")
        if c.valid_categories == 0:
            reasons.append(f"{what} has no valid category ({c.quarantined_categories} quarantined)")
    if sum(c.valid_annotations for c in counts.values()) == 0:
        quarantined = sum(c.quarantined_annotations for c in counts.values())
        reasons.append(f"no valid annotation in any split ({quarantined} quarantined)")
    return reasons


@dataclass(frozen=True)
class Report:
    dataset: str
    counts: dict[str, SplitCounts]
    problems: list[Problem]  # in Problem.sort_key order
    unusable_reasons: list[str] = field(default_factory=list)
    strict: bool = False
    fewshot: dict[str, dict[str, Any]] = field(default_factory=dict)  # few-shot files of the clean copy, by label

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == Severity.ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == Severity.WARNING]

    @property
    def set_aside(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == Severity.SET_ASIDE]

    @property
    def usable(self) -> bool:
        return not self.unusable_reasons

    @property
    def ok(self) -> bool:
        return self.usable and not self.errors

    @property
    def exit_code(self) -> int:
        return 1 if not self.usable or (self.strict and self.errors) else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "usable": self.usable,
            "unusable_reasons": list(self.unusable_reasons),
            "dataset": self.dataset,
            "counts": {split: asdict(c) for split, c in self.counts.items()},
            "problems": [p.to_json() for p in self.problems],
            "fewshot": self.fewshot,
        }

    def summary(self) -> list[str]:
        """Short human summary: counts per split, problems per check, and why the exit code is not 0."""
        lines = []
        for split, c in self.counts.items():
            lines.append(
                f"{split}: {c.valid_images}/{c.images} images, {c.valid_annotations}/{c.annotations} annotations, "
                f"{c.valid_categories}/{c.categories} categories kept"
            )
        by_check = Counter((str(p.check), str(p.severity)) for p in self.problems)
        for (check, severity), count in sorted(by_check.items()):
            if severity == Severity.SET_ASIDE:
                lines.append(f"{check}: {count} record{'s' if count > 1 else ''} set aside")
            else:
                lines.append(f"{check}: {count} {severity}{'s' if count > 1 else ''}")
        for label, entry in self.fewshot.items():
            source = "from the dataset" if entry["source"] == FROM_DATASET else "generated (not in the dataset)"
            lines.append(f"{label}: {source}, {entry['images']} images, {entry['annotations']} annotations")
        if not self.problems:
            lines.append("no problems found")
        lines += [f"not usable: {reason}" for reason in self.unusable_reasons]
        if self.strict and self.errors:
            lines.append(f"--strict: {len(self.errors)} error(s)")
        return lines


def write_report(path: Path, report: Report) -> None:
    save_coco(path, report.to_json())
