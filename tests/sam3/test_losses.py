"""SAM 3 criterion, every term against values worked out by hand (docs/RECIPE.md section 3).

    loss_bbox     = 5 * sum_matched |b - g|_1 / N_b
    loss_giou     = 2 * sum_matched (1 - GIoU(b, g)) / N_b
    loss_ce       = 20 * [sum_matched 10 * BCE(x, t) + sum_unmatched BCE(x, 0) * p^2] / (N_q * N),
                    t = max(p^0.25 * IoU^0.75, 0.01) detached; pairs of queries without targets count 0
      (focal)     = 2 * sum_all_pairs alpha_t (1 - p_t)^2 BCE(x, y) / N_b
    loss_presence = 20 * sum_q 0.5 * BCE(presence_x, has_target) / N_q
    loss_mask     = 200 * sum_matched mean_pixels focal(x, m) / N_b
    loss_dice     = 10 * sum_matched [1 - (2 sum p m + 1) / (sum p + sum m + 1)] / N_b
with p = sigmoid(x), BCE(x, y) = softplus(x) - y x, N_b = max(1, target boxes), N_q = max(1, queries).

Numbers used below (x = logit):
    sigmoid(1) = 0.731059, sigmoid(-1) = 0.268941, sigmoid(2) = 0.880797, sigmoid(-2) = 0.119203
    softplus(1) = 1.313262, softplus(-1) = 0.313262, softplus(2) = 2.126928, softplus(-2) = 0.126928,
    softplus(-0.5) = 0.474077
"""

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sam3.config import LossConfig
from sam3.errors import ConfigError
from sam3.losses import Criterion, normalisers
from sam3.mask_losses import dice_loss

# The standard case: one query, one target g, two predictions.
#   g      = (0.5, 0.5, 0.2, 0.2) cxcywh = (0.4, 0.4, 0.6, 0.6) xyxy
#   pred 0 = (0.6, 0.5, 0.2, 0.2) = (0.5, 0.4, 0.7, 0.6), logit +1: g moved right by 0.1
#   pred 1 = (0.2, 0.2, 0.1, 0.1) = (0.15, 0.15, 0.25, 0.25), logit -1: far away
# Matching: pred 0 costs 5 * 0.1 + 2 * c_cls(1) - 2 * (1/3) < 1 while pred 1 costs 5 * 0.8 + ... > 4: pred 0 wins.
# pred 0 vs g: intersection 0.1 x 0.2 = 0.02, union 0.04 + 0.04 - 0.02 = 0.06, IoU = 1/3; the enclosing box
# (0.4, 0.4, 0.7, 0.6) has area 0.06 = union, so GIoU = 1/3.
TARGET = [0.5, 0.5, 0.2, 0.2]
PRED_BOXES = [[0.6, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]
PRED_LOGITS = [1.0, -1.0]
PRESENCE = 0.5


def plain(**settings) -> LossConfig:
    """The recipe's weights without the sqrt(queries) scale: the hand-worked values below are of the plain sums."""
    return LossConfig(**{"scale_by_sqrt_num_queries": False, **settings})


def _outputs(logits, boxes, presence, masks=None) -> dict:
    """Leaf tensors with gradients, shaped as the model returns them."""
    out = {
        "pred_logits": torch.tensor(logits, requires_grad=True),
        "pred_boxes": torch.tensor(boxes, requires_grad=True),
        "presence_logits": torch.tensor(presence, requires_grad=True),
    }
    if masks is not None:
        out["pred_masks"] = torch.tensor(masks, requires_grad=True)
    return out


def _standard() -> tuple[dict, list[dict]]:
    return _outputs([PRED_LOGITS], [PRED_BOXES], [PRESENCE]), [{"boxes": torch.tensor([TARGET])}]


def test_box_l1_and_giou_by_hand():
    """N_b = 1 target box.
    loss_bbox = 5 * (|0.6 - 0.5| + 0 + 0 + 0) / 1 = 0.5
    loss_giou = 2 * (1 - 1/3) / 1 = 1.333333
    """
    outputs, targets = _standard()
    losses = Criterion(plain())(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.5, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(4 / 3, abs=1e-5)  # torchvision adds 1e-7 to denominators


def test_identical_prediction_and_target_give_zero_box_loss():
    """Two targets equal to predictions 2 and 0 (prediction 1 is elsewhere): both are matched exactly,
    L1 = 0 and GIoU = 1, so loss_bbox = 0 and loss_giou = 0 (up to torchvision's 1e-7 eps in the GIoU)."""
    boxes = [[0.3, 0.3, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1], [0.6, 0.4, 0.3, 0.1]]
    outputs = _outputs([[0.0, 0.0, 0.0]], [boxes], [0.0])
    targets = [{"boxes": torch.tensor([boxes[2], boxes[0]])}]
    losses = Criterion(plain())(outputs, targets)
    assert losses["loss_bbox"].item() == 0.0
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-5)


def test_iou_aware_bce_matched_and_unmatched_by_hand():
    """Matched pred 0: p = 0.731059, IoU = 1/3
        t = 0.731059^0.25 * (1/3)^0.75 = 0.924673 * 0.438691 = 0.405646
        10 * BCE(1, t) = 10 * (softplus(1) - t * 1) = 10 * (1.313262 - 0.405646) = 9.076158
    Unmatched pred 1: p = 0.268941
        BCE(-1, 0) * p^2 = softplus(-1) * 0.072329 = 0.313262 * 0.072329 = 0.022658
    loss_ce = 20 * (9.076158 + 0.022658) / (1 query x 2 predictions) = 90.988158
    """
    outputs, targets = _standard()
    losses = Criterion(plain())(outputs, targets)
    assert losses["loss_ce"].item() == pytest.approx(90.988158, rel=1e-6)


def test_iou_aware_bce_gradients_show_what_is_detached():
    """d loss_ce / d x, with the factor 20 / 2 of the weight and the mean over 2 pairs:
    matched (t detached): d/dx 10 * (softplus(x) - t x) = 10 * (p - t) = 10 * (0.731059 - 0.405646) = 3.254127
        -> 10 * 3.254127 = 32.541267 (if t depended on x this would differ)
    unmatched (p^2 NOT detached, as in the reference): d/dx softplus(x) p^2 = p^3 + 2 p^2 (1 - p) softplus(x)
        = 0.019452 + 2 * 0.072329 * 0.731059 * 0.313262 = 0.019452 + 0.033129 = 0.052581 -> 0.525811
        (a detached p^2 would give p * p^2 = 0.019452 -> 0.194523)
    """
    outputs, targets = _standard()
    Criterion(plain())(outputs, targets)["loss_ce"].backward()
    grad = outputs["pred_logits"].grad[0]
    assert grad[0].item() == pytest.approx(32.541267, rel=1e-5)
    assert grad[1].item() == pytest.approx(0.525811, rel=1e-5)


def test_presence_by_hand():
    """Query 0 has a target (y = 1, x = 0.5): 0.5 * BCE = 0.5 * softplus(-0.5) = 0.5 * 0.474077 = 0.237038
    Query 1 has none (y = 0, x = -1):           0.5 * BCE = 0.5 * softplus(-1)   = 0.5 * 0.313262 = 0.156631
    loss_presence = 20 * (0.237038 + 0.156631) / 2 queries = 3.936693
    Presence logits given as [Q, 1], the shape transformers returns, are flattened to [Q].
    """
    outputs = _outputs([PRED_LOGITS, [2.0, -2.0]], [PRED_BOXES, PRED_BOXES], [[PRESENCE], [-1.0]])
    targets = [{"boxes": torch.tensor([TARGET])}, {"boxes": torch.zeros(0, 4)}]
    losses = Criterion(plain())(outputs, targets)
    assert losses["loss_presence"].item() == pytest.approx(3.936693, rel=1e-6)


def test_query_without_targets_contributes_only_through_presence():
    """A lone negative prompt: logits (2, -2), presence logit -1, 0 target boxes, so N_b = max(1, 0) = 1.
    No match: loss_bbox = loss_giou = 0 exactly. IABCE (the reference with its presence head): the pairs of a
    query without targets are zeroed, loss_ce = 0. loss_presence = 20 * 0.5 * softplus(-1) = 3.132617.
    Gradients: only the presence logit gets one.
    """
    outputs = _outputs([[2.0, -2.0]], [PRED_BOXES], [-1.0])
    losses = Criterion(plain())(outputs, [{"boxes": torch.zeros(0, 4)}])
    assert losses["loss_bbox"].item() == 0.0
    assert losses["loss_giou"].item() == 0.0
    assert losses["loss_ce"].item() == 0.0
    assert losses["loss_presence"].item() == pytest.approx(3.132617, rel=1e-6)
    losses["loss"].backward()
    assert torch.count_nonzero(outputs["pred_logits"].grad) == 0
    assert torch.count_nonzero(outputs["pred_boxes"].grad) == 0
    # d/dx 10 * softplus(x) = 10 * sigmoid(-1) = 2.689414
    assert outputs["presence_logits"].grad.item() == pytest.approx(2.689414, rel=1e-6)


def test_negative_query_with_ce_on_negative_prompts_adds_the_unmatched_term():
    """ce_on_negative_prompts=True: a lone negative prompt (logits 2, -2; presence -1) contributes through presence
    and the unmatched BCE term only:
    x = 2:  softplus(2) * sigmoid(2)^2   = 2.126928 * 0.775803 = 1.650080
    x = -2: softplus(-2) * sigmoid(-2)^2 = 0.126928 * 0.014209 = 0.001804
    loss_ce = 20 * (1.650080 + 0.001804) / (1 query x 2 predictions) = 16.518840
    loss_presence = 3.132617 as without the option; box terms 0.
    """
    outputs = _outputs([[2.0, -2.0]], [PRED_BOXES], [-1.0])
    losses = Criterion(plain(ce_on_negative_prompts=True))(outputs, [{"boxes": torch.zeros(0, 4)}])
    assert losses["loss_ce"].item() == pytest.approx(16.518840, rel=1e-5)
    assert losses["loss_presence"].item() == pytest.approx(3.132617, rel=1e-6)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert losses["loss"].item() == pytest.approx(16.518840 + 3.132617, rel=1e-5)


def test_negative_query_still_counts_in_the_iabce_mean():
    """The standard query plus a negative one: the negative adds 0 to the sum but 2 pairs to the count, so
    loss_ce = 20 * (9.076158 + 0.022658 + 0 + 0) / (2 queries x 2 predictions) = 45.494079; box terms unchanged."""
    outputs = _outputs([PRED_LOGITS, [2.0, -2.0]], [PRED_BOXES, PRED_BOXES], [PRESENCE, -1.0])
    targets = [{"boxes": torch.tensor([TARGET])}, {"boxes": torch.zeros(0, 4)}]
    losses = Criterion(plain())(outputs, targets)
    assert losses["loss_ce"].item() == pytest.approx(45.494079, rel=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0.5, abs=1e-6)


def test_focal_class_loss_by_hand():
    """class_loss="focal", alpha 0.25, gamma 2, weight 2, N_b = 1:
    matched pred 0, y = 1, x = 1:   0.25 * (1 - 0.731059)^2 * softplus(-1) = 0.25 * 0.072329 * 0.313262 = 0.005665
    unmatched pred 1, y = 0, x = -1: 0.75 * 0.268941^2 * softplus(-1)      = 0.75 * 0.072329 * 0.313262 = 0.016994
    loss_ce = 2 * (0.005665 + 0.016994) / 1 = 0.045316
    """
    outputs, targets = _standard()
    losses = Criterion(plain(class_loss="focal"))(outputs, targets)
    assert losses["loss_ce"].item() == pytest.approx(0.045316, rel=1e-4)
    assert losses["loss_bbox"].item() == pytest.approx(0.5, abs=1e-6)


def test_focal_class_loss_covers_negative_prompts():
    """A lone negative prompt with logits (2, -2), focal: every pair has y = 0 (alpha_t = 0.75, 1 - p_t = p):
    x = 2:  0.75 * 0.880797^2 * softplus(2)  = 0.75 * 0.775803 * 2.126928 = 1.237559
    x = -2: 0.75 * 0.119203^2 * softplus(-2) = 0.75 * 0.014209 * 0.126928 = 0.001353
    loss_ce = 2 * (1.237559 + 0.001353) / N_b (= max(1, 0) = 1) = 2.477823; no box terms.
    """
    outputs = _outputs([[2.0, -2.0]], [PRED_BOXES], [-1.0])
    losses = Criterion(plain(class_loss="focal"))(outputs, [{"boxes": torch.zeros(0, 4)}])
    assert losses["loss_ce"].item() == pytest.approx(2.477823, rel=1e-6)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert losses["loss_presence"].item() == pytest.approx(3.132617, rel=1e-6)


def test_mask_focal_and_dice_by_hand_with_upsampling():
    """One prediction matched to one target (exact box). Its mask logits are 1 x 2: (-2, 2); the target mask is
    2 x 4 with rows (0, 0, 1, 1). Bilinear upsampling (align_corners=False) to 2 x 4 samples the source at
    x = (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, i.e. logits (-2, -1, 1, 2) in both rows.
    Focal per pixel (alpha_t = 0.75 for y = 0, 0.25 for y = 1; 1 - p_t = p for y = 0, 1 - p for y = 1):
        x=-2, y=0: 0.75 * 0.119203^2 * softplus(-2) = 0.001353
        x=-1, y=0: 0.75 * 0.268941^2 * softplus(-1) = 0.016994
        x= 1, y=1: 0.25 * 0.268941^2 * softplus(-1) = 0.005665
        x= 2, y=1: 0.25 * 0.119203^2 * softplus(-2) = 0.000451
        mean over the 8 pixels = (0.001353 + 0.016994 + 0.005665 + 0.000451) / 4 = 0.006115
        loss_mask = 200 * 0.006115 / N_b (1) = 1.223081
    Dice: p = (0.119203, 0.268941, 0.731059, 0.880797) per row; sum p = 2 * 2 = 4, sum m = 4,
        sum p m = 2 * (0.731059 + 0.880797) = 3.223711
        dice = 1 - (2 * 3.223711 + 1) / (4 + 4 + 1) = 1 - 7.447423 / 9 = 0.172509; loss_dice = 1.725086
    """
    outputs = _outputs([[1.0]], [[TARGET]], [PRESENCE], masks=[[[[-2.0, 2.0]]]])
    targets = [
        {"boxes": torch.tensor([TARGET]), "masks": torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1]]], dtype=torch.bool)}
    ]
    losses = Criterion(plain(), with_masks=True)(outputs, targets)
    assert losses["loss_mask"].item() == pytest.approx(1.223081, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(1.725086, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(sum(v.item() for k, v in losses.items() if k != "loss"), rel=1e-6)


def test_dice_of_a_confident_exact_mask_is_near_zero():
    """Logits +-20 on the mask / background: p = 1 - 2e-9 or 2e-9, so sum p m = sum p = sum m = 3 and
    dice = 1 - (2 * 3 + 1) / (3 + 3 + 1) = 0 (to ~1e-8)."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])
    assert dice_loss(40 * mask - 20, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_masks_only_on_the_final_layer_and_zero_without_matches():
    """Mask terms come from the final layer only; a batch of negative prompts gives 0 for both (no match)."""
    outputs = _outputs([[2.0, -2.0]], [PRED_BOXES], [-1.0], masks=[[[[1.0]], [[-1.0]]]])
    outputs["aux_outputs"] = [_outputs([[2.0, -2.0]], [PRED_BOXES], [-1.0])]
    losses = Criterion(plain(), with_masks=True)(outputs, [{"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 2, 2)}])
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    assert "loss_mask_0" not in losses and "loss_dice_0" not in losses


def test_aux_layers_add_suffixed_terms_matched_per_layer():
    """Final layer = the standard case. Aux layer 0 = the same predictions in swapped order (the good one is now
    prediction 1), so it is matched on its own and gives exactly the same values; aux layer 1 = the final layer.
    `loss` = the sum of all 12 terms."""
    outputs, targets = _standard()
    outputs["aux_outputs"] = [
        _outputs([PRED_LOGITS[::-1]], [PRED_BOXES[::-1]], [PRESENCE]),
        _outputs([PRED_LOGITS], [PRED_BOXES], [PRESENCE]),
    ]
    losses = Criterion(plain())(outputs, targets)
    names = ["loss_bbox", "loss_giou", "loss_ce", "loss_presence"]
    assert set(losses) == {*names, *(f"{n}_0" for n in names), *(f"{n}_1" for n in names), "loss"}
    for name in names:
        assert losses[f"{name}_0"].item() == pytest.approx(losses[name].item(), rel=1e-6)
        assert losses[f"{name}_1"].item() == pytest.approx(losses[name].item(), rel=1e-6)
    # 3 layers x (0.5 + 1.333333 + 90.988158 + 4.740770) = 3 x 97.562261
    assert losses["loss"].item() == pytest.approx(3 * 97.562261, rel=1e-6)
    assert losses["loss"].item() == pytest.approx(sum(v.item() for k, v in losses.items() if k != "loss"), rel=1e-6)


def test_gradients_are_finite_on_a_random_batch():
    """3 queries (one negative), 5 predictions, masks 6x6 -> 12x12, 2 aux layers: backward gives finite,
    non-zero gradients for every output tensor, in both classification modes."""
    gen = torch.Generator().manual_seed(0)

    def layer(masks: bool) -> dict:
        out = {
            "pred_logits": torch.randn(3, 5, generator=gen).requires_grad_(),
            "pred_boxes": (0.2 + 0.6 * torch.rand(3, 5, 4, generator=gen)).requires_grad_(),
            "presence_logits": torch.randn(3, generator=gen).requires_grad_(),
        }
        if masks:
            out["pred_masks"] = torch.randn(3, 5, 6, 6, generator=gen).requires_grad_()
        return out

    boxes = [torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]), torch.zeros(0, 4), torch.tensor([TARGET])]
    targets = [{"boxes": b, "masks": torch.rand(len(b), 12, 12, generator=gen) > 0.5} for b in boxes]
    for class_loss in ("iabce", "focal"):
        outputs = layer(masks=True)
        outputs["aux_outputs"] = [layer(masks=False), layer(masks=False)]
        losses = Criterion(plain(class_loss=class_loss), with_masks=True)(outputs, targets)
        losses["loss"].backward()
        leaves = [outputs[k] for k in ("pred_logits", "pred_boxes", "presence_logits", "pred_masks")]
        leaves += [aux[k] for aux in outputs["aux_outputs"] for k in ("pred_logits", "pred_boxes", "presence_logits")]
        for leaf in leaves:
            assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_accumulated_micro_batches_sum_to_the_large_batch():
    """With the whole batch's counts (num_boxes = 1, num_queries = 2) passed to each micro-batch, the two
    micro-batch losses add up to the loss of the 2-query batch: 45.494079 for loss_ce, as worked out above."""
    logits, boxes, presence = [PRED_LOGITS, [2.0, -2.0]], [PRED_BOXES, PRED_BOXES], [PRESENCE, -1.0]
    targets = [{"boxes": torch.tensor([TARGET])}, {"boxes": torch.zeros(0, 4)}]
    whole = Criterion(plain())(_outputs(logits, boxes, presence), targets)
    parts = [
        Criterion(plain())(_outputs(logits[i : i + 1], boxes[i : i + 1], presence[i : i + 1]), targets[i : i + 1], 1, 2)
        for i in range(2)
    ]
    for name in whole:
        assert (parts[0][name] + parts[1][name]).item() == pytest.approx(whole[name].item(), rel=1e-6)
    assert (parts[0]["loss_ce"] + parts[1]["loss_ce"]).item() == pytest.approx(45.494079, rel=1e-6)


def test_reference_sqrt_scaling_is_on_by_default():
    """4 queries (the standard one 4 times): scale_by_sqrt_num_queries (the reference's, on by default) multiplies
    every term by sqrt(4) = 2."""
    outputs = _outputs([PRED_LOGITS] * 4, [PRED_BOXES] * 4, [PRESENCE] * 4)
    targets = [{"boxes": torch.tensor([TARGET])}] * 4
    unscaled = Criterion(plain())(outputs, targets)
    scaled = Criterion()(outputs, targets)
    assert LossConfig().scale_by_sqrt_num_queries
    for name in unscaled:
        assert scaled[name].item() == pytest.approx(2 * unscaled[name].item(), rel=1e-6)
    # 4 targets, N_b = 4: loss_bbox = 5 * 4 * 0.1 / 4 = 0.5, the same as for one query
    assert unscaled["loss_bbox"].item() == pytest.approx(0.5, abs=1e-6)


def test_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="class_loss='bce' is not known: use one of iabce, focal"):
        Criterion(plain(class_loss="bce"))
    outputs, targets = _standard()
    with pytest.raises(ConfigError, match="needs 'pred_masks'"):
        Criterion(plain(), with_masks=True)(outputs, targets)
    outputs["pred_masks"] = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ConfigError, match="query 0 has 1 target boxes but no 'masks'"):
        Criterion(plain(), with_masks=True)(outputs, targets)
    with pytest.raises(ValueError, match="one target dict per query"):
        Criterion(plain())(outputs, targets * 2)


def _normalisers_on_rank(rank: int, init_file: str, counts: list[tuple[float, float]], out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(counts))
    try:
        num_boxes, num_queries = normalisers(*counts[rank], "cpu")
        Path(out_dir, f"rank{rank}.txt").write_text(f"{num_boxes.item()} {num_queries.item()}")
    finally:
        dist.destroy_process_group()


def test_normalisers_are_averaged_over_ranks(tmp_path):
    """Two gloo processes. Rank 0 holds 3 boxes in 2 queries, rank 1 holds 0 boxes in 4 queries:
    N_b = max(1, (3 + 0) / 2) = 1.5 and N_q = max(1, (2 + 4) / 2) = 3 on BOTH ranks.
    Alone (no process group) rank 1's counts would give N_b = max(1, 0) = 1 and N_q = 4."""
    counts = [(3.0, 2.0), (0.0, 4.0)]
    # spawn, not fork: a forked child inherits whatever threads earlier tests left in this process (Prefect's
    # test harness, servers) and can die on them
    args = (str(tmp_path / "init"), counts, str(tmp_path))
    mp.start_processes(_normalisers_on_rank, args=args, nprocs=2, start_method="spawn")
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "1.5 3.0"
    num_boxes, num_queries = normalisers(*counts[1], "cpu")
    assert (num_boxes.item(), num_queries.item()) == (1.0, 4.0)


# One-to-many (DAC) terms. One query, target g = TARGET, 4 o2m slots, every logit 0 (p = 0.5, so BCE(0, t) = log 2
# whatever the soft target t):
#   slot 0 = g, slot 1 = g                    IoU 1    C = 0.3 * 0.5 + 0.7 * 1   = 0.85
#   slot 2 = (0.55, 0.5, 0.2, 0.2)            IoU 0.6  C = 0.15 + 0.7 * 0.6     = 0.57
#            (intersection 0.15 x 0.2 = 0.03, union 0.05; the enclosing box's area is 0.05 too, so GIoU = 0.6)
#   slot 3 = (0.1, 0.1, 0.1, 0.1), far away   IoU 0    C = 0.15
# With o2m_topk 3 the quantile level is 1 - 3/4 = 0.25: position 0.25 * 3 = 0.75 of the sorted C, 0.15 + 0.75 *
# (0.57 - 0.15) = 0.465. Above it and above the threshold 0.4: slots 0, 1, 2, so the target takes 3 slots.
O2M_BOXES = [[TARGET, TARGET, [0.55, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]]
LOG2 = math.log(2)


def _o2m_outputs(masks=None) -> dict:
    """o2o outputs (the standard case) plus o2m outputs in the final dict and in one aux entry, as the model gives."""
    out = _outputs([PRED_LOGITS], [PRED_BOXES], [PRESENCE])
    out["pred_logits_o2m"] = torch.zeros(1, 4, requires_grad=True)
    out["pred_boxes_o2m"] = torch.tensor(O2M_BOXES, requires_grad=True)
    if masks is not None:
        out["pred_masks"] = torch.zeros(1, 2, 2, 2)
        out["pred_masks_o2m"] = torch.tensor(masks, requires_grad=True)
    aux = _outputs([PRED_LOGITS], [PRED_BOXES], [PRESENCE])
    aux.update(pred_logits_o2m=out["pred_logits_o2m"], pred_boxes_o2m=out["pred_boxes_o2m"])
    out["aux_outputs"] = [aux]
    return out


def test_one_to_many_terms_by_hand_a_target_takes_three_slots():
    """Slots 0, 1, 2 matched (N_b = 1), times o2m_weight 2:
    loss_bbox_o2m = 2 * 5 * (0 + 0 + 0.05)                                   = 0.5
    loss_giou_o2m = 2 * 2 * ((1 - 1) + (1 - 1) + (1 - 0.6))                 = 1.6
    loss_ce_o2m   = 2 * 20 * (3 matched * 10 * log 2 + slot 3: log 2 * 0.5^2) / (1 query x 4 slots)
                  = 2 * 20 * 30.25 log 2 / 4                                 = 209.6771
    No presence term of its own. The aux layer's o2m outputs use Hungarian matching (the recipe's
    use_o2m_matcher_on_o2m_aux false): one slot (slot 0, the first of the two perfect ones) takes the target:
    loss_bbox_o2m_0 = 0, loss_ce_o2m_0 = 2 * 20 * (10 log 2 + 3 * log 2 * 0.25) / 4 = 107.5 log 2 = 74.5133."""
    losses = Criterion(plain(o2m_topk=3))(_o2m_outputs(), [{"boxes": torch.tensor([TARGET])}])
    assert losses["loss_bbox_o2m"].item() == pytest.approx(0.5, rel=1e-5)
    assert losses["loss_giou_o2m"].item() == pytest.approx(1.6, abs=1e-4)  # float32 GIoU of equal boxes: 1 - 5e-6
    assert losses["loss_ce_o2m"].item() == pytest.approx(2 * 20 * 30.25 * LOG2 / 4, rel=1e-6)
    assert losses["loss_ce_o2m"].item() == pytest.approx(209.6771, rel=1e-6)
    assert "loss_presence_o2m" not in losses and "loss_presence_o2m_0" not in losses
    assert losses["loss_bbox_o2m_0"].item() == pytest.approx(0.0, abs=1e-7)
    assert losses["loss_ce_o2m_0"].item() == pytest.approx(107.5 * LOG2, rel=1e-6)
    # the total holds them beside the o2o terms, which are what they were without the o2m outputs
    o2o_only = _o2m_outputs()
    for layer in (o2o_only, o2o_only["aux_outputs"][0]):
        del layer["pred_logits_o2m"], layer["pred_boxes_o2m"]
    without = Criterion(plain(o2m_topk=3))(o2o_only, [{"boxes": torch.tensor([TARGET])}])
    o2m_total = sum(value.item() for name, value in losses.items() if "_o2m" in name)
    assert losses["loss"].item() == pytest.approx(without["loss"].item() + o2m_total, rel=1e-6)
    assert set(losses) - set(without) == {name for name in losses if "_o2m" in name}


def test_one_to_many_threshold_removes_matches_above_the_quantile():
    """Threshold 0.6: slot 2 (C 0.57) is above the quantile 0.465 but not the threshold; slots 0 and 1 remain.
    loss_bbox_o2m = loss_giou_o2m = 0 (both are g), loss_ce_o2m = 2 * 20 * (2 * 10 log 2 + 2 * 0.25 log 2) / 4
    = 205 log 2 = 142.0952. The weight scales every term: o2m_weight 1 halves it."""
    targets = [{"boxes": torch.tensor([TARGET])}]
    losses = Criterion(plain(o2m_topk=3, o2m_threshold=0.6))(_o2m_outputs(), targets)
    assert losses["loss_bbox_o2m"].item() == pytest.approx(0.0, abs=1e-7)
    assert losses["loss_giou_o2m"].item() == pytest.approx(0.0, abs=1e-4)  # float32 GIoU of equal boxes
    assert losses["loss_ce_o2m"].item() == pytest.approx(205 * LOG2, rel=1e-6)
    halved = Criterion(plain(o2m_topk=3, o2m_threshold=0.6, o2m_weight=1.0))(_o2m_outputs(), targets)
    assert halved["loss_ce_o2m"].item() == pytest.approx(102.5 * LOG2, rel=1e-6)


def test_one_to_many_all_negative_prompt():
    """No target: nothing matched; the o2m classification of a negative prompt is zeroed like the o2o one (it is
    supervised by the shared presence term alone), so every o2m term is 0 and still in the graph."""
    losses = Criterion(plain())(_o2m_outputs(), [{"boxes": torch.zeros(0, 4)}])
    for name in ("loss_bbox_o2m", "loss_giou_o2m", "loss_ce_o2m", "loss_bbox_o2m_0", "loss_ce_o2m_0"):
        assert losses[name].item() == 0.0, name
    assert losses["loss_presence"].item() > 0


def test_one_to_many_mask_terms_on_the_final_layer():
    """Mask logits 0 (p = 0.5) for every slot, target mask all ones (2 x 2). Matched slots 0, 1, 2:
    focal per pixel = 0.25 * 0.5^2 * log 2; loss_mask_o2m = 2 * 200 * 3 * 0.0625 log 2 = 75 log 2 = 51.986
    dice = 1 - (2 * 2 + 1) / (2 + 4 + 1) = 2/7 per slot; loss_dice_o2m = 2 * 10 * 3 * 2/7 = 17.142857."""
    targets = [{"boxes": torch.tensor([TARGET]), "masks": torch.ones(1, 2, 2, dtype=torch.bool)}]
    losses = Criterion(plain(o2m_topk=3), with_masks=True)(_o2m_outputs(masks=[[[[0.0] * 2] * 2] * 4]), targets)
    assert losses["loss_mask_o2m"].item() == pytest.approx(75 * LOG2, rel=1e-6)
    assert losses["loss_dice_o2m"].item() == pytest.approx(120 / 7, rel=1e-6)
    assert "loss_mask_o2m_0" not in losses  # masks on the final layer only


def best_pair_per_prediction(
    match_query: torch.Tensor, match_pred: torch.Tensor, iou: torch.Tensor, shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: the matched pairs with each (query, prediction) once, keeping its largest IoU; (query, pred, iou),
    each [M'], ordered by query then prediction. What the criterion's classification term means, deduplicated (it
    uses `sam3.losses.best_overlap_per_pair`, which needs no nonzero)."""
    num_preds = shape[1]
    key = match_query * num_preds + match_pred
    best = iou.new_full((shape[0] * num_preds,), -1.0).scatter_reduce(0, key, iou, reduce="amax")
    kept = (best >= 0).nonzero().squeeze(1)
    return kept // num_preds, kept % num_preds, best[kept]


def test_a_slot_matched_to_two_targets_is_one_positive_with_its_best_overlap():
    """Two targets g and g' = (0.55, 0.5, 0.2, 0.2). Slot 0 = g overlaps both (IoU 1 and 0.6). Its classification
    target is the best one (IoU 1), counted once, while both pairs count for the boxes."""
    query, pred, iou = best_pair_per_prediction(
        torch.tensor([0, 0, 0]), torch.tensor([0, 0, 2]), torch.tensor([1.0, 0.6, 0.3]), torch.Size([1, 4])
    )
    assert query.tolist() == [0, 0] and pred.tolist() == [0, 2] and iou.tolist() == pytest.approx([1.0, 0.3])


# Rewritten torchvision losses: the same values and gradients, bit for bit, without their host syncs or memory.


def _boxes_xyxy(gen: torch.Generator, n: int) -> torch.Tensor:
    low = torch.rand(n, 2, generator=gen) * 0.8
    return torch.cat([low, low + 0.02 + torch.rand(n, 2, generator=gen) * 0.5], dim=1)


def test_giou_loss_is_torchvisions_bit_for_bit_without_a_boolean_mask():
    """Random pairs, overlapping and not (about half of them here), plus identical and touching boxes: the same
    values and the same gradients as torchvision's generalized_box_iou_loss, whose `inter[mask] = ...` is a
    data-dependent shape (a host sync on a GPU) in the forward and in the backward."""
    from torchvision.ops import generalized_box_iou_loss

    from sam3.host_sync import count_host_syncs
    from sam3.losses import giou_loss

    gen = torch.Generator().manual_seed(0)
    a, b = _boxes_xyxy(gen, 200), _boxes_xyxy(gen, 200)
    b[:3] = a[:3]  # identical
    b[3] = torch.tensor([a[3, 2], a[3, 1], a[3, 2] + 0.1, a[3, 3]])  # touching: zero-width intersection
    results = []
    for loss_fn in (lambda x, y: generalized_box_iou_loss(x, y, reduction="none"), giou_loss):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        with count_host_syncs() as syncs:
            loss = loss_fn(x, y)
            (loss * torch.linspace(0.5, 2.0, 200)).sum().backward()
        results.append((loss.detach(), x.grad, y.grad, syncs.total))
    (ref, ref_gx, ref_gy, ref_syncs), (got, got_gx, got_gy, got_syncs) = results
    overlapping = ((torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])) > 0).all(dim=1)
    assert 50 < int(overlapping.sum()) < 150
    assert torch.equal(got, ref) and torch.equal(got_gx, ref_gx) and torch.equal(got_gy, ref_gy)
    assert ref_syncs == 10 and got_syncs == 0  # torchvision: 4 boolean reads + 1 write, and their backwards


def test_mask_losses_are_torchvisions_focal_and_the_plain_dice_bit_for_bit():
    """`mask_losses` against the formula it replaced (torchvision's sigmoid_focal_loss, a dice of its own sigmoid),
    values and gradients equal bit for bit: upsampled or not, bool or float targets, other alpha / gamma, alpha < 0
    (no weighting), saturated logits."""
    import torch.nn.functional as F
    from torchvision.ops import sigmoid_focal_loss

    from sam3.mask_losses import mask_losses

    def reference(logits, masks, num_boxes, alpha, gamma):
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        x, t = logits.flatten(1), masks.flatten(1).to(logits.dtype)
        focal = sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma).mean(1).sum() / num_boxes
        return focal, dice_loss(x, t).sum() / num_boxes

    gen = torch.Generator().manual_seed(0)
    for case in range(12):
        h = 3 + case % 4
        size = h if case % 2 else 2 * h + 1
        logits = torch.randn(4, h, h, generator=gen) * 4
        logits[0, 0, 0], logits[1, 0, 0] = 40.0, -40.0
        masks = torch.rand(4, size, size, generator=gen) > 0.5
        if case % 3 == 0:
            masks = masks.float()
        alpha, gamma = [(0.25, 2.0), (0.6, 1.0), (-1.0, 2.0)][case % 3]
        results = []
        for loss_fn in (reference, mask_losses):
            x = logits.clone().requires_grad_()
            focal, dice = loss_fn(x, masks, torch.tensor(3.0), alpha, gamma)
            (1.7 * focal + dice).backward()
            results.append((focal.detach(), dice.detach(), x.grad))
        for ref, got in zip(*results, strict=True):
            assert torch.equal(got, ref), case


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of fn()."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_mask_losses_keep_less_for_the_backward():
    """M = 4 masks of 64 x 64 (logits 16 x 16): torchvision's focal and a separate dice keep 9 full-size float
    tensors for the backward (logits, float targets, two sigmoids, 1 - t, alpha_t, 1 - p_t, its power, the BCE);
    `mask_losses` keeps 6 and a 1-byte mask."""
    from sam3.mask_losses import mask_losses

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 16, 16, generator=gen).requires_grad_()
    masks = torch.rand(4, 64, 64, generator=gen) > 0.5
    full = 4 * 64 * 64 * 4  # bytes of one float [M, H, W]
    scalars = 64  # and a few bytes of scalars (N_b)

    def reference():
        import torch.nn.functional as F
        from torchvision.ops import sigmoid_focal_loss

        x = F.interpolate(logits[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0].flatten(1)
        t = masks.flatten(1).float()
        return sigmoid_focal_loss(x, t).mean(1).sum() + dice_loss(x, t).sum()

    assert 9 * full <= _saved_bytes(reference) < 9 * full + scalars
    saved = _saved_bytes(lambda: mask_losses(logits, masks, torch.tensor(1.0)))
    assert 6 * full + full // 4 <= saved < 6 * full + full // 4 + scalars


def test_the_classification_target_of_a_repeated_slot_needs_no_deduplication():
    """`best_overlap_per_pair` on the pairs of the test above: each pair carries its slot's best IoU, so writing all
    of them gives the soft targets of `best_pair_per_prediction`'s deduplicated pairs, bit for bit."""
    from sam3.losses import best_overlap_per_pair, iou_aware_bce

    query, pred, iou = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 2, 1]), torch.tensor([1.0, 0.6, 0.3, 0.45])
    shape = torch.Size([2, 4])
    assert best_overlap_per_pair(query, pred, iou, shape).tolist() == pytest.approx([1.0, 1.0, 0.3, 0.45])
    logits = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    has_target = torch.tensor([True, True])
    deduplicated = iou_aware_bce(logits, *best_pair_per_prediction(query, pred, iou, shape), has_target, 2.0)
    every_pair = iou_aware_bce(logits, query, pred, best_overlap_per_pair(query, pred, iou, shape), has_target, 2.0)
    assert torch.equal(every_pair, deduplicated)
