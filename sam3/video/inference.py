"""Semi-supervised VOS inference with transformers' own video API: masks in on the frames where objects first appear,
label maps out on every frame.

    processor_for(model)                      the Sam2VideoProcessor / Sam3TrackerVideoProcessor of the model's size
    track_video(model, frames, first_masks)   one video -> (H, W) uint8 label maps
    predict_split(model, split_dir, out_dir)  a DAVIS/MOSE split -> out_dir/<video>/<frame>.png palette PNGs

Only the model's weights and config drive the result (the processor is built from the config, not read from the
folder), so a model saved with `save_pretrained` and reloaded with `Sam2VideoModel.from_pretrained` tracks the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm
from transformers import (
    Sam2ImageProcessor,
    Sam2VideoProcessor,
    Sam2VideoVideoProcessor,
    Sam3ImageProcessor,
    Sam3TrackerVideoProcessor,
)
from transformers.models.sam2_video.modeling_sam2_video import NO_OBJ_SCORE

from sam3.errors import DataError
from sam3.video.data import FRAME_SUFFIXES, natural_key
from sam3.video.palette import read_label_map, write_label_map
from sam3.video.tracker import model_image_size, tracker_kind

FirstMasks = dict[int, tuple[int, np.ndarray]]  # object id -> (first frame index, (H, W) bool mask on that frame)


def processor_for(model: nn.Module) -> Sam2VideoProcessor | Sam3TrackerVideoProcessor:
    """The model's processor at its input size S: frames resized to S x S (bilinear) and normalised as the released
    checkpoints' processors do (SAM 2.1: ImageNet mean/std; SAM 3: mean 0.5, std 0.5, as Sam3ImageProcessor),
    masks resized to S and thresholded at 0.5, predictions upsampled straight to the frame size."""
    size = model_image_size(model)
    square = {"height": size, "width": size}
    mask_square = {"height": size // 4, "width": size // 4}
    if tracker_kind(model) == "sam2.1":
        image = Sam2ImageProcessor(size=square, mask_size=mask_square)
        video = Sam2VideoVideoProcessor(size=square)
        return Sam2VideoProcessor(image_processor=image, video_processor=video, target_size=size)
    image = Sam3ImageProcessor(size=square, mask_size=mask_square)
    video = Sam2VideoVideoProcessor(size=square, image_mean=image.image_mean, image_std=image.image_std)
    return Sam3TrackerVideoProcessor(image_processor=image, video_processor=video, target_size=size)


def track_video(
    model: nn.Module,
    frames: list[Image.Image] | list[np.ndarray],
    first_masks: FirstMasks,
    device: torch.device | str = "cpu",
) -> list[np.ndarray]:
    """Segment every frame given each object's mask on the first frame where it appears.

    As the reference's `vos_inference` (its per-object variant for objects appearing later): an object is added
    with its mask on its first frame and tracked from there on; before that frame it scores -1024 (absent). Each
    frame runs all objects once, in time order (transformers' `propagate_in_video_iterator` between the frames where
    new objects come in). The low-res logits are upsampled to the frame size, overlaps resolved as the reference's
    non-overlap constraint (`non_overlap_masks=True` in its VOS evaluation): at each pixel only the highest-scoring
    object keeps its logit, the others are clamped to <= -10; then a pixel takes the id of the object whose logit
    is > 0 (0 if none).

    frames: T RGB frames ((H, W, 3) uint8 arrays or PIL images) of one size. first_masks: object id (1..255) ->
    (frame index, (H, W) bool mask). Returns T (H, W) uint8 label maps. The model runs in eval mode in float32 on
    `device` (its training mode is restored after).
    """
    ids = sorted(first_masks)
    num_frames = len(frames)
    if num_frames == 0:
        return []
    height, width = _frame_size(frames[0])
    starts: dict[int, list[int]] = {}
    for object_id in ids:
        frame, mask = first_masks[object_id]
        if not 0 < object_id < 256:
            raise ValueError(f"object id {object_id}: label maps hold ids 1..255")
        if not 0 <= frame < num_frames:
            raise ValueError(f"object {object_id}: first frame {frame} is not in the video's {num_frames} frames")
        if np.shape(mask) != (height, width):
            raise ValueError(f"object {object_id}: mask of shape {np.shape(mask)}, the frames are {(height, width)}")
        starts.setdefault(frame, []).append(object_id)
    label_maps = [np.zeros((height, width), np.uint8) for _ in range(num_frames)]
    if not ids:
        return label_maps

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            processor = processor_for(model)
            session = processor.init_video_session(video=frames, inference_device=device, dtype=torch.float32)
            order = sorted(starts)
            for i, start in enumerate(order):
                new = starts[start]
                processor.add_inputs_to_inference_session(
                    inference_session=session,
                    frame_idx=start,
                    obj_ids=new,
                    input_masks=[np.asarray(first_masks[k][1], dtype=bool) for k in new],
                )
                end = order[i + 1] - 1 if i + 1 < len(order) else num_frames - 1
                for output in model.propagate_in_video_iterator(
                    session, start_frame_idx=start, max_frame_num_to_track=end - start
                ):
                    label_maps[output.frame_idx] = _label_map(processor, output, ids, (height, width))
    finally:
        model.train(was_training)
    return label_maps


def _label_map(processor, output, ids: list[int], size: tuple[int, int]) -> np.ndarray:
    """The (H, W) uint8 ids of one frame's output: objects not yet added score NO_OBJ_SCORE; upsampled to the frame
    size, non-overlap constraint, logit > 0 (the reference's `score_thresh`)."""
    low_res = output.pred_masks  # (N_added, 1, h, w), in the session's order of object ids
    scores = low_res.new_full((len(ids), *low_res.shape[1:]), NO_OBJ_SCORE)
    for row, object_id in enumerate(output.object_ids):
        scores[ids.index(object_id)] = low_res[row]
    scores = processor.post_process_masks(
        [scores.float().cpu()], original_sizes=[size], binarize=False, apply_non_overlapping_constraints=True
    )[0][:, 0]  # (N, H, W)
    best = scores.max(dim=0)
    labels = torch.tensor(ids, dtype=torch.uint8)[best.indices]
    return torch.where(best.values > 0, labels, 0).numpy().astype(np.uint8)


def _frame_size(frame: Image.Image | np.ndarray) -> tuple[int, int]:
    if isinstance(frame, Image.Image):
        return frame.height, frame.width
    return int(frame.shape[0]), int(frame.shape[1])


def predict_split(
    model: nn.Module,
    split_dir: str | Path,
    out_dir: str | Path,
    videos: list[str] | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Predict every video of a DAVIS/MOSE split and write out_dir/<video>/<frame>.png palette label maps.

    Layout: split_dir/JPEGImages/<video>/<frame>.jpg and split_dir/Annotations/<video>/<frame>.png (indexed PNGs);
    every annotation present is read, and each object is given with its mask on the first annotated frame where it
    appears (semi-supervised VOS: usually only the first frame is annotated). `videos`: a subset (default: every
    folder of JPEGImages, sorted). Returns the videos predicted. DataError for a missing folder, a video without
    frames or an annotation whose size is not its frame's.
    """
    split_dir, out_dir = Path(split_dir), Path(out_dir)
    images, annotations = split_dir / "JPEGImages", split_dir / "Annotations"
    for folder in (images, annotations):
        if not folder.is_dir():
            raise DataError(
                f"{folder} is missing: a DAVIS/MOSE split holds JPEGImages/<video>/ and Annotations/<video>/"
            )
    if videos is None:
        videos = sorted(p.name for p in images.iterdir() if p.is_dir())
    for video in tqdm(videos, desc="videos", disable=not progress):
        frame_files = _frame_files(images / video)
        frames = [_read_frame(path) for path in frame_files]
        first_masks = _first_masks(annotations / video, [p.stem for p in frame_files], _frame_size(frames[0]))
        label_maps = track_video(model, frames, first_masks, device=device)
        for path, label_map in zip(frame_files, label_maps, strict=True):
            write_label_map(out_dir / video / f"{path.stem}.png", label_map)
    return list(videos)


def _frame_files(folder: Path) -> list[Path]:
    """The video's frames (JPEG or PNG, as the readers of sam3.video.data take them) in their order: numbers as
    numbers (as the reference), else by name."""
    if not folder.is_dir():
        raise DataError(f"{folder} is missing: each video of the split is a folder of frames")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
    if not files:
        raise DataError(f"{folder} holds no frames ({', '.join(FRAME_SUFFIXES)})")
    return sorted(files, key=lambda p: natural_key(p.stem))


def _read_frame(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as err:
        raise DataError(f"{path}: cannot read the frame ({err})") from err


def _first_masks(folder: Path, frame_names: list[str], size: tuple[int, int]) -> FirstMasks:
    """Each object id's first annotated frame and its mask there, from the video's annotation PNGs."""
    if not folder.is_dir():
        raise DataError(f"{folder} is missing: semi-supervised VOS needs each video's first-frame annotation")
    first: FirstMasks = {}
    for index, name in enumerate(frame_names):
        path = folder / f"{name}.png"
        if not path.is_file():
            continue
        label_map = read_label_map(path)
        if label_map.shape != size:
            raise DataError(f"{path}: annotation is {label_map.shape}, its frame is {size} (height, width)")
        for object_id in np.unique(label_map):
            if object_id != 0 and int(object_id) not in first:
                first[int(object_id)] = (index, label_map == object_id)
    return first
