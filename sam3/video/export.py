"""Export a fine-tuned tracker as a self-contained transformers folder: weights, processor, model card.

    folder/
        config.json, model.safetensors   the Sam2VideoModel / Sam3TrackerVideoModel (`save_pretrained`)
        processor_config.json            Sam2VideoProcessor / Sam3TrackerVideoProcessor: an image processor and a
                                         video processor that resize frames to S x S (bilinear) and normalise them
                                         as training did (`sam3.video.transforms.PIXEL_STATS`: ImageNet mean/std
                                         for SAM 2.1, 0.5 / 0.5 for SAM 3), point and box coordinates scaled to S,
                                         mask prompts resized to the prompt encoder's mask input side
        README.md                        the model card: data, base model, params, how to load and track

`Sam2VideoModel.from_pretrained(folder)` (or Sam3TrackerVideoModel) and `AutoProcessor.from_pretrained(folder)` then
run a video session (`init_video_session`, `add_inputs_to_inference_session`, `propagate_in_video_iterator`) in plain
transformers, offline. The folder is written as `<folder>.partial` and swapped in whole (`sam3.io.replace_folder`),
so `folder` is the previous export or the new one, never half of one. Non-finite weights are refused (ExportError)
before anything is written: a diverged model must not be deployed.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import nn
from transformers import (
    Sam2ImageProcessor,
    Sam2VideoProcessor,
    Sam2VideoVideoProcessor,
    Sam3ImageProcessor,
    Sam3TrackerVideoProcessor,
)
from transformers.processing_utils import ProcessorMixin

from sam3.errors import ExportError
from sam3.io import replace_folder, write_text
from sam3.model import non_finite_tensors
from sam3.video.tracker import model_image_size, tracker_kind
from sam3.video.transforms import PIXEL_STATS

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
# tracker kind -> (model class name, processor class, image processor class), all transformers'
_CLASSES: dict[str, tuple[str, type[ProcessorMixin], type]] = {
    "sam2.1": ("Sam2VideoModel", Sam2VideoProcessor, Sam2ImageProcessor),
    "sam3": ("Sam3TrackerVideoModel", Sam3TrackerVideoProcessor, Sam3ImageProcessor),
}


def export_tracker(model: nn.Module, out_dir: str | Path, card: Mapping[str, Any] | None = None) -> Path:
    """Write the model folder (module docstring) atomically; returns it.

    `card`: what the model card says about training, all optional: "dataset" (the training data), "base_model" (the
    weights it started from), "params" (the run's params, written as YAML), "steps" (optimiser steps trained),
    "metrics" (name -> value). ExportError, with nothing written, when a weight is NaN or infinite.
    """
    folder = Path(out_dir)
    bad = non_finite_tensors(model)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ExportError(
            f"{folder}: not exported: {len(bad)} weight tensor(s) hold NaN or infinite values ({shown}); training "
            "diverged: resume from an earlier checkpoint with a lower learning rate"
        )
    kind = tracker_kind(model)
    processor = build_processor(model)
    readme = render_card(kind, model_image_size(model), str(folder), card or {})
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # a crashed earlier export
    model.save_pretrained(partial)  # safetensors, transformers' default
    processor.save_pretrained(partial)
    write_text(partial / CARD_FILE, readme)
    replace_folder(partial, folder)
    logger.info("exported the %s tracker to %s", kind, folder)
    return folder


def build_processor(model: nn.Module) -> ProcessorMixin:
    """The model's transformers processor: frames resized to its input side S and normalised as in training, points
    and boxes scaled to S, mask prompts resized to the prompt encoder's mask input side (S / 4 for SAM 2.1's
    patch 16, 4 S / 14 for SAM 3's)."""
    kind = tracker_kind(model)
    side = model_image_size(model)
    mean, std = PIXEL_STATS[kind]
    mask_h, mask_w = model.prompt_encoder.mask_input_size
    size = {"height": side, "width": side}
    _, processor_class, image_processor_class = _CLASSES[kind]
    image_processor = image_processor_class(
        size=size, mask_size={"height": mask_h, "width": mask_w}, image_mean=list(mean), image_std=list(std)
    )
    # transformers has one video processor for both trackers (Sam2VideoVideoProcessor); its defaults are SAM 2's
    # ImageNet statistics, so SAM 3's are set explicitly
    video_processor = Sam2VideoVideoProcessor(size=size, image_mean=list(mean), image_std=list(std))
    return processor_class(image_processor=image_processor, video_processor=video_processor, target_size=side)


def usage_snippet(kind: str, model_dir: str) -> str:
    """Python that loads the export and tracks a first-frame mask through a video (the card's example)."""
    model_class = _CLASSES[kind][0]
    return f"""```python
import torch
from transformers import AutoProcessor, {model_class}

model = {model_class}.from_pretrained("{model_dir}").eval()
processor = AutoProcessor.from_pretrained("{model_dir}")
# video: a list of RGB frames (PIL images or uint8 arrays, H x W x 3); mask: bool H x W, the object in frame 0
session = processor.init_video_session(video=video, inference_device="cpu")
processor.add_inputs_to_inference_session(session, frame_idx=0, obj_ids=1, input_masks=mask)
masks = {{}}
with torch.no_grad():
    for output in model.propagate_in_video_iterator(session):
        video_masks = processor.post_process_masks(
            [output.pred_masks], original_sizes=[[session.video_height, session.video_width]], binarize=True
        )[0]
        masks[output.frame_idx] = video_masks[0, 0]  # object 1's mask in this frame
```"""


def render_card(kind: str, image_size: int, model_dir: str, card: Mapping[str, Any]) -> str:
    """The README.md of the export (module docstring)."""
    model_class = _CLASSES[kind][0]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: mask-generation",
        "tags: [video-object-segmentation, sam2, sam3, sam3-finetune]",
        "---",
        "",
        f"# {'SAM 2.1' if kind == 'sam2.1' else 'SAM 3'} tracker fine-tuned for video object segmentation",
        "",
        f"A transformers `{model_class}` fine-tuned with sam3-finetune (SAM 2.1's MOSE fine-tuning recipe: AdamW, "
        "cosine schedule, layer decay over the image encoder, the multi-step multi-mask loss).",
        "",
        "## Training",
        "",
        f"- data: {card.get('dataset', 'not recorded')}",
        f"- base model: {card.get('base_model', 'not recorded')}",
        f"- input size: {image_size} x {image_size}",
    ]
    if card.get("steps") is not None:
        lines.append(f"- optimiser steps: {card['steps']}")
    metrics = card.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value:.4g} |" for name, value in metrics.items()]
    lines += [
        "",
        "## Use",
        "",
        "Semi-supervised tracking: give each object's mask (or clicks, or a box) on a frame, propagate through the "
        "video.",
        "",
        usage_snippet(kind, model_dir),
    ]
    params = card.get("params") or {}
    if params:
        lines += ["", "## Parameters", "", "```yaml", yaml.safe_dump(dict(params), sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"
