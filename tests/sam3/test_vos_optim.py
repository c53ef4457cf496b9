"""`sam3.video.optim`: the AdamW groups (lr after layer decay, weight decay) and the cosine schedule, by hand.

Toy models carry the parameter names of transformers' trackers, so each expected rate is written out:
Hiera (Sam2VideoModel) with L = 3 blocks and SAM 3's ViT (Sam3TrackerVideoModel) with L = 2, layer decay d = 0.5,
lr_vision = 1e-3, lr = 1e-2:

    block j      1e-3 * 0.5^(L - j)        patch embedding  1e-3 * 0.5^(L + 1)
    pos embeds   1e-3                      neck             1e-3             the rest  1e-2
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sam3.video.config import VosOptimConfig
from sam3.video.optim import build_optimizer, param_groups, schedule_factor, set_lr, trunk_blocks

CONFIG = VosOptimConfig(lr=1e-2, lr_vision=1e-3, layer_decay=0.5, weight_decay=0.1, final_factor=0.1)


def _block() -> nn.Module:
    block = nn.Module()
    block.layer_norm1 = nn.LayerNorm(4)
    block.mlp = nn.Linear(4, 4)
    return block


def _hiera_model(num_blocks: int = 3) -> nn.Module:
    """vision_encoder.backbone.{pos_embed, pos_embed_window, patch_embed.projection, blocks.j}, neck, and two
    tracker parts: the names of a Sam2VideoModel."""
    backbone = nn.Module()
    backbone.pos_embed = nn.Parameter(torch.zeros(1, 4, 2, 2))
    backbone.pos_embed_window = nn.Parameter(torch.zeros(1, 4, 2, 2))
    backbone.patch_embed = nn.Module()
    backbone.patch_embed.projection = nn.Conv2d(3, 4, 1)
    backbone.blocks = nn.ModuleList(_block() for _ in range(num_blocks))
    vision = nn.Module()
    vision.backbone = backbone
    vision.neck = nn.Conv2d(4, 4, 1)
    model = nn.Module()
    model.vision_encoder = vision
    model.mask_decoder = nn.Linear(4, 4)
    model.memory_encoder = nn.LayerNorm(4)
    model.no_memory_embedding = nn.Parameter(torch.zeros(1, 4))
    return model


def _vit_model(num_blocks: int = 2) -> nn.Module:
    """vision_encoder.backbone.{embeddings.position_embeddings, embeddings.patch_embeddings, layer_norm, layers.j}:
    the names of a Sam3TrackerVideoModel's ViT."""
    embeddings = nn.Module()
    embeddings.position_embeddings = nn.Parameter(torch.zeros(1, 4, 4))
    embeddings.patch_embeddings = nn.Linear(3, 4, bias=False)
    backbone = nn.Module()
    backbone.embeddings = embeddings
    backbone.layer_norm = nn.LayerNorm(4)
    backbone.layers = nn.ModuleList(_block() for _ in range(num_blocks))
    vision = nn.Module()
    vision.backbone = backbone
    model = nn.Module()
    model.vision_encoder = vision
    model.mask_decoder = nn.Linear(4, 4)
    return model


def _by_name(groups: list[dict]) -> dict[str, tuple[str, float, float]]:
    return {name: (g["component"], g["base_lr"], g["weight_decay"]) for g in groups for name in g["names"]}


def test_hiera_groups_by_hand():
    got = _by_name(param_groups(_hiera_model(), CONFIG))
    v, t = 1e-3, 1e-2
    expected = {
        "vision_encoder.backbone.pos_embed": ("vision", v, 0.1),  # lr override only; weight decay as the reference
        "vision_encoder.backbone.pos_embed_window": ("vision", v, 0.1),
        "vision_encoder.backbone.patch_embed.projection.weight": ("vision", v * 0.5**4, 0.1),
        "vision_encoder.backbone.patch_embed.projection.bias": ("vision", v * 0.5**4, 0.0),
        "vision_encoder.backbone.blocks.0.layer_norm1.weight": ("vision", v * 0.5**3, 0.0),
        "vision_encoder.backbone.blocks.0.mlp.weight": ("vision", v * 0.5**3, 0.1),
        "vision_encoder.backbone.blocks.1.mlp.weight": ("vision", v * 0.5**2, 0.1),
        "vision_encoder.backbone.blocks.2.mlp.weight": ("vision", v * 0.5, 0.1),  # the last block: x d
        "vision_encoder.backbone.blocks.2.mlp.bias": ("vision", v * 0.5, 0.0),
        "vision_encoder.neck.weight": ("vision", v, 0.1),
        "mask_decoder.weight": ("tracker", t, 0.1),
        "mask_decoder.bias": ("tracker", t, 0.0),
        "memory_encoder.weight": ("tracker", t, 0.0),  # a LayerNorm's weight
        "no_memory_embedding": ("tracker", t, 0.1),
    }
    for name, (component, lr, decay) in expected.items():
        assert got[name][0] == component, name
        assert got[name][1] == pytest.approx(lr, rel=1e-12), name
        assert got[name][2] == decay, name
    assert set(got) == {name for name, _ in _hiera_model().named_parameters()}


def test_vit_groups_by_hand():
    got = _by_name(param_groups(_vit_model(), CONFIG))
    v = 1e-3
    assert got["vision_encoder.backbone.embeddings.position_embeddings"][1] == pytest.approx(v)
    assert got["vision_encoder.backbone.embeddings.patch_embeddings.weight"][1] == pytest.approx(v * 0.5**3)
    assert got["vision_encoder.backbone.layer_norm.weight"][1:] == pytest.approx((v * 0.5**3, 0.0))
    assert got["vision_encoder.backbone.layers.0.mlp.weight"][1] == pytest.approx(v * 0.5**2)
    assert got["vision_encoder.backbone.layers.1.mlp.weight"][1] == pytest.approx(v * 0.5)
    assert got["mask_decoder.weight"][1] == pytest.approx(1e-2)


def test_trunk_blocks_and_frozen_parameters_left_out():
    model = _hiera_model(num_blocks=4)
    assert trunk_blocks(model) == ("hiera", 4)
    assert trunk_blocks(_vit_model(3)) == ("vit", 3)
    model.vision_encoder.requires_grad_(False)  # loop.freeze image_encoder
    optimizer = build_optimizer(model, CONFIG)
    names = {name for group in optimizer.param_groups for name in group["names"]}
    assert names == {"mask_decoder.weight", "mask_decoder.bias", "memory_encoder.weight", "memory_encoder.bias",
                     "no_memory_embedding"}  # fmt: skip
    assert {group["component"] for group in optimizer.param_groups} == {"tracker"}
    with pytest.raises(ValueError, match="no image-encoder trunk"):
        trunk_blocks(nn.Linear(2, 2))


def test_cosine_schedule_values():
    """T = 10, f = 0.1: 1 at step 0, (1 + f) / 2 = 0.55 halfway, f at the end; (1 + cos(pi / 5)) / 2 at step 2."""
    assert schedule_factor(0, 10, 0, 0.1) == pytest.approx(1.0)
    assert schedule_factor(5, 10, 0, 0.1) == pytest.approx(0.55)
    assert schedule_factor(10, 10, 0, 0.1) == pytest.approx(0.1)
    assert schedule_factor(2, 10, 0, 0.1) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 5)) / 2)


def test_warmup_then_cosine():
    """W = 2 of T = 10: 0, 0.5, then the cosine over the 8 steps left: 1 at step 2, 0.55 at step 6, 0.1 at 10."""
    factors = [schedule_factor(s, 10, 2, 0.1) for s in (0, 1, 2, 6, 10)]
    assert factors == pytest.approx([0.0, 0.5, 1.0, 0.55, 0.1])


def test_set_lr_writes_each_group_from_its_base():
    optimizer = build_optimizer(_hiera_model(), CONFIG)
    set_lr(optimizer, 5, 10, CONFIG, scale=0.5)  # halfway (x 0.55), after one rollback (x 0.5)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["base_lr"] * 0.55 * 0.5)
    set_lr(optimizer, 10, 10, CONFIG)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["base_lr"] * 0.1)
