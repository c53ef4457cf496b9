"""Command `predict`: a model, images and text prompts in; predictions.json and one overlay PNG per image out.

    python -m pipeline predict --model DIR_OR_tiny --image PATH [PATH ...] --prompt TEXT [--prompt TEXT ...]
        --out DIR [--threshold 0.5] [--mode detection|segmentation] [--max-dets 100] [--prompt-chunk N]
        [--device auto|cpu|cuda] [--image-size N]

Kept: detections scoring above --threshold (score = sigmoid(logit) * sigmoid(presence)), at most --max-dets per
image across all prompts (`sam3.inference.predict_images`).
- predictions.json, COCO style: images (id 1.., file_name = the path as given, width, height), categories (id 1..,
  name = each prompt in the order given), annotations (id, image_id, category_id, bbox [x, y, w, h] in the image's
  pixels, score, area, iscrowd 0, and segmentation as compressed RLE in segmentation mode), best first per image.
- <stem>_overlay.png per image: masks, boxes and "prompt score" labels in one colour per prompt (`sam3.overlay`).
Images are read with their EXIF orientation applied, as image viewers show them; coordinates refer to that view.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.evaluate import MODES
from sam3.errors import ConfigError, DataError
from sam3.images import READ_ERRORS
from sam3.images import read_image as read_upright
from sam3.io import write_json

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.json"
OVERLAY_SUFFIX = "_overlay.png"
DEFAULT_THRESHOLD = 0.5  # the SA-Co operating point: what a user would keep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sam3.config import DEFAULT_MAX_DETS, DEFAULT_PROMPT_CHUNK, DEVICE_CHOICES

    parser.add_argument("--model", required=True, help="'tiny', 'full' or a model folder (transformers format)")
    parser.add_argument("--image", required=True, nargs="+", type=Path, help="image files")
    parser.add_argument("--prompt", required=True, action="append", help="text prompt; repeat for several")
    parser.add_argument("--out", required=True, type=Path, help="folder for predictions.json and the overlays")
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


def check_inputs(images: list[Path], prompts: list[str], threshold: float) -> None:
    """ConfigError for an empty or repeated prompt, two images whose overlays would share a name, or a bad threshold."""
    from sam3.tokenizer import clean_text  # equal after cleaning = the same tokens, the same detections

    seen: dict[str, str] = {}
    for prompt in prompts:
        key = clean_text(prompt)
        if not key:
            raise ConfigError("--prompt is empty; give a text such as 'red circle'")
        if key in seen:
            raise ConfigError(f"--prompt {prompt!r} repeats {seen[key]!r} (the model sees the same text); drop one")
        seen[key] = prompt
    stems = Counter(path.stem for path in images)
    repeated = sorted(stem for stem, count in stems.items() if count > 1)
    if repeated:
        raise ConfigError(
            f"several images are named {repeated[0]!r}; their overlays ({repeated[0]}{OVERLAY_SUFFIX}) would "
            "overwrite each other; rename them or run them separately"
        )
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"--threshold must be in [0, 1) (scores are probabilities), got {threshold}")


def predictions_document(
    paths: list[Path], images: list[Image.Image], prompts: list[str], detections: list[list[Any]]
) -> dict[str, Any]:
    """The COCO-style predictions.json content (see the module docstring)."""
    from sam3.coco import encode_mask

    annotations = []
    for image_id, per_image in enumerate(detections, start=1):
        for detection in per_image:
            x0, y0, x1, y1 = detection.box
            annotation = {
                "id": len(annotations) + 1,
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
            annotations.append(annotation)
    return {
        "images": [
            {"id": i, "file_name": str(path), "width": image.width, "height": image.height}
            for i, (path, image) in enumerate(zip(paths, images, strict=True), start=1)
        ],
        "categories": [{"id": i, "name": prompt} for i, prompt in enumerate(prompts, start=1)],
        "annotations": annotations,
    }


@dataclass
class PredictResult:
    predictions_file: Path
    overlays: list[Path]
    counts: list[int]  # detections per image


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
) -> PredictResult:
    """Detect `prompts` on each image; write predictions.json and the overlays under `out`."""
    from sam3.inference import predict_images
    from sam3.model import load_model
    from sam3.overlay import draw_detections

    check_inputs(image_paths, prompts, threshold)
    images = [read_image(path) for path in image_paths]  # every file is checked before the model loads
    detector = load_model(model, image_size=image_size)
    detections = predict_images(
        detector,
        images,
        prompts,
        with_masks=with_masks,
        prompt_chunk=prompt_chunk,
        max_dets=max_dets,
        score_threshold=threshold,
        device=device,
    )
    predictions_file = out / PREDICTIONS_FILE
    write_json(predictions_file, predictions_document(image_paths, images, prompts, detections))
    overlays = []
    for path, image, per_image in zip(image_paths, images, detections, strict=True):
        overlay = out / f"{path.stem}{OVERLAY_SUFFIX}"
        draw_detections(image, per_image, prompts).save(overlay)
        overlays.append(overlay)
    return PredictResult(predictions_file, overlays, [len(d) for d in detections])


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
    )
    for path, overlay, count in zip(args.image, result.overlays, result.counts, strict=True):
        print(f"{path}: {count} detections above {args.threshold} -> {overlay}")
    print(f"wrote {result.predictions_file}")
    return 0
