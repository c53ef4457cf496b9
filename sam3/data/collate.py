"""Collate `PromptSample`s into a `PromptBatch`: B images, P unique prompts, Q (image, prompt) queries.

Each unique prompt string is tokenized once for the whole batch (the text encoder then runs once per prompt, not
once per query); queries point at their image and prompt by index. Shapes are documented in `sam3.batch`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sam3.batch import PromptBatch
from sam3.data.dataset import PromptSample
from sam3.tokenizer import attention_mask, tokenize


def collate_prompts(samples: Sequence[PromptSample]) -> PromptBatch:
    """Stack images, deduplicate prompts (first-seen order) and list one target dict per query.

    pixel_values [B, 3, S, S]; input_ids, attention_mask [P, 32]; query_image, query_prompt [Q];
    targets: Q dicts {"boxes" [n, 4], "category_id" int, "masks" [n, S, S] when the samples carry masks};
    orig_sizes [B, 2] (height, width).
    """
    if not samples:
        raise ValueError("collate_prompts needs at least one sample")
    prompt_index: dict[str, int] = {}  # insertion-ordered: index = first-seen position
    query_image, query_prompt, targets = [], [], []
    for image_index, sample in enumerate(samples):
        for query in sample.queries:
            query_image.append(image_index)
            query_prompt.append(prompt_index.setdefault(query.prompt, len(prompt_index)))
            target = {"boxes": query.boxes, "category_id": query.category_id}
            if query.masks is not None:
                target["masks"] = query.masks
            targets.append(target)

    prompts = list(prompt_index)
    input_ids = tokenize(prompts)
    return PromptBatch(
        pixel_values=torch.stack([sample.image for sample in samples]),
        input_ids=input_ids,
        attention_mask=attention_mask(input_ids),
        query_image=torch.tensor(query_image, dtype=torch.long),
        query_prompt=torch.tensor(query_prompt, dtype=torch.long),
        targets=targets,
        image_ids=[sample.image_id for sample in samples],
        prompts=prompts,
        orig_sizes=torch.tensor([sample.orig_size for sample in samples], dtype=torch.long).reshape(-1, 2),
    )
