"""Optimiser groups and the inverse-square-root schedule, checked against hand-computed values."""

import math

import pytest
import torch
from transformers import Sam3Config, Sam3Model

from sam3.optim import OptimConfig, build_optimizer, inverse_sqrt_lr, param_groups, set_lr


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),  # warm-up starts at 0
        (10, 0.5),  # 10 / 20 of the warm-up
        (20, 1.0),  # end of warm-up: s > W is false, so no decay yet
        (29, math.sqrt(20 / 29)),  # sqrt(tau / (s + tau - W)) = sqrt(20 / 29) = 0.8304548
        (80, math.sqrt(20 / 80)),  # = 0.5; cool-down (100 - 80) / 20 = 1 not yet active
        (85, math.sqrt(20 / 85) * 0.75),  # 0.4850713 * (15 / 20) = 0.3638034
        (100, 0.0),  # end of cool-down
        (120, 0.0),  # past the end stays 0, never negative
    ],
)
def test_inverse_sqrt_lr_hand_values(step, expected):
    assert inverse_sqrt_lr(step, total_steps=100, base_lr=1.0) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_inverse_sqrt_lr_scales_with_base_and_ramps_can_be_switched_off():
    assert inverse_sqrt_lr(10, 100, 8e-5) == pytest.approx(4e-5)
    assert inverse_sqrt_lr(0, 100, 1.0, warmup=0, cooldown=0) == 1.0
    assert inverse_sqrt_lr(100, 100, 1.0, warmup=0, cooldown=0, timescale=25) == pytest.approx(math.sqrt(25 / 125))


@pytest.fixture(scope="module")
def full_model_on_meta():
    # the real 840M architecture without allocating memory
    with torch.device("meta"):
        return Sam3Model(Sam3Config())


def _group_of(groups, name):
    return next(g for g in groups if name in g["names"])


def test_groups_follow_the_recipe_on_the_full_architecture(full_model_on_meta):
    groups = param_groups(full_model_on_meta, OptimConfig(), num_vit_blocks=32)
    assert sum(len(g["params"]) for g in groups) == len(list(full_model_on_meta.parameters()))
    block0 = _group_of(groups, "vision_encoder.backbone.layers.0.attention.q_proj.weight")
    assert block0["base_lr"] == pytest.approx(2.5e-5 * 0.9**32) and block0["weight_decay"] == 0.1
    block31 = _group_of(groups, "vision_encoder.backbone.layers.31.mlp.fc1.weight")
    assert block31["base_lr"] == pytest.approx(2.5e-5 * 0.9)
    stem = _group_of(groups, "vision_encoder.backbone.embeddings.patch_embeddings.projection.weight")
    assert stem["base_lr"] == pytest.approx(2.5e-5 * 0.9**33)
    position = _group_of(groups, "vision_encoder.backbone.embeddings.position_embeddings")
    assert position["base_lr"] == pytest.approx(2.5e-5)  # the reference overrides *pos_embed* to 1.0
    prenorm = _group_of(groups, "vision_encoder.backbone.layer_norm.weight")
    assert prenorm["base_lr"] == pytest.approx(2.5e-5 * 0.9**33) and prenorm["weight_decay"] == 0.0
    neck = _group_of(groups, "vision_encoder.neck.fpn_layers.0.proj1.weight")
    assert neck["base_lr"] == pytest.approx(2.5e-5)
    text = _group_of(groups, "text_projection.weight")
    assert text["component"] == "text" and text["base_lr"] == pytest.approx(5e-6)
    bias = _group_of(groups, "detr_decoder.box_head.layer1.bias")
    assert bias["component"] == "detr" and bias["base_lr"] == pytest.approx(8e-5) and bias["weight_decay"] == 0.0
    norm = _group_of(groups, "detr_decoder.output_layer_norm.weight")
    assert norm["weight_decay"] == 0.0


def test_frozen_parameters_get_no_group_and_set_lr_follows_schedule():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    model[0].weight.requires_grad_(False)
    config = OptimConfig(lr_detr=1.0)
    optimizer = build_optimizer(model, config, num_vit_blocks=0)
    names = sorted(n for g in optimizer.param_groups for n in g["names"])
    assert names == ["0.bias", "1.bias", "1.weight"]
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)
    set_lr(optimizer, step=10, total_steps=100, config=config)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.5)] * len(optimizer.param_groups)
