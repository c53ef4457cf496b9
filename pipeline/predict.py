"""Command `predict`: a model, images, folders or videos and text prompts in; predictions.json and overlays out.

    python -m pipeline predict --model DIR_OR_tiny [--image PATH [PATH ...]] [--video FILE [FILE ...]]
        --prompt TEXT [--prompt TEXT ...] --out DIR [--frame-step N] [--threshold 0.5]
        [--mode detection|segmentation] [--max-dets 100] [--prompt-chunk N] [--device auto|cpu|cuda] [--image-size N]

Inputs (at least one --image or --video):
- --image: image files, and folders standing for every image file in them (IMAGE_SUFFIXES, by name; hidden files
  and subfolders are not read). Images are read with their EXIF orientation applied, as image viewers show them;
  coordinates refer to that view.
- --video: video files, read with PyAV (FFmpeg): every --frame-step-th frame from the first, turned upright by the
  stream's display rotation, as players show it.
Every input is checked (found; opens as an image; a video has a video stream whose first frame decodes) before the
model loads, and pictures are decoded one at a time as inference reaches them: a folder or a long video needs the
memory of one picture. A progress bar counts images and frames.

Kept: detections scoring above --threshold (score = sigmoid(logit) * sigmoid(presence)), at most --max-dets per
picture across all prompts (the same selection as `sam3.inference.predict_images`).

Outputs in --out:
- predictions.json, COCO style:
    images       id 1.. in input order. An image: file_name (the path as found), width, height. A video frame: file_name
                 (the video's path), video_id, frame_index (0-based, in decoding order), time_s (its timestamp,
                 null when the stream has none), width, height
    videos       id 1.., file_name, fps (null when unknown), frame_step, frames (frames predicted); only with --video
    categories   id 1.., name = each prompt in the order given
    annotations  id, image_id, category_id, bbox [x, y, w, h] in the picture's pixels, score, area, iscrowd 0, and
                 segmentation as compressed RLE in segmentation mode; best first per picture
- <stem>_overlay.png per image, <stem>_overlay/<frame index, 6 digits>.png per predicted video frame: masks, boxes and
  "prompt score" labels in one colour per prompt (`sam3.overlay`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from pipeline.evaluate import MODES
from pipeline.video import VIDEO_SUFFIXES, VideoInfo, probe_video, video_frames
from sam3.errors import ConfigError, DataError
from sam3.images import READ_ERRORS
from sam3.images import read_image as read_upright
from sam3.io import write_json

if TYPE_CHECKING:
    import torch

    from sam3.inference import Detection
    from sam3.model import Sam3Detector

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.json"
OVERLAY_SUFFIX = "_overlay.png"
FRAME_OVERLAY_SUFFIX = "_overlay"  # a video's folder of per-frame overlays
DEFAULT_THRESHOLD = 0.5  # the SA-Co operating point: what a user would keep
# What a folder given to --image is searched for (lower-case; a file's suffix is compared lower-cased).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pbm", ".pgm", ".ppm", ".pnm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sam3.config import DEFAULT_MAX_DETS, DEFAULT_PROMPT_CHUNK, DEVICE_CHOICES

    parser.add_argument("--model", required=True, help="'tiny', 'full' or a model folder (transformers format)")
    parser.add_argument(
        "--image", nargs="+", type=Path, default=[], help="image files, or folders: every image file in them"
    )
    parser.add_argument("--video", nargs="+", type=Path, default=[], help="video files (read with PyAV)")
    parser.add_argument("--prompt", required=True, action="append", help="text prompt; repeat for several")
    parser.add_argument("--out", required=True, type=Path, help="folder for predictions.json and the overlays")
    parser.add_argument(
        "--frame-step", type=int, default=1, help="predict every N-th video frame (default: %(default)s, every frame)"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="keep detections scoring above this (default: %(default)s)",
    )
    parser.add_argument(
        "--mode", choices=MODES, default="detection", help="segmentation adds masks (default: %(default)s)"
    )
    parser.add_argument(
        "--max-dets",
        type=int,
        default=DEFAULT_MAX_DETS,
        help="most detections kept per image, across prompts (default: %(default)s)",
    )
    parser.add_argument(
        "--prompt-chunk",
        type=int,
        default=DEFAULT_PROMPT_CHUNK,
        help="prompts per decoder call; lower it if memory runs out (default: %(default)s)",
    )
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto (default): CUDA when available")
    parser.add_argument("--image-size", type=int, help="model input size (default: the model's own)")


# ---------------------------------------------------------------- images and folders


def read_image(path: Path) -> Image.Image:
    """The RGB image at `path`, upright (`sam3.images.read_image`); DataError when missing or not an image."""
    try:
        return read_upright(path)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; --image takes image files") from None
    except READ_ERRORS as err:
        raise DataError(f"{path}: cannot read as an image ({err})") from None


def check_image(path: Path) -> None:
    """DataError unless `path` exists and opens as an image (its header only: pixels are decoded when predicted)."""
    if path.suffix.lower() in VIDEO_SUFFIXES:
        raise DataError(f"{path}: is a video; pass it with --video")
    try:
        with Image.open(path):
            pass
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except READ_ERRORS as err:
        raise DataError(f"{path}: cannot read as an image ({err})") from None


def expand_images(paths: Sequence[Path]) -> list[Path]:
    """The image files of --image in order: a file as given, a folder as its image files sorted by name.

    DataError for a folder without image files (saying so when it holds videos).
    """
    files: list[Path] = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        entries = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
        images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            videos = [p for p in entries if p.suffix.lower() in VIDEO_SUFFIXES]
            hint = f"; it holds videos ({videos[0].name}, ...): pass them with --video" if videos else ""
            raise DataError(
                f"{path}: no image files in this folder (looked for {', '.join(IMAGE_SUFFIXES)}; subfolders are not "
                f"searched){hint}"
            )
        files.extend(images)
    return files


# ---------------------------------------------------------------- what is predicted


@dataclass
class Picture:
    """One image or video frame to predict: the upright RGB image, its COCO image entry (without the id), where its
    overlay goes, and which input it comes from (index into the images, then the videos)."""

    image: Image.Image
    entry: dict[str, Any]
    overlay: Path
    source: int


@dataclass(frozen=True)
class Inputs:
    """The checked inputs of a run: image files (folders expanded) and videos."""

    images: list[Path]
    videos: list[VideoInfo]

    def pictures(self, out: Path, frame_step: int) -> Iterator[Picture]:
        """Every picture in input order: the images, then each video's frames (decoded as they are reached)."""
        for source, path in enumerate(self.images):
            image = read_image(path)
            entry = {"file_name": str(path), "width": image.width, "height": image.height}
            yield Picture(image, entry, self.overlay(out, source), source)
        for video_id, video in enumerate(self.videos, start=1):
            source = len(self.images) + video_id - 1
            folder = self.overlay(out, source)
            for index, time_s, image in video_frames(video.path, frame_step):
                entry = {
                    "file_name": str(video.path),
                    "video_id": video_id,
                    "frame_index": index,
                    "time_s": time_s,
                    "width": image.width,
                    "height": image.height,
                }
                yield Picture(image, entry, folder / f"{index:06d}.png", source)

    @property
    def paths(self) -> list[Path]:
        """Every input file: the images, then the videos (the `source` order)."""
        return [*self.images, *(video.path for video in self.videos)]

    def overlay(self, out: Path, source: int) -> Path:
        """An image's overlay PNG, or a video's folder of per-frame overlay PNGs."""
        path = self.paths[source]
        return out / f"{path.stem}{OVERLAY_SUFFIX if source < len(self.images) else FRAME_OVERLAY_SUFFIX}"

    def total(self, frame_step: int) -> int | None:
        """Pictures to predict, None when a video does not say how many frames it has (the bar then counts up)."""
        counts = [video.frames for video in self.videos]
        if None in counts:
            return None
        return len(self.images) + sum(math.ceil(count / frame_step) for count in counts if count is not None)


def check_inputs(
    images: Sequence[Path], videos: Sequence[Path], prompts: list[str], threshold: float, options: dict[str, int]
) -> Inputs:
    """The run's inputs, checked (module docstring); ConfigError for an empty or repeated prompt, no input, two
    inputs whose overlays would share a name, a bad threshold or option; DataError for an unreadable input."""
    from sam3.tokenizer import clean_text  # equal after cleaning = the same tokens, the same detections

    seen: dict[str, str] = {}
    for prompt in prompts:
        key = clean_text(prompt)
        if not key:
            raise ConfigError("--prompt is empty; give a text such as 'red circle'")
        if key in seen:
            raise ConfigError(f"--prompt {prompt!r} repeats {seen[key]!r} (the model sees the same text); drop one")
        seen[key] = prompt
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"--threshold must be in [0, 1) (scores are probabilities), got {threshold}")
    for name, value in options.items():
        if value < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {value}")
    if not images and not videos:
        raise ConfigError("nothing to predict: give --image (files or folders) or --video (files)")
    image_files = expand_images(images)
    stems = Counter(path.stem for path in [*image_files, *videos])
    repeated = sorted(stem for stem, count in stems.items() if count > 1)
    if repeated:
        raise ConfigError(
            f"several inputs are named {repeated[0]!r}; their overlays ({repeated[0]}{OVERLAY_SUFFIX} or "
            f"{repeated[0]}{FRAME_OVERLAY_SUFFIX}/) would overwrite each other; rename them or run them separately"
        )
    for path in image_files:
        check_image(path)
    return Inputs(image_files, [probe_video(path) for path in videos])


# ---------------------------------------------------------------- inference, one picture at a time


class PictureDetector:
    """The detections of the run's prompts on one picture at a time, as `sam3.inference.predict_images` computes
    them: the picture warped to S x S (the validation transform), the best `max_dets` scores above `threshold`
    across prompts, boxes (and masks) in the picture's pixels. The prompts are encoded once, here."""

    def __init__(
        self,
        detector: Sam3Detector,
        prompts: list[str],
        with_masks: bool,
        prompt_chunk: int,
        max_dets: int,
        threshold: float,
        device: str,
    ) -> None:
        from sam3.inference import encode_prompt_features, model_input_size, resolve_device

        self.detector = detector
        self.prompts = prompts
        self.with_masks = with_masks
        self.prompt_chunk = prompt_chunk
        self.max_dets = max_dets
        self.threshold = threshold
        self.device = resolve_device(device)
        self.size = model_input_size(detector)
        detector.eval().to(self.device)
        with self._inference():
            self.features = encode_prompt_features(detector, prompts, prompt_chunk)

    def _inference(self) -> contextlib.ExitStack:
        """No autograd; bf16 autocast on CUDA, fp32 on the CPU (as sam3.inference)."""
        import torch

        from sam3.engine import autocast

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast(self.device, torch.bfloat16))
        return stack

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """float [1, 3, S, S]: `image` (RGB, 8 bits) through the validation transform."""
        import torch
        from torchvision.transforms.v2.functional import pil_to_tensor

        from sam3.data.transforms import val_transform

        return val_transform(pil_to_tensor(image), torch.zeros(0, 4), None, self.size).image[None]

    def __call__(self, image: Image.Image) -> list[Detection]:
        from sam3.inference import Detection, boxes_to_original_xyxy, masks_to_original, top_detections

        with self._inference():
            pixels = self.pixel_values(image).to(self.device)
            top = top_detections(
                self.detector, pixels, self.features, self.with_masks, self.prompt_chunk, self.max_dets, self.threshold
            )[0]
        size = {"width": image.width, "height": image.height}
        boxes = boxes_to_original_xyxy(top.boxes, size).tolist()
        masks = masks_to_original(top.mask_logits, size) if top.mask_logits is not None else iter([None] * len(top))
        return [
            Detection(prompt_index=p, prompt=self.prompts[p], score=s, box=tuple(box), mask=next(masks))
            for s, p, box in zip(top.scores.tolist(), top.prompt_ids.tolist(), boxes, strict=True)
        ]


def annotations(image_id: int, first_id: int, detections: list[Detection]) -> list[dict[str, Any]]:
    """COCO annotations of one picture's detections, ids from `first_id` (module docstring)."""
    from sam3.coco import encode_mask

    result = []
    for detection in detections:
        x0, y0, x1, y1 = detection.box
        annotation = {
            "id": first_id + len(result),
            "image_id": image_id,
            "category_id": detection.prompt_index + 1,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": detection.score,
            "area": (x1 - x0) * (y1 - y0),
            "iscrowd": 0,
        }
        if detection.mask is not None:
            annotation["segmentation"] = encode_mask(detection.mask)
            annotation["area"] = int(detection.mask.sum())
        result.append(annotation)
    return result


@dataclass
class InputSummary:
    """What one input gave: its file, overlay (a PNG, or a video's folder of PNGs), kept detections, and for a
    video the number of frames predicted (None for an image)."""

    path: Path
    overlay: Path
    detections: int
    frames: int | None = None


@dataclass
class PredictResult:
    predictions_file: Path
    inputs: list[InputSummary]


def predict(
    model: str,
    image_paths: list[Path],
    prompts: list[str],
    out: Path,
    threshold: float,
    with_masks: bool,
    max_dets: int,
    prompt_chunk: int,
    device: str,
    image_size: int | None = None,
    video_paths: Sequence[Path] = (),
    frame_step: int = 1,
) -> PredictResult:
    """Detect `prompts` on each image and video frame; write predictions.json and the overlays under `out`."""
    from tqdm import tqdm

    from sam3.model import load_model
    from sam3.overlay import draw_detections

    options = {"max-dets": max_dets, "prompt-chunk": prompt_chunk, "frame-step": frame_step}
    inputs = check_inputs(image_paths, video_paths, prompts, threshold, options)  # before the model loads
    detect = PictureDetector(
        load_model(model, image_size=image_size), prompts, with_masks, prompt_chunk, max_dets, threshold, device
    )
    images: list[dict[str, Any]] = []
    all_annotations: list[dict[str, Any]] = []
    summaries = [
        InputSummary(path, inputs.overlay(out, source), 0, frames=None if source < len(inputs.images) else 0)
        for source, path in enumerate(inputs.paths)
    ]
    with tqdm(total=inputs.total(frame_step), desc="predict", unit="img") as bar:
        for picture in inputs.pictures(out, frame_step):
            detections = detect(picture.image)
            image_id = len(images) + 1
            images.append({"id": image_id, **picture.entry})
            all_annotations += annotations(image_id, len(all_annotations) + 1, detections)
            picture.overlay.parent.mkdir(parents=True, exist_ok=True)
            draw_detections(picture.image, detections, prompts).save(picture.overlay)
            summary = summaries[picture.source]
            summary.detections += len(detections)
            if summary.frames is not None:
                summary.frames += 1
            bar.update()
    document: dict[str, Any] = {
        "images": images,
        "categories": [{"id": i, "name": prompt} for i, prompt in enumerate(prompts, start=1)],
        "annotations": all_annotations,
    }
    if inputs.videos:
        document["videos"] = [
            {"id": i, "file_name": str(v.path), "fps": v.fps, "frame_step": frame_step, "frames": s.frames}
            for i, (v, s) in enumerate(zip(inputs.videos, summaries[len(inputs.images) :], strict=True), start=1)
        ]
    predictions_file = out / PREDICTIONS_FILE
    write_json(predictions_file, document)
    return PredictResult(predictions_file, summaries)


def run(args: argparse.Namespace) -> int:
    result = predict(
        args.model,
        args.image,
        args.prompt,
        args.out,
        threshold=args.threshold,
        with_masks=args.mode == "segmentation",
        max_dets=args.max_dets,
        prompt_chunk=args.prompt_chunk,
        device=args.device,
        image_size=args.image_size,
        video_paths=args.video,
        frame_step=args.frame_step,
    )
    for item in result.inputs:
        frames = "" if item.frames is None else f"{item.frames} frames, "
        print(f"{item.path}: {frames}{item.detections} detections above {args.threshold} -> {item.overlay}")
    print(f"wrote {result.predictions_file}")
    return 0
