"""The VOS loss (`sam3.video.losses.vos_loss`), every term against values worked out by hand.

Per object and mask (p = sigmoid(x), P pixels, weights 20 / 1 / 1 / 1):
    focal = mean_pixels alpha_t (1 - p_t)^2 BCE(x, y)   alpha_t = 0.25 on positives, 0.75 on negatives
    dice  = 1 - (2 sum p y + 1) / (sum p + sum y + 1)
    iou   = |iou_pred - IoU(x > 0, y)|,  score = BCE(score_logit, any(y))
summed over objects, steps and frames, divided by max(1, num_objects).

Numbers used below (x = logit, BCE(x, 1) = softplus(-x), BCE(x, 0) = softplus(x)):
    sigmoid(0) = 0.5, ln 2 = 0.693147; sigmoid(2) = 0.880797, sigmoid(-2) = 0.119203
    softplus(2) = 2.126928, softplus(-2) = 0.126928, softplus(-1) = 0.313262
    focal of one pixel:
      x = 0, y = 1:  0.25 * 0.5^2 * ln 2                = 0.043322
      x = 0, y = 0:  0.75 * 0.5^2 * ln 2                = 0.129965
      x = 2, y = 1:  0.25 * 0.119203^2 * 0.126928       = 0.000451
      x = -2, y = 0: 0.75 * 0.119203^2 * 0.126928       = 0.001353
      x = 2, y = 0:  0.75 * 0.880797^2 * 2.126928       = 1.237559
      x = -2, y = 1: 0.25 * 0.880797^2 * 2.126928       = 0.412520
"""

from __future__ import annotations

import math

import pytest
import torch

from sam3.host_sync import count_host_syncs
from sam3.video.config import VosLossConfig
from sam3.video.losses import mask_ious, vos_loss
from sam3.video.types import ClipOutput, FrameOutput, FrameStep

LN2 = math.log(2)
CORNER = [[True, False], [False, False]]  # one positive pixel of four


def _step(logits, iou_pred, score, dtype=torch.float32) -> FrameStep:
    """Leaf tensors with gradients: logits (O, M, S, S), iou_pred (O, M), score logits (O, 1)."""
    return FrameStep(
        mask_logits=torch.tensor(logits, dtype=dtype, requires_grad=True),
        iou_pred=torch.tensor(iou_pred, dtype=dtype, requires_grad=True),
        object_score_logits=torch.tensor(score, dtype=dtype, requires_grad=True),
    )


def _clip(*frames: list[FrameStep]) -> ClipOutput:
    return ClipOutput([FrameOutput(frame_index=t, steps=steps) for t, steps in enumerate(frames)])


def _targets(*frames) -> torch.Tensor:
    """(T, O, S, S) bool from per-frame lists of per-object masks."""
    return torch.tensor(frames, dtype=torch.bool)


def _zeros_step(iou_pred: float = 0.8) -> FrameStep:
    """One object, one 2 x 2 mask of logits 0, predicted IoU iou_pred, object score logit 0."""
    return _step([[[[0.0, 0.0], [0.0, 0.0]]]], [[iou_pred]], [[0.0]])


def test_each_term_of_one_mask_by_hand():
    """Target CORNER, logits all 0, iou_pred 0.8, score logit 0, N = O = 1.
    focal = (0.043322 + 3 * 0.129965) / 4                      = 0.108304
    dice  = 1 - (2 * 0.5 + 1) / (4 * 0.5 + 1 + 1) = 1 - 2 / 4  = 0.5
    iou   = |0.8 - 0|  (no logit > 0: A empty, IoU = 0 / 1)     = 0.8
    score = BCE(0, 1) = ln 2                                    = 0.693147
    loss  = 20 * 0.108304 + 0.5 + 0.8 + 0.693147                = 4.159232
    """
    losses = vos_loss(_clip([_zeros_step()]), _targets([CORNER]), VosLossConfig())
    assert losses["focal"].item() == pytest.approx(0.108304, abs=1e-6)
    assert losses["dice"].item() == pytest.approx(0.5, abs=1e-6)
    assert losses["iou"].item() == pytest.approx(0.8, abs=1e-6)
    assert losses["object_score"].item() == pytest.approx(LN2, abs=1e-6)
    assert losses["loss"].item() == pytest.approx(4.159232, abs=1e-5)
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in losses.values())


def test_mask_gradient_of_one_mask_by_hand():
    """d loss / d x at x = 0 (p = 0.5, dp/dx = 0.25), through focal (weight 20, mean over 4 pixels) and dice.
    Positive pixel: d/dx 0.25 (1 - p)^2 softplus(-x) = 0.25 * (-2 (1 - p) p (1 - p) ln 2 - (1 - p)^3)
                    = 0.25 * (-0.173287 - 0.125) = -0.074572; * 20 / 4 = -0.372859
                    dice = 1 - N / D, N = 2 sum p y + 1 = 2, D = 4: d/dp = -(2 y D - N) / D^2 = -(8 - 2) / 16
                    = -0.375; * 0.25 = -0.09375.  Total -0.466609
    Negative pixel: d/dx 0.75 p^2 softplus(x) = 0.75 * (2 p p (1 - p) ln 2 + p^3) = 0.75 * (0.173287 + 0.125)
                    = 0.223715; * 20 / 4 = 1.118576; dice: -(0 - 2) / 16 * 0.25 = 0.03125.  Total 1.149826
    The IoU term sends nothing to the logits (a count of binarised pixels); d/d iou_pred = sign(0.8 - 0) = 1;
    d/d score = sigmoid(0) - 1 = -0.5.
    """
    step = _zeros_step()
    vos_loss(_clip([step]), _targets([CORNER]), VosLossConfig())["loss"].backward()
    expected = torch.tensor([[[[-0.466609, 1.149826], [1.149826, 1.149826]]]])
    torch.testing.assert_close(step.mask_logits.grad, expected, atol=1e-5, rtol=0)
    assert step.iou_pred.grad.item() == pytest.approx(1.0)
    assert step.object_score_logits.grad.item() == pytest.approx(-0.5)


def _three_masks(iou_pred) -> FrameStep:
    """One object, target the top row; mask 0 right ([[2, 2], [-2, -2]]), mask 1 unsure (0s), mask 2 inverted."""
    right, unsure, inverted = [[2.0, 2.0], [-2.0, -2.0]], [[0.0, 0.0], [0.0, 0.0]], [[-2.0, -2.0], [2.0, 2.0]]
    return _step([[right, unsure, inverted]], [iou_pred], [[0.0]])


TOP_ROW = [[True, True], [False, False]]


@pytest.mark.parametrize("supervise_all_iou", [True, False])
def test_only_the_lowest_loss_mask_is_trained(supervise_all_iou):
    """Target TOP_ROW (2 of 4 pixels), sum y = 2.
    mask 0: focal = (2 * 0.000451 + 2 * 0.001353) / 4 = 0.000902
            dice = 1 - (2 * 2 * 0.880797 + 1) / (2 + 2 + 1) = 1 - 4.523188 / 5 = 0.095362   20 f + d = 0.113398
    mask 1: focal = (2 * 0.043322 + 2 * 0.129965) / 4 = 0.086643;  dice = 1 - 3 / 5 = 0.4   20 f + d = 2.132868
    mask 2: focal = (2 * 0.412520 + 2 * 1.237559) / 4 = 0.825039
            dice = 1 - (4 * 0.119203 + 1) / 5 = 0.704638                                      20 f + d = 17.2054
    Mask 0 is trained: focal 0.000902, dice 0.095362.
    IoU: mask 0 binarises to the target (IoU 1), mask 1 to nothing (0), mask 2 to the other row (0 / 4 = 0);
    iou_pred (0.9, 0.2, 0.4): L1 (0.1, 0.2, 0.4): all -> mean 0.7 / 3 = 0.233333; else mask 0's 0.1.
    Gradients: masks 1 and 2 get none through focal / dice; d/d iou_pred = sign(pred - IoU) / 3 for every mask with
    supervise_all_iou, else (-1, 0, 0).
    """
    step = _three_masks([0.9, 0.2, 0.4])
    losses = vos_loss(_clip([step]), _targets([TOP_ROW]), VosLossConfig(supervise_all_iou=supervise_all_iou))
    assert losses["focal"].item() == pytest.approx(0.000902, abs=1e-6)
    assert losses["dice"].item() == pytest.approx(0.095362, abs=1e-6)
    assert losses["iou"].item() == pytest.approx(0.233333 if supervise_all_iou else 0.1, abs=1e-6)
    losses["loss"].backward()
    grad = step.mask_logits.grad[0]
    assert torch.count_nonzero(grad[1:]) == 0
    assert torch.all(grad[0] != 0)
    expected_iou_grad = [-1 / 3, 1 / 3, 1 / 3] if supervise_all_iou else [-1.0, 0.0, 0.0]
    torch.testing.assert_close(step.iou_pred.grad[0], torch.tensor(expected_iou_grad))


@pytest.mark.parametrize(("focal_weight", "trained"), [(20.0, 0), (0.0, 1)])
def test_the_choice_weighs_focal_and_dice(focal_weight, trained):
    """Target three pixels of four (all but the bottom right), sum y = 3.
    mask A, logits 0:  focal = (3 * 0.043322 + 0.129965) / 4 = 0.064983;  dice = 1 - (2 * 1.5 + 1) / (2 + 3 + 1)
                       = 0.333333
    mask B, logits 2:  focal = (3 * 0.000451 + 1.237559) / 4 = 0.309728
                       dice = 1 - (2 * 3 * 0.880797 + 1) / (4 * 0.880797 + 3 + 1) = 1 - 6.284782 / 7.523188 = 0.164612
    Weights 20 / 1: A 1.632984 < B 6.359168, A trained; weights 0 / 1: B's dice is lower, B trained.
    """
    step = _step([[[[0.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]]], [[0.5, 0.5]], [[0.0]])
    target = _targets([[[True, True], [True, False]]])
    losses = vos_loss(_clip([step]), target, VosLossConfig(focal_weight=focal_weight))
    focal, dice = [(0.064983, 0.333333), (0.309728, 0.164612)][trained]
    assert losses["focal"].item() == pytest.approx(focal, abs=1e-6)
    assert losses["dice"].item() == pytest.approx(dice, abs=1e-6)


def test_an_absent_object_counts_only_through_its_object_score():
    """Two objects, N = O = 2. Object 0 as in the one-mask test (CORNER, logits 0, iou_pred 0.8, score logit 0);
    object 1 absent (empty target), logits 0, iou_pred 0.3, score logit -1.
    focal = 0.108304 / 2 = 0.054152, dice = 0.5 / 2 = 0.25, iou = 0.8 / 2 = 0.4 (object 1's 0.129965, 1 - 1 / 3
    and 0.3 are zeroed); score = (ln 2 + BCE(-1, 0)) / 2 = (0.693147 + 0.313262) / 2 = 0.503204.
    Gradients of object 1: none to its logits or iou_pred; d/d score = sigmoid(-1) / 2 = 0.134471.
    """
    zeros = [[0.0, 0.0], [0.0, 0.0]]
    step = _step([[zeros], [zeros]], [[0.8], [0.3]], [[0.0], [-1.0]])
    empty = [[False, False], [False, False]]
    losses = vos_loss(_clip([step]), _targets([CORNER, empty]), VosLossConfig())
    assert losses["focal"].item() == pytest.approx(0.054152, abs=1e-6)
    assert losses["dice"].item() == pytest.approx(0.25, abs=1e-6)
    assert losses["iou"].item() == pytest.approx(0.4, abs=1e-6)
    assert losses["object_score"].item() == pytest.approx(0.503204, abs=1e-6)
    losses["loss"].backward()
    assert torch.count_nonzero(step.mask_logits.grad[1]) == 0
    assert step.iou_pred.grad[1].item() == 0.0
    assert step.object_score_logits.grad[1].item() == pytest.approx(0.134471, abs=1e-6)


@pytest.mark.parametrize(("num_objects", "divisor"), [(None, 1.0), (4.0, 4.0), (0.0, 1.0), (torch.tensor(4.0), 4.0)])
def test_every_term_is_divided_by_num_objects(num_objects, divisor):
    """The one-mask test's terms (0.108304, 0.5, 0.8, 0.693147; loss 4.159232) divided by max(1, num_objects):
    None -> O = 1; 4 -> a quarter; 0 -> clamped to 1, as the reference clamps; a device tensor works alike."""
    losses = vos_loss(_clip([_zeros_step()]), _targets([CORNER]), VosLossConfig(), num_objects=num_objects)
    for name, value in [("focal", 0.108304), ("dice", 0.5), ("iou", 0.8), ("object_score", LN2), ("loss", 4.159232)]:
        assert losses[name].item() == pytest.approx(value / divisor, abs=1e-5)


def test_steps_and_frames_are_summed_not_averaged():
    """Frame 0 (target CORNER) has two passes, logits 0, iou_pred 0.8 then 0.6; frame 1 (target all four pixels)
    one pass, logits 0, iou_pred 0.3. Frame 1: focal = 0.043322, dice = 1 - (2 * 2 + 1) / (2 + 4 + 1) = 0.285714,
    IoU(empty, full) = 0 / 4, so iou = 0.3.
    focal = 2 * 0.108304 + 0.043322 = 0.259930;  dice = 0.5 + 0.5 + 0.285714 = 1.285714
    iou = 0.8 + 0.6 + 0.3 = 1.7;  score = 3 ln 2 = 2.079442   (sums over the 3 passes, N = 1)
    """
    full = [[True, True], [True, True]]
    clip = _clip([_zeros_step(0.8), _zeros_step(0.6)], [_zeros_step(0.3)])
    losses = vos_loss(clip, _targets([CORNER], [full]), VosLossConfig())
    assert losses["focal"].item() == pytest.approx(0.259930, abs=1e-6)
    assert losses["dice"].item() == pytest.approx(1.285714, abs=1e-6)
    assert losses["iou"].item() == pytest.approx(1.7, abs=1e-6)
    assert losses["object_score"].item() == pytest.approx(3 * LN2, abs=1e-6)


def test_bf16_inputs_are_scored_in_fp32():
    """bf16 logits / iou_pred / scores whose values bf16 holds exactly (0, 2, 0.75) give the fp32 result, in fp32,
    and their gradients come back in bf16."""
    logits = [[[[2.0, 0.0], [0.0, -2.0]], [[0.0, 2.0], [2.0, 0.0]]]]
    steps = [_step(logits, [[0.75, 0.5]], [[2.0]], dtype) for dtype in (torch.float32, torch.bfloat16)]
    target = _targets([TOP_ROW])
    fp32, bf16 = (vos_loss(_clip([s]), target, VosLossConfig()) for s in steps)
    for name in fp32:
        assert bf16[name].dtype == torch.float32
        assert bf16[name].item() == pytest.approx(fp32[name].item(), rel=1e-6)
    bf16["loss"].backward()
    assert steps[1].mask_logits.grad.dtype == torch.bfloat16


def test_mask_ious_by_hand():
    """pred (logit > 0) [1, 1, 0, 0] vs target [1, 0, 1, 0]: 1 / 3; empty vs empty: 0 / max(1, 0) = 0."""
    logits = torch.tensor([[1.0, 1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    target = torch.tensor([[True, False, True, False], [False, False, False, False]])
    torch.testing.assert_close(mask_ious(logits, target), torch.tensor([1 / 3, 0.0]))


def test_gradients_flow_and_no_host_sync():
    """Random logits (3 objects, one absent in frame 1; 3 masks; 8 x 8), two frames, frame 0 with a correction pass:
    the forward and backward make no host sync, every term is finite, the gradients finite and non-zero."""
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(2, 3, 8, 8, generator=gen) > 0.5
    masks[1, 2] = False

    def step() -> FrameStep:
        return FrameStep(
            (torch.randn(3, 3, 8, 8, generator=gen) * 10).requires_grad_(),
            torch.rand(3, 3, generator=gen).requires_grad_(),
            torch.randn(3, 1, generator=gen).requires_grad_(),
        )

    clip = _clip([step(), step()], [step()])
    leaves = [t for f in clip.frames for s in f.steps for t in (s.mask_logits, s.iou_pred, s.object_score_logits)]
    with count_host_syncs() as syncs:
        losses = vos_loss(clip, masks, VosLossConfig())
        losses["loss"].backward()
    assert syncs.total == 0
    assert all(torch.isfinite(v) for v in losses.values())
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all() and torch.count_nonzero(leaf.grad) > 0


def test_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match="mask_logits"):
        vos_loss(_clip([_zeros_step()]), torch.zeros(1, 1, 3, 3, dtype=torch.bool), VosLossConfig())
    with pytest.raises(ValueError, match="frame_index"):
        vos_loss(_clip([_zeros_step()], [_zeros_step()]), _targets([CORNER]), VosLossConfig())
