"""Write the clean copy and the quarantine of a VOS dataset, video by video, and carry its ImageSets lists along.

    CLEAN_DIR/<split folder>/JPEGImages/<video>/<frame>           clean videos' frames and annotations, hard-linked
    CLEAN_DIR/<split folder>/Annotations/<video>/<frame>.png      (copied across filesystems); the layout of the input
    CLEAN_DIR/<split folder>/ImageSets/<year>/<list>.txt          the lists with only the clean videos left in them
    CLEAN_DIR/_quarantine/<split>/<video>/JPEGImages/<frame>      a quarantined video's files
    CLEAN_DIR/_quarantine/<split>/<video>/Annotations/<frame>.png
    CLEAN_DIR/_quarantine/<split>/<video>/reasons.json            {"split", "video", "problems": [...]} (errors and
                                                                  warnings of the video, report entries)
A DAVIS-style root's split folder is the root itself (its quarantine label is `all`). Only files found inside the
dataset are placed (`paths.locate`: a link leading out is reported, never followed); unexpected files are reported
and not copied. `output.prepare_out_dir` makes CLEAN_DIR (and refuses to delete what validate did not write).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.validation.output import QUARANTINE_DIR, link_or_copy
from pipeline.validation.vos_layout import ANNOTATIONS_DIR, FRAMES_DIR, VideoFiles, read_video_list
from pipeline.validation.vos_problems import VosProblem
from sam3.io import write_json

REASONS_FILE = "reasons.json"


@dataclass(frozen=True)
class CheckedVideo:
    """A video after its file checks: the real file of each frame and annotation (None: it may not be read) and its
    distinct object ids."""

    files: VideoFiles
    frame_files: dict[str, Path | None]
    annotation_files: dict[str, Path | None]
    object_ids: int

    @property
    def key(self) -> tuple[str, str]:
        return self.files.split.label, self.files.name


def _place(files: dict[str, Path | None], target_dir: Path) -> int:
    placed = 0
    for name, source in files.items():
        if source is not None and source.is_file():
            link_or_copy(source, target_dir / name)
            placed += 1
    return placed


def write_clean_video(video: CheckedVideo, out_dir: Path) -> None:
    """Place the video's frames and annotations where the input had them, under `out_dir`."""
    split_dir = out_dir / video.files.split.folder
    _place(video.frame_files, split_dir / FRAMES_DIR / video.files.name)
    _place(video.annotation_files, split_dir / ANNOTATIONS_DIR / video.files.name)


def quarantine_dir(out_dir: Path, video: CheckedVideo) -> Path:
    return out_dir / QUARANTINE_DIR / video.files.split.label / video.files.name


def write_quarantined_video(video: CheckedVideo, problems: Sequence[VosProblem], out_dir: Path) -> None:
    """Place the video's readable files and its reasons file in its quarantine folder."""
    target = quarantine_dir(out_dir, video)
    _place(video.frame_files, target / FRAMES_DIR)
    _place(video.annotation_files, target / ANNOTATIONS_DIR)
    reasons = {"split": video.files.split.label, "video": video.files.name, "problems": [p.to_json() for p in problems]}
    write_json(target / REASONS_FILE, reasons)


def write_image_sets(
    root: Path, out_dir: Path, lists: Sequence[str], clean: set[str], quarantined: set[str]
) -> dict[str, dict[str, int]]:
    """Copy each ImageSets list (paths relative to `root`) with only its clean videos; returns per list how many
    videos it listed, kept, lost to the quarantine, and named that the split lacks (listed_video_missing)."""
    counts = {}
    for relative in lists:
        names = read_video_list(root / relative)
        kept = [name for name in names if name in clean]
        target = out_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(f"{name}\n" for name in kept), encoding="utf-8")
        counts[relative] = {
            "listed": len(names),
            "clean": len(kept),
            "quarantined": sum(name in quarantined for name in names),
            "missing": sum(name not in clean and name not in quarantined for name in names),
        }
    return counts
