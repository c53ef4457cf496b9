"""VOS training data: video folders (DAVIS/MOSE layout) or COCO images as 1-frame videos, sampled into `VideoClip`s.

Layout of a split folder (MOSE-style roots hold `ROOT/train/` and `ROOT/valid/`, each one such folder):

    JPEGImages/<video>/<frame>.jpg     (.jpeg and .png accepted)
    Annotations/<video>/<frame>.png    indexed PNG: 0 background, k object k (`sam3.video.palette`)

A DAVIS-style folder is read through a video list file (`ImageSets/2017/train.txt`: one name per line). Frames are
ordered by name, numbers compared as numbers ("frame_2" before "frame_10"). Annotations may be sparse (MOSE valid
has only the first frame's): a frame is *annotated* when its PNG exists, and clips use annotated frames only.

Sampling (`ClipDataset`, the reference's RandomUniformSampler), for item i of an epoch:
- video = videos[i mod V] (each video is visited `multiplier` times per epoch);
- T = min(num_frames, A) consecutive annotated frames (A = the video's annotated frame count) from a start drawn
  uniformly among the starts whose first frame shows at least one object. A video with fewer than num_frames
  annotated frames gives a shorter clip (T < num_frames), never a padded one; the reference instead refuses it and
  draws another video. The reference finds the start by rejection (up to 1000 random starts); we visit the starts in
  a random order and take the first with an object: the same distribution, each PNG read once;
- when no start of the video has an object, another video is drawn (at most MAX_VIDEO_TRIES, then DataError), as
  the reference's dataset retries a random video (100 times) when its sampler fails; the video is named in a warning
  once and skipped without a new scan afterwards;
- objects = a random subset of min(O_visible, max_objects) of the ids visible (non-empty mask) in the first frame,
  listed in increasing id order; in later frames an object may be absent (its masks all False).
Eval (`train=False`, validation losses): no augmentation, no randomness; the clip is the first T annotated frames and
holds every object of the first annotated frame (DataError when it has none, as the reference's EvalSampler). The
dataset then has one item per video (a multiplier would repeat identical clips).

Randomness comes from a torch.Generator seeded from (seed, epoch, index) (`sam3.data.dataset.sample_generator`), so
an item depends on nothing else: not the worker count, not the order of access, not where a run resumed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from sam3.coco import annotation_mask
from sam3.coco_split import CocoSplit
from sam3.data.dataset import sample_generator
from sam3.data.sampler import EpochDataset
from sam3.errors import DataError
from sam3.images import READ_ERRORS, read_image
from sam3.video.config import ClipConfig
from sam3.video.palette import read_label_map
from sam3.video.transforms import PIXEL_STATS, eval_clip, train_clip
from sam3.video.types import VideoClip

logger = logging.getLogger(__name__)

IMAGES_DIR = "JPEGImages"
ANNOTATIONS_DIR = "Annotations"
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_VIDEO_TRIES = 100  # the reference's VOSDataset MAX_RETRIES
_SHOWN_NAMES = 10  # names listed in a warning before "and N more"


def natural_key(name: str) -> tuple:
    """Sort key comparing digit runs as numbers: "f2" < "f10", "00009" < "00010"; the name itself breaks ties
    ("1" vs "01")."""
    parts = re.split(r"(\d+)", name)
    return (tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN_NAMES])
    return shown + (f" and {len(names) - _SHOWN_NAMES} more" if len(names) > _SHOWN_NAMES else "")


@dataclass(frozen=True)
class VosVideo:
    """One video: its frame files in order, and per frame its annotation file or None (not annotated)."""

    name: str
    frames: tuple[Path, ...]
    annotations: tuple[Path | None, ...]

    @property
    def annotated(self) -> list[int]:
        """Indices of the annotated frames, in order."""
        return [t for t, path in enumerate(self.annotations) if path is not None]

    def frame_name(self, t: int) -> str:
        return self.frames[t].stem


class ClipSource(Protocol):
    """What `ClipDataset` samples from: videos, their frames as pixels, their annotated frames as object masks."""

    videos: list[VosVideo]

    def read_frame(self, video: VosVideo, t: int) -> np.ndarray:
        """Frame t as (H, W, 3) uint8 RGB."""
        ...

    def read_objects(self, video: VosVideo, t: int) -> dict[int, np.ndarray]:
        """The objects visible in annotated frame t: id -> (H, W) bool mask, non-empty masks only."""
        ...


def _read_frame(path: Path, video: str) -> np.ndarray:
    try:
        return np.asarray(read_image(path))
    except READ_ERRORS as err:
        raise DataError(f"{path}: cannot read frame of video {video!r} ({err})") from None


def _frame_files(folder: Path) -> list[Path]:
    """Image files of a video folder, in natural order; DataError when two share a stem (00001.jpg, 00001.png)."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise DataError(f"{folder}: frames {stems[path.stem].name} and {path.name} have the same name; keep one")
        stems[path.stem] = path
    return sorted(files, key=lambda p: natural_key(p.stem))


def _read_video_list(videos_file: Path, images_dir: Path) -> list[str]:
    """Names of a video list file (one a line, blank lines ignored, duplicates kept once), sorted."""
    try:
        lines = videos_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{videos_file}: cannot read the video list ({err})") from None
    names: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if name and name not in names:
            names[name] = number
    for name, number in names.items():
        if not (images_dir / name).is_dir():
            raise DataError(f"{videos_file}:{number}: video {name!r} not found: no folder {images_dir / name}")
    return sorted(names)


@dataclass
class VosIndex:
    """The videos of one split folder that have at least one annotated frame, sorted by name."""

    split_dir: Path
    videos: list[VosVideo]

    @classmethod
    def read(cls, split_dir: str | Path, videos_file: str | Path | None = None) -> VosIndex:
        """Index `split_dir` (JPEGImages/ + Annotations/), every video or those listed in `videos_file`.

        DataError for a missing JPEGImages/ or Annotations/ folder, a listed video without a frame folder, a video
        without frames, or no usable video at all. Videos with no annotated frame are skipped with a warning naming
        them (the validate stage quarantines them upstream).
        """
        split_dir = Path(split_dir)
        images_dir, annotations_dir = split_dir / IMAGES_DIR, split_dir / ANNOTATIONS_DIR
        for folder in (images_dir, annotations_dir):
            if not folder.is_dir():
                raise DataError(
                    f"{folder}: folder not found; a VOS split folder holds {IMAGES_DIR}/<video>/<frame>.jpg and "
                    f"{ANNOTATIONS_DIR}/<video>/<frame>.png"
                )
        if videos_file is not None:
            names = _read_video_list(Path(videos_file), images_dir)
        else:
            names = sorted(p.name for p in images_dir.iterdir() if p.is_dir())
        videos, unannotated, orphans = [], [], 0
        for name in names:
            frames = _frame_files(images_dir / name)
            if not frames:
                raise DataError(f"{images_dir / name}: video {name!r} has no frames ({', '.join(FRAME_SUFFIXES)})")
            mask_dir = annotations_dir / name
            pngs = {p.stem: p for p in mask_dir.glob("*.png")} if mask_dir.is_dir() else {}
            annotations = tuple(pngs.get(frame.stem) for frame in frames)
            orphans += len(pngs) - sum(a is not None for a in annotations)
            if any(a is not None for a in annotations):
                videos.append(VosVideo(name, tuple(frames), annotations))
            else:
                unannotated.append(name)
        if unannotated:
            logger.warning(
                "%s: %d video(s) without any annotated frame skipped: %s",
                split_dir,
                len(unannotated),
                _names(unannotated),
            )
        if orphans:
            logger.warning("%s: %d annotation PNG(s) without a same-named frame ignored", annotations_dir, orphans)
        if not videos:
            raise DataError(f"{split_dir}: no video with an annotated frame ({len(names)} video folder(s) read)")
        return cls(split_dir, videos)

    def read_frame(self, video: VosVideo, t: int) -> np.ndarray:
        return _read_frame(video.frames[t], video.name)

    def read_objects(self, video: VosVideo, t: int) -> dict[int, np.ndarray]:
        path = video.annotations[t]
        if path is None:
            raise ValueError(f"frame {video.frame_name(t)} of video {video.name!r} is not annotated")
        label_map = read_label_map(path)
        return {int(k): label_map == k for k in np.unique(label_map) if k != 0}


@dataclass
class CocoVideoIndex:
    """A COCO split (Roboflow layout) as 1-frame videos: one per image with a non-crowd annotation, named by the
    image id, sorted by it; each non-crowd annotation is one object, its id the annotation id, its mask decoded from
    the polygons or RLE (`sam3.coco.annotation_mask`). Crowd annotations are dropped (as the image datasets do);
    images left without annotations are skipped, counted in a log line."""

    split: CocoSplit
    videos: list[VosVideo]
    image_ids: dict[str, int] = field(default_factory=dict)  # video name -> image id

    @classmethod
    def read(cls, dataset_dir: str | Path, split: str) -> CocoVideoIndex:
        """`<dataset_dir>/<split>/_annotations.coco.json` and its images."""
        return cls.from_split(CocoSplit.read(dataset_dir, split))

    @classmethod
    def from_split(cls, split: CocoSplit) -> CocoVideoIndex:
        videos, image_ids, skipped = [], {}, 0
        for image_id in sorted(split.images):
            if not any(not ann.get("iscrowd", 0) for ann in split.annotations[image_id]):
                skipped += 1
                continue
            name = str(image_id)
            # the annotation file marks the frame annotated: its masks are decoded from there
            videos.append(VosVideo(name, (split.image_path(image_id),), (split.annotation_file,)))
            image_ids[name] = image_id
        if skipped:
            logger.info("%s: %d image(s) without a non-crowd annotation skipped", split.annotation_file, skipped)
        if not videos:
            raise DataError(f"{split.annotation_file}: no image with a non-crowd annotation")
        return cls(split, videos, image_ids)

    def read_frame(self, video: VosVideo, t: int) -> np.ndarray:
        return _read_frame(video.frames[t], video.name)

    def read_objects(self, video: VosVideo, t: int) -> dict[int, np.ndarray]:
        image_id = self.image_ids[video.name]
        record = self.split.images[image_id]
        height, width = record.get("height"), record.get("width")
        if not isinstance(height, int) or not isinstance(width, int) or height <= 0 or width <= 0:
            raise DataError(f"{self.split.annotation_file}: image id {image_id} needs positive integer width/height")
        objects = {}
        for ann in self.split.annotations[image_id]:
            if ann.get("iscrowd", 0):
                continue
            try:
                mask = annotation_mask(ann.get("segmentation", []), height, width)
            except Exception as err:  # pycocotools raises assorted types on malformed input
                raise DataError(
                    f"{self.split.annotation_file}: mask of annotation {ann.get('id')} (image id {image_id}) does "
                    f"not decode: {err}; fix or remove its segmentation"
                ) from None
            if mask.any():
                objects[int(ann["id"])] = mask
        return objects


class ClipDataset(EpochDataset):
    """`VideoClip`s drawn from a `ClipSource` (module docstring: sampling; `sam3.video.transforms`: augmentation).

    Args:
        index: a `VosIndex` or `CocoVideoIndex` (anything with the `ClipSource` interface).
        clip: frames per clip, objects per clip, multiplier and augmentation strengths.
        image_size: side S of the square frames.
        seed: base seed of the per-item generators.
        train: sampled and augmented clips (True), or the deterministic first clip of each video (False).
        tracker: whose normalisation the frames get ("sam2.1": ImageNet mean/std, "sam3": 0.5/0.5; `PIXEL_STATS`).
    Item: frames (T, 3, S, S) float32, masks (T, O, S, S) bool, 1 <= T <= clip.num_frames,
    1 <= O <= clip.max_objects when training.
    """

    def __init__(
        self,
        index: ClipSource,
        clip: ClipConfig,
        image_size: int,
        seed: int = 0,
        train: bool = True,
        tracker: str = "sam2.1",
    ) -> None:
        if tracker not in PIXEL_STATS:
            raise ValueError(f"tracker must be one of {', '.join(PIXEL_STATS)}, got {tracker!r}")
        if clip.num_frames < 1 or clip.max_objects < 1 or clip.multiplier < 1:
            raise ValueError("num_frames, max_objects and multiplier must be at least 1")
        self.index, self.clip, self.image_size = index, clip, image_size
        self.seed, self.train = seed, train
        self.mean, self.std = PIXEL_STATS[tracker]
        self._objectless: set[str] = set()  # videos found with no object in any start frame (per worker process)

    def __len__(self) -> int:
        return len(self.index.videos) * (self.clip.multiplier if self.train else 1)

    def sample(self, index: int, epoch: int) -> VideoClip:
        if not 0 <= index < len(self):
            raise IndexError(f"clip index {index} out of range for {len(self)} clips")
        if not self.train:
            return self._eval_clip(self.index.videos[index])
        generator = sample_generator(self.seed, epoch, index)
        video, positions, objects = self._draw(index % len(self.index.videos), generator)
        visible = sorted(objects)
        keep = min(len(visible), self.clip.max_objects)
        chosen = sorted(visible[j] for j in torch.randperm(len(visible), generator=generator)[:keep].tolist())
        frames, masks = self._load(video, positions, objects, chosen)
        frames, masks = train_clip(frames, masks, self.clip, self.image_size, generator, self.mean, self.std)
        return VideoClip(video.name, [video.frame_name(t) for t in positions], frames, masks, chosen)

    def _draw(self, video_index: int, generator: torch.Generator) -> tuple[VosVideo, list[int], dict]:
        """The video, its clip's frame indices and the first frame's objects (see the module docstring)."""
        videos = self.index.videos
        for _ in range(MAX_VIDEO_TRIES):
            video = videos[video_index]
            # a child seed drawn on every try, so skipping a known objectless video leaves the stream unchanged
            child = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=generator)))
            if video.name not in self._objectless:
                found = self._draw_start(video, child)
                if found is not None:
                    return video, *found
                self._objectless.add(video.name)
                logger.warning("video %r: no annotated frame shows an object; another video is drawn", video.name)
            video_index = int(torch.randint(len(videos), (), generator=generator))
        raise DataError(
            f"no clip with a visible object after {MAX_VIDEO_TRIES} videos; videos without objects: "
            f"{_names(sorted(self._objectless))}"
        )

    def _draw_start(self, video: VosVideo, generator: torch.Generator) -> tuple[list[int], dict] | None:
        """Frame indices of a clip whose first frame shows an object, uniform over such starts; None if none does."""
        annotated = video.annotated
        length = min(self.clip.num_frames, len(annotated))
        for start in torch.randperm(len(annotated) - length + 1, generator=generator).tolist():
            objects = self.index.read_objects(video, annotated[start])
            if objects:
                return annotated[start : start + length], objects
        return None

    def _eval_clip(self, video: VosVideo) -> VideoClip:
        positions = video.annotated[: self.clip.num_frames]
        objects = self.index.read_objects(video, positions[0])
        if not objects:
            raise DataError(
                f"{video.annotations[positions[0]]}: the first annotated frame of video {video.name!r} has no object; "
                "validation clips are prompted with it"
            )
        chosen = sorted(objects)
        frames, masks = self._load(video, positions, objects, chosen)
        frames, masks = eval_clip(frames, masks, self.image_size, self.mean, self.std)
        return VideoClip(video.name, [video.frame_name(t) for t in positions], frames, masks, chosen)

    def _load(
        self, video: VosVideo, positions: list[int], first_objects: dict[int, np.ndarray], chosen: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (T, 3, H, W) uint8 and masks (T, O, H, W) bool of `chosen` objects (False where absent)."""
        frames, masks = [], []
        for step, t in enumerate(positions):
            pixels = self.index.read_frame(video, t)
            objects = first_objects if step == 0 else self.index.read_objects(video, t)
            size = pixels.shape[:2]
            if frames and size != frames[0].shape[:2]:
                raise DataError(
                    f"{video.frames[t]}: frame is {size[1]}x{size[0]} but frame {video.frame_name(positions[0])} of "
                    f"video {video.name!r} is {frames[0].shape[1]}x{frames[0].shape[0]}; a video's frames share a size"
                )
            for mask in objects.values():
                if mask.shape != size:
                    raise DataError(
                        f"{video.annotations[t]}: annotation is {mask.shape[1]}x{mask.shape[0]} but its frame "
                        f"{video.frames[t]} is {size[1]}x{size[0]}"
                    )
            empty = np.zeros(size, dtype=bool)
            frames.append(pixels)
            masks.append(np.stack([objects.get(k, empty) for k in chosen]))
        frames_t = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()
        return frames_t, torch.from_numpy(np.stack(masks))


def first_clip(batch: list[VideoClip]) -> VideoClip:
    """DataLoader collate for batch size 1 (the recipe trains one clip per GPU): the batch's only clip."""
    if len(batch) != 1:
        raise ValueError(f"VOS clips are collated one at a time (batch_size=1), got a batch of {len(batch)}")
    return batch[0]
