"""The VOS validation report: per-split counts, the problems, whether the clean dataset is usable, the exit code.

Report JSON (written with save_coco: sorted keys, byte-stable):
    {"ok": bool, "usable": bool, "unusable_reasons": [str], "strict": bool, "dataset": str, "layout": "mose"|"davis",
     "counts": {split: {videos, videos_clean, videos_quarantined, frames, frames_clean, annotations,
                        annotations_clean, objects_clean, quarantined_by_reason: {check: videos}}},
     "quarantined_by_reason": {check: videos, over all splits},
     "quarantined": {split: {video: [check, ...]}},
     "image_sets": {list path: {listed, clean, quarantined, missing}},
     "problems": [{check, severity, split, video, frame, file, message}]}
For every split videos == videos_clean + videos_quarantined. A quarantined video counts once under each distinct
error check it has, so the per-reason counts may add up to more than videos_quarantined. `objects_clean` counts
(video, object id) pairs of the clean videos. `ok` means usable and no error; warnings do not spoil it.

Exit code, as the image validation's: 1 when the clean dataset is not usable (a split without a clean video), or
with `strict` when there is any error (even though it was quarantined); 0 otherwise. An unreadable dataset never
gets here: DataError, exit 2.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.validation.problems import Severity
from pipeline.validation.vos_problems import VosProblem
from sam3.coco import save_coco


@dataclass(frozen=True)
class VosSplitCounts:
    """Videos, frames and annotations of one split: in the input and kept (videos also quarantined)."""

    videos: int
    videos_clean: int
    videos_quarantined: int
    frames: int
    frames_clean: int
    annotations: int
    annotations_clean: int
    objects_clean: int
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class VosReport:
    dataset: str
    layout: str
    counts: dict[str, VosSplitCounts]
    problems: list[VosProblem]  # sorted
    quarantined: dict[str, dict[str, list[str]]]  # split -> video -> its error checks
    image_sets: dict[str, dict[str, int]] = field(default_factory=dict)
    strict: bool = False

    @property
    def errors(self) -> list[VosProblem]:
        return [p for p in self.problems if p.severity == Severity.ERROR]

    @property
    def unusable_reasons(self) -> list[str]:
        """Why training or evaluation could not use the clean dataset; empty when it can."""
        return [
            f"split {split} has no clean video ({c.videos_quarantined} of {c.videos} quarantined)"
            for split, c in self.counts.items()
            if c.videos_clean == 0
        ]

    @property
    def usable(self) -> bool:
        return not self.unusable_reasons

    @property
    def ok(self) -> bool:
        return self.usable and not self.errors

    @property
    def exit_code(self) -> int:
        return 1 if not self.usable or (self.strict and self.errors) else 0

    def quarantined_by_reason(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for c in self.counts.values():
            total.update(c.quarantined_by_reason)
        return dict(sorted(total.items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "usable": self.usable,
            "unusable_reasons": self.unusable_reasons,
            "strict": self.strict,
            "dataset": self.dataset,
            "layout": self.layout,
            "counts": {split: asdict(c) for split, c in self.counts.items()},
            "quarantined_by_reason": self.quarantined_by_reason(),
            "quarantined": self.quarantined,
            "image_sets": self.image_sets,
            "problems": [p.to_json() for p in self.problems],
        }

    def summary(self) -> list[str]:
        """Short human summary: videos per split, problems per check, and why the exit code is not 0."""
        lines = [
            f"{split}: {c.videos_clean}/{c.videos} videos clean ({c.videos_quarantined} quarantined), "
            f"{c.frames_clean}/{c.frames} frames, {c.annotations_clean}/{c.annotations} annotations kept"
            for split, c in self.counts.items()
        ]
        by_check = Counter((str(p.check), str(p.severity)) for p in self.problems)
        lines += [f"{check}: {n} {severity}{'s' if n > 1 else ''}" for (check, severity), n in sorted(by_check.items())]
        if not self.problems:
            lines.append("no problems found")
        lines += [f"not usable: {reason}" for reason in self.unusable_reasons]
        if self.strict and self.errors:
            lines.append(f"--strict: {len(self.errors)} error(s)")
        return lines


def write_vos_report(path: Path, report: VosReport) -> None:
    save_coco(path, report.to_json())
