"""The VOS optimiser: AdamW parameter groups with layer decay over the image encoder's trunk, and the cosine schedule.

SAM 2.1's MOSE fine-tuning recipe (`sam2.1_hiera_b+_MOSE_finetune.yaml`, `training/optimizer.py`):

Groups
    Two components: the image encoder ("vision", every `vision_encoder.*` parameter: trunk and FPN neck) at
    `optim.lr_vision`, everything else ("tracker": memory attention, memory encoder, prompt encoder, mask decoder,
    object pointers) at `optim.lr`.
    Layer decay over the trunk's L blocks, d = optim.layer_decay, as the reference's `layer_decay_param_modifier`
    with its layer ids (Hiera's `get_layer_id`):

        block j (0-based)                  d^(L - j)      the last block x d, the first x d^L
        patch embedding (and ViT pre-norm) d^(L + 1)
        position embeddings                1              the reference's `*pos_embed*` override
        the neck, anything else            1

    Trunk blocks: `vision_encoder.backbone.blocks.<j>` (Hiera, Sam2VideoModel) or `vision_encoder.backbone.layers.<j>`
    (SAM 3's ViT, Sam3TrackerVideoModel, whose names are the image model's: `sam3.optim.vit_layer_scale`).
    Weight decay optim.weight_decay, 0 on biases and on normalisation layers' parameters (`sam3.optim`). The
    reference gives its position embeddings weight decay (only its lr override exempts them), and so do we.
    Frozen parameters (requires_grad False) are left out, so they carry no optimiser state.
Each group records `component`, `base_lr` (after layer decay) and `names`; `set_lr` writes the schedule into it.

Schedule (fvcore's CosineParamScheduler at where = s / T, after an optional linear warmup of W steps), for step s of
T and final factor f = optim.final_factor:

    factor(s) = s / W                                              s < W
    factor(s) = f + (1 - f) * (1 + cos(pi * (s - W) / (T - W))) / 2   W <= s     (1 at s = W, f at s = T)
    lr(s)     = base_lr * factor(s) * guard multiplier
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from sam3.optim import FUSED_DEVICE_TYPES, group_parameters, vit_layer_scale
from sam3.video.config import VosOptimConfig

VISION_PREFIX = "vision_encoder."
_HIERA_BLOCK = re.compile(r"^vision_encoder\.backbone\.blocks\.(\d+)\.")
_VIT_BLOCK = re.compile(r"^vision_encoder\.backbone\.layers\.(\d+)\.")
_HIERA_POSITION = "vision_encoder.backbone.pos_embed"  # pos_embed and pos_embed_window
_HIERA_STEM = "vision_encoder.backbone.patch_embed."


def trunk_blocks(model: nn.Module) -> tuple[str, int]:
    """("hiera" | "vit", L): the kind of image-encoder trunk and its number of blocks, from the parameter names
    (frozen ones included). ValueError when the model has neither trunk."""
    hiera, vit = set(), set()
    for name, _ in model.named_parameters():
        if match := _HIERA_BLOCK.match(name):
            hiera.add(int(match.group(1)))
        elif match := _VIT_BLOCK.match(name):
            vit.add(int(match.group(1)))
    if hiera:
        return "hiera", max(hiera) + 1
    if vit:
        return "vit", max(vit) + 1
    raise ValueError(
        f"{type(model).__name__} has no image-encoder trunk blocks (vision_encoder.backbone.blocks.* or .layers.*); "
        "pass a transformers Sam2VideoModel or Sam3TrackerVideoModel"
    )


def hiera_layer_scale(name: str, num_blocks: int, decay: float) -> float:
    """Layer-decay factor of a Sam2VideoModel parameter (module docstring's table)."""
    if name.startswith(_HIERA_POSITION):
        return 1.0
    if match := _HIERA_BLOCK.match(name):
        return decay ** (num_blocks - int(match.group(1)))
    if name.startswith(_HIERA_STEM):
        return decay ** (num_blocks + 1)
    return 1.0


def layer_scale(name: str, trunk: str, num_blocks: int, decay: float) -> float:
    """The lr factor of parameter `name`: layer decay in the image encoder's trunk, 1 elsewhere."""
    if not name.startswith(VISION_PREFIX):
        return 1.0
    if trunk == "hiera":
        return hiera_layer_scale(name, num_blocks, decay)
    return vit_layer_scale(name, num_blocks, decay)


def param_groups(model: nn.Module, config: VosOptimConfig) -> list[dict]:
    """The tracker's AdamW groups (`sam3.optim.group_parameters`): components vision / tracker, layer decay over the
    trunk (module docstring)."""
    trunk, num_blocks = trunk_blocks(model)

    def place(name: str) -> tuple[str, float, float]:
        vision = name.startswith(VISION_PREFIX)
        scale = layer_scale(name, trunk, num_blocks, config.layer_decay)
        return ("vision", config.lr_vision, scale) if vision else ("tracker", config.lr, scale)

    return group_parameters(model, config.weight_decay, place)


def build_optimizer(model: nn.Module, config: VosOptimConfig) -> torch.optim.AdamW:
    """AdamW (torch's betas and eps, as the reference) over `param_groups`; fused on the CPU and CUDA, as
    `sam3.optim.build_optimizer` (one pass over all parameters instead of a per-op loop)."""
    groups = param_groups(model, config)
    if not groups:
        raise ValueError("no trainable parameters: every parameter is frozen")
    fused = {p.device.type for g in groups for p in g["params"]} <= FUSED_DEVICE_TYPES
    return torch.optim.AdamW(groups, fused=fused or None)


def schedule_factor(step: int, total_steps: int, warmup: int, final_factor: float) -> float:
    """The schedule's factor at `step` of `total_steps` (module docstring): linear warmup, then cosine to
    `final_factor` at `total_steps`."""
    if warmup > 0 and step < warmup:
        return step / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(
    optimizer: torch.optim.Optimizer, step: int, total_steps: int, config: VosOptimConfig, scale: float = 1.0
) -> None:
    """Write the scheduled rate of `step`, times `scale` (the divergence guard's multiplier, never stored in
    `base_lr`, so rollbacks lower the rate by exactly lr_factor^rollbacks), into every group."""
    factor = schedule_factor(step, total_steps, config.warmup, config.final_factor) * scale
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
