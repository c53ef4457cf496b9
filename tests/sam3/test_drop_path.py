"""Drop-path hooks on transformers' Sam3ViTLayer: Meta's rates, exact per-sample arithmetic on both branches, eval
untouched, seeded draws, activation checkpointing and compile give the same results as the plain eager forward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sam3.compiling import compile_vit_blocks
from sam3.drop_path import META_DROP_PATH, DropPath, attach_drop_path, drop_path_rates, vit_layers
from sam3.errors import ConfigError
from sam3.memory import enable_activation_checkpointing
from sam3.model import Sam3Detector, load_model

GRID, WIDTH = 16, 64  # the tiny model's patch grid at 224 px (224 / 14) and its width


@pytest.fixture(scope="module")
def tiny() -> Sam3Detector:
    return load_model("tiny")


@pytest.fixture
def detector(tiny) -> Sam3Detector:
    """A fresh copy of the tiny detector (layer 0 windowed 8x8, layer 1 global), in training mode."""
    return copy.deepcopy(tiny).train()


def _layer(detector: Sam3Detector, index: int) -> nn.Module:
    return detector.model.vision_encoder.backbone.layers[index]


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def _masks(seed: int, batch: int, rate: float) -> torch.Tensor:
    """The float [2, B] masks the pre-hook draws first thing after `torch.manual_seed(seed)`: keep / (1 - rate)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(2, batch, generator=gen) < 1 - rate).float() / (1 - rate)


def _seed_with(batch: int, rate: float, want) -> int:
    """The first seed whose masks satisfy `want` (a predicate on the [2, B] keep booleans)."""
    return next(s for s in range(1000) if want(_masks(s, batch, rate) > 0))


def _features(detector: Sam3Detector, pixels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return detector.encode_images(pixels, levels=1).levels[-1]


# --- rates and configuration ---


def test_rates_are_metas_linear_schedule():
    rates = drop_path_rates(META_DROP_PATH, 32)
    assert len(rates) == 32
    assert rates[0] == 0.0
    assert rates[-1] == 0.1
    assert rates[1] == 0.1 / 31
    assert rates[16] == pytest.approx(0.1 * 16 / 31, abs=1e-15)
    assert all(a < b for a, b in zip(rates, rates[1:], strict=False))  # strictly increasing
    # torch.linspace(0, r, 1) is [0.]: a single block is the first block, never dropped.
    assert drop_path_rates(0.3, 1) == [0.0]
    assert drop_path_rates(0.3, 2) == [0.0, 0.3]
    assert drop_path_rates(0.0, 4) == [0.0] * 4


@pytest.mark.parametrize("rate", [1.0, -0.01, 1.5, math.nan, "0.1", True])
def test_rate_outside_0_1_is_a_config_error(tiny, rate):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        drop_path_rates(rate, 4)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        attach_drop_path(tiny.model, rate)
    assert _hook_count(tiny.model) == 0


def test_bad_depth_and_mismatched_rates_are_config_errors(tiny):
    with pytest.raises(ConfigError, match="depth"):
        drop_path_rates(0.1, 0)
    with pytest.raises(ConfigError, match="one rate per layer"):
        DropPath(vit_layers(tiny.model), [0.1])
    with pytest.raises(ConfigError, match="no Sam3ViTLayer"):
        attach_drop_path(nn.Linear(2, 2), 0.1)


def test_rate_zero_attaches_nothing(detector):
    before = _hook_count(detector.model)
    drop = attach_drop_path(detector.model, 0.0)
    assert drop.rates == (0.0, 0.0)
    assert drop.num_hooks == 0
    assert _hook_count(detector.model) == before


def test_attach_hooks_only_layers_with_a_rate(detector):
    drop = attach_drop_path(detector.model, 0.4)
    assert drop.rates == (0.0, 0.4)  # 2 blocks: linspace(0, 0.4, 2)
    assert drop.num_hooks == 3
    assert _hook_count(_layer(detector, 0)) == 0
    layer = _layer(detector, 1)
    assert len(layer.layer_norm1._forward_pre_hooks) == 1
    assert len(layer.attention._forward_hooks) == 1
    assert len(layer.mlp._forward_hooks) == 1
    assert len(layer._forward_pre_hooks) == 0  # nothing on the layer itself (outside the checkpoint)
    keys = list(detector.model.state_dict())
    drop.remove()
    assert _hook_count(detector.model) == 0
    assert list(detector.model.state_dict()) == keys


# --- the forward ---


def test_eval_mode_is_bitwise_untouched(detector):
    detector.eval()
    pixels = torch.randn(3, 3, 224, 224)
    plain = _features(detector, pixels)
    drop = attach_drop_path(detector.model, 0.9)
    hooked = _features(detector, pixels)
    assert torch.equal(plain, hooked)
    # A train/eval round trip leaves no mask behind that eval would read.
    detector.train()
    _features(detector, pixels)
    detector.eval()
    assert torch.equal(plain, _features(detector, pixels))
    drop.remove()


def test_training_changes_the_samples_of_a_batch(detector):
    pixels = torch.randn(6, 3, 224, 224)
    plain = _features(detector, pixels)
    drop = attach_drop_path(detector.model, 0.5)
    hooked = _features(detector, pixels, seed=0)
    drop.remove()
    # Layer 1 (rate 0.5) drops each sample's branch or keeps it scaled by 2, so every sample's features move.
    assert all(not torch.allclose(plain[b], hooked[b]) for b in range(6))
    assert torch.isfinite(hooked).all()


def _attention_branch(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The global layer's attention branch attn(norm1(x)) [B, H, W, C], computed from its sub-modules (no hooks)."""
    normed = layer.layer_norm1(x)
    return layer.attention(normed, layer.rotary_emb(normed, layer.position_ids))[0]


def test_global_layer_arithmetic_is_exact(detector):
    """y = h + d_mlp * mlp(norm2(h)), h = x + d_attn * attn(norm1(x)), d = keep / (1 - r), bitwise, all 4 cases."""
    layer, rate, batch = _layer(detector, 1), 0.5, 8
    assert layer.window_size == 0
    x = torch.randn(batch, GRID, GRID, WIDTH)
    seed = _seed_with(batch, rate, lambda k: {(bool(a), bool(m)) for a, m in k.T} == {(0, 0), (0, 1), (1, 0), (1, 1)})
    masks = _masks(seed, batch, rate)
    with torch.no_grad():
        attn = _attention_branch(layer, x)
        h = x + attn * masks[0].view(-1, 1, 1, 1)
        expected = h + layer.mlp(layer.layer_norm2(h)) * masks[1].view(-1, 1, 1, 1)
        plain = layer(x)
        drop = DropPath([layer], [rate])
        torch.manual_seed(seed)
        out = layer(x)
    drop.remove()
    assert set(masks.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(out, expected)
    both_dropped = (masks == 0).all(0)
    assert torch.equal(out[both_dropped], x[both_dropped])  # the block is the identity for that sample
    assert not torch.allclose(out, plain)


def test_windowed_layer_mask_is_per_sample_over_all_windows(detector):
    layer, rate = _layer(detector, 0), 0.5
    assert layer.window_size == 8  # 16 x 16 grid: 4 windows per sample, batch-major after window_partition
    x = torch.randn(2, GRID, GRID, WIDTH)
    # Sample 0's attention kept, sample 1's dropped; both MLP branches dropped, so the output is norm2's input h.
    seed = _seed_with(2, rate, lambda k: k[0].tolist() == [True, False] and not k[1].any())
    seen = []
    capture = layer.layer_norm2.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    with torch.no_grad():
        layer(x)
        drop = DropPath([layer], [rate])
        torch.manual_seed(seed)
        out = layer(x)
    drop.remove()
    capture.remove()
    attn = seen[0] - x  # the plain layer's un-partitioned attention branch, up to rounding
    assert torch.equal(out, seen[1])
    assert torch.equal(out[1], x[1])  # all 4 windows of sample 1 dropped: exactly the input
    torch.testing.assert_close(out[0], x[0] + 2 * attn[0], rtol=1e-5, atol=1e-5)  # all 4 windows of sample 0 kept
    # Window-major masks (repeat instead of repeat_interleave) would drop some of sample 0's windows.
    for rows in (slice(0, 8), slice(8, 16)):
        for cols in (slice(0, 8), slice(8, 16)):
            assert not torch.allclose(out[0, rows, cols], x[0, rows, cols])
            assert attn[1, rows, cols].abs().max() > 1e-3  # the branch dropped in sample 1 was not zero anyway


def test_same_seed_same_output_different_seed_different_masks(detector):
    pixels = torch.randn(4, 3, 224, 224)
    drop = attach_drop_path(detector.model, 0.5)
    first, again = _features(detector, pixels, seed=1), _features(detector, pixels, seed=1)
    assert torch.equal(first, again)
    assert not torch.equal(_masks(1, 4, 0.5), _masks(2, 4, 0.5))  # seed 2 draws other masks...
    assert not torch.allclose(first, _features(detector, pixels, seed=2))  # ...so other features
    drop.remove()


def test_remove_restores_the_plain_forward(detector):
    pixels = torch.randn(3, 3, 224, 224)
    plain = _features(detector, pixels, seed=5)
    drop = attach_drop_path(detector.model, 0.6)
    assert not torch.allclose(_features(detector, pixels, seed=5), plain)
    drop.remove()
    assert drop.num_hooks == 0
    assert _hook_count(detector.model) == 0
    assert torch.equal(_features(detector, pixels, seed=5), plain)
    drop.remove()  # idempotent


# --- gradients ---


def test_gradients_flow_through_kept_samples_only(detector):
    layer, rate, batch = _layer(detector, 1), 0.5, 4
    # Sample 0: both branches dropped; sample 1: attention dropped, MLP kept.
    seed = _seed_with(batch, rate, lambda k: not k[:, 0].any() and k[:, 1].tolist() == [False, True])
    x = torch.randn(batch, GRID, GRID, WIDTH, requires_grad=True)
    drop = DropPath([layer], [rate])
    torch.manual_seed(seed)
    out = layer(x)
    drop.remove()
    attn_params = list(layer.attention.parameters())
    mlp_params = list(layer.mlp.parameters())

    grads = torch.autograd.grad(out[0].sum(), [x, *attn_params, *mlp_params], allow_unused=True, retain_graph=True)
    assert torch.equal(grads[0][0], torch.ones_like(x[0]))  # the identity for sample 0
    assert torch.equal(grads[0][1:], torch.zeros_like(x[1:]))  # attention does not mix samples
    assert all(g is None or not g.any() for g in grads[1:])  # no branch parameter learns from a dropped sample

    grads = torch.autograd.grad(out[1].sum(), [*attn_params, *mlp_params], allow_unused=True)
    attn_grads, mlp_grads = grads[: len(attn_params)], grads[len(attn_params) :]
    assert all(g is None or not g.any() for g in attn_grads)
    assert all(g is not None and g.any() for g in mlp_grads)  # the kept MLP branch learns from sample 1


def _encoder_grads(detector: Sam3Detector, batches: list[torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Gradients of a fixed weighting of the ViT features of `batches` (run one after another, one backward)."""
    detector.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = sum(
        (detector.encode_images(p, levels=1).levels[-1] * (i + 1)).square().mean() for i, p in enumerate(batches)
    )
    loss.backward()
    vision = detector.model.vision_encoder
    return {n: p.grad.clone() for n, p in vision.named_parameters() if p.grad is not None}


def test_activation_checkpointing_recomputes_the_same_masks(tiny):
    plain, checkpointed = copy.deepcopy(tiny).train(), copy.deepcopy(tiny).train()
    # Rate 0.5 on both blocks (the windowed one too) to make a wrong redraw visible in the gradients.
    drops = [DropPath(vit_layers(d.model), [0.5, 0.5]) for d in (plain, checkpointed)]
    report = enable_activation_checkpointing(checkpointed.model)
    assert report.checkpointed["vision_encoder"] == 2
    calls = []
    counter = _layer(checkpointed, 1).layer_norm1.register_forward_pre_hook(lambda m, a: calls.append(1))
    # Two encoder runs before one backward: masks drawn for the first run must not be read by the second's recompute.
    batches = [torch.randn(3, 3, 224, 224), torch.randn(3, 3, 224, 224)]
    expected = _encoder_grads(plain, batches, seed=7)
    got = _encoder_grads(checkpointed, batches, seed=7)
    counter.remove()
    assert len(calls) == 4  # 2 forwards + 2 recomputes: the blocks really were checkpointed
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    other = _encoder_grads(plain, batches, seed=8)  # other masks give other gradients: the masks matter
    assert any(not torch.allclose(other[n], expected[n]) for n in expected)
    for drop in drops:
        drop.remove()


def test_compiled_blocks_draw_the_same_masks(detector):
    pixels = torch.randn(2, 3, 224, 224)
    drop = attach_drop_path(detector.model, 0.5)
    eager = _features(detector, pixels, seed=3)
    compile_vit_blocks(detector.model, backend="aot_eager")  # no C++ compiler needed
    compiled = _features(detector, pixels, seed=3)
    assert torch.equal(compiled, eager)
    assert not torch.equal(_features(detector, pixels, seed=4), eager)
    drop.remove()
