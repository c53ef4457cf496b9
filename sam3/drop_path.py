"""Stochastic depth (drop-path) for the ViT blocks of transformers' `Sam3Model`, added with module hooks.

Meta trains SAM 3's 32-block ViT with drop-path rate 0.1, linear over depth (block i of n: 0.1 * i / (n - 1)), and
drops each block's two residual branches independently (timm's DropPath, `scale_by_keep=True`):

    x = x + d_attn * attn(norm1(x))        d = keep_b / (1 - r), keep_b ~ Bernoulli(1 - r) per sample b
    x = x + d_mlp  * mlp(norm2(x))         (d_attn and d_mlp drawn independently, per call)

so the expectation of each branch is unchanged and a dropped sample passes a branch as the identity. transformers'
`Sam3ViTLayer` has no drop-path; rather than subclass it or copy its forward, hooks on its sub-modules scale the two
branch outputs, so parameters, state-dict names and the eval-mode forward stay those of transformers:

    layer.layer_norm1  forward pre-hook   draws the layer's two masks, float [2, B], for this call
    layer.attention    forward hook       output[0] * mask[0], per sample, repeated over the sample's windows
    layer.mlp          forward hook       output * mask[1]

Why the masks are drawn in `layer_norm1`'s pre-hook and not the layer's own: transformers' `GradientCheckpointingLayer`
checkpoints the layer's `forward` (hooks on the layer itself stay outside the checkpoint), while `layer_norm1` runs
first inside it. So with activation checkpointing (`sam3.memory`) the backward's recompute, which restores the RNG
states saved at the forward, redraws the very same masks, and nothing drawn for one call is ever read by another
(e.g. when the encoder runs twice before one backward). The masks come from torch's global generator on the input's
device, so a resumed run that restores the RNG states (`sam3.checkpoint`) draws what the uninterrupted run drew.
Hooks run inside `nn.Module.compile` (`sam3.compiling`): they are part of the compiled `_call_impl`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from transformers.models.sam3.modeling_sam3 import Sam3ViTLayer

from sam3.config import META_DROP_PATH  # 0.1, Meta's rate for SAM 3's ViT (its model_builder's drop_path_rate)
from sam3.errors import ConfigError

__all__ = ["META_DROP_PATH", "DropPath", "attach_drop_path", "drop_path_rates", "vit_layers"]


def _check_rate(rate: float, what: str = "drop_path rate") -> float:
    # `not 0 <= rate < 1` is also true for NaN; a rate of 1 would divide by a keep probability of 0.
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate < 1.0:
        raise ConfigError(f"{what} must be a number in [0, 1) (0 turns drop-path off; Meta uses 0.1), got {rate!r}")
    return float(rate)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block rates, linear from 0 at the first block to `rate` at the last: block i gets rate * i / (depth - 1).

    Meta's `torch.linspace(0, rate, depth)`, in Python floats (so the last block gets exactly `rate`); depth 1 gives
    [0.0] as linspace does. Raises ConfigError for a rate outside [0, 1) or a depth below 1.
    """
    rate = _check_rate(rate)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"depth must be a positive number of blocks, got {depth!r}")
    if depth == 1:
        return [0.0]
    return [rate * i / (depth - 1) if i < depth - 1 else rate for i in range(depth)]


class DropPath:
    """Drop-path hooks on a list of `Sam3ViTLayer`s, one rate each; `remove()` takes them off.

    rates  the rate of each layer, in the order given (0: no hooks on that layer)
    Active only while a layer is in training mode; in eval mode every hook returns without touching anything, so
    outputs are bitwise those of the plain model.
    """

    def __init__(self, layers: Sequence[nn.Module], rates: Sequence[float]) -> None:
        if len(layers) != len(rates):
            raise ConfigError(f"drop-path needs one rate per layer: {len(layers)} layers, {len(rates)} rates")
        self.rates: tuple[float, ...] = tuple(_check_rate(r, "per-layer drop_path rate") for r in rates)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # index -> float [2, B] masks of the call in progress (row 0 attention, row 1 MLP); set by the pre-hook on
        # layer_norm1 and popped by the MLP hook, the layer's last use, so no mask outlives its call.
        self._masks: dict[int, torch.Tensor] = {}
        for index, (layer, rate) in enumerate(zip(layers, self.rates, strict=True)):
            if rate == 0.0:
                continue  # rate 0 is the identity: skip the hooks rather than multiply by ones
            self._handles += [
                layer.layer_norm1.register_forward_pre_hook(partial(self._draw, index, layer, rate)),
                layer.attention.register_forward_hook(partial(self._scale_attention, index)),
                layer.mlp.register_forward_hook(partial(self._scale_mlp, index)),
            ]

    @property
    def num_hooks(self) -> int:
        """How many hooks are attached (3 per layer with a rate above 0)."""
        return len(self._handles)

    def remove(self) -> None:
        """Detach every hook: the layers run transformers' plain forward again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._masks.clear()

    def _draw(self, index: int, layer: nn.Module, rate: float, module: nn.Module, args: tuple) -> None:
        if not layer.training:
            self._masks.pop(index, None)
            return
        hidden = args[0]  # the block input, [B, H, W, C]
        keep = 1.0 - rate
        # One uniform per (branch, sample) from the global generator of the input's device: u < keep is
        # Bernoulli(keep), and dividing by keep keeps each branch's expectation (timm's scale_by_keep).
        draws = torch.rand(2, hidden.shape[0], device=hidden.device)
        self._masks[index] = (draws < keep).to(torch.float32) / keep

    def _scale_attention(self, index: int, module: nn.Module, args: tuple, output: tuple) -> tuple | None:
        masks = self._masks.get(index)
        if masks is None or not module.training:
            return None
        hidden = output[0]  # [B * num_windows, ws, ws, C] for windowed layers, [B, H, W, C] for global ones
        # window_partition orders windows batch-major ([B, nH, nW] flattened), so sample b owns rows
        # b * num_windows ... (b + 1) * num_windows - 1: repeat each sample's value over its windows.
        mask = masks[0].repeat_interleave(hidden.shape[0] // masks.shape[1])
        # Multiply in the branch's dtype (bf16 under autocast), as timm does, so the branch's dtype is kept.
        return (hidden * mask.to(hidden.dtype).view(-1, *[1] * (hidden.dim() - 1)), *output[1:])

    def _scale_mlp(self, index: int, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        masks = self._masks.pop(index, None)
        if masks is None or not module.training:
            return None
        return output * masks[1].to(output.dtype).view(-1, *[1] * (output.dim() - 1))  # output [B, H, W, C]


def vit_layers(model: nn.Module) -> list[Sam3ViTLayer]:
    """The `Sam3ViTLayer` blocks of `model` (a Sam3Model, its vision encoder or anything holding them), in order."""
    return [m for m in model.modules() if isinstance(m, Sam3ViTLayer)]


def attach_drop_path(model: nn.Module, rate: float) -> DropPath:
    """Add drop-path to the ViT blocks of `model` (a transformers Sam3Model), rates `drop_path_rates(rate, depth)`.

    Rate 0 attaches nothing (the returned DropPath holds no hooks); a rate outside [0, 1) raises ConfigError.
    Call once per model (a second call would stack a second drop-path); `.remove()` undoes it.
    """
    rate = _check_rate(rate)
    layers = vit_layers(model)
    if not layers:
        raise ConfigError(f"drop-path found no Sam3ViTLayer in {type(model).__name__}; pass a transformers Sam3Model")
    return DropPath(layers, drop_path_rates(rate, len(layers)))  # rate 0: all rates 0, so no hooks
