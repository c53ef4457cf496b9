"""`python -m pipeline vos-preprocess`: resize a DAVIS/MOSE-layout VOS dataset once, to the tracker's input size.

    python -m pipeline vos-preprocess --in SPLIT_OR_ROOT --out DIR [--size 1024] [--no-enlarge] [--workers N]

Input: a MOSE root (`train/`, `valid/`, ... each holding `JPEGImages/` and `Annotations/`) or one split folder
(`JPEGImages/`, `Annotations/`, maybe `ImageSets/`, as DAVIS). The output mirrors it: the same split folders, the
same `<video>/<frame>` paths under JPEGImages/ and Annotations/ (nested folders such as DAVIS's `480p/` included),
`ImageSets/` copied byte for byte, and `preprocess.json` with the counts (no timing: the same bytes on any machine).

Per file, with (w, h) its size and scale = SIZE / max(w, h) (never above 1 with --no-enlarge):

    new = (max(1, round(w * scale)), max(1, round(h * scale)))      the longer side becomes SIZE, aspect kept

- already `new`: copied byte for byte (no re-encoding loss; a second run on the output copies everything);
- frames: bilinear resampling, antialiased when shrinking (Pillow widens the filter by 1 / scale), saved in their
  own format (JPEG at quality 95 with fixed settings, as the image preprocess stage);
- annotations (indexed PNGs, `sam3.video.palette`): nearest neighbour on the palette indices, palette kept, so
  every output value is an object id of the input. An object thinner than the sampling step may vanish when
  shrinking; such files are counted and logged.

SAM 2.1 trains at 1024 x 1024 and SAM 3's tracker at 1008 x 1008 (`sam3.video.config.IMAGE_SIZE`); resizing once
here instead of in every data-loader step saves decoding full-size frames each epoch. Deterministic: the same
input gives the same bytes whatever --workers is. Unreadable frames are a DataError naming the file: the validate
stage normally quarantines them before this one runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.preprocess import JPEG_OPTIONS, PNG_OPTIONS
from pipeline.stage_args import Shorthand, add_params_arguments, stage_params
from sam3.errors import ConfigError, DataError
from sam3.video.config import IMAGE_SIZE

log = logging.getLogger(__name__)

DEFAULT_SIZE = IMAGE_SIZE["sam2.1"]
FRAMES_DIR = "JPEGImages"
ANNOTATIONS_DIR = "Annotations"
LISTS_DIR = "ImageSets"
SUMMARY_FILE = "preprocess.json"
FRAME_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
ROOT_SPLIT = "."  # the split name of a single split folder (DAVIS): its files sit directly under --in / --out


@dataclass(frozen=True)
class VideoJob:
    """One video of one split: its frame and annotation folders in and out (a folder is None when absent)."""

    name: str  # "<split>/<video>" for messages
    frames_in: Path | None
    frames_out: Path
    annotations_in: Path | None
    annotations_out: Path
    size: int
    enlarge: bool


@dataclass(frozen=True)
class VideoResult:
    frames: int
    annotations: int
    resized: int  # files resized (frames and annotations)
    copied: int  # files copied byte for byte
    ids_lost: int  # annotation files whose set of ids shrank in resizing


def target_size(width: int, height: int, size: int, enlarge: bool = True) -> tuple[int, int]:
    """(new_w, new_h) with the longer side `size`: scale = size / max(w, h), capped at 1 unless `enlarge`;
    new = max(1, round(side * scale)) per side (the same rounding as `sam3.resize.fit_size`)."""
    scale = size / max(width, height)
    if not enlarge:
        scale = min(1.0, scale)
    return max(1, round(width * scale)), max(1, round(height * scale))


def find_splits(root: Path) -> list[str]:
    """The split folders of `root`: [ROOT_SPLIT] when it holds JPEGImages/ itself, else its sub-folders holding
    one (train/, valid/, ...), sorted. DataError naming `root` when there are none."""
    if not root.is_dir():
        raise DataError(f"{root}: input folder not found")
    if (root / FRAMES_DIR).is_dir():
        return [ROOT_SPLIT]
    splits = sorted(p.name for p in root.iterdir() if (p / FRAMES_DIR).is_dir())
    if not splits:
        raise DataError(
            f"{root}: no {FRAMES_DIR}/ folder and no split folder (train/, valid/) holding one; give a MOSE root "
            f"(train/{FRAMES_DIR}, train/{ANNOTATIONS_DIR}, ...) or one split folder ({FRAMES_DIR}/, "
            f"{ANNOTATIONS_DIR}/)"
        )
    return splits


def video_folders(folder: Path, suffixes: frozenset[str]) -> list[str]:
    """Relative paths (posix) of the folders under `folder` that directly hold files with these suffixes."""
    if not folder.is_dir():
        return []
    found = {p.parent.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix.lower() in suffixes}
    return sorted(found - {"."})


def plan_split(in_split: Path, out_split: Path, split: str, size: int, enlarge: bool) -> list[VideoJob]:
    """One job per video found under JPEGImages/ or Annotations/ (the union: a video with only one is kept)."""
    frames_root, annotations_root = in_split / FRAMES_DIR, in_split / ANNOTATIONS_DIR
    with_frames = set(video_folders(frames_root, FRAME_SUFFIXES))
    with_annotations = set(video_folders(annotations_root, frozenset({".png"})))
    return [
        VideoJob(
            name=video if split == ROOT_SPLIT else f"{split}/{video}",
            frames_in=frames_root / video if video in with_frames else None,
            frames_out=out_split / FRAMES_DIR / video,
            annotations_in=annotations_root / video if video in with_annotations else None,
            annotations_out=out_split / ANNOTATIONS_DIR / video,
            size=size,
            enlarge=enlarge,
        )
        for video in sorted(with_frames | with_annotations)
    ]


def process_video(job: VideoJob) -> VideoResult:
    """Resize or copy every frame and annotation of one video (runs in a worker process)."""
    frame_sizes: dict[str, tuple[int, int]] = {}
    resized = copied = 0
    frames = sorted(p for p in job.frames_in.iterdir() if p.suffix.lower() in FRAME_SUFFIXES) if job.frames_in else []
    for path in frames:
        was_resized, frame_sizes[path.stem] = _frame(path, job.frames_out / path.name, job.size, job.enlarge)
        resized += was_resized
        copied += not was_resized
    annotations = sorted(job.annotations_in.glob("*.png")) if job.annotations_in else []
    ids_lost = 0
    for path in annotations:
        was_resized, lost = _annotation(path, job.annotations_out / path.name, job, frame_sizes.get(path.stem))
        resized += was_resized
        copied += not was_resized
        ids_lost += lost
    return VideoResult(len(frames), len(annotations), resized, copied, ids_lost)


def _frame(source: Path, target: Path, size: int, enlarge: bool) -> tuple[bool, tuple[int, int]]:
    """Copy or resize one frame; returns (resized, its input (w, h)). DataError naming the file if unreadable."""
    from PIL import Image

    from sam3.images import READ_ERRORS, to_8bit

    try:
        with Image.open(source) as im:
            new_size = target_size(*im.size, size, enlarge)
            fmt = "JPEG" if im.format == "MPO" else im.format
            im.load()  # decode now: a truncated file fails here, even when it would only be copied
            if new_size == im.size:
                _replace(target, lambda tmp: shutil.copyfile(source, tmp))
                return False, im.size
            options = JPEG_OPTIONS if fmt == "JPEG" else PNG_OPTIONS if fmt == "PNG" else {}
            picture = to_8bit(im)  # 16-bit greyscale to 8 bits as every reader maps it
            if picture.mode not in ("RGB", "L"):
                picture = picture.convert("RGB")  # palette / alpha / CMYK: resample colours, not indices
            small = picture.resize(new_size, Image.Resampling.BILINEAR)
            _replace(target, lambda tmp: small.save(tmp, format=fmt, **options))
            return True, im.size
    except READ_ERRORS as err:
        raise DataError(
            f"{source}: cannot read the frame ({err}); the validate stage normally quarantines unreadable frames "
            "before preprocessing: run it, or remove the file"
        ) from None


def _annotation(source: Path, target: Path, job: VideoJob, frame_size: tuple[int, int] | None) -> tuple[bool, bool]:
    """Copy or resize one indexed PNG with nearest neighbour; returns (resized, some id vanished)."""
    import numpy as np
    from PIL import Image

    from sam3.video.palette import read_label_map

    labels = read_label_map(source)  # DataError naming the file: unreadable or not palette-indexed
    height, width = labels.shape
    if frame_size is not None and frame_size != (width, height):
        raise DataError(
            f"{source}: annotation is {width}x{height} pixels but its frame in {job.frames_in} is "
            f"{frame_size[0]}x{frame_size[1]}; an annotation must match its frame"
        )
    new_size = target_size(width, height, job.size, job.enlarge)
    if new_size == (width, height):
        _replace(target, lambda tmp: shutil.copyfile(source, tmp))
        return False, False
    with Image.open(source) as im:
        small = im.resize(new_size, Image.Resampling.NEAREST)  # mode "P" and its palette are kept
        options = dict(PNG_OPTIONS)
        if "transparency" in im.info:
            options["transparency"] = im.info["transparency"]
    _replace(target, lambda tmp: small.save(tmp, format="PNG", **options))
    lost = bool(set(np.unique(labels).tolist()) - set(np.unique(np.asarray(small)).tolist()))
    return True, lost


def _replace(target: Path, write: Any) -> None:
    """Write through a temporary name, then rename: an interrupted run never leaves half a file under the real one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    write(tmp)
    tmp.replace(target)


def _run_jobs(jobs: list[VideoJob], workers: int) -> Iterator[VideoResult]:
    """Results of `process_video` in job order, on `workers` processes, with a progress bar over videos."""
    from tqdm import tqdm

    workers = min(workers, len(jobs))
    with tqdm(total=len(jobs), desc="vos-preprocess", unit="video") as bar:
        if workers <= 1:
            for job in jobs:
                yield process_video(job)
                bar.update()
            return
        # spawn: workers import only this module and Pillow, whatever the parent has loaded (as pipeline.preprocess)
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            for result in executor.map(process_video, jobs):  # map keeps the job order
                yield result
                bar.update()
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


def preprocess_vos(
    in_dir: str | Path, out_dir: str | Path, size: int = DEFAULT_SIZE, enlarge: bool = True, workers: int = 1
) -> dict[str, Any]:
    """Write the resized copy of `in_dir` to `out_dir` (module docstring) and `out_dir`/preprocess.json; return it
    plus the seconds it took (logged, not written: the folder is a DVC output and must be the same on any machine):

    {"size", "enlarge", "workers", "videos", "frames", "annotations", "resized", "copied", "ids_lost", "seconds",
     "splits": {split ("." for a single split folder): {"videos", "frames", "annotations", "resized", "copied",
     "ids_lost"}}}
    Raises ConfigError for a bad size, workers or out_dir, DataError (naming the folder or file) for bad input.
    """
    start = time.perf_counter()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if size < 1:
        raise ConfigError(f"vos-preprocess: --size must be a positive number of pixels, got {size}")
    if workers < 1:
        raise ConfigError(f"vos-preprocess: --workers must be at least 1, got {workers}")
    splits = find_splits(in_dir)
    if out_dir.resolve() == in_dir.resolve():
        raise ConfigError(f"{out_dir}: --out must differ from --in (it would overwrite the input)")

    plans = {split: plan_split(in_dir / split, out_dir / split, split, size, enlarge) for split in splits}
    results = iter(list(_run_jobs([job for jobs in plans.values() for job in jobs], workers)))
    per_split = {}
    for split, jobs in plans.items():
        done = [next(results) for _ in jobs]
        per_split[split] = {
            "videos": len(jobs),
            "frames": sum(r.frames for r in done),
            "annotations": sum(r.annotations for r in done),
            "resized": sum(r.resized for r in done),
            "copied": sum(r.copied for r in done),
            "ids_lost": sum(r.ids_lost for r in done),
        }
        lists = in_dir / split / LISTS_DIR
        if lists.is_dir():
            shutil.copytree(lists, out_dir / split / LISTS_DIR, dirs_exist_ok=True)
    totals = {key: sum(c[key] for c in per_split.values()) for key in ("videos", "frames", "annotations")}
    totals |= {key: sum(c[key] for c in per_split.values()) for key in ("resized", "copied", "ids_lost")}
    summary = {"size": size, "enlarge": enlarge, "workers": workers, **totals, "splits": per_split}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "seconds": round(time.perf_counter() - start, 3)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--in",
        dest="input",
        type=Path,
        required=True,
        metavar="SPLIT_OR_ROOT",
        help=f"a MOSE root (train/, valid/ holding {FRAMES_DIR}/ and {ANNOTATIONS_DIR}/) or one split folder",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (same layout, plus preprocess.json)")
    parser.add_argument(
        "--no-enlarge",
        dest="enlarge",
        action="store_false",
        help="copy frames whose longer side is already at most SIZE instead of enlarging them",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    add_params_arguments(parser, SHORTHANDS)


SHORTHANDS = (
    Shorthand(
        "--size",
        "vos.preprocess.size",
        int,
        help=f"longer side of every frame and annotation in pixels: SAM 2.1 uses {IMAGE_SIZE['sam2.1']}, "
        f"SAM 3 {IMAGE_SIZE['sam3']}",
    ),
)


def run(args: argparse.Namespace) -> int:
    size = stage_params(args, SHORTHANDS).vos.preprocess.size
    summary = preprocess_vos(args.input, args.out, size=size, enlarge=args.enlarge, workers=args.workers)
    for split, counts in summary["splits"].items():
        log.info(
            "%s: %d videos, %d frames, %d annotations (%d files resized, %d copied)",
            args.input if split == ROOT_SPLIT else split,
            counts["videos"],
            counts["frames"],
            counts["annotations"],
            counts["resized"],
            counts["copied"],
        )
        if counts["ids_lost"]:
            log.warning(
                "%s: %d annotation(s) lost an object id in resizing (thinner than the sampling step)",
                split,
                counts["ids_lost"],
            )
    log.info("wrote %s in %.1f s", args.out, summary["seconds"])
    return 0
