"""Flatten what the file checks found into pandas tables of scalar facts, one row per thing, for the
great-expectations rules (`vos_suites`). Every table spans all splits (a `split` column), so each rule runs once.

- frames:      split, video, frame (name without suffix), name, path, width, height, readable, has_annotation,
               same_frame_files (the video's file names for this frame, ", "-joined: more than one is a duplicate)
- annotations: split, video, frame, path, mode, width, height, readable, size ("WxH"), has_frame, frame_path,
               frame_size (its frame's "WxH", None when that frame is missing or unreadable), objects
- objects:     split, video, frame, path, object_id, area, x, y, w, h (bounding box in pixels), one per id per
               readable annotation
- tracks:      split, video, object_id, first_frame, first_path, frames (annotations it is in), first_annotated
               (the video's first readable annotation's frame), in_first_annotated
- videos:      split, video, frames, annotations, readable_annotations, objects (distinct ids), order_mismatches,
               name_order, number_order
Paths are relative to the dataset root. Frame order is name order, the order VOS loaders list a folder in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import pandas as pd

from pipeline.validation.vos_files import FileFacts
from pipeline.validation.vos_layout import VideoFiles

ORDER_SHOWN = 5  # frame names a frames_out_of_order message shows from each order

FRAME_COLUMNS = ["split", "video", "frame", "name", "path", "width", "height", "readable", "has_annotation"]
ANNOTATION_COLUMNS = ["split", "video", "frame", "path", "mode", "width", "height", "readable", "size"]
OBJECT_COLUMNS = ["split", "video", "frame", "path", "object_id", "area", "x", "y", "w", "h"]
TRACK_COLUMNS = ["split", "video", "object_id", "first_frame", "first_path", "frames", "first_annotated"]
VIDEO_COLUMNS = ["split", "video", "frames", "annotations", "readable_annotations", "objects", "order_mismatches"]
# the columns the rules' messages use besides
FRAME_TABLE = [*FRAME_COLUMNS, "same_frame_files"]
ANNOTATION_TABLE = [*ANNOTATION_COLUMNS, "has_frame", "frame_path", "frame_size", "objects"]
VIDEO_TABLE = [*VIDEO_COLUMNS, "name_order", "number_order"]


def _size(facts: FileFacts | None) -> str | None:
    if facts is None or facts.width is None or facts.height is None:
        return None
    return f"{facts.width}x{facts.height}"


def _stem(name: str) -> str:
    return PurePosixPath(name).stem


def frame_order(stems: list[str]) -> tuple[int, list[str], list[str]]:
    """(frames whose place differs, name order, number order) for a video's distinct frame names: when every name
    is a number, sorting by name must give the number order (1, 2, 10 sorts as 1, 10, 2: not zero-padded).
    Names that are not all numbers have only the name order (0 mismatches)."""
    by_name = sorted(set(stems))
    if not by_name or not all(stem.isdigit() for stem in by_name):
        return 0, by_name, by_name
    by_number = sorted(by_name, key=lambda stem: (int(stem), stem))
    return sum(a != b for a, b in zip(by_name, by_number, strict=True)), by_name, by_number


@dataclass
class VosTables:
    """The five tables (module docstring)."""

    frames: pd.DataFrame
    annotations: pd.DataFrame
    objects: pd.DataFrame
    tracks: pd.DataFrame
    videos: pd.DataFrame


def _columns(names: list[str]) -> dict[str, list[Any]]:
    return {name: [] for name in names}


def _append(columns: dict[str, list[Any]], row: dict[str, Any]) -> None:
    for name, values in columns.items():
        values.append(row[name])


@dataclass
class TableBuilder:
    """Collects the rows video by video (`add_video`), then builds the tables once (`tables`).

    Rows are kept column by column: a MOSE-sized dataset has millions of object rows, and a dict per row would
    take several times their memory."""

    frames: dict[str, list[Any]] = field(default_factory=lambda: _columns(FRAME_TABLE))
    annotations: dict[str, list[Any]] = field(default_factory=lambda: _columns(ANNOTATION_TABLE))
    objects: dict[str, list[Any]] = field(default_factory=lambda: _columns(OBJECT_COLUMNS))
    videos: dict[str, list[Any]] = field(default_factory=lambda: _columns(VIDEO_TABLE))

    def add_video(self, video: VideoFiles, frames: dict[str, FileFacts], annotations: dict[str, FileFacts]) -> None:
        """Rows of one video from its file facts, keyed by file name (those of `video.frames` and
        `video.annotations`)."""
        split = video.split.label
        by_stem: dict[str, list[str]] = {}
        for name in video.frames:
            by_stem.setdefault(_stem(name), []).append(name)
        annotated = {_stem(name) for name in video.annotations}
        for name in video.frames:
            facts = frames[name]
            _append(
                self.frames,
                {
                    "split": split,
                    "video": video.name,
                    "frame": _stem(name),
                    "name": name,
                    "path": video.frame_path(name),
                    "width": facts.width,
                    "height": facts.height,
                    "readable": facts.readable,
                    "has_annotation": _stem(name) in annotated,
                    "same_frame_files": ", ".join(by_stem[_stem(name)]),
                },
            )
        ids: set[int] = set()
        for name in video.annotations:
            facts, stem = annotations[name], _stem(name)
            frame_name = by_stem.get(stem, [None])[0]  # with duplicates, the first (duplicate_frame says so)
            _append(
                self.annotations,
                {
                    "split": split,
                    "video": video.name,
                    "frame": stem,
                    "path": video.annotation_path(name),
                    "mode": facts.mode,
                    "width": facts.width,
                    "height": facts.height,
                    "readable": facts.readable,
                    "size": _size(facts),
                    "has_frame": frame_name is not None,
                    "frame_path": None if frame_name is None else video.frame_path(frame_name),
                    "frame_size": None if frame_name is None else _size(frames[frame_name]),
                    "objects": len(facts.objects),
                },
            )
            path = video.annotation_path(name)  # one string shared by the object rows
            for obj in facts.objects:
                ids.add(obj.object_id)
                _append(
                    self.objects,
                    {
                        "split": split,
                        "video": video.name,
                        "frame": stem,
                        "path": path,
                        "object_id": obj.object_id,
                        "area": obj.area,
                        "x": obj.x,
                        "y": obj.y,
                        "w": obj.width,
                        "h": obj.height,
                    },
                )
        mismatches, by_name, by_number = frame_order(list(by_stem))
        _append(
            self.videos,
            {
                "split": split,
                "video": video.name,
                "frames": len(video.frames),
                "annotations": len(video.annotations),
                "readable_annotations": sum(annotations[name].readable for name in video.annotations),
                "objects": len(ids),
                "order_mismatches": mismatches,
                "name_order": ", ".join(by_name[:ORDER_SHOWN]),
                "number_order": ", ".join(by_number[:ORDER_SHOWN]),
            },
        )

    def tables(self) -> VosTables:
        annotations = pd.DataFrame(self.annotations)
        objects = pd.DataFrame(self.objects)
        tables = (pd.DataFrame(self.frames), annotations, objects, track_table(annotations, objects))
        return VosTables(*tables, pd.DataFrame(self.videos))


def track_table(annotations: pd.DataFrame, objects: pd.DataFrame) -> pd.DataFrame:
    """One row per object id of each video: where it first appears (name order), in how many annotations, and
    whether that is the video's first readable annotation."""
    if objects.empty:
        return pd.DataFrame(columns=[*TRACK_COLUMNS, "in_first_annotated"])
    keys = ["split", "video"]
    first_annotated = (
        annotations[annotations["readable"]].groupby(keys)["frame"].min().rename("first_annotated").reset_index()
    )
    ordered = objects.sort_values([*keys, "object_id", "frame"])
    tracks = (
        ordered.groupby([*keys, "object_id"], sort=True)
        .agg(first_frame=("frame", "first"), first_path=("path", "first"), frames=("frame", "size"))
        .reset_index()
        .merge(first_annotated, on=keys, how="left")
    )
    tracks["in_first_annotated"] = tracks["first_frame"] == tracks["first_annotated"]
    return tracks
