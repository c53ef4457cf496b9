"""Comparing the weights of two training runs that must agree up to float round-off.

A few SAM 3 parameters have an exact gradient of 0: a bias added to every key of a softmax attention shifts all of
a query's logits by the same amount, which softmax ignores. They are the attention key biases (`*.k_proj.bias`) and
the output biases of the decoder's box relative-position-bias MLPs (`box_rpb_embed_{x,y}.layer2.bias`, one
constant per head added to every key). Their computed gradients are round-off (~1e-9) that differs between two
ways of computing the same step (batch 4 vs 2 x 2 accumulation, pixels vs cached features), and AdamW divides by
sqrt(v) + eps, scaling that noise up to updates of ~1e-5 per step (measured with the fused AdamW: at most 2.4e-5
after 3 steps). Every other weight agrees within 1e-5 (the weights are ~0.1-0.5).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

ZERO_GRADIENT_SUFFIXES = (".k_proj.bias", "box_rpb_embed_x.layer2.bias", "box_rpb_embed_y.layer2.bias")
ATOL = 1e-5
ZERO_GRADIENT_ATOL = 1e-4


def assert_same_weights(actual: Iterable[tuple[str, torch.Tensor]], expected: Iterable[tuple[str, torch.Tensor]]):
    """Every named weight of `actual` equals `expected`'s (same names, same order) within the tolerances above."""
    actual, expected = list(actual), list(expected)
    assert [name for name, _ in actual] == [name for name, _ in expected]
    for (name, a), (_, e) in zip(actual, expected, strict=True):
        atol = ZERO_GRADIENT_ATOL if name.endswith(ZERO_GRADIENT_SUFFIXES) else ATOL
        torch.testing.assert_close(a, e, rtol=1e-5, atol=atol, msg=name)
