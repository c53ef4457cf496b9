"""The prompt batch: B images, P unique prompts, Q (image, prompt) queries.

SAM 3 training pairs every image with one text query per dataset category (plus optional extra negatives). The
vision encoder runs once per image, the text encoder once per unique prompt, and the DETR parts on the Q pairs.
`PromptBatch` is the contract between `sam3.data` (collate), `sam3.model` (forward) and `sam3.losses` (targets).

Shapes:
    pixel_values    float [B, 3, S, S]   normalised with mean = std = 0.5 (padding is -1)
    input_ids       long  [P, L]         CLIP BPE ids, L = 32 (sam3.tokenizer)
    attention_mask  long  [P, L]
    query_image     long  [Q]            index into the B images
    query_prompt    long  [Q]            index into the P prompts
    targets         list of Q dicts:
                      boxes        float [n, 4]    normalised cxcywh in [0, 1] of the S x S input
                      masks        bool  [n, S, S] (segmentation mode only)
                      category_id  int             dataset category, -1 for an extra negative phrase
    image_ids       list of B ints (COCO image ids)
    prompts         list of P strings
    orig_sizes      long  [B, 2]         (height, width) of the ORIGINAL image, before any preprocessing
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class PromptBatch:
    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    query_image: torch.Tensor
    query_prompt: torch.Tensor
    targets: list[dict]
    image_ids: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    orig_sizes: torch.Tensor | None = None

    @property
    def num_queries(self) -> int:
        return int(self.query_image.numel())

    @property
    def num_target_boxes(self) -> int:
        return sum(int(t["boxes"].shape[0]) for t in self.targets)

    def map_tensors(self, fn) -> "PromptBatch":
        """A copy with `fn` applied to every tensor, targets included."""

        def apply(x):
            return fn(x) if isinstance(x, torch.Tensor) else x

        return replace(
            self,
            pixel_values=apply(self.pixel_values),
            input_ids=apply(self.input_ids),
            attention_mask=apply(self.attention_mask),
            query_image=apply(self.query_image),
            query_prompt=apply(self.query_prompt),
            targets=[{k: apply(v) for k, v in t.items()} for t in self.targets],
            orig_sizes=apply(self.orig_sizes),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PromptBatch":
        """Move every tensor to `device`."""
        return self.map_tensors(lambda x: x.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PromptBatch":
        """Called by DataLoader(pin_memory=True): pinned CPU tensors let host-to-device copies overlap compute."""
        return self.map_tensors(lambda x: x.pin_memory())
