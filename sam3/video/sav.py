"""SA-V (Segment Anything Video) training videos converted to our split-folder layout (`sam3.video.data`).

SA-V train ships `<video>.mp4` (24 fps) and `<video>_manual.json`, whose `masklet` is a list over annotated frames
of lists over masklets of COCO RLEs ({"size": [H, W], "counts": str}). Annotations are at 6 fps: annotation a
belongs to video frame a * 4 (facebookresearch/sam2 `sav_dataset/utils/sav_utils.py`, annot_sample_rate 4; the
reference's JSONSegmentLoader derives the step from a `fps` field when a file has one, as we do).

`sav_to_folder` writes the annotated frames only:

    <out>/JPEGImages/<video>/<frame:05d>.jpg     frame = the 24 fps frame index (00000, 00004, 00008, ...)
    <out>/Annotations/<video>/<frame:05d>.png    palette PNG: masklet i -> object id i + 1, 0 background

Choices where a palette PNG cannot say what the json says:
- SA-V masklets may overlap (a person and their hand); a pixel holds one id, so each frame's masks are painted
  largest first and a smaller mask stays on top (the hand keeps its pixels, the person loses them). The number of
  overlapping pixels is logged.
- A frame entry that is null or holds a null masklet (not annotated, as opposed to an empty RLE: absent) is skipped,
  as the reference's JSONRawDataset drops such frames (rm_unannotated).
- At most 255 masklets per video (uint8 ids).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sam3.coco import read_json
from sam3.errors import DataError
from sam3.video.data import ANNOTATIONS_DIR, IMAGES_DIR
from sam3.video.palette import write_label_map

logger = logging.getLogger(__name__)

SAV_ANN_EVERY = 4  # SA-V: 24 fps videos annotated at 6 fps
JPEG_QUALITY = 95
MAX_MASKLETS = 255


def _masklets(json_path: Path) -> tuple[list[Any], dict[str, Any]]:
    """The per-frame masklet lists and the whole record; DataError when the file is not SA-V's format."""
    data = read_json(json_path)
    if isinstance(data, list):  # the reference also accepts a bare list of frames
        data = {"masklet": data}
    frames = data.get("masklet", data.get("masks")) if isinstance(data, dict) else None
    if not isinstance(frames, list):
        raise DataError(f"{json_path}: no 'masklet' list (SA-V *_manual.json: a list over frames of lists of RLEs)")
    return frames, data


def _annotation_step(data: dict[str, Any], video_fps: float | None, json_path: Path) -> int:
    """Video frames per annotation: video fps / annotation fps when the json says its fps, else SA-V's 4."""
    fps = data.get("fps")
    if fps is None or video_fps is None:
        return SAV_ANN_EVERY
    fps = float(fps[0] if isinstance(fps, list) else fps)
    step = round(video_fps / fps) if fps > 0 else 0
    if step < 1 or abs(step * fps - video_fps) > 0.01 * video_fps:
        raise DataError(f"{json_path}: annotation fps {fps} does not divide the video's {video_fps:.3f} fps")
    return step


def label_map_from_rles(rles: list[dict[str, Any]], height: int, width: int, where: str) -> tuple[np.ndarray, int]:
    """(H, W) uint8 ids (masklet i -> i + 1) painted largest mask first, and the count of overlapping pixels."""
    from pycocotools import mask as mask_utils

    masks = []
    for i, rle in enumerate(rles):
        size = rle.get("size") if isinstance(rle, dict) else None
        if size is None or list(size) != [height, width]:
            raise DataError(f"{where}: masklet {i} has size {size}, the video is {height}x{width} (H x W)")
        counts = rle["counts"]
        rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        try:
            masks.append(mask_utils.decode(rle).astype(bool))
        except Exception as err:  # pycocotools raises assorted types on malformed RLE
            raise DataError(f"{where}: masklet {i} does not decode ({err})") from None
    label_map = np.zeros((height, width), dtype=np.uint8)
    covered = np.zeros((height, width), dtype=np.int32)
    for i in sorted(range(len(masks)), key=lambda k: -int(masks[k].sum())):  # stable: ties keep masklet order
        label_map[masks[i]] = i + 1
        covered += masks[i]
    return label_map, int((covered > 1).sum())


def sav_to_folder(
    mp4: str | Path,
    json_path: str | Path,
    out_split_dir: str | Path,
    video: str | None = None,
    ann_every: int | None = None,
) -> list[str]:
    """Convert one SA-V video and its masklet json into `out_split_dir` (module docstring); return the written frame
    names. `video` defaults to the mp4's stem; `ann_every` (video frames per annotation) to the json's fps or 4.

    DataError when the mp4 does not decode, the json is not SA-V's format, a mask's size differs from the video's,
    or the json annotates frames past the video's end.
    """
    import av

    mp4, json_path, out = Path(mp4), Path(json_path), Path(out_split_dir)
    video = video or mp4.stem
    frames, data = _masklets(json_path)
    try:
        container = av.open(str(mp4))
    except (av.error.FFmpegError, OSError) as err:
        raise DataError(f"{mp4}: cannot open the video ({err})") from None
    written: list[str] = []
    overlaps, skipped, decoded = 0, 0, 0
    with container:
        if not container.streams.video:
            raise DataError(f"{mp4}: no video stream")
        stream = container.streams.video[0]
        video_fps = float(stream.average_rate) if stream.average_rate else None
        step = ann_every or _annotation_step(data, video_fps, json_path)
        try:
            for index, frame in enumerate(container.decode(stream)):
                decoded = index + 1
                annotation, offset = divmod(index, step)
                if offset or annotation >= len(frames):
                    continue
                rles = frames[annotation]
                if not isinstance(rles, list) or any(r is None for r in rles):
                    skipped += 1
                    continue
                if len(rles) > MAX_MASKLETS:
                    raise DataError(f"{json_path}: {len(rles)} masklets; a palette PNG holds at most {MAX_MASKLETS}")
                pixels = frame.to_ndarray(format="rgb24")
                name = f"{index:05d}"
                where = f"{json_path} (annotated frame {annotation}, video frame {index})"
                label_map, overlap = label_map_from_rles(rles, pixels.shape[0], pixels.shape[1], where)
                overlaps += overlap
                image_path = out / IMAGES_DIR / video / f"{name}.jpg"
                image_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(image_path, quality=JPEG_QUALITY)
                write_label_map(out / ANNOTATIONS_DIR / video / f"{name}.png", label_map)
                written.append(name)
        except av.error.FFmpegError as err:
            raise DataError(f"{mp4}: cannot decode frame {decoded} ({err})") from None
    needed = (len(frames) - 1) * step + 1
    if decoded < needed:
        raise DataError(
            f"{json_path}: {len(frames)} annotated frames (one every {step}) need {needed} video frames, "
            f"{mp4} has {decoded}"
        )
    if skipped:
        logger.warning("%s: %d frame(s) with unannotated (null) masklets skipped", json_path, skipped)
    if overlaps:
        logger.info("%s: %d overlapping mask pixel(s) given to the smaller masklet", json_path, overlaps)
    return written


def sav_dir_to_folder(sav_dir: str | Path, out_split_dir: str | Path) -> list[str]:
    """Convert every `<video>.mp4` of `sav_dir` that has a `<video>_manual.json`; return the converted video names.
    DataError when there is none."""
    sav_dir = Path(sav_dir)
    done = []
    for mp4 in sorted(sav_dir.glob("*.mp4")):
        manual = mp4.with_name(f"{mp4.stem}_manual.json")
        if manual.is_file():
            sav_to_folder(mp4, manual, out_split_dir)
            done.append(mp4.stem)
    if not done:
        raise DataError(f"{sav_dir}: no <video>.mp4 with a <video>_manual.json (the SA-V train layout)")
    return done
