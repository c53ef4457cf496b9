"""Spatial priors for a randomly initialised SAM 3 decoder, so that training from scratch learns to localise.

Only the built-in random models ("tiny", "full": `sam3.model.load_model`) get them; pretrained weights are loaded
as they are. Two decoder parameters are set after transformers' random initialisation:

1. Reference boxes on a grid. Query i starts from cell i (row-major) of a G x G grid, G = ceil(sqrt(N)) for N
   queries: centre ((c + 0.5) / G, (r + 0.5) / G), width = height = 1 / G, stored as logits
   (`reference_points` = inverse_sigmoid(cx, cy, w, h)). Random init puts every reference box near
   (0.5, 0.5, 0.5, 0.5): all queries start alike.

2. A box relative-position bias (RPB) that looks inside the reference box. The decoder's vision cross-attention
   adds, for query box [x0, x1] x [y0, y1] and feature-map cell (u, v) (u = column / W, v = row / H), the bias
   b = mlp_x(f(u - x0), f(u - x1)) + mlp_y(f(v - y0), f(v - y1)),   f(d) = sign(d) log2(8 |d| + 1) / 3,
   each mlp 2 -> hidden -> heads with a ReLU. The prior makes every head's
   mlp(d_lo, d_hi) = -slope * (relu(-d_lo) + relu(d_hi)):
   0 inside the box, and -slope times the log-scaled distance to the box outside it (on each axis; the two add).
   Hidden unit 0 computes relu(-d_lo) and unit 1 relu(d_hi); every other hidden unit keeps its random first
   layer but gets zero output weights, so it starts silent and still learns (its activations are not zero).
   With a random RPB every query attends almost uniformly to the whole image, where content-based localisation
   is slow to emerge.

Measured on generated shapes (bench/learning.py settings, one thread, 1,000 steps, held-out box AP50): random
init 0.008; both priors with slope 4: 0.25, slope 8: 0.37. docs/PERFORMANCE.md and README record the 10-minute
benchmark.
"""

from __future__ import annotations

import math

import torch
from transformers import Sam3Model
from transformers.models.sam3.modeling_sam3 import inverse_sigmoid

RPB_OUTSIDE_SLOPE = 8.0  # bias per unit of log-scaled distance outside the reference box (slope 4 learned slower)


def grid_reference_boxes(num_queries: int) -> torch.Tensor:
    """float [N, 4] cxcywh: query i at cell i (row-major) of the ceil(sqrt(N))-sided grid, side 1 / that size."""
    side = math.ceil(math.sqrt(num_queries))
    index = torch.arange(num_queries)
    cx = (index % side + 0.5) / side
    cy = (index // side + 0.5) / side
    size = torch.full((num_queries,), 1.0 / side)
    return torch.stack([cx, cy, size, size], dim=1)


@torch.no_grad()
def set_rpb_inside_box_prior(mlp: torch.nn.Module, slope: float = RPB_OUTSIDE_SLOPE) -> None:
    """Make a decoder RPB mlp (2 -> hidden -> heads) output -slope * (relu(-d_lo) + relu(d_hi)) for every head."""
    first, second = mlp.layer1, mlp.layer2
    first.weight[:2].zero_()
    first.bias[:2].zero_()
    first.weight[0, 0] = -1.0  # relu(-d_lo): how far before the low edge
    first.weight[1, 1] = 1.0  # relu(d_hi): how far past the high edge
    second.weight.zero_()
    second.bias.zero_()
    second.weight[:, :2] = -slope


@torch.no_grad()
def apply_scratch_priors(model: Sam3Model, slope: float = RPB_OUTSIDE_SLOPE) -> None:
    """Set the grid reference boxes and the inside-the-box RPB (module docstring) on a random `model`, in place."""
    decoder = model.detr_decoder
    boxes = grid_reference_boxes(decoder.reference_points.num_embeddings).to(decoder.reference_points.weight)
    decoder.reference_points.weight.copy_(inverse_sigmoid(boxes))
    set_rpb_inside_box_prior(decoder.box_rpb_embed_x, slope)
    set_rpb_inside_box_prior(decoder.box_rpb_embed_y, slope)
