"""The decoder's from-scratch priors (sam3.scratch), checked through the real transformers decoder."""

import math

import pytest
import torch

from sam3.model import load_model
from sam3.scratch import RPB_OUTSIDE_SLOPE, grid_reference_boxes


def test_grid_reference_boxes_by_hand():
    boxes = grid_reference_boxes(16)  # 4 x 4 cells of side 0.25
    assert boxes[0].tolist() == [0.125, 0.125, 0.25, 0.25]
    assert boxes[5].tolist() == [0.375, 0.375, 0.25, 0.25]  # row 1, column 1
    assert boxes[15].tolist() == [0.875, 0.875, 0.25, 0.25]
    five = grid_reference_boxes(5)  # a 3 x 3 grid, the first 5 cells
    assert five[4].tolist() == pytest.approx([0.5, 0.5, 1 / 3, 1 / 3])
    assert five[3].tolist() == pytest.approx([1 / 6, 0.5, 1 / 3, 1 / 3])


def test_random_models_start_from_the_grid():
    decoder = load_model("tiny").model.detr_decoder
    torch.testing.assert_close(decoder.reference_points.weight.detach().sigmoid(), grid_reference_boxes(16))


def _log_scaled(d: float) -> float:
    """The decoder's encoding of a coordinate difference: sign(d) log2(8 |d| + 1) / 3."""
    return math.copysign(math.log2(8 * abs(d) + 1) / 3, d)


def test_rpb_is_zero_inside_the_reference_box_and_grows_with_the_distance_outside():
    decoder = load_model("tiny").model.detr_decoder
    box = torch.tensor([[[0.5, 0.5, 0.5, 0.5]]])  # cxcywh: x and y from 0.25 to 0.75
    bias = decoder._get_rpb_matrix(box, (torch.tensor(16), torch.tensor(16)))  # [1, heads, 1, 16 * 16]
    heads = bias.shape[1]
    bias = bias[0, :, 0].reshape(heads, 16, 16)  # [head, row, column]; cell coordinate = index / 16
    assert (bias == bias[0]).all()  # every head the same
    bias = bias[0]
    # inside: columns and rows 4..12 (0.25 <= u <= 0.75)
    assert bias[4:13, 4:13].abs().max() == 0
    # column 0 (u = 0), row inside: 0.25 before the low edge
    left = -RPB_OUTSIDE_SLOPE * _log_scaled(0.25)
    assert bias[8, 0].item() == pytest.approx(left, rel=1e-5)
    assert left == pytest.approx(-4.2266, abs=1e-4)  # -8 * log2(3) / 3
    # column 15 (u = 0.9375): 0.1875 past the high edge
    assert bias[8, 15].item() == pytest.approx(-RPB_OUTSIDE_SLOPE * _log_scaled(0.1875), rel=1e-5)
    # the corner cell: outside on both axes, the two terms add
    assert bias[0, 0].item() == pytest.approx(2 * left, rel=1e-5)
    # farther outside, more negative
    assert bias[8, 0] < bias[8, 2] < bias[8, 3] < 0


def test_silent_rpb_units_still_learn():
    """Hidden units beyond the two of the prior start with zero output weights but live inputs: they get gradients."""
    decoder = load_model("tiny").model.detr_decoder
    box = torch.tensor([[[0.4, 0.6, 0.3, 0.2]]])
    bias = decoder._get_rpb_matrix(box, (torch.tensor(8), torch.tensor(8)))
    (bias * torch.randn_like(bias)).sum().backward()
    grad = decoder.box_rpb_embed_x.layer2.weight.grad  # [heads, hidden]
    assert grad[:, 2:].abs().sum() > 0


def test_without_priors_the_model_is_transformers_initialisation():
    plain = load_model("tiny", scratch_priors=False).model.detr_decoder
    reference = plain.reference_points.weight.detach().sigmoid()
    assert (reference - 0.5).abs().max() < 0.1  # std-0.1 logits: every box near (0.5, 0.5, 0.5, 0.5)
    assert plain.box_rpb_embed_x.layer2.weight.abs().min() > 0  # random, not the prior's zeros
