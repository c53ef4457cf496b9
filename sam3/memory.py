"""Memory modes: activation checkpointing of the encoders' transformer blocks.

Activation checkpointing keeps only each block's input during the forward and recomputes the block during the
backward, trading about one extra forward of the checkpointed blocks (~+33% step FLOPs when all of them are) for
their stored activations. At 1008 px the ViT is what fills memory: 32 blocks over 72 x 72 = 5,184 tokens of width
1024, each block keeping attention inputs, MLP hidden states (4,096 wide) and norms; the DETR parts run on a few
hundred queries and matter far less.

The blocks are transformers' `GradientCheckpointingLayer`s (`Sam3ViTLayer` in the vision trunk, `CLIPEncoderLayer`
in the text tower). transformers' `gradient_checkpointing_enable` refuses Sam3Model (it does not declare support),
so we set the two attributes such a layer reads (`gradient_checkpointing` and `_gradient_checkpointing_func`)
ourselves, with the non-reentrant checkpoint (it works with frozen inputs and keyword arguments, and with DDP).
Frozen parts that do not need gradients gain nothing from it, so only trainable blocks are checkpointed.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

CHECKPOINT_PARTS = ("vision_encoder", "text_encoder")  # the model's top-level towers whose blocks can be checkpointed


@dataclass(frozen=True)
class CheckpointReport:
    """What `enable_activation_checkpointing` did: block counts per tower (checkpointed, left out as frozen)."""

    checkpointed: dict[str, int]
    frozen: dict[str, int]

    def summary(self) -> str:
        parts = [f"{name} {n}" for name, n in self.checkpointed.items() if n]
        skipped = [f"{name} {n}" for name, n in self.frozen.items() if n]
        text = "activation checkpointing: " + (", ".join(parts) if parts else "no trainable blocks") + " blocks"
        return text + (f" (frozen, not checkpointed: {', '.join(skipped)})" if skipped else "")


def checkpointable_blocks(model: nn.Module) -> dict[str, list[GradientCheckpointingLayer]]:
    """{tower name: its GradientCheckpointingLayer blocks} for the towers of CHECKPOINT_PARTS that `model` has.

    `model` is a transformers Sam3Model (or anything with those attribute names).
    """
    blocks: dict[str, list[GradientCheckpointingLayer]] = {}
    for name in CHECKPOINT_PARTS:
        tower = getattr(model, name, None)
        if tower is not None:
            blocks[name] = [m for m in tower.modules() if isinstance(m, GradientCheckpointingLayer)]
    return blocks


def enable_activation_checkpointing(model: nn.Module) -> CheckpointReport:
    """Checkpoint every trainable encoder block of `model` (a Sam3Model); call after freezing.

    A block counts as trainable when any of its parameters requires grad. Blocks already enabled stay enabled;
    `disable_activation_checkpointing` undoes it.
    """
    checkpointed: dict[str, int] = {}
    frozen: dict[str, int] = {}
    for name, blocks in checkpointable_blocks(model).items():
        checkpointed[name] = frozen[name] = 0
        for block in blocks:
            if not any(p.requires_grad for p in block.parameters()):
                frozen[name] += 1
                continue
            block.gradient_checkpointing = True
            block._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
            checkpointed[name] += 1
    return CheckpointReport(checkpointed, frozen)


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Store activations again in every encoder block of `model`."""
    for blocks in checkpointable_blocks(model).values():
        for block in blocks:
            block.gradient_checkpointing = False


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process in GiB (2**30 bytes, what GPU makers' "24 GB" means): CUDA max allocated since
    the last reset, else the peak resident set size.

    On CPU the peak resident set size never goes down, so it includes everything the process did before.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20
