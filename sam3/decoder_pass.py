"""One pass of transformers' `Sam3DetrDecoder`, with the two things the reference recipe needs and transformers'
forward does not give: the one-to-many (DAC) queries and the presence logits before their clamp
(docs/RECIPE.md section 3).

One-to-many (DAC, "divide and conquer"). Meta's decoder (sam3/model/decoder.py, `TransformerDecoder.forward` with
`apply_dac`, used while training) runs its N query embeddings and N reference boxes TWICE in one pass: 2N queries,
the first N one-to-one (o2o, matched by Hungarian matching), the second N one-to-many (o2m, several per target).
No new weights: both halves start from the same embeddings. Per decoder layer:

    self-attention     presence token + o2o queries only; each o2m query gets a zero update, so after the
                       layer's residual and LayerNorm it is LayerNorm(o2m) (Meta's dac_use_selfatt_ln)
    text / image cross-attention, FFN, box refinement     every query on its own, as before

So the halves never see each other, and the o2o half (and the presence token) computes exactly what the plain
decoder computes. Here, over transformers' own modules (no copy of its decoder):
- `torch.func.functional_call` runs the decoder with `query_embed.weight` and `reference_points.weight` replaced
  by their two stacked copies [2N, D] / [2N, 4] (gradients of both halves flow into the one parameter);
- hooks on each layer's `self_attn` cut its inputs to the first 1 + N tokens and pad its output with zeros for the
  N o2m tokens.

Presence logits. `Sam3DetrDecoder` clamps each layer's presence logit to +-10 before returning it; Meta's decoder
calls a non-in-place clamp and discards the result, so its logits are unclamped. A clamp kills the gradient of a
confidently wrong presence (logit 12 on an absent prompt: loss 6, gradient 0), so a forward hook on
`presence_head` keeps each layer's raw logit and those are returned instead.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers.models.sam3.modeling_sam3 import Sam3DetrDecoder

from sam3.memory import REPLAY_ATTR


@dataclass
class DecoderPass:
    """Every layer's outputs of one decoder pass over Q (image, prompt) pairs, L layers.

    hidden           float [L, Q, K, D]  after the decoder's output norm; K = N, or 2N with one_to_many (o2o first)
    reference_boxes  float [L, Q, K, 4]  the cxcywh box each layer starts from (sigmoid space)
    presence_logits  float [L, Q]        unclamped
    """

    hidden: torch.Tensor
    reference_boxes: torch.Tensor
    presence_logits: torch.Tensor


def run_decoder(decoder: Sam3DetrDecoder, *, one_to_many: bool = False, **inputs) -> DecoderPass:
    """`decoder(**inputs)` (keyword arguments of `Sam3DetrDecoder.forward`), with raw presence logits and, when
    `one_to_many`, the 2N DAC queries (module docstring)."""
    presence: list[torch.Tensor] = []
    with ExitStack() as stack:
        handle = decoder.presence_head.register_forward_hook(lambda _m, _i, out: presence.append(out))
        stack.callback(handle.remove)
        if one_to_many:
            stack.enter_context(_o2o_only_self_attention(decoder, decoder.config.num_queries))
            doubled = {
                "query_embed.weight": decoder.query_embed.weight.repeat(2, 1),
                "reference_points.weight": decoder.reference_points.weight.repeat(2, 1),
            }
            out = functional_call(decoder, doubled, args=(), kwargs=inputs, strict=False)
        else:
            out = decoder(**inputs)
    raw = torch.stack(presence).reshape(len(presence), -1)  # [L, Q], from L outputs [Q, 1, 1] of the head
    return DecoderPass(hidden=out.intermediate_hidden_states, reference_boxes=out.reference_boxes, presence_logits=raw)


@contextmanager
def _o2o_only_self_attention(decoder: Sam3DetrDecoder, num_o2o: int):
    """While active, every decoder layer's self-attention sees the presence token and the first `num_o2o` queries
    only (tokens 0 .. num_o2o), and returns a zero update for the others.

    Each layer also carries, while active, how to put its hooks back (`sam3.memory.REPLAY_ATTR`): a layer under
    activation checkpointing runs its forward again in the backward, after this context has closed, and must
    compute the same thing then.
    """
    with ExitStack() as stack:
        for layer in decoder.layers:
            stack.enter_context(o2o_only_layer(layer, num_o2o))
            setattr(layer, REPLAY_ATTR, partial(o2o_only_layer, layer, num_o2o))
            stack.callback(delattr, layer, REPLAY_ATTR)
        yield


@contextmanager
def o2o_only_layer(layer: torch.nn.Module, num_o2o: int):
    """While active, `layer.self_attn` sees tokens 0 .. num_o2o only and returns zeros for the tokens after."""
    keep = 1 + num_o2o  # the presence token sits at position 0

    def cut_inputs(_module, args, kwargs):
        if args:  # transformers calls it with keywords; anything else would silently mix the halves
            raise RuntimeError("Sam3DetrDecoderLayer.self_attn was called positionally; the DAC hook needs keywords")
        for name in ("query", "key", "value"):
            kwargs[name] = kwargs[name][:, :keep]
        return args, kwargs

    def pad_output(_module, _args, _kwargs, output):
        attn, *rest = output
        total = attn.shape[1] + num_o2o  # 1 + 2N
        return (F.pad(attn, (0, 0, 0, total - attn.shape[1])), *rest)

    handles = [
        layer.self_attn.register_forward_pre_hook(cut_inputs, with_kwargs=True),
        layer.self_attn.register_forward_hook(pad_output, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
