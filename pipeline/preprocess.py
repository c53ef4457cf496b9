"""Preprocess stage: shrink every image of a COCO dataset to fit SIZE x SIZE and move its annotations to match.

    python -m pipeline preprocess DATASET_DIR --out DIR [--params FILE] [--set preprocess.size=1008 ...]

Settings: params.yaml's `preprocess` section (`--size N` and `--workers N` are short for `--set preprocess.size=N`
and `--set preprocess.workers=N`).

Input and output use the Roboflow layout (`<dir>/{train,valid,test}/_annotations.coco.json` + images).
Per image (geometry in `sam3.resize`):
- (new_w, new_h) = fit_size(width, height, size): aspect ratio kept, never enlarged.
- An image that already fits is copied byte for byte and its annotations are kept unchanged.
- A larger image is resized (Lanczos) and saved in its own format: PNG stays PNG; JPEG is re-encoded at quality
  JPEG_QUALITY with fixed settings. Palette ("P") and 1-bit images are resampled as RGB(A) / L, because Pillow
  would otherwise fall back to nearest-neighbour. A 16-bit greyscale image is first mapped to 8 bits exactly as
  every reader maps it (`sam3.images.to_8bit`), so the resized file holds the pixels training would see, not
  values clipped to white; a copied one stays 16-bit (the readers map it). Its boxes, polygons, RLE masks and
  areas are scaled.
- The record gets the new width/height and `orig_width`/`orig_height`: the size before ANY preprocessing (kept
  when the input was itself preprocessed), so predictions can always be mapped back to the true original.

Few-shot files: every `fewshot_train_shot*_seed*.json` of the train folder is carried along. Its images must be
images of the train split (same id, file_name, width and height; the validate stage checks this too); their
records and annotations are moved exactly as the train split's are, with no image written twice.

Deterministic: the same input gives the same bytes whatever `workers` is, and a second run into the same
folder rewrites identical files. Running the stage on its own output changes nothing (every image fits).
Files in a split folder that no image record names are not copied; they are counted and logged.
"""

from __future__ import annotations

import argparse
import copy
import logging
import multiprocessing
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image
from tqdm import tqdm

from pipeline.fewshot import FEWSHOT_SPLIT, fewshot_files
from pipeline.stage_args import Shorthand, add_params_arguments, stage_params
from sam3.coco import ANNOTATIONS_FILE, load_coco, present_splits, save_coco, split_annotation_path
from sam3.config import SAM3_IMAGE_SIZE
from sam3.errors import ConfigError, DataError
from sam3.images import make_upright, to_8bit, upright_size
from sam3.resize import ORIG_HEIGHT, ORIG_WIDTH, fit_size, original_size, scale_annotation

log = logging.getLogger(__name__)

DEFAULT_SIZE = SAM3_IMAGE_SIZE  # larger images would only be shrunk again at train time
JPEG_QUALITY = 95
# Fixed JPEG settings so that re-encoding is reproducible; 4:4:4 chroma keeps thin coloured edges sharp.
JPEG_OPTIONS: dict[str, Any] = {"quality": JPEG_QUALITY, "subsampling": 0, "optimize": False, "progressive": False}
PNG_OPTIONS: dict[str, Any] = {"compress_level": 6, "optimize": False}


@dataclass(frozen=True)
class ImageJob:
    """One image and its annotations: the unit of work a worker process handles."""

    annotation_file: Path  # the split's annotation file, named in error messages
    source: Path
    target: Path
    record: dict[str, Any]
    annotations: list[dict[str, Any]]
    size: int


@dataclass(frozen=True)
class ImageResult:
    record: dict[str, Any]
    annotations: list[dict[str, Any]]
    resized: bool


@dataclass
class SplitPlan:
    """One split read and checked: its COCO data, one job per image, and where each annotation came from."""

    split: str
    data: dict[str, Any]
    jobs: list[ImageJob]
    annotation_index: list[list[int]]  # per job, the positions of its annotations in data["annotations"]
    unreferenced_files: int
    results: list[ImageResult] = field(default_factory=list)


SHORTHANDS = (
    Shorthand("--size", "preprocess.size", int, help="fit images in SIZE x SIZE"),
    Shorthand("--workers", "preprocess.workers", int, help="worker processes"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset_dir", type=Path, help="COCO dataset in the Roboflow layout (validated)")
    parser.add_argument("--out", type=Path, required=True, help="output dataset folder (same layout)")
    add_params_arguments(parser, SHORTHANDS)


def run(args: argparse.Namespace) -> int:
    from sam3.run_lock import run_lock

    params = stage_params(args, SHORTHANDS).preprocess
    with run_lock(args.out, "preprocess run"):  # a second writer of the folder: RunLocked naming the first
        summary = preprocess_dataset(args.dataset_dir, args.out, size=params.size, workers=params.workers)
    for split, counts in summary["splits"].items():
        log.info(
            "%s: %d images (%d resized, %d copied), %d annotations",
            split,
            counts["images"],
            counts["resized"],
            counts["copied"],
            counts["annotations"],
        )
    log.info("wrote %s in %.1f s", args.out, summary["seconds"])
    return 0


def preprocess_dataset(
    dataset_dir: str | Path, out_dir: str | Path, size: int = DEFAULT_SIZE, workers: int = 1
) -> dict[str, Any]:
    """Write the resized copy of `dataset_dir` to `out_dir`; return a summary.

    Summary: {"size", "workers", "images", "resized", "copied", "annotations", "seconds",
              "splits": {split: {"images", "resized", "copied", "annotations", "unreferenced_files"}},
              "fewshot": {"train/<file>": {"images", "annotations"}}}
    Raises ConfigError for a bad size/workers/out_dir and DataError (naming the file) for bad input.
    """
    start = time.perf_counter()
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    if size < 1:
        raise ConfigError(f"--size must be a positive number of pixels, got {size}")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    splits = present_splits(dataset_dir)
    if out_dir.resolve() == dataset_dir.resolve():
        raise ConfigError(f"{out_dir}: --out must differ from the input dataset folder (it would overwrite it)")

    plans = [_plan_split(dataset_dir, out_dir, split, size) for split in splits]
    train = next((plan for plan in plans if plan.split == FEWSHOT_SPLIT), None)
    fewshot = {path: _check_fewshot(path, train) for path in fewshot_files(dataset_dir / FEWSHOT_SPLIT)}
    jobs = [job for plan in plans for job in plan.jobs]
    results = list(_run_jobs(jobs, workers))
    for plan in plans:
        plan.results, results = results[: len(plan.jobs)], results[len(plan.jobs) :]
        save_coco(split_annotation_path(out_dir, plan.split), _assemble(plan))
    fewshot_counts = {}
    for path, data in fewshot.items():
        save_coco(out_dir / FEWSHOT_SPLIT / path.name, _resize_fewshot(path, data, size))
        label = f"{FEWSHOT_SPLIT}/{path.name}"
        fewshot_counts[label] = {"images": len(data["images"]), "annotations": len(data.get("annotations", []))}
        log.info("%s: carried along, %d images, %d annotations", label, *fewshot_counts[label].values())

    split_counts = {}
    for plan in plans:
        resized = sum(r.resized for r in plan.results)
        split_counts[plan.split] = {
            "images": len(plan.results),
            "resized": resized,
            "copied": len(plan.results) - resized,
            "annotations": len(plan.data.get("annotations", [])),
            "unreferenced_files": plan.unreferenced_files,
        }
        if plan.unreferenced_files:
            log.warning(
                "%s: %d file(s) not named by any image record were not copied",
                dataset_dir / plan.split,
                plan.unreferenced_files,
            )
    return {
        "size": size,
        "workers": workers,
        "images": sum(c["images"] for c in split_counts.values()),
        "resized": sum(c["resized"] for c in split_counts.values()),
        "copied": sum(c["copied"] for c in split_counts.values()),
        "annotations": sum(c["annotations"] for c in split_counts.values()),
        "seconds": time.perf_counter() - start,
        "splits": split_counts,
        "fewshot": fewshot_counts,
    }


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _plan_split(dataset_dir: Path, out_dir: Path, split: str, size: int) -> SplitPlan:
    """Read one split, check what the workers rely on (ids, file names, sizes, references), build its jobs."""
    ann_file = split_annotation_path(dataset_dir, split)
    data = load_coco(ann_file)
    images = data.get("images")
    if not isinstance(images, list):
        raise DataError(f"{ann_file}: 'images' must be a list of image records")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise DataError(f"{ann_file}: 'annotations' must be a list")

    position: dict[Any, int] = {}
    file_names: set[str] = set()
    for k, record in enumerate(images):
        where = f"{ann_file}: images[{k}]"
        if not isinstance(record, dict) or "id" not in record:
            raise DataError(f"{where}: must be an object with an 'id'")
        where = f"{ann_file}: image id {record['id']}"
        if record["id"] in position:
            raise DataError(f"{where}: duplicate image id; give every image its own id")
        position[record["id"]] = k
        name = record.get("file_name")
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: missing 'file_name'")
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or "\\" in name:
            raise DataError(f"{where}: file_name {name!r} must be a relative path inside {split}/")
        if path.as_posix() in file_names:
            raise DataError(f"{where}: file_name {name!r} is used by two image records")
        file_names.add(path.as_posix())
        if not (_positive_int(record.get("width")) and _positive_int(record.get("height"))):
            raise DataError(f"{where}: width and height must be positive integers (the image's pixel size)")
        try:
            orig_w, orig_h = original_size(record)
        except DataError as err:
            raise DataError(f"{ann_file}: {err}") from None
        if not (_positive_int(orig_w) and _positive_int(orig_h)):
            raise DataError(f"{where}: {ORIG_WIDTH} and {ORIG_HEIGHT} must be positive integers")

    annotation_index: list[list[int]] = [[] for _ in images]
    for k, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise DataError(f"{ann_file}: annotations[{k}] must be an object")
        image_id = ann.get("image_id")
        if image_id not in position:
            raise DataError(
                f"{ann_file}: annotation id {ann.get('id')} (annotations[{k}]) refers to image id {image_id!r}, "
                "which is not in 'images'; run `python -m pipeline validate` first"
            )
        annotation_index[position[image_id]].append(k)

    split_dir = dataset_dir / split
    jobs = [
        ImageJob(
            annotation_file=ann_file,
            source=split_dir / record["file_name"],
            target=out_dir / split / record["file_name"],
            record=record,
            annotations=[annotations[i] for i in annotation_index[k]],
            size=size,
        )
        for k, record in enumerate(images)
    ]
    present = {p.relative_to(split_dir).as_posix() for p in split_dir.rglob("*") if p.is_file()}
    carried = {p.name for p in fewshot_files(split_dir)} if split == FEWSHOT_SPLIT else set()
    unreferenced = len(present - file_names - {ANNOTATIONS_FILE} - carried)
    return SplitPlan(split, data, jobs, annotation_index, unreferenced)


def _check_fewshot(path: Path, train: SplitPlan | None) -> dict[str, Any]:
    """Read a few-shot file and check it is a subset of the train split: every image record equal to the train
    split's in id, file_name, width and height, every annotation on one of its images. DataError otherwise."""
    if train is None:
        raise DataError(f"{path}: few-shot file without a train split ({ANNOTATIONS_FILE}) to take its images from")
    data = load_coco(path)
    images, annotations = data.get("images"), data.get("annotations", [])
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DataError(f"{path}: 'images' and 'annotations' must be lists")
    train_images = {job.record["id"]: job.record for job in train.jobs}
    keys = ("file_name", "width", "height")
    ids = set()
    for k, record in enumerate(images):
        image_id = record.get("id") if isinstance(record, dict) else None
        same = train_images.get(image_id)
        if same is None or any(record.get(key) != same.get(key) for key in keys):
            raise DataError(
                f"{path}: images[{k}] (id {image_id!r}) is not an image of {train.split}/{ANNOTATIONS_FILE} with the "
                f"same {', '.join(keys)}; run `python -m pipeline validate` first (it quarantines such records)"
            )
        ids.add(image_id)
    for k, ann in enumerate(annotations):
        if not isinstance(ann, dict) or ann.get("image_id") not in ids:
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            raise DataError(
                f"{path}: annotations[{k}] refers to image id {image_id!r}, which is not in the file's 'images'; "
                "run `python -m pipeline validate` first"
            )
    return data


def _resize_fewshot(path: Path, data: dict[str, Any], size: int) -> dict[str, Any]:
    """A checked few-shot file with each image record and its annotations moved as `resize_records` moves the
    train split's (no image file is read or written: the train split's jobs wrote them)."""
    by_image: dict[Any, list[int]] = {record["id"]: [] for record in data["images"]}
    annotations = data.get("annotations", [])
    for k, ann in enumerate(annotations):
        by_image[ann["image_id"]].append(k)
    out_images, out_annotations = [], list(annotations)
    for record in data["images"]:
        where = f"{path}: image id {record['id']}"
        result = resize_records(record, [annotations[k] for k in by_image[record["id"]]], size, where)
        out_images.append(result.record)
        for k, ann in zip(by_image[record["id"]], result.annotations, strict=True):
            out_annotations[k] = ann
    return {**data, "images": out_images, **({"annotations": out_annotations} if "annotations" in data else {})}


def _assemble(plan: SplitPlan) -> dict[str, Any]:
    """The split's output COCO data: every top-level key kept, images and annotations in their input order."""
    out = dict(plan.data)
    out["images"] = [r.record for r in plan.results]
    if "annotations" in plan.data:
        annotations: list[dict[str, Any] | None] = [None] * len(plan.data["annotations"])
        for indices, result in zip(plan.annotation_index, plan.results, strict=True):
            for i, ann in zip(indices, result.annotations, strict=True):
                annotations[i] = ann
        out["annotations"] = annotations
    return out


def _run_jobs(jobs: list[ImageJob], workers: int) -> Iterator[ImageResult]:
    """Results of `process_image` in job order, on `workers` processes, with a progress bar."""
    workers = min(workers, len(jobs))
    with tqdm(total=len(jobs), desc="preprocess", unit="img") as bar:
        if workers <= 1:
            for job in jobs:
                yield process_image(job)
                bar.update()
            return
        # spawn: workers import only this module (Pillow, pycocotools), whatever the parent process has loaded
        # (forking a parent that runs torch or Prefect threads is unsafe).
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        chunksize = max(1, min(16, len(jobs) // (workers * 8)))
        try:
            for result in executor.map(process_image, jobs, chunksize=chunksize):  # map keeps the job order
                yield result
                bar.update()
        finally:
            executor.shutdown(wait=True, cancel_futures=True)  # after an error, skip the images not yet started


def process_image(job: ImageJob) -> ImageResult:
    """Copy or resize one image file and move its annotations to the new size (runs in a worker process)."""
    record = job.record
    where = f"{job.annotation_file}: image id {record['id']}"
    width, height = record["width"], record["height"]
    _write_image(job.source, job.target, (width, height), fit_size(width, height, job.size), where)
    return resize_records(record, job.annotations, job.size, where)


def resize_records(record: dict[str, Any], annotations: list[dict[str, Any]], size: int, where: str) -> ImageResult:
    """An image record and its annotations after the image is fitted in `size` x `size` (no file I/O): the new
    width/height and orig_width/orig_height on the record, annotations unchanged (copied) when it already fits,
    scaled by (new_w / width, new_h / height) otherwise. `where` names the image in errors."""
    width, height = record["width"], record["height"]
    new_w, new_h = fit_size(width, height, size)
    resized = (new_w, new_h) != (width, height)
    try:
        orig_w, orig_h = original_size(record)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    new_record = dict(record, width=new_w, height=new_h)
    new_record[ORIG_WIDTH], new_record[ORIG_HEIGHT] = orig_w, orig_h
    new_annotations = []
    for ann in annotations:
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, dict) and list(segmentation.get("size", [])) != [height, width]:
            raise DataError(
                f"{where}: annotation id {ann.get('id')}: RLE size {segmentation.get('size')} differs from the "
                f"image size [height, width] = [{height}, {width}]"
            )
        if not resized:
            new_annotations.append(copy.deepcopy(ann))
            continue
        try:
            new_annotations.append(scale_annotation(ann, new_w / width, new_h / height, new_h, new_w))
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
    return ImageResult(new_record, new_annotations, resized)


def _write_image(source: Path, target: Path, size: tuple[int, int], new_size: tuple[int, int], where: str) -> None:
    """Copy `source` to `target` when `new_size` equals `size`, else resize it and save in its own format. Sizes are
    upright (`sam3.images`): a copy keeps its EXIF orientation tag, a resized image is saved upright without it."""
    try:
        with Image.open(source) as im:
            if (found := upright_size(im)) != size:
                raise DataError(
                    f"{where}: {source} is {found[0]}x{found[1]} pixels but the record says {size[0]}x{size[1]}; "
                    "fix the record's width/height"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            if new_size == size:
                shutil.copyfile(source, tmp)  # byte for byte: no re-encoding loss
            else:
                _save_resized(make_upright(im), tmp, new_size)
            tmp.replace(target)  # atomic: an interrupted run never leaves half an image under the real name
    except FileNotFoundError:
        raise DataError(f"{where}: image file {source} not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{where}: cannot read image {source}: {err}") from None


def _save_resized(im: Image.Image, path: Path, new_size: tuple[int, int]) -> None:
    """Resize `im` to `new_size` with Lanczos and save it to `path` in `im`'s format with fixed settings."""
    fmt = "JPEG" if im.format == "MPO" else im.format  # MPO: a camera JPEG with extra frames; keep the first
    options: dict[str, Any] = {k: im.info[k] for k in ("icc_profile", "exif") if im.info.get(k)}
    if fmt == "JPEG":
        options.update(JPEG_OPTIONS)
    elif fmt == "PNG":
        options.update(PNG_OPTIONS)
    im = to_8bit(im)  # 16-bit greyscale -> "L" by the readers' rule; UnsupportedPixels (a ValueError) for float
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "1":
        im = im.convert("L")
    im.resize(new_size, Image.Resampling.LANCZOS).save(path, format=fmt, **options)
