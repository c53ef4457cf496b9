"""What `python -m pipeline vos-validate` finds: the VOS check names and the `VosProblem` record each check produces.

A VOS dataset is judged video by video: a problem of severity `error` quarantines the whole video it names (a video
is trained and evaluated as one sequence, so a hole in it spoils the rest); a `warning` is only reported.
Severities are the image validation's (`problems.Severity`); the checks are their own, as a video, a frame and an
object are not COCO records.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pipeline.validation.problems import Severity


class VosCheck(StrEnum):
    """Every VOS check, by the name the report and the reasons files use."""

    # file checks (plain Python: vos_files.py)
    FRAME_UNREADABLE = "frame_unreadable"  # PIL cannot identify or fully decode the frame image
    ANNOTATION_UNREADABLE = "annotation_unreadable"  # the annotation PNG does not decode
    ANNOTATION_NOT_PALETTE = "annotation_not_palette"  # the annotation PNG is not indexed (read_label_map refuses it)
    LINK_OUTSIDE_DATASET = "link_outside_dataset"  # a symbolic link leads outside the dataset: never read
    BROKEN_LINK = "broken_link"  # a symbolic link leads to nothing
    UNEXPECTED_FILE = "unexpected_file"  # warning: not a frame, annotation or list of the layout; not copied
    LISTED_VIDEO_MISSING = "listed_video_missing"  # warning: an ImageSets list names a video the split lacks
    # great-expectations rules over the tables (vos_suites.py)
    DUPLICATE_FRAME = "duplicate_frame"  # two files of one video share a frame name (00001.jpg and 00001.png)
    FRAMES_OUT_OF_ORDER = "frames_out_of_order"  # numeric frame names whose name order is not their number order
    ANNOTATION_WITHOUT_FRAME = "annotation_without_frame"  # an annotation PNG whose frame image is missing
    ANNOTATION_SIZE_MISMATCH = "annotation_size_mismatch"  # annotation width x height != its frame's
    MORE_ANNOTATIONS_THAN_FRAMES = "more_annotations_than_frames"  # a video with more annotation PNGs than frames
    EMPTY_VIDEO = "empty_video"  # no frame, no annotation, or no object in any annotation
    VOID_LABEL = "void_label"  # warning: palette index 255, DAVIS's "void" (ignored region), used in a video
    OBJECT_NOT_IN_FIRST_FRAME = "object_not_in_first_frame"  # warning: an id first seen after the first annotated frame


@dataclass(frozen=True)
class VosProblem:
    """One finding about one video of a split, and the frame (stem) and file it concerns when there is one.

    `file` is relative to the dataset folder, where to fix it.
    """

    check: VosCheck
    severity: Severity
    message: str
    split: str | None = None
    video: str | None = None
    frame: str | None = None
    file: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The report entry (also what a quarantined video's reasons file lists)."""
        return {
            "check": str(self.check),
            "severity": str(self.severity),
            "split": self.split,
            "video": self.video,
            "frame": self.frame,
            "file": self.file,
            "message": self.message,
        }

    def sort_key(self, split_order: dict[str, int]) -> tuple[int, str, str, str, str, str]:
        """Splits in `split_order` (their order in the dataset), then video, frame, check, message."""
        return (
            split_order.get(self.split or "", len(split_order)),
            self.video or "",
            self.frame or "",
            str(self.check),
            self.message,
            self.file or "",
        )
