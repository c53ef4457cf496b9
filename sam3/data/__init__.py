"""Training data: COCO splits as prompt samples, the reference transforms, the negatives file, batch collation.

dataset = CocoPromptDataset("data/mine", "train", image_size=1008, negatives="negatives/train.json")
loader = DataLoader(dataset, batch_size=2, collate_fn=collate_prompts)  # yields sam3.batch.PromptBatch
"""

from sam3.data.collate import collate_prompts
from sam3.data.dataset import (
    EXTRA_NEGATIVE_CATEGORY_ID,
    CocoPromptDataset,
    PromptQuery,
    PromptSample,
    sample_generator,
)
from sam3.data.negatives import load_negatives
from sam3.data.transforms import (
    PIXEL_MEAN,
    PIXEL_STD,
    REFERENCE_IMAGE_SIZE,
    Transformed,
    WarpPad,
    sample_train_warp_pad,
    train_sides,
    train_transform,
    val_transform,
    warp_pad,
)

__all__ = [
    "EXTRA_NEGATIVE_CATEGORY_ID",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "REFERENCE_IMAGE_SIZE",
    "CocoPromptDataset",
    "PromptQuery",
    "PromptSample",
    "Transformed",
    "WarpPad",
    "collate_prompts",
    "load_negatives",
    "sample_generator",
    "sample_train_warp_pad",
    "train_sides",
    "train_transform",
    "val_transform",
    "warp_pad",
]
