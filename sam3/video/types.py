"""The data that passes between the VOS modules: a clip in, the tracker's predictions out.

Shapes: T frames, O objects (at most `ClipConfig.max_objects`), S the model's square input side, M masks per
decoder pass (3 with multimask output, else 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class VideoClip:
    """T consecutive frames of one video, resized to S x S, with the masks of the O objects tracked in it.

    frames: (T, 3, S, S) float32, normalised with the model's mean/std (ImageNet for SAM 2.1, 0.5/0.5 for SAM 3:
        sam3.video.transforms.PIXEL_STATS)
    masks:  (T, O, S, S) bool; masks[t, k] is object k in frame t, all False where it is absent or occluded
    object_ids: the O objects' ids in the dataset (palette values of DAVIS/MOSE, masklet ids of SA-V)
    frame_names: the T frames' names (file stems) in the video, for writing predictions back
    """

    video: str
    frame_names: list[str]
    frames: torch.Tensor
    masks: torch.Tensor
    object_ids: list[int]

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def num_objects(self) -> int:
        return int(self.masks.shape[1])

    def to(self, device: torch.device | str) -> VideoClip:
        return VideoClip(self.video, self.frame_names, self.frames.to(device), self.masks.to(device), self.object_ids)


@dataclass
class FrameStep:
    """One mask-decoder pass on one frame for all O objects: the first prediction, or the one after a correction
    click. Logits are at the model's input resolution S (upsampled from the decoder's S/4, as the reference trains).

    mask_logits: (O, M, S, S)
    iou_pred: (O, M) the predicted IoU of each mask
    object_score_logits: (O, 1) whether the object is present in the frame (logit)
    """

    mask_logits: torch.Tensor
    iou_pred: torch.Tensor
    object_score_logits: torch.Tensor


@dataclass
class FrameOutput:
    """The tracker's passes on frame `frame_index` of the clip, in order (steps[0] first, then one per correction
    click). `is_conditioning`: the frame had a prompt (mask, points or box) or was corrected."""

    frame_index: int
    steps: list[FrameStep]
    is_conditioning: bool = False


@dataclass
class ClipOutput:
    """Every frame's passes, in frame order (frames[t].frame_index == t)."""

    frames: list[FrameOutput] = field(default_factory=list)
