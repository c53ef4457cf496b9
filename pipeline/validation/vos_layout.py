"""Find the splits, videos and files of a VOS dataset folder (DAVIS/MOSE layout); reads no image.

A split folder holds `JPEGImages/<video>/<frame>.{jpg,jpeg,png}` and `Annotations/<video>/<frame>.png`, and
optionally `ImageSets/<year>/<list>.txt` (video names, one a line). A dataset root is either
- MOSE-style: its sub-folders are split folders (`ROOT/train/`, `ROOT/valid/`), each labelled by its name; or
- DAVIS-style: the root is one split folder, labelled `all` (its ImageSets lists, e.g. 2017/train.txt and val.txt,
  say which videos each subset uses; they are carried along, filtered, not turned into split folders).
Anything else in these folders is listed as unexpected (reported, never copied) so that nothing is dropped silently,
except the root's `meta.json`, the description our generators write (vos-shapes-data, vos-demo-data): known, not
copied (its counts describe the raw data, not the clean copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from sam3.coco import SPLITS
from sam3.errors import DataError

FRAMES_DIR = "JPEGImages"
ANNOTATIONS_DIR = "Annotations"
IMAGE_SETS_DIR = "ImageSets"
GENERATOR_META = "meta.json"  # our generators' description of a dataset root
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
ANNOTATION_SUFFIX = ".png"
DAVIS_SPLIT = "all"  # the label of a DAVIS-style root's single split folder
DAVIS_RESOLUTIONS = ("480p", "1080p", "Full-Resolution")  # DAVIS's own downloads nest videos one level deeper
LAYOUT_DIRS = (FRAMES_DIR, ANNOTATIONS_DIR)


@dataclass(frozen=True)
class VosSplit:
    """One split folder: `label` keys the report and the quarantine; `folder` is its path inside the root ("" for a
    DAVIS-style root, which is its own split folder)."""

    label: str
    folder: str

    def path(self, *parts: str) -> str:
        """A path inside the split folder, relative to the dataset root (how problems name files)."""
        return PurePosixPath(self.folder, *parts).as_posix() if self.folder else PurePosixPath(*parts).as_posix()


@dataclass(frozen=True)
class VideoFiles:
    """The files of one video: frame and annotation file names (sorted) and what else its folders hold."""

    split: VosSplit
    name: str
    frames: list[str] = field(default_factory=list)  # names in JPEGImages/<video>/ with a frame suffix
    annotations: list[str] = field(default_factory=list)  # names in Annotations/<video>/ ending in .png
    unexpected: list[str] = field(default_factory=list)  # other entries, relative to the dataset root

    def frame_path(self, name: str) -> str:
        return self.split.path(FRAMES_DIR, self.name, name)

    def annotation_path(self, name: str) -> str:
        return self.split.path(ANNOTATIONS_DIR, self.name, name)


@dataclass(frozen=True)
class Layout:
    """What `find_layout` found: the kind ("mose" or "davis"), the splits, and unexpected top-level entries."""

    kind: str
    splits: list[VosSplit]
    unexpected: list[str]


def _is_split_folder(path: Path) -> bool:
    return any((path / name).is_dir() for name in LAYOUT_DIRS)


def _split_order(label: str) -> tuple[int, str]:
    return (SPLITS.index(label) if label in SPLITS else len(SPLITS), label)


def find_layout(root: Path) -> Layout:
    """The layout of the dataset at `root`; DataError when it is missing or holds no VOS split folder."""
    if not root.exists():
        raise DataError(f"{root}: not found; --in must be a VOS dataset folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; --in must be a VOS dataset folder")
    if _is_split_folder(root):
        split = VosSplit(DAVIS_SPLIT, "")
        _refuse_resolution_folders(root, split)
        known = {*LAYOUT_DIRS, IMAGE_SETS_DIR, GENERATOR_META}
        unexpected = sorted(p.name for p in root.iterdir() if p.name not in known)
        return Layout("davis", [split], unexpected)
    children = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: _split_order(p.name))
    splits = [VosSplit(p.name, p.name) for p in children if _is_split_folder(p)]
    if not splits:
        raise DataError(
            f"{root}: not a VOS dataset: neither it nor a sub-folder holds {FRAMES_DIR}/ or {ANNOTATIONS_DIR}/ "
            f"(expected <split>/{FRAMES_DIR}/<video>/<frame>.jpg as MOSE, or {FRAMES_DIR}/<video>/ at the top as "
            "DAVIS)"
        )
    for split in splits:
        _refuse_resolution_folders(root / split.folder, split)
    labels = {split.folder for split in splits} | {GENERATOR_META}
    unexpected = sorted(p.name for p in root.iterdir() if p.name not in labels)
    return Layout("mose", splits, unexpected)


def _refuse_resolution_folders(split_dir: Path, split: VosSplit) -> None:
    """DAVIS's download nests videos under JPEGImages/480p/; read as our layout, each resolution would be one
    "video" of sub-folders, so say how to point at it instead."""
    for name in DAVIS_RESOLUTIONS:
        nested = split_dir / FRAMES_DIR / name
        if nested.is_dir() and any(p.is_dir() for p in nested.iterdir()):
            raise DataError(
                f"{nested}: videos nested under a resolution folder (DAVIS's download layout); the agreed layout is "
                f"{FRAMES_DIR}/<video>/<frame>: move {split.path(FRAMES_DIR, name)}/* and "
                f"{split.path(ANNOTATIONS_DIR, name)}/* one level up"
            )


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def split_videos(root: Path, split: VosSplit) -> tuple[list[VideoFiles], list[str]]:
    """The videos of `split` (every folder of JPEGImages/ or Annotations/, by name) and the unexpected entries of
    the split folder itself (relative to `root`)."""
    split_dir = root / split.folder
    unexpected = []
    if split.folder:  # a DAVIS root's own entries are judged by find_layout
        known = {*LAYOUT_DIRS, IMAGE_SETS_DIR}
        unexpected += [split.path(p.name) for p in _entries(split_dir) if p.name not in known]
    names: set[str] = set()
    for kind in LAYOUT_DIRS:
        for entry in _entries(split_dir / kind):
            if entry.is_dir():
                names.add(entry.name)
            else:
                unexpected.append(split.path(kind, entry.name))
    videos = [_video_files(split_dir, split, name) for name in sorted(names)]
    return videos, sorted(unexpected)


def _video_files(split_dir: Path, split: VosSplit, name: str) -> VideoFiles:
    video = VideoFiles(split, name)
    for entry in _entries(split_dir / FRAMES_DIR / name):
        if entry.suffix.lower() in FRAME_SUFFIXES and not entry.is_dir():
            video.frames.append(entry.name)
        else:
            video.unexpected.append(video.frame_path(entry.name))
    for entry in _entries(split_dir / ANNOTATIONS_DIR / name):
        if entry.suffix.lower() == ANNOTATION_SUFFIX and not entry.is_dir():
            video.annotations.append(entry.name)
        else:
            video.unexpected.append(video.annotation_path(entry.name))
    return video


def image_set_files(root: Path, split: VosSplit) -> tuple[list[str], list[str]]:
    """The video lists of the split folder (`ImageSets/**/*.txt`) and its other ImageSets files (unexpected), both
    relative to `root` and sorted."""
    folder = root / split.folder / IMAGE_SETS_DIR
    if not folder.is_dir():
        return [], []
    lists, unexpected = [], []
    for path in folder.rglob("*"):
        if path.is_dir():
            continue
        name = split.path(IMAGE_SETS_DIR, path.relative_to(folder).as_posix())
        (lists if path.suffix == ".txt" else unexpected).append(name)
    return sorted(lists), sorted(unexpected)


def read_video_list(path: Path) -> list[str]:
    """The video names of an ImageSets list: one a line, blank lines skipped."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
