"""Freeze modes on the real full-size architecture (meta device: no memory)."""

import pytest
import torch
from transformers import Sam3Config, Sam3Model

from sam3.freeze import FREEZE_MODES, apply_freeze

FULL_PARAMS = 840_376_374  # docs/RECIPE.md section 1


@pytest.fixture(scope="module")
def model():
    with torch.device("meta"):
        return Sam3Model(Sam3Config())


def _count(model, prefix):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def test_each_mode_freezes_exactly_its_parts(model):
    vision = _count(model, "vision_encoder.")
    text = _count(model, "text_encoder.") + _count(model, "text_projection.")
    detr_encoder, geometry = _count(model, "detr_encoder."), _count(model, "geometry_encoder.")
    expected_frozen = {
        "none": 0,
        "vision": vision,
        "vision_text": vision + text,
        "heads": vision + text + detr_encoder + geometry,
    }
    for mode in FREEZE_MODES:
        counts = apply_freeze(model, mode)
        assert counts["total"] == FULL_PARAMS
        assert counts["frozen"] == expected_frozen[mode], mode
        assert counts["trainable"] == FULL_PARAMS - expected_frozen[mode]
    # decoder heads only: the DETR decoder trains, the fusion encoder does not
    apply_freeze(model, "heads")
    assert model.detr_decoder.box_head.layer1.weight.requires_grad
    assert not model.detr_encoder.layers[0].self_attn.q_proj.weight.requires_grad


def test_also_freeze_and_unknown_mode(model):
    counts = apply_freeze(model, "none", also_freeze=("text_projection.weight",))
    assert counts["frozen"] == model.text_projection.weight.numel()
    with pytest.raises(ValueError, match="unknown freeze mode 'decoder'"):
        apply_freeze(model, "decoder")
