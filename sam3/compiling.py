"""Regional `torch.compile` of the ViT blocks: the repeated, heavy part of SAM 3, compiled once and reused.

Compiling the whole model recompiles on every new number of prompts (the DETR parts run on Q = sum of prompts per
image, which changes from batch to batch) and spends minutes on 840M parameters; the ViT's 32 blocks all have one
structure and a fixed input shape at a fixed image size, so compiling the block class's forward once serves all of
them, and the step keeps working in eager mode around them. On CPU inductor needs a C++ compiler; `backend`
"aot_eager" checks the traced graphs without one.
"""

from __future__ import annotations

from torch import nn
from transformers.models.sam3.modeling_sam3 import Sam3ViTLayer


def compile_vit_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """`torch.compile` each ViT block of `model` (a Sam3Model) in place; returns how many.

    nn.Module.compile keeps the module's parameters and state-dict keys unchanged (checkpoints and the
    transformers export are unaffected), unlike wrapping the module in `torch.compile(...)`.
    """
    blocks = [m for m in model.vision_encoder.modules() if isinstance(m, Sam3ViTLayer)]
    for block in blocks:
        block.compile(backend=backend, dynamic=False)
    return len(blocks)
