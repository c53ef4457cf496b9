"""Inference: text prompts in, scored boxes (and masks) out, in ORIGINAL image coordinates (docs/RECIPE.md section 5).

For a batch of B images and the run's P prompts:

    vision encoder   once per image
    text encoder     once per prompt for the whole run (in chunks of `prompt_chunk`)
    decode           on chunks of `prompt_chunk` prompts: B x chunk (image, prompt) pairs per call, so memory does
                     not grow with the number of categories
    score[q, n] = sigmoid(logit[q, n]) * sigmoid(presence[q])      (Q pairs x N decoder queries; no NMS)
    keep the `max_dets` best detections of each image ACROSS all prompts: a running top-k, merged chunk by chunk

Geometry. The validation transform warps a dataset image of width x height to S x S (aspect not kept, no padding),
so the S x S input, the dataset image and the original image (orig_width x orig_height, before preprocessing) all
show the same content edge to edge:
    box   normalised cxcywh -> xyxy, clipped to [0, 1], times (width, height): pixels of the dataset image;
          then `sam3.resize.boxes_to_original`: pixels of the original image.
    mask  logits [h, w] (4x the patch grid) upsampled bilinearly straight to the original size, then > 0
          (sigmoid > 0.5). Upsampling to S x S, thresholding, and resampling the binary mask twice (to the dataset
          image, then to the original) describes the same mapping, since every step scales the whole frame; one
          resize of the logits and one threshold at the end keeps the sub-pixel boundary the other way rounds off
          three times.

`predict_dataset` gives COCO results for a split; `predict_images` gives `Detection`s for PIL images;
`best_scores_dataset` gives every prompt's best score on every image of a split (no top-k across prompts).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.ops import box_convert
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from sam3.coco import encode_mask
from sam3.config import DEFAULT_MAX_DETS, DEFAULT_PROMPT_CHUNK
from sam3.data.dataset import CocoPromptDataset
from sam3.data.transforms import val_transform
from sam3.engine import autocast
from sam3.errors import ConfigError
from sam3.images import to_8bit
from sam3.model import PromptFeatures, Sam3Detector
from sam3.resize import ORIG_HEIGHT, ORIG_WIDTH, boxes_to_original, original_size
from sam3.tokenizer import attention_mask, tokenize

logger = logging.getLogger(__name__)

MASK_LOGIT_THRESHOLD = 0.0  # sigmoid 0.5
# At most this many float32 values are upsampled at once (256 MB): 100 masks of a 12-megapixel photo would be 4.8 GB.
MASK_UPSAMPLE_ELEMENTS = 1 << 26


@dataclass
class Detection:
    """One detection on one image, in the image's original pixels.

    prompt_index  index into the run's prompts
    prompt        the prompt text
    score         sigmoid(logit) * sigmoid(presence), in [0, 1]
    box           (x0, y0, x1, y1) in original pixels
    mask          bool [orig_height, orig_width], or None in detection mode
    """

    prompt_index: int
    prompt: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None


@dataclass
class TopDetections:
    """The best detections of one image so far, best first (K <= max_dets), still in model space.

    scores       float [K]
    prompt_ids   long  [K]          index into the run's prompts
    boxes        float [K, 4]       normalised cxcywh of the S x S input
    mask_logits  float [K, h, w]    or None in detection mode
    """

    scores: torch.Tensor
    prompt_ids: torch.Tensor
    boxes: torch.Tensor
    mask_logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.scores.numel())


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or "auto": CUDA when a GPU is visible, else CPU. Raises ConfigError for "cuda" without a GPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA GPU is visible; use --device cpu or auto")
    return resolved


def model_input_size(detector: Sam3Detector) -> int:
    """Side S of the square input the detector was built for."""
    size = detector.config.image_size
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ConfigError(f"the model's input is {size[0]} x {size[1]}; inference needs a square input")
        size = size[0]
    return int(size)


def detection_scores(logits: torch.Tensor, presence_logits: torch.Tensor) -> torch.Tensor:
    """score [Q, N] = sigmoid(logits [Q, N]) * sigmoid(presence_logits [Q])[:, None].

    The presence term says whether the prompt is in the image at all; each query's logit, which of its instances.
    """
    return logits.sigmoid() * presence_logits.sigmoid()[:, None]


def _take(first: torch.Tensor | None, second: torch.Tensor, index: torch.Tensor, split: int) -> torch.Tensor:
    """Rows `index` of cat([first, second]) without building the concatenation (mask logits are large)."""
    if first is None or split == 0:
        return second[index]
    from_first = index < split
    out = second.new_empty((index.numel(), *second.shape[1:]))
    out[from_first] = first[index[from_first]].to(second.dtype)
    out[~from_first] = second[index[~from_first] - split]
    return out


def merge_top(
    current: TopDetections | None, new: TopDetections, max_dets: int, score_threshold: float | None = None
) -> TopDetections:
    """The `max_dets` best of `current` and `new` together, best first; scores <= `score_threshold` are dropped.

    The sort is stable and `current` goes first, so when `new` holds later prompts than `current`, equal scores
    stay in (prompt, query) order: merging chunk by chunk keeps exactly what one sort over all prompts would keep.
    """
    if current is None:
        split, scores = 0, new.scores
    else:
        split, scores = len(current), torch.cat([current.scores, new.scores.to(current.scores.dtype)])
    order = torch.sort(scores, descending=True, stable=True).indices[:max_dets]
    if score_threshold is not None:
        order = order[scores[order] > score_threshold]

    def take(name: str) -> torch.Tensor:
        return _take(None if current is None else getattr(current, name), getattr(new, name), order, split)

    return TopDetections(
        scores=scores[order],
        prompt_ids=take("prompt_ids"),
        boxes=take("boxes"),
        mask_logits=None if new.mask_logits is None else take("mask_logits"),
    )


def encode_prompt_features(detector: Sam3Detector, prompts: Sequence[str], chunk: int) -> PromptFeatures:
    """Text features of every prompt (tokens [P, L, D], mask [P, L]), encoded `chunk` prompts at a time."""
    device = next(detector.parameters()).device
    ids = tokenize(list(prompts)).to(device)
    mask = attention_mask(ids)
    parts = [detector.encode_prompts(ids[i : i + chunk], mask[i : i + chunk]) for i in range(0, len(prompts), chunk)]
    return PromptFeatures(tokens=torch.cat([p.tokens for p in parts]), mask=torch.cat([p.mask for p in parts]))


@dataclass
class DecodedChunk:
    """One decode call over B images x C prompts (prompts `prompt_ids`), flattened prompt-major per image.

    prompt_ids   long  [C]
    scores       float [B, C * N]        detection_scores; entry c * N + n = prompt c, query n
    boxes        float [B, C * N, 4]     normalised cxcywh of the S x S input
    mask_logits  float [B, C * N, h, w]  or None in detection mode
    """

    prompt_ids: torch.Tensor
    scores: torch.Tensor
    boxes: torch.Tensor
    mask_logits: torch.Tensor | None


def decode_chunks(
    detector: Sam3Detector,
    pixel_values: torch.Tensor,
    prompts: PromptFeatures,
    with_masks: bool = False,
    prompt_chunk: int = DEFAULT_PROMPT_CHUNK,
) -> Iterator[DecodedChunk]:
    """Decoder outputs of B images (pixel_values [B, 3, S, S]) x all P prompts, `prompt_chunk` prompts per call.

    The images are encoded once; decode runs on B x C pairs per chunk of C prompts, pair q = b * C + c, so memory
    does not grow with P.
    """
    num_images, num_prompts = pixel_values.shape[0], prompts.tokens.shape[0]
    if num_prompts == 0:
        raise ConfigError("no prompts: give at least one text prompt")
    images = detector.encode_images(pixel_values, levels=None if with_masks else 1)
    device = pixel_values.device
    for start in range(0, num_prompts, prompt_chunk):
        chunk_ids = torch.arange(start, min(start + prompt_chunk, num_prompts), device=device)
        chunk = chunk_ids.numel()
        query_image = torch.arange(num_images, device=device).repeat_interleave(chunk)
        query_prompt = chunk_ids.repeat(num_images)
        out = detector.decode(images, prompts, query_image, query_prompt, with_masks=with_masks)
        scores = detection_scores(out["pred_logits"].float(), out["presence_logits"].float())  # [B * C, N]
        num_queries = scores.shape[1]
        masks = out["pred_masks"] if with_masks else None
        yield DecodedChunk(
            prompt_ids=chunk_ids,
            scores=scores.reshape(num_images, chunk * num_queries),
            boxes=out["pred_boxes"].float().reshape(num_images, chunk * num_queries, 4),
            mask_logits=None if masks is None else masks.reshape(num_images, chunk * num_queries, *masks.shape[-2:]),
        )


def top_detections(
    detector: Sam3Detector,
    pixel_values: torch.Tensor,
    prompts: PromptFeatures,
    with_masks: bool = False,
    prompt_chunk: int = DEFAULT_PROMPT_CHUNK,
    max_dets: int = DEFAULT_MAX_DETS,
    score_threshold: float | None = None,
) -> list[TopDetections]:
    """The best `max_dets` detections of each of B images (pixel_values [B, 3, S, S]) over all P prompts.

    The images are encoded once; decode runs on B x C pairs per chunk of C prompts (`decode_chunks`).
    """
    best: list[TopDetections | None] = [None] * pixel_values.shape[0]
    for chunk in decode_chunks(detector, pixel_values, prompts, with_masks, prompt_chunk):
        num_queries = chunk.scores.shape[1] // chunk.prompt_ids.numel()
        prompt_ids = chunk.prompt_ids.repeat_interleave(num_queries)  # [C * N], prompt-major like the scores
        for b in range(len(best)):
            masks = None if chunk.mask_logits is None else chunk.mask_logits[b]
            candidates = TopDetections(chunk.scores[b], prompt_ids, chunk.boxes[b], masks)
            best[b] = merge_top(best[b], candidates, max_dets, score_threshold)
    return best  # type: ignore[return-value]  # every entry was set: decode_chunks yields at least once


def best_prompt_scores(
    detector: Sam3Detector,
    pixel_values: torch.Tensor,
    prompts: PromptFeatures,
    prompt_chunk: int = DEFAULT_PROMPT_CHUNK,
) -> torch.Tensor:
    """float [B, P]: each prompt's best detection score on each image, best[b, p] = max over queries n of score.

    The score `predict` compares with its threshold, for every prompt rather than the top detections across prompts
    (a prompt absent from the top `max_dets` still has a best score). Boxes and masks are not decoded.
    """
    best = []
    for chunk in decode_chunks(detector, pixel_values, prompts, with_masks=False, prompt_chunk=prompt_chunk):
        per_prompt = chunk.scores.reshape(chunk.scores.shape[0], chunk.prompt_ids.numel(), -1)  # [B, C, N]
        best.append(per_prompt.max(dim=2).values)
    return torch.cat(best, dim=1)


def boxes_to_original_xyxy(boxes: torch.Tensor, image_record: Mapping[str, Any]) -> torch.Tensor:
    """Normalised cxcywh boxes [K, 4] of the S x S input as xyxy [K, 4] in the ORIGINAL image's pixels.

        xyxy = clip(cxcywh -> xyxy, 0, 1) * (width, height, width, height)     pixels of the dataset image
        then * (orig_width / width, orig_height / height, ...)                 sam3.resize.boxes_to_original
    `image_record` is a COCO image entry: width, height, and orig_width / orig_height when preprocessed.
    """
    width, height = float(image_record["width"]), float(image_record["height"])
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy").clamp(0.0, 1.0)  # the image ends where the input does
    return boxes_to_original(xyxy * xyxy.new_tensor([width, height, width, height]), image_record)


def masks_to_original(mask_logits: torch.Tensor, image_record: Mapping[str, Any]) -> Iterator[np.ndarray]:
    """Mask logits [K, h, w] as K bool masks [orig_height, orig_width], upsampled in groups to bound memory.

    mask = bilinear(logits, original size) > 0 (pixel centres aligned, i.e. align_corners=False; antialiased when
    the original is smaller than the mask grid). Yields one mask at a time.
    """
    orig_w, orig_h = original_size(image_record)
    group = max(1, MASK_UPSAMPLE_ELEMENTS // (orig_w * orig_h))
    for start in range(0, mask_logits.shape[0], group):
        logits = mask_logits[start : start + group].float()[:, None]  # [G, 1, h, w]
        upsampled = F.interpolate(logits, size=(orig_h, orig_w), mode="bilinear", align_corners=False, antialias=True)
        yield from (upsampled[:, 0] > MASK_LOGIT_THRESHOLD).cpu().numpy()


def _check_options(prompts: Sequence[str], prompt_chunk: int, max_dets: int, batch_size: int) -> None:
    if not prompts:
        raise ConfigError("no prompts: give at least one text prompt")
    for name, value in (("prompt_chunk", prompt_chunk), ("max_dets", max_dets), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@contextlib.contextmanager
def _inference(detector: Sam3Detector, device: torch.device) -> Iterator[None]:
    """Eval mode on `device`, no autograd, bf16 autocast on CUDA (fp32 on CPU); the training flag is restored."""
    was_training = detector.training
    detector.eval().to(device)
    try:
        with torch.inference_mode(), autocast(device, torch.bfloat16):
            yield
    finally:
        detector.train(was_training)


def _split_images(detector: Sam3Detector, dataset_dir: str | Path, split: str) -> CocoPromptDataset:
    """The split's images as the model sees them (validation transform, S x S); DataError for a missing split."""
    # with_masks=False: inference needs the images only, not the decoded GT masks
    return CocoPromptDataset(dataset_dir, split, image_size=model_input_size(detector), train=False)


def _image_batches(dataset: CocoPromptDataset, batch_size: int, num_workers: int) -> DataLoader:
    """Batches of samples in file order, as lists."""
    # collate_fn=list: the prompts are the same for every image, so the samples' own queries are not needed
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=list)


def predict_dataset(
    detector: Sam3Detector,
    dataset_dir: str | Path,
    split: str,
    with_masks: bool = False,
    prompt_chunk: int = DEFAULT_PROMPT_CHUNK,
    max_dets: int = DEFAULT_MAX_DETS,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    desc: str = "inference",
) -> list[dict[str, Any]]:
    """COCO results for every image of one split, prompts = its category names, in ORIGINAL image coordinates.

    Each result: {image_id, category_id, bbox [x, y, w, h] (original pixels), score, segmentation (compressed RLE
    of size [orig_height, orig_width], only when `with_masks`)}. Images in file order, best score first within an
    image, at most `max_dets` per image. Moves `detector` to `device` (None: CUDA if available). `desc` labels the
    progress bar.
    Raises DataError for a missing split or unreadable image, ConfigError for bad options.
    """
    resolved = resolve_device(device)
    dataset = _split_images(detector, dataset_dir, split)
    category_ids = list(dataset.categories)  # sorted by id
    prompts = [dataset.categories[c] for c in category_ids]
    _check_options(prompts, prompt_chunk, max_dets, batch_size)
    records = {
        r.image_id: {
            "id": r.image_id,
            "width": r.width,
            "height": r.height,
            ORIG_HEIGHT: r.orig_size[0],
            ORIG_WIDTH: r.orig_size[1],
        }
        for r in dataset.records
    }
    loader = _image_batches(dataset, batch_size, num_workers)
    results: list[dict[str, Any]] = []
    with _inference(detector, resolved), tqdm(total=len(dataset), desc=f"{desc} {split}", unit="img") as bar:
        features = encode_prompt_features(detector, prompts, prompt_chunk)
        for samples in loader:
            pixel_values = torch.stack([s.image for s in samples]).to(resolved)
            tops = top_detections(detector, pixel_values, features, with_masks, prompt_chunk, max_dets)
            for sample, top in zip(samples, tops, strict=True):
                results.extend(_coco_results(records[sample.image_id], top, category_ids))
            bar.update(len(samples))
    logger.info("%s/%s: %d detections on %d images", dataset_dir, split, len(results), len(dataset))
    return results


def best_scores_dataset(
    detector: Sam3Detector,
    dataset_dir: str | Path,
    split: str,
    prompts: Sequence[str],
    prompt_chunk: int = DEFAULT_PROMPT_CHUNK,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    desc: str = "scores",
) -> tuple[list[int], torch.Tensor]:
    """Each prompt's best detection score on each image of a split, whatever the split's categories.

    Returns the image ids (file order) and float [I, P] on the CPU: best[i, p] = max over the decoder queries of
    sigmoid(logit) * sigmoid(presence) (`best_prompt_scores`). Batching, prompt chunks and devices as
    `predict_dataset`; `desc` labels the progress bar. Raises DataError for a missing split, ConfigError for bad
    options.
    """
    resolved = resolve_device(device)
    dataset = _split_images(detector, dataset_dir, split)
    _check_options(prompts, prompt_chunk, 1, batch_size)
    image_ids: list[int] = []
    rows: list[torch.Tensor] = []
    with _inference(detector, resolved), tqdm(total=len(dataset), desc=f"{desc} {split}", unit="img") as bar:
        features = encode_prompt_features(detector, prompts, prompt_chunk)
        for samples in _image_batches(dataset, batch_size, num_workers):
            pixel_values = torch.stack([s.image for s in samples]).to(resolved)
            rows.append(best_prompt_scores(detector, pixel_values, features, prompt_chunk).float().cpu())
            image_ids.extend(s.image_id for s in samples)
            bar.update(len(samples))
    scores = torch.cat(rows) if rows else torch.zeros(0, len(prompts))
    return image_ids, scores


def _coco_results(record: Mapping[str, Any], top: TopDetections, category_ids: list[int]) -> list[dict[str, Any]]:
    """COCO result dicts of one image; masks are encoded as they are upsampled, never all held at full size."""
    boxes = boxes_to_original_xyxy(top.boxes, record).tolist()
    masks = masks_to_original(top.mask_logits, record) if top.mask_logits is not None else None
    results = []
    for score, prompt_id, (x0, y0, x1, y1) in zip(top.scores.tolist(), top.prompt_ids.tolist(), boxes, strict=True):
        result = {
            "image_id": record["id"],
            "category_id": category_ids[prompt_id],
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": score,
        }
        if masks is not None:
            result["segmentation"] = encode_mask(next(masks))
        results.append(result)
    return results


def predict_images(
    detector: Sam3Detector,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    with_masks: bool = False,
    prompt_chunk: int = DEFAULT_PROMPT_CHUNK,
    max_dets: int = DEFAULT_MAX_DETS,
    batch_size: int = 1,
    score_threshold: float | None = None,
    device: str | torch.device | None = None,
) -> list[list[Detection]]:
    """Detections of every prompt on each PIL image, best first, at most `max_dets` per image.

    Each image is warped to S x S like the validation transform; boxes and masks come back in the image's own
    pixels. `score_threshold`: keep only scores above it (None keeps the top `max_dets` whatever their score).
    """
    resolved = resolve_device(device)
    _check_options(prompts, prompt_chunk, max_dets, batch_size)
    size = model_input_size(detector)
    no_boxes = torch.zeros(0, 4)
    detections: list[list[Detection]] = []
    with _inference(detector, resolved), tqdm(total=len(images), desc="inference", unit="img") as bar:
        features = encode_prompt_features(detector, prompts, prompt_chunk)
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            # to_8bit: a 16-bit greyscale image would otherwise clip to white (sam3.images)
            pixels = [pil_to_tensor(to_8bit(image).convert("RGB")) for image in batch]
            pixel_values = torch.stack([val_transform(p, no_boxes, None, size).image for p in pixels]).to(resolved)
            tops = top_detections(detector, pixel_values, features, with_masks, prompt_chunk, max_dets, score_threshold)
            for image, top in zip(batch, tops, strict=True):
                record = {"width": image.width, "height": image.height}
                detections.append(_detections(record, top, prompts))
            bar.update(len(batch))
    return detections


def _detections(record: Mapping[str, Any], top: TopDetections, prompts: Sequence[str]) -> list[Detection]:
    boxes = boxes_to_original_xyxy(top.boxes, record).tolist()
    masks = list(masks_to_original(top.mask_logits, record)) if top.mask_logits is not None else [None] * len(top)
    return [
        Detection(prompt_index=p, prompt=prompts[p], score=s, box=tuple(box), mask=mask)
        for s, p, box, mask in zip(top.scores.tolist(), top.prompt_ids.tolist(), boxes, masks, strict=True)
    ]
