"""Memory modes: activation checkpointing of the encoders' transformer blocks and of the DETR layers.

Activation checkpointing keeps only each block's input during the forward and recomputes the block during the
backward, trading about one extra forward of the checkpointed blocks (~+33% step FLOPs when all of them are) for
their stored activations. At 1008 px the ViT is what fills memory: 32 blocks over 72 x 72 = 5,184 tokens of width
1024, each block keeping attention inputs, MLP hidden states (4,096 wide) and norms; the DETR parts run on a few
hundred queries, but once per (image, prompt) pair: 6 encoder layers over the 5,184 image tokens and 6 decoder
layers whose cross-attention spans them, so their stored activations grow with the prompts per image and pass the
ViT's past a dozen prompts (docs/PERFORMANCE.md).

The blocks are transformers' `GradientCheckpointingLayer`s (`Sam3ViTLayer` in the vision trunk, `CLIPEncoderLayer`
in the text tower). transformers' `gradient_checkpointing_enable` refuses Sam3Model (it does not declare support),
so we set the two attributes such a layer reads (`gradient_checkpointing` and `_gradient_checkpointing_func`)
ourselves, with the non-reentrant checkpoint (it works with frozen inputs and keyword arguments, and with DDP).
Frozen parts that do not need gradients gain nothing from it, so only trainable blocks are checkpointed.

The DETR encoder and decoder layers (`Sam3DetrEncoderLayer`, `Sam3DetrDecoderLayer`) are plain modules, so each
trainable one gets an instance `forward` that runs its class's forward under the same non-reentrant checkpoint in
training (a bound method, so a deep copy of the model calls its own layers). The decoder's one-to-many pass
(`sam3.decoder_pass`) adds hooks to each layer's self-attention for the duration of the forward; the backward's
recompute runs after they are gone, so the layer carries how to put them back (`REPLAY_ATTR`, a context manager
factory) while the pass runs, and the recompute enters it: the same computation twice, as checkpointing needs.

The decoder's box relative-position bias is the one large tensor left: before each layer, `Sam3DetrDecoder` computes
`_get_rpb_matrix` ([Q, heads, K, H W]: 0.53 GB per layer at 1008 px for 16 prompts with the 400 one-to-many
queries, in bf16) and pads a row for the presence token, and the layer's checkpoint would keep it as an input until
the backward. With the decoder checkpointed, its `_get_rpb_matrix` (an instance override) only notes its arguments
and returns a small stand-in, and the next layer's checkpoint computes the bias (and the pad, as the decoder does)
inside itself, from the detached reference boxes: it is rebuilt in the backward instead of kept, and the bias
MLP's gradients flow through the recompute.
"""

from __future__ import annotations

import resource
import sys
import threading
from dataclasses import dataclass
from functools import partial
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

CHECKPOINT_PARTS = ("vision_encoder", "text_encoder")  # the model's top-level towers whose blocks can be checkpointed
DETR_PARTS = ("detr_encoder", "detr_decoder")  # towers of plain layers (`.layers`) checkpointed through their forward
# the attribute a module carries while forward-time hooks are on it: a context manager factory that puts them back
REPLAY_ATTR = "_sam3_replay_hooks"


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


def checkpointable_blocks(
    model: nn.Module, parts: tuple[str, ...] = CHECKPOINT_PARTS + DETR_PARTS
) -> dict[str, list[nn.Module]]:
    """{tower name: its blocks}: the GradientCheckpointingLayer blocks of the towers of CHECKPOINT_PARTS, and the
    `.layers` of the towers of DETR_PARTS, for those `model` has.

    `model` is a transformers Sam3Model (or anything with those attribute names); `parts`: the towers to look at.
    """
    blocks: dict[str, list[nn.Module]] = {}
    for name in CHECKPOINT_PARTS:
        tower = getattr(model, name, None)
        if tower is not None and name in parts:
            blocks[name] = [m for m in tower.modules() if isinstance(m, GradientCheckpointingLayer)]
    for name in DETR_PARTS:
        tower = getattr(model, name, None) if name in parts else None
        if tower is not None:
            blocks[name] = list(tower.layers)
    return blocks


def enable_activation_checkpointing(
    model: nn.Module, parts: tuple[str, ...] = CHECKPOINT_PARTS + DETR_PARTS
) -> CheckpointReport:
    """Checkpoint every trainable block of the towers `parts` of `model` (a Sam3Model; default: all four, as
    train.activation_checkpointing does; `bench.speed --activation-checkpointing encoders` passes CHECKPOINT_PARTS,
    what this did before the DETR layers were included); call after freezing.

    A block counts as trainable when any of its parameters requires grad. Blocks already enabled stay enabled;
    `disable_activation_checkpointing` undoes it.
    """
    checkpointed: dict[str, int] = {}
    frozen: dict[str, int] = {}
    for name, blocks in checkpointable_blocks(model, parts).items():
        checkpointed[name] = frozen[name] = 0
        for block in blocks:
            if not any(p.requires_grad for p in block.parameters()):
                frozen[name] += 1
                continue
            if isinstance(block, GradientCheckpointingLayer):
                block.gradient_checkpointing = True
                block._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
            else:
                block.forward = MethodType(_checkpointed_forward, block)
            checkpointed[name] += 1
    decoder = getattr(model, "detr_decoder", None)
    if checkpointed.get("detr_decoder") and hasattr(decoder, "_get_rpb_matrix"):
        decoder._get_rpb_matrix = MethodType(_deferred_rpb_matrix, decoder)
    return CheckpointReport(checkpointed, frozen)


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Store activations again in every encoder block and DETR layer of `model`."""
    for blocks in checkpointable_blocks(model).values():
        for block in blocks:
            if isinstance(block, GradientCheckpointingLayer):
                block.gradient_checkpointing = False
            else:
                block.__dict__.pop("forward", None)
    decoder = getattr(model, "detr_decoder", None)
    if decoder is not None:
        decoder.__dict__.pop("_get_rpb_matrix", None)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """The class's forward of `self` under a non-reentrant checkpoint while training with gradients; the hooks the
    forward ran under (`REPLAY_ATTR`) are put back for the backward's recompute."""
    plain = partial(type(self).forward, self)
    pending_bias, _PENDING.bias = getattr(_PENDING, "bias", None), None
    if not (self.training and torch.is_grad_enabled()):
        return plain(*args, **kwargs)
    replay = getattr(self, REPLAY_ATTR, None)
    if pending_bias is not None and kwargs.get("vision_cross_attn_mask") is not None:
        kwargs = {**kwargs, "vision_cross_attn_mask": None}  # the stand-in; the real bias is computed inside
    else:
        pending_bias = None

    def run(*inner_args, **inner_kwargs):
        if pending_bias is not None:  # as Sam3DetrDecoder pads it: a zero row for the presence token
            inner_kwargs["vision_cross_attn_mask"] = F.pad(pending_bias(), (0, 0, 1, 0), mode="constant", value=0)
        if replay is not None and getattr(self, REPLAY_ATTR, None) is None:  # the backward, after the pass
            with replay():
                return plain(*inner_args, **inner_kwargs)
        return plain(*inner_args, **inner_kwargs)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


# the decoder's box bias waiting for the next layer's checkpoint (`_deferred_rpb_matrix`); per thread
_PENDING = threading.local()


def _deferred_rpb_matrix(self: nn.Module, reference_boxes: torch.Tensor, spatial_shape) -> torch.Tensor:
    """`Sam3DetrDecoder._get_rpb_matrix` of a checkpointed decoder: while training with gradients, the bias is left
    to the next layer's checkpoint (module docstring) and a [Q, 1, K, 1] stand-in returned; else computed here."""
    compute = partial(type(self)._get_rpb_matrix, self, reference_boxes, spatial_shape)
    if not (self.training and torch.is_grad_enabled()):
        return compute()
    _PENDING.bias = compute
    queries, boxes = reference_boxes.shape[:2]
    return reference_boxes.new_zeros(queries, 1, boxes, 1)


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
